"""The FL headline (evaluation/headline.py): the exact pooled test against random rankings, the verdicts, the
sentence, and the repairability block."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from vitfl.evaluation.headline import benchmark_block, blocks_markdown, pooled_hits_test, repairability_block
from vitfl.evaluation.ranking_metrics import evaluate_ranking, positional_metrics


def _row(total, n_pos, k, hits):
    return {"total": total, "n_pos": n_pos, "K@1%": k, "hits@1%": hits}


def test_pooled_test_equals_brute_force_enumeration():
    rows = [_row(60, 5, 7, 2), _row(40, 3, 6, 1), _row(90, 9, 4, 2)]
    df = pd.DataFrame(rows)
    supports = [np.arange(0, min(r["K@1%"], r["n_pos"]) + 1) for r in rows]
    pmfs = [sps.hypergeom(r["total"], r["n_pos"], r["K@1%"]).pmf(s) for r, s in zip(rows, supports)]
    above = below = 0.0
    h_obs = sum(r["hits@1%"] for r in rows)
    for combo in itertools.product(*[range(len(s)) for s in supports]):  # every joint outcome
        p = np.prod([pmf[i] for pmf, i in zip(pmfs, combo)])
        h = sum(s[i] for s, i in zip(supports, combo))
        above += p * (h >= h_obs)
        below += p * (h <= h_obs)
    pa, pb = pooled_hits_test(df)
    assert pa == pytest.approx(above, rel=1e-10) and pb == pytest.approx(below, rel=1e-10)


def test_pooled_test_on_large_rows_uses_fft_and_agrees_with_the_normal_approximation():
    rows = [_row(4_718_592, 47_186, 47_186, 600) for _ in range(3)]
    pa, pb = pooled_hits_test(pd.DataFrame(rows))
    d = [sps.hypergeom(4_718_592, 47_186, 47_186) for _ in rows]
    mean, sd = sum(x.mean() for x in d), np.sqrt(sum(x.var() for x in d))
    z = (1800 - 0.5 - mean) / sd
    assert pa == pytest.approx(sps.norm.sf(z), rel=0.05) and pb > 0.99


def test_positional_null_matches_simulation():
    rng = np.random.default_rng(0)
    total, n_first = 600, 200
    gt = torch.from_numpy(rng.random(total))
    rows = [positional_metrics(torch.from_numpy(rng.random(total)), gt, n_first, 30, (0.01, 0.05)) for _ in range(2)]
    df = pd.DataFrame(rows)
    pa, pb = pooled_hits_test(df, "5%", "published_positional")
    sims = np.array([sum(positional_metrics(torch.from_numpy(rng.random(total)), gt, n_first, 30, (0.05,))[
        "hits@5%"] for _ in range(2)) for _ in range(3000)])
    h = df["hits@5%"].sum()
    assert pa == pytest.approx((sims >= h).mean(), abs=0.03) and pb == pytest.approx((sims <= h).mean(), abs=0.03)


def _bench(seed=0, n_settings=8, total=3000, n_pos=150):
    """Rows of three methods: an oracle-ish one, random, and an anti-oracle (positives ranked last)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in range(n_settings):
        gt = torch.rand(total, generator=g, dtype=torch.float64)
        pos = torch.zeros(total, dtype=torch.bool)
        pos[torch.argsort(-gt)[:n_pos]] = True
        for method, scores in (("good", gt + 0.3 * torch.rand(total, generator=g, dtype=torch.float64)),
                               ("random", torch.rand(total, generator=g, dtype=torch.float64)),
                               ("anti", -gt), ("worst_possible", -gt)):
            rows.append({"method": method, "setting": s, **evaluate_ranking(scores, pos, fractions=(0.01, 0.05))})
    return pd.DataFrame(rows)


