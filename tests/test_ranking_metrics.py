import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn.metrics import average_precision_score

from vitfl.evaluation.ranking_metrics import (average_precision, evaluate_ranking, expected_random_ap, hits_at,
                                        k_of_fraction, neuron_to_weight_scores, random_expectation, rank_order,
                                        top_fraction_positives, topk_overlap)
from vitfl.localization.ffn import WeightIndex


def test_hand_made_ranking():
    # 10 items, ranking by score: 9,8,...,0 ; positives {9, 7, 2}
    scores = torch.arange(10, dtype=torch.float)
    pos = torch.tensor([9, 7, 2])
    gt = torch.tensor([0, 0, 0, 0, 0, 0, 0, 5., 4., 3.])  # gt top-2 = {7, 8}
    row = evaluate_ranking(scores, pos, gt_scores=gt, fractions=(0.2, 0.5, 1.0))
    # K=2: top {9, 8} -> 1 hit
    assert row["K@20%"] == 2 and row["hits@20%"] == 1
    assert row["P@20%"] == pytest.approx(0.5) and row["R@20%"] == pytest.approx(1 / 3)
    assert row["F1@20%"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert row["overlap@20%"] == pytest.approx(0.5)  # {9,8} ∩ {7,8}
    # K=5: top {9..5} -> hits {9,7}
    assert row["hits@50%"] == 2 and row["P@50%"] == pytest.approx(0.4) and row["R@50%"] == pytest.approx(2 / 3)
    assert row["overlap@50%"] == pytest.approx(3 / 5)  # gt top-5 = {7,8,9,0,1} (index tie-break) ∩ {9..5}
    assert row["R@100%"] == 1.0
    # ranks of positives: 9 -> 1, 7 -> 3, 2 -> 8: AP = (1/1 + 2/3 + 3/8) / 3
    assert row["AP"] == pytest.approx((1 + 2 / 3 + 3 / 8) / 3)
    assert row["R_precision"] == pytest.approx(2 / 3)  # top-3 {9,8,7}
    assert row["rand_P@20%"] == pytest.approx(0.3) and row["rand_R@20%"] == pytest.approx(0.2)
    # Spearman against scipy
    assert row["spearman"] == pytest.approx(sps.spearmanr(scores.numpy(), gt.numpy()).statistic)
    # p_random: P(hits >= 1) with K=2 from 10 with 3 positives = 1 - C(7,2)/C(10,2)
    assert row["p_random@20%"] == pytest.approx(1 - 21 / 45)


def test_ties_break_deterministically():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert rank_order(scores).tolist() == [1, 2, 3, 0, 4]  # lower index first among equals
    a, b = rank_order(scores, "random", seed=3), rank_order(scores, "random", seed=3)
    assert torch.equal(a, b) and set(a[:3].tolist()) == {1, 2, 3} and a[3:].tolist() == [0, 4]
    assert any(not torch.equal(rank_order(scores, "random", seed=s)[:3], torch.tensor([1, 2, 3])) for s in range(10))
    with pytest.raises(ValueError, match="ties"):
        rank_order(scores, "nope")


def test_ap_matches_sklearn_without_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.rand(300, generator=g, dtype=torch.float64)
        y = torch.rand(300, generator=g) < 0.1
        assert average_precision(rank_order(s), y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(torch.tensor([1.0, float("nan")]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no positives"):
        evaluate_ranking(torch.rand(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="duplicates"):
        evaluate_ranking(torch.rand(5), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lie in"):
        evaluate_ranking(torch.rand(5), torch.tensor([7]))
    with pytest.raises(ValueError, match="1-D"):
        evaluate_ranking(torch.rand(5, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match="fraction"):
        k_of_fraction(0.0, 10)


def test_random_expectation_vs_monte_carlo():
    total, n_pos, fr = 200, 12, (0.05, 0.1, 0.25)
    pos = torch.zeros(total, dtype=torch.bool)
    pos[torch.randperm(total, generator=torch.Generator().manual_seed(1))[:n_pos]] = True
    g = torch.Generator().manual_seed(2)
    reps = 3000
    keys = ["P@5%", "R@10%", "F1@25%", "F1@5%", "AP"]
    acc = {k: [] for k in keys}
    ks = [k_of_fraction(f, total) for f in fr]
    # vectorised Monte Carlo: random permutations = random rankings
    for _ in range(reps):
        order = torch.randperm(total, generator=g)
        h = hits_at(order, pos, ks).tolist()
        acc["P@5%"].append(h[0] / ks[0])
        acc["R@10%"].append(h[1] / n_pos)
        acc["F1@25%"].append(2 * h[2] / (ks[2] + n_pos))
        acc["F1@5%"].append(2 * h[0] / (ks[0] + n_pos))
        acc["AP"].append(average_precision(order, pos))
    exact = evaluate_ranking(torch.rand(total), pos, fractions=fr)
    ref = {"P@5%": exact["rand_P@5%"], "R@10%": exact["rand_R@10%"], "F1@25%": exact["rand_F1@25%"],
           "F1@5%": exact["rand_F1@5%"], "AP": exact["rand_AP"]}
    for k in keys:
        mc = np.asarray(acc[k])
        se = mc.std(ddof=1) / np.sqrt(reps)
        assert abs(mc.mean() - ref[k]) < 4 * se + 1e-12, (k, mc.mean(), ref[k], se)
    # hits distribution matches hypergeom's std
    e = random_expectation(total, n_pos, ks[2])
    assert e["hits"] == pytest.approx(ks[2] * n_pos / total)
    assert e["hits_std"] == pytest.approx(sps.hypergeom(total, n_pos, ks[2]).std())


def test_expected_random_ap_small_exhaustive():
    # brute force over all rankings of 5 items with 2 positives (all C(5,2) placements equally likely)
    import itertools

    total, n_pos = 5, 2
    aps = []
    for placed in itertools.combinations(range(total), n_pos):
        ranks = np.array(placed) + 1
        aps.append(np.mean(np.arange(1, n_pos + 1) / ranks))
    assert expected_random_ap(total, n_pos) == pytest.approx(np.mean(aps))
    assert expected_random_ap(4, 4) == pytest.approx(1.0)


def test_top_fraction_positives_and_overlap():
    gt = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    m = top_fraction_positives(gt, 0.3)
    assert torch.nonzero(m).reshape(-1).tolist() == [1, 2, 4]
    assert topk_overlap(rank_order(gt), rank_order(gt), 3) == 1.0


def test_neuron_to_weight_scores():
    idx = WeightIndex(d=3, d_ff=4)
    s = torch.tensor([10.0, 20.0, 30.0, 40.0])
    w = neuron_to_weight_scores(s, idx)
    assert w.shape == (idx.total,)
    assert torch.equal(w, s[idx.neuron_of(torch.arange(idx.total))])
    with pytest.raises(ValueError, match="neurons"):
        neuron_to_weight_scores(torch.ones(3), idx)


def test_scales_to_vit_b_size():
    import time

    total = 4_718_592
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(total, generator=g)
    gt = torch.rand(total, generator=g)
    t = time.perf_counter()
    row = evaluate_ranking(scores, top_fraction_positives(gt, 0.01), gt_scores=gt, with_spearman=False)
    assert time.perf_counter() - t < 20
    assert row["K@1%"] == 47186 and row["n_pos"] == 47186
    assert row["P@1%"] == pytest.approx(0.01, abs=0.002)


def test_precision_at_k_and_ap_match_torchmetrics_retrieval():
    from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_precision, retrieval_recall

    g = torch.Generator().manual_seed(5)
    for total in (50, 400, 1000):
        s = torch.rand(total, generator=g, dtype=torch.float64)  # continuous: no ties, so both orders agree
        pos = torch.rand(total, generator=g) < 0.07
        pos[0] = True
        row = evaluate_ranking(s, pos, fractions=(0.01, 0.05, 0.2), with_spearman=False)
        for lab, f in (("1%", 0.01), ("5%", 0.05), ("20%", 0.2)):
            k = k_of_fraction(f, total)
            assert row[f"P@{lab}"] == pytest.approx(float(retrieval_precision(s, pos, top_k=k)))
            assert row[f"R@{lab}"] == pytest.approx(float(retrieval_recall(s, pos, top_k=k)))
        assert row["AP"] == pytest.approx(float(retrieval_average_precision(s, pos)))
        assert row["AP"] == pytest.approx(average_precision_score(pos.numpy(), s.numpy()))


# ------------------------------------------------------------------- the published positional comparison (exp-fl-5-7)
def _published_sorted_ranks(diff: np.ndarray, n_first: int) -> np.ndarray:
    """exp-fl-5-1's rank arrays, re-derived: global ranks 1..N by descending value, split into the two matrices,
    each half sorted ascending, concatenated (locations discarded)."""
    order = np.argsort(-diff, kind="stable")
    ranks = np.zeros(len(diff), dtype=np.int64)
    ranks[order] = np.arange(1, len(diff) + 1)
    return np.concatenate([np.sort(ranks[:n_first]), np.sort(ranks[n_first:])])


def _published_topk_metrics(fl_rank, gt_rank, ks, top_gt):
    """exp-fl-5-7's compute_topk_metrics / compute_topk_overlap, re-derived from their formulas (sets of positions)."""
    pos = set(np.where(gt_rank <= top_gt)[0])
    out = []
    for k in ks:
        pred = set(np.where(fl_rank <= k)[0])
        tp = len(pred & pos)
        p, r = tp / len(pred), tp / len(pos)
        gt_k = set(np.where(gt_rank <= k)[0])
        out.append((p, r, 0.0 if p + r == 0 else 2 * p * r / (p + r), len(pred & gt_k) / k))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_positional_comparison_reproduces_exp_fl_5_7_on_sorted_rank_arrays(seed):
    from vitfl.evaluation.ranking_metrics import positional_metrics

    rng = np.random.default_rng(seed)
    n_first, n_second = (int(v) for v in rng.integers(500, 3000, size=2))
    total = n_first + n_second
    gt = rng.random(total)
    fl = gt + rng.normal(scale=rng.uniform(0.05, 2.0), size=total)  # correlated with the ground truth, not equal
    fr = (0.001, 0.005, 0.01, 0.02, 0.05)
    ks = [int(f * total) for f in fr]  # the published floor
    top_gt = int(0.01 * total)
    ref = _published_topk_metrics(_published_sorted_ranks(fl, n_first), _published_sorted_ranks(gt, n_first), ks,
                                  top_gt)
    row = positional_metrics(torch.from_numpy(fl), torch.from_numpy(gt), n_first, top_gt, fr, k_rounding="floor")
    for f, k, (p, r, f1, ov) in zip(fr, ks, ref):
        lab = f"{f * 100:g}%"
        assert row[f"K@{lab}"] == k
        assert row[f"P@{lab}"] == pytest.approx(p, abs=1e-12) and row[f"R@{lab}"] == pytest.approx(r, abs=1e-12)
        assert row[f"F1@{lab}"] == pytest.approx(f1, abs=1e-12)
        assert row[f"overlap@{lab}"] == pytest.approx(ov, abs=1e-12)


def test_positional_random_expectation_vs_monte_carlo():
    from vitfl.evaluation.ranking_metrics import positional_metrics

    rng = np.random.default_rng(0)
    total, n_first = 900, 300
    gt = torch.from_numpy(rng.random(total))
    exact = positional_metrics(torch.rand(total, dtype=torch.float64), gt, n_first, 45, (0.05, 0.2))
    draws = [positional_metrics(torch.from_numpy(rng.random(total)), gt, n_first, 45, (0.05, 0.2))
             for _ in range(1500)]
    for key in ("P@5%", "P@20%", "overlap@5%"):
        mc = np.array([d[key] for d in draws])
        assert abs(mc.mean() - exact[f"rand_{key}"]) < 4 * mc.std() / np.sqrt(len(mc)) + 1e-9, key


@pytest.mark.parametrize("seed", range(3))
def test_worst_ranking_scores_high_positionally_and_not_above_random_corrected(seed):
    from vitfl.evaluation.checkpoint_benchmark import ranking_row, weight_change_ground_truth, worst_possible_scores

    g = torch.Generator().manual_seed(seed)
    d, d_ff = 32, 128
    prev = {"W_bef": torch.randn(d_ff, d, generator=g), "b_bef": torch.zeros(d_ff),
            "W_aft": torch.randn(d, d_ff, generator=g), "b_aft": torch.zeros(d)}
    nxt = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in prev.items()}
    gt = weight_change_ground_truth(prev, nxt, epoch=2)
    worst = worst_possible_scores(gt)
    pos = ranking_row(worst, gt, "published_positional")
    cor = ranking_row(worst, gt, "corrected")
    assert pos["P@1%"] >= 0.9 and pos["comparison"] == "published_positional"
    assert cor["P@1%"] <= cor["rand_P@1%"] and cor["P@1%"] == 0.0
    # the best ranking scores 1 under both; a random one ~E[random] under the corrected comparison
    assert ranking_row(gt.scores, gt, "corrected")["P@1%"] == 1.0
    assert ranking_row(gt.scores, gt, "published_positional")["P@1%"] == 1.0


def test_k_rounding_floor_gives_the_published_counts():
    n = 65_536
    fr = (0.001, 0.005, 0.01, 0.02, 0.05)
    assert [k_of_fraction(f, n, "floor") for f in fr] == [65, 327, 655, 1310, 3276]
    assert [k_of_fraction(f, n) for f in fr] == [66, 328, 655, 1311, 3277]
    gt = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert int(top_fraction_positives(gt, 0.01, rounding="floor").sum()) == 655
    assert int(top_fraction_positives(gt, 0.005, rounding="floor").sum()) == 327
    with pytest.raises(ValueError, match="k_rounding"):
        k_of_fraction(0.01, n, "ceil")


def test_hypergeom_pmf_equals_scipy():
    from vitfl.evaluation.ranking_metrics import hypergeom_pmf

    for total, n, k in ((50, 7, 12), (65_536, 32_768, 3_277), (4_718_592, 47_186, 47_186), (10, 10, 3)):
        support = np.arange(0, min(n, k) + 3)
        np.testing.assert_allclose(hypergeom_pmf(total, n, k, support), sps.hypergeom(total, n, k).pmf(support),
                                   rtol=1e-6, atol=1e-14)