def test_benchmark_block_sorts_tests_and_says_which_methods_it_separates():
    b = benchmark_block(_bench(), "Checkpoint benchmark", "synthetic", "P@1%", "settings", extra=("R@1%",))
    t = b.table
    tested = t[~t["verdict"].str.startswith("control")]
    assert list(tested["method"]) == ["good", "random", "anti"]  # sorted by the mean
    v = dict(zip(t["method"], t["verdict"]))
    assert v == {"good": "above random", "random": "not separated", "anti": "below random",
                 "worst_possible": "control (never tested)"}
    assert t["method"].iloc[-1] == "worst_possible"  # controls last
    assert "**1** above random: good" in b.sentence and "**1** below random: anti" in b.sentence
    assert "Control: worst_possible" in b.sentence
    md = blocks_markdown([b])
    assert md.startswith("**Checkpoint benchmark**") and "| good |" in md and "above random" in md
    # a benchmark where nothing differs from random says so
    only_random = _bench()
    only_random = only_random[only_random["method"] == "random"]
    assert "separates **no** method" in benchmark_block(only_random, "B", "w").sentence


def _pooled(rows):
    cols = ["repair", "fl_method", "budget", "runs", "test_targets", "test_fixed", "test_correct", "test_broken",
            "repair_targets", "repair_fixed", "rr_in_sample"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_repairability_block_compares_with_random_at_the_same_budget():
    p = _pooled([("lp", "ours", 33, 10, 200, 120, 1000, 10, 400, 300, 0.75),
                 ("lp", "random", 33, 10, 200, 40, 1000, 30, 400, 90, 0.225),
                 ("lp", "arachne_w", 33, 10, 200, 45, 1000, 12, 400, 100, 0.25),
                 ("de", "ours", 33, 10, 200, 60, 1000, 20, 400, 150, 0.375)])
    b = repairability_block(p, what="synthetic")
    t = b.table.set_index("fl_method")
    assert t.loc["ours", "verdict"] == "above random" and t.loc["arachne_w", "verdict"] == "not separated"
    assert t.loc["random", "verdict"] == "baseline"
    ref = sps.fisher_exact([[120, 80], [40, 160]]).pvalue
    assert t.loc["ours", "Fisher p vs random"] == pytest.approx(ref)
    assert t.loc["ours", "held out (Wilson 95%)"].startswith("0.600 [") and "(120/200)" in t.loc["ours",
                                                                                                  "held out (Wilson 95%)"]
    assert t.loc["ours", "de held out"] == "0.300 (60/200)"
    assert "1 of 2 differ from `random`" in b.sentence and "ours at N = 33 (above random" in b.sentence
    # no lp runs: said, not an empty table
    assert "no `lp` repair runs" in repairability_block(p[p["repair"] == "de"]).sentence


def test_comonotone_test_is_exact_for_identical_rows_and_conservative_for_independent_ones():
    one = _row(500, 20, 25, 4)
    # identical rankings in every setting: H = 5 h, so the pooled p is the one-row hypergeometric tail
    rows = pd.DataFrame([one] * 5).assign(**{"hits@1%": 4})
    pa, pb = pooled_hits_test(rows, dependence="comonotone")
    ref = sps.hypergeom(500, 20, 25)
    assert pa == pytest.approx(ref.sf(3), rel=1e-9) and pb == pytest.approx(ref.cdf(4), rel=1e-9)
    # the independent law of the same rows is narrower: its upper tail is smaller (a smaller p)
    pa_ind, _ = pooled_hits_test(rows, dependence="independent")
    assert pa_ind < pa
    # a brute-force comonotone sum over a fine grid of quantiles, for rows with different laws
    rows = pd.DataFrame([_row(300, 12, 20, 2), _row(400, 30, 15, 3), _row(250, 5, 40, 1)])
    u = (np.arange(200_000) + 0.5) / 200_000
    s = sum(sps.hypergeom(r["total"], r["n_pos"], r["K@1%"]).ppf(u) for r in rows.to_dict("records"))
    pa, pb = pooled_hits_test(rows, dependence="comonotone")
    assert pa == pytest.approx((s >= 6).mean(), abs=1e-4) and pb == pytest.approx((s <= 6).mean(), abs=1e-4)


def test_repair_verdicts_sort_by_rr_and_read_the_paired_test_per_cell():
    import numpy as np
    import pandas as pd

    from vitfl.evaluation.headline import repair_verdicts

    def cell(m, rr, n_t=10, budget="0.5%"):
        fixed = int(round(rr * n_t)) if n_t else 0
        return {"dataset": "d", "repair": "de", "budget": budget, "fl_method": m,
                "rr_pooled": (fixed / n_t) if n_t else np.nan, "rr_lo": 0.1, "rr_hi": 0.9, "n_test_fixed": fixed,
                "n_test_targets": n_t, "br_pooled": 0.02, "br_lo": 0.01, "br_hi": 0.05, "n_test_broken": 2,
                "n_test_correct": 100}

    table = pd.DataFrame([cell("random", 0.2), cell("a", 0.8), cell("b", 0.4), cell("c", 0.0, n_t=0),
                          cell("d", 0.1), cell("a", 0.3, budget="10"), cell("random", 0.3, budget="10")])
    q = "d / de / n=0.5% / rr (test fold)"
    paired = pd.DataFrame([
        {"question": q, "method_a": "a", "method_b": "random", "median_diff": 0.5, "p_holm": 0.01, "n": 9},
        {"question": q, "method_a": "random", "method_b": "b", "median_diff": -0.1, "p_holm": 0.30, "n": 9},
        {"question": q, "method_a": "random", "method_b": "d", "median_diff": 0.2, "p_holm": 0.02, "n": 9},
        # another cell's test must not leak into this one
        {"question": "d / de / n=10 / rr (test fold)", "method_a": "a", "method_b": "random", "median_diff": -1,
         "p_holm": 0.001, "n": 9}])
    v = repair_verdicts(table, paired)
    col = "RR vs random (Wilcoxon, Holm)"
    first = v[v["budget"] == "10"]
    assert list(v["budget"]) == ["10", "10", "0.5%", "0.5%", "0.5%", "0.5%", "0.5%"]  # counts before shares
    assert list(first["FL method"]) == ["a", "random"] and first.iloc[0][col].startswith("below random")
    cell_v = v[v["budget"] == "0.5%"].set_index("FL method")
    assert list(cell_v.index) == ["a", "b", "random", "d", "c"]  # by RR, the targetless cell last
    assert cell_v.loc["a", col].startswith("above random (p_Holm 0.01")
    assert cell_v.loc["b", col].startswith("not separated (p_Holm 0.3")
    assert cell_v.loc["d", col].startswith("below random")  # random - d > 0
    assert cell_v.loc["c", col] == "no paired runs" and cell_v.loc["random", col] == "-"
    assert cell_v.loc["c", "RR held out [95% CI] (fixed/targets)"] == "n/a (0 targets)"
    assert cell_v.loc["a", "RR held out [95% CI] (fixed/targets)"] == "0.800 [0.100, 0.900] (8/10)"


def test_repair_verdicts_keep_each_block_in_its_own_cells():
    """Results of two transformer blocks: each row names its block (the same FL method at the same budget on two
    blocks were two indistinguishable rows) and reads the paired test of its own block's cell."""
    import pandas as pd

    from vitfl.evaluation.headline import repair_verdicts

    def cell(m, block, fixed):
        return {"dataset": "d", "block": block, "repair": "de", "budget": "0.5%", "fl_method": m,
                "rr_pooled": fixed / 10, "rr_lo": 0.1, "rr_hi": 0.9, "n_test_fixed": fixed, "n_test_targets": 10,
                "br_pooled": 0.02, "br_lo": 0.01, "br_hi": 0.05, "n_test_broken": 2, "n_test_correct": 100}

    table = pd.DataFrame([cell("a", 0, 8), cell("random", 0, 1), cell("a", 2, 1), cell("random", 2, 3)])
    paired = pd.DataFrame([
        {"question": "d (block 0) / de / n=0.5% / rr (test fold)", "method_a": "a", "method_b": "random",
         "median_diff": 0.5, "p_holm": 0.01, "n": 9},
        {"question": "d (block 2) / de / n=0.5% / rr (test fold)", "method_a": "a", "method_b": "random",
         "median_diff": -0.2, "p_holm": 0.01, "n": 9}])
    v = repair_verdicts(table, paired)
    col = "RR vs random (Wilcoxon, Holm)"
    assert list(v["block"]) == ["0", "0", "2", "2"] and list(v["FL method"]) == ["a", "random", "random", "a"]
    got = v.set_index(["block", "FL method"])[col]
    assert got["0", "a"].startswith("above random") and got["2", "a"].startswith("below random")
