"""Misclassification settings (localization/misclf.py) on hand-built prediction tables whose ranks are known, and
against a naive reference and a plain re-derivation of the published code's selection on random tables."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from vitfl.localization.misclf import ALL_KINDS, analyze, confusion, stratified_positive_sample, target_mask


def table(rows):
    """[(true, pred, count), ...] -> (label, pred) tensors in a fixed shuffled order."""
    label = [t for t, p, n in rows for _ in range(n)]
    pred = [p for t, p, n in rows for _ in range(n)]
    perm = np.random.default_rng(0).permutation(len(label))
    return torch.tensor(label)[perm], torch.tensor(pred)[perm]


# 5 labels; label 4 is never predicted (precision 0, no input wrongly predicted as 4)
#   true 0: 5 right, 3 -> 1, 1 -> 2      true 1: 4 right, 2 -> 0      true 2: 6 right, 2 -> 1
#   true 3: 3 right                       true 4: 2 -> 0
ROWS = [(0, 0, 5), (0, 1, 3), (0, 2, 1), (1, 1, 4), (1, 0, 2), (2, 2, 6), (2, 1, 2), (3, 3, 3), (4, 0, 2)]
# precision: 0: 5/9, 1: 4/9, 2: 6/7, 3: 1, 4: 0 (never predicted)   recall: 0: 5/9, 1: 4/6, 2: 6/8, 3: 1, 4: 0


@pytest.fixture
def hand():
    label, pred = table(ROWS)
    n = len(label)
    index = torch.from_numpy(np.random.default_rng(1).permutation(n)) + 1000  # sample indices, not positions
    info = analyze(label, pred, index, num_classes=5, ranks=3, pos_fraction=0.25, seed=0)
    return label, pred, index, info


def idx_where(index, mask):
    return sorted(index[torch.as_tensor(mask)].tolist())


def test_src_tgt_ranks_by_count_then_label(hand):
    label, pred, index, info = hand
    s = info["settings"]
    # (0,1) x3 first; then the ties at 2, (true, pred) = (1,0), (2,1), (4,0), ordered by (pred, true) as published:
    # (pred 0, true 1), (pred 0, true 4), (pred 1, true 2) -> rank 2 = (1,0), rank 3 = (4,0)
    assert [(s[f"src_tgt_r{r}"]["true"], s[f"src_tgt_r{r}"]["pred"]) for r in (1, 2, 3)] == [(0, 1), (1, 0), (4, 0)]
    assert [s[f"src_tgt_r{r}"]["published_key"] for r in (1, 2, 3)] == ["1to0", "0to1", "0to4"]
    # the other order: by (true, pred) -> (1,0), (2,1) [(4,0) would be rank 4]
    other = analyze(label, pred, index, num_classes=5, ranks=3, tie_order="true_pred")["settings"]
    assert [(other[f"src_tgt_r{r}"]["true"], other[f"src_tgt_r{r}"]["pred"]) for r in (1, 2, 3)] == [
        (0, 1), (1, 0), (2, 1)]
    assert [s[f"src_tgt_r{r}"]["n_neg"] for r in (1, 2, 3)] == [3, 2, 2]
    assert sorted(s["src_tgt_r1"]["i_neg"]) == idx_where(index, (label == 0) & (pred == 1))
    # I_pos of the true label: the correct inputs of label 0
    assert sorted(s["src_tgt_r1"]["i_pos_label"]) == idx_where(index, (label == 0) & (pred == 0))
    assert len(s["src_tgt_r1"]["i_pos_label"]) == 5
    assert info["pair_order"] == "(true, pred)"
    assert np.array_equal(np.array(info["confusion"]), np.array(
        [[5, 3, 1, 0, 0], [2, 4, 0, 0, 0], [0, 2, 6, 0, 0], [0, 0, 0, 3, 0], [2, 0, 0, 0, 0]]))


def test_tgt_fp_never_predicted_label_skipped(hand):
    label, pred, index, info = hand
    s, skipped = info["settings"], info["skipped"]
    # worst precision: 4 (0, never predicted: empty I_neg -> skipped), then 1 (4/9), then 0 (5/9)
    assert "tgt_fp_r1" not in s and "tgt_fp_r1" in skipped and "no misclassified" in skipped["tgt_fp_r1"]
    assert s["tgt_fp_r2"]["label"] == 1 and s["tgt_fp_r2"]["precision"] == pytest.approx(4 / 9)
    assert s["tgt_fp_r3"]["label"] == 0 and s["tgt_fp_r3"]["precision"] == pytest.approx(5 / 9)
    # I_neg: inputs wrongly predicted as the label; I_pos: every correct input; no per-label I_pos
    assert sorted(s["tgt_fp_r2"]["i_neg"]) == idx_where(index, (pred == 1) & (label != 1))
    assert s["tgt_fp_r2"]["n_neg"] == 5
    assert sorted(s["tgt_fp_r2"]["i_pos"]) == idx_where(index, label == pred)
    assert s["tgt_fp_r2"]["i_pos_label"] is None
    assert info["precision"] == pytest.approx([5 / 9, 4 / 9, 6 / 7, 1.0, 0.0])


def test_tgt_fn_by_recall(hand):
    label, pred, index, info = hand
    s = info["settings"]
    assert [s[f"tgt_fn_r{r}"]["label"] for r in (1, 2, 3)] == [4, 0, 1]
    assert [s[f"tgt_fn_r{r}"]["recall"] for r in (1, 2, 3)] == pytest.approx([0.0, 5 / 9, 4 / 6])
    assert sorted(s["tgt_fn_r2"]["i_neg"]) == idx_where(index, (label == 0) & (pred != 0))
    assert s["tgt_fn_r1"]["i_pos_label"] == []  # label 4 has no correct input
    assert sorted(s["tgt_fn_r3"]["i_pos_label"]) == idx_where(index, (label == 1) & (pred == 1))


def test_all_setting(hand):
    label, pred, index, info = hand
    a = info["settings"]["all"]
    assert a["kind"] == "all" and a["n_neg"] == 10
    assert sorted(a["i_neg"]) == idx_where(index, label != pred)
    assert info["accuracy"] == pytest.approx(18 / 28)


def test_target_mask_agrees_with_i_neg(hand):
    label, pred, index, info = hand
    assert info["settings"]
    for name, st in info["settings"].items():
        m = target_mask(st, label, pred)
        assert idx_where(index, m) == sorted(st["i_neg"]), name
        assert set(st["i_neg"]).isdisjoint(st["i_pos"])
    with pytest.raises(ValueError, match="unknown setting kind"):
        target_mask({"kind": "bogus"}, label, pred)


def test_i_pos_repair_stratified(hand):
    label, pred, index, info = hand
    # int(0.25 * 28) = 7 of 18 correct inputs; correct per predicted label: 0: 5, 1: 4, 2: 6, 3: 3
    # floors 7*5//18=1, 7*4//18=1, 7*6//18=2, 7*3//18=1 (=5); the 2 left go to the most leftover capacity:
    # 0 (5-1=4) and 2 (6-2=4), ties by label -> {0: 2, 1: 1, 2: 3, 3: 1}
    rep = info["settings"]["all"]["i_pos_repair"]
    assert len(rep) == 7 == len(set(rep)) and rep == sorted(rep)
    pos_of = dict(zip(index.tolist(), pred.tolist()))
    correct = set(idx_where(index, label == pred))
    assert set(rep) <= correct
    assert Counter(pos_of[i] for i in rep) == {0: 2, 1: 1, 2: 3, 3: 1}
    # the same sample in every setting (one repair I_pos per split) and reproducible from the seed
    assert all(s["i_pos_repair"] == rep for s in info["settings"].values())
    again = analyze(label, pred, index, num_classes=5, pos_fraction=0.25, seed=0)
    assert again["settings"]["all"]["i_pos_repair"] == rep


def reference_strata(pools: dict[int, int], n_total: int) -> dict[int, int]:
    """floor(|pool_l| n / n_correct), then one more each for the ``left`` labels with the most leftover capacity."""
    n_correct = sum(pools.values())
    n_total = min(n_total, n_correct)
    take = {l: size * n_total // n_correct for l, size in pools.items()}
    left = n_total - sum(take.values())
    while left:
        for l in sorted(pools, key=lambda l: (-(pools[l] - take[l]), l)):
            if left and pools[l] > take[l]:
                take[l] += 1
                left -= 1
    return {l: k for l, k in take.items() if k}


@pytest.mark.parametrize("seed", range(6))
def test_stratified_sample_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 120))
    label = rng.integers(0, 6, n)
    pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, 6, n))
    index = rng.permutation(n) * 2 + 7
    correct = label == pred
    pools = Counter(pred[correct].tolist())
    for n_total in (0, 1, int(0.05 * n), int(rng.integers(1, correct.sum() + 1)), int(correct.sum()), n):
        got = stratified_positive_sample(label, pred, index, n_total, seed=seed)
        assert got == sorted(got) and len(set(got)) == len(got)
        assert set(got) <= set(index[correct].tolist())
        by = Counter(int(pred[index == i][0]) for i in got)
        assert dict(by) == reference_strata(dict(pools), n_total), n_total
    assert stratified_positive_sample(label, pred, index, int(correct.sum()), seed=0) == sorted(
        index[correct].tolist())


def test_stratified_sample_no_correct_input():
    label, pred = np.array([0, 1, 2]), np.array([1, 2, 0])
    assert stratified_positive_sample(label, pred, np.arange(3), 2, seed=0) == []


def test_precision_and_recall_ties_by_label():
    # labels 0 and 1 both have precision 1/2 and recall 1/2; label 2 is perfect (rank 3: empty I_neg)
    label = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 0, 2, 2])
    info = analyze(label, pred, torch.arange(6), num_classes=3, ranks=3)
    s, sk = info["settings"], info["skipped"]
    assert (s["tgt_fp_r1"]["label"], s["tgt_fp_r2"]["label"]) == (0, 1)
    assert (s["tgt_fn_r1"]["label"], s["tgt_fn_r2"]["label"]) == (0, 1)
    assert "tgt_fp_r3" in sk and "tgt_fn_r3" in sk
    # one input each: (true 1, pred 0) comes first, its (pred, true) = (0, 1) is the smaller key
    assert [(s[f"src_tgt_r{r}"]["true"], s[f"src_tgt_r{r}"]["pred"]) for r in (1, 2)] == [(1, 0), (0, 1)]
    assert "src_tgt_r3" in sk and "only 2 distinct confusion pairs" in sk["src_tgt_r3"]
    assert sorted(s["tgt_fp_r1"]["i_neg"]) == [3] and sorted(s["tgt_fn_r1"]["i_neg"]) == [1]


def naive_settings(label, pred, k, ranks):
    """A loop-by-loop reference: {name: (kind, key, sorted i_neg positions)} for the non-empty settings."""
    n = len(label)
    pairs = Counter((int(label[i]), int(pred[i])) for i in range(n) if label[i] != pred[i])
    out = {}
    # equal counts: by (pred, true)
    for r, ((s, t), _) in enumerate(sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0][1], kv[0][0]))[:ranks], 1):
        out[f"src_tgt_r{r}"] = (s, t), [i for i in range(n) if label[i] == s and pred[i] == t]
    prec, rec = {}, {}
    for l in range(k):
        predicted = [i for i in range(n) if pred[i] == l]
        actual = [i for i in range(n) if label[i] == l]
        prec[l] = sum(label[i] == l for i in predicted) / len(predicted) if predicted else 0.0
        if actual:
            rec[l] = sum(pred[i] == l for i in actual) / len(actual)
    for kind, metric, neg in (("tgt_fp", prec, lambda l, i: pred[i] == l != label[i]),
                              ("tgt_fn", rec, lambda l, i: label[i] == l != pred[i])):
        for r, l in enumerate(sorted(metric, key=lambda l: (metric[l], l))[:ranks], 1):
            rows = [i for i in range(n) if neg(l, i)]
            if rows:
                out[f"{kind}_r{r}"] = l, rows
    wrong = [i for i in range(n) if label[i] != pred[i]]
    if wrong:
        out["all"] = None, wrong
    return out


@pytest.mark.parametrize("seed", range(8))
def test_analyze_against_naive_reference(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(5, 80))
    label = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < rng.uniform(0.3, 0.9), label, rng.integers(0, k, n))
    index = rng.permutation(n) + 50
    info = analyze(torch.from_numpy(label), torch.from_numpy(pred), torch.from_numpy(index), num_classes=k, ranks=3)
    ref = naive_settings(label.tolist(), pred.tolist(), k, 3)
    assert set(info["settings"]) == set(ref)
    for name, (key, rows) in ref.items():
        st = info["settings"][name]
        got_key = (st["true"], st["pred"]) if st["kind"] == "src_tgt" else st["label"]
        assert got_key == key, name
        assert sorted(st["i_neg"]) == sorted(index[rows].tolist()), name
    expected_names = {f"{kind}_r{r}" for kind in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3)} | {"all"}
    left_out = {n for n in info["skipped"] if " label " in n}
    assert left_out == {f"tgt_fn label {l}" for l in range(k) if not (label == l).any()}
    assert set(info["settings"]) | (set(info["skipped"]) - left_out) == expected_names
    assert not set(info["settings"]) & set(info["skipped"])
    json.dumps(info)  # JSON-serialisable as written to misclf_info.json


def test_perfect_model_skips_everything():
    label = torch.arange(20) % 4
    info = analyze(label, label.clone(), torch.arange(20), num_classes=4, ranks=3)
    assert info["settings"] == {} and info["accuracy"] == 1.0
    assert set(info["skipped"]) == {f"{k}_r{r}" for k in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3)} | {"all"}
    assert all(isinstance(m, str) and m for m in info["skipped"].values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        analyze(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        analyze(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([0, 1]), num_classes=2)


def test_confusion_and_plot(tmp_path):
    label, pred = table(ROWS)
    c = confusion(label, pred, 5)
    assert c.sum() == 28 and c[0, 1] == 3 and c[4, 0] == 2 and c[4, 4] == 0
    from vitfl.pipeline.misclf import plot_confusion

    info = analyze(label, pred, torch.arange(len(label)), num_classes=5)
    fig = plot_confusion(info, [f"c{i}" for i in range(5)])
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------ tie order (published: (pred, true))
# (0,1) x3 is rank 1; (0,2) and (1,0) tie at 2. By (pred, true): (pred 0, true 1) < (pred 2, true 0), so rank 2 =
# (1,0), rank 3 = (0,2); by (true, pred): rank 2 = (0,2), rank 3 = (1,0).
TIE_ROWS = [(0, 0, 4), (0, 1, 3), (0, 2, 2), (1, 1, 5), (1, 0, 2), (2, 2, 6)]


@pytest.mark.parametrize("tie_order, expected", [("pred_true", [(0, 1), (1, 0), (0, 2)]),
                                                 ("true_pred", [(0, 1), (0, 2), (1, 0)])])
def test_tie_order_changes_rank_2_and_3(tie_order, expected):
    label, pred = table(TIE_ROWS)
    info = analyze(label, pred, torch.arange(len(label)), num_classes=3, ranks=3, tie_order=tie_order)
    s = info["settings"]
    assert [(s[f"src_tgt_r{r}"]["true"], s[f"src_tgt_r{r}"]["pred"]) for r in (1, 2, 3)] == expected
    for r in (1, 2, 3):
        st = s[f"src_tgt_r{r}"]
        assert sorted(st["i_neg"]) == idx_where(torch.arange(len(label)), (label == st["true"]) & (pred == st["pred"]))
    assert info["options"]["tie_order"] == tie_order


def test_tie_order_default_is_published_and_bad_option_refused():
    label, pred = table(TIE_ROWS)
    default = analyze(label, pred, torch.arange(len(label)), num_classes=3)
    assert default["options"]["tie_order"] == "pred_true"
    assert (default["settings"]["src_tgt_r2"]["true"], default["settings"]["src_tgt_r2"]["pred"]) == (1, 0)
    with pytest.raises(ValueError, match="tie_order must be one of"):
        analyze(label, pred, torch.arange(len(label)), num_classes=3, tie_order="pred")
    with pytest.raises(ValueError, match="no_true_input must be one of"):
        analyze(label, pred, torch.arange(len(label)), num_classes=3, no_true_input="zero")
    with pytest.raises(ValueError, match="unknown setting kind"):
        analyze(label, pred, torch.arange(len(label)), num_classes=3, kinds=("tgt", "fp"))
    with pytest.raises(ValueError, match="duplicate"):
        analyze(label, pred, torch.zeros(len(label), dtype=torch.long), num_classes=3)


# ------------------------------------------------------------------ a label with no true input
# 4 labels; label 3 has no true input but is predicted twice (wrongly); label 2 is never predicted.
#   recall: 0: 4/6, 1: 3/5, 2: 0/2, 3: none      precision: 0: 4/5, 1: 3/6, 2: 0 (never predicted), 3: 0/2
NO_TRUE_ROWS = [(0, 0, 4), (0, 1, 2), (1, 1, 3), (1, 0, 1), (1, 3, 1), (2, 1, 1), (2, 3, 1)]


def test_no_true_input_skip_rule_leaves_label_out_and_reports_it():
    label, pred = table(NO_TRUE_ROWS)
    info = analyze(label, pred, torch.arange(len(label)), num_classes=4, ranks=3)
    s, sk = info["settings"], info["skipped"]
    assert info["options"]["no_true_input"] == "skip"
    # recall ascending over labels 0..2 only: 2 (0), 1 (3/5), 0 (4/6)
    assert [s[f"tgt_fn_r{r}"]["label"] for r in (1, 2, 3)] == [2, 1, 0]
    assert [s[f"tgt_fn_r{r}"]["recall"] for r in (1, 2, 3)] == pytest.approx([0.0, 3 / 5, 4 / 6])
    assert "tgt_fn label 3" in sk and "no true input" in sk["tgt_fn label 3"]
    assert info["no_true_input_labels"] == [3] and info["never_predicted"] == [2]
    assert info["recall"][3] is None
    # the never-predicted label 2: precision 0, rank 1 of tgt_fp (ties with label 3 at 0, label order), empty I_neg
    assert info["precision"][2] == 0.0
    assert "tgt_fp_r1" in sk and s["tgt_fp_r2"]["label"] == 3 and s["tgt_fp_r2"]["n_neg"] == 2


def test_no_true_input_recall_zero_rule_ranks_it_first():
    label, pred = table(NO_TRUE_ROWS)
    info = analyze(label, pred, torch.arange(len(label)), num_classes=4, ranks=3, no_true_input="recall_zero")
    s, sk = info["settings"], info["skipped"]
    # recall 0 for labels 2 and 3, by label: rank 1 = 2, rank 2 = 3 (no true input: empty I_neg, skipped), rank 3 = 1
    assert s["tgt_fn_r1"]["label"] == 2 and s["tgt_fn_r1"]["recall"] == 0.0
    assert "tgt_fn_r2" not in s and "tgt_fn_r2" in sk and "no misclassified" in sk["tgt_fn_r2"]
    assert s["tgt_fn_r3"]["label"] == 1
    assert not any(" label " in n for n in sk)
    assert info["options"]["no_true_input"] == "recall_zero"
    json.dumps(info)


def sklearn_rank(metric: str, label, pred, rank: int) -> int:
    """The published rule, re-derived: the (rank)-th label of ``sorted(enumerate(scores), key=score)`` with the
    per-label scores of scikit-learn (zero division -> 0), which is what the published code ranked."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    fn = {"precision": precision_score, "recall": recall_score, "f1": f1_score}[metric]
    scores = fn(label, pred, average=None, zero_division=0)
    return sorted(enumerate(scores), key=lambda x: x[1])[rank - 1][0]


@pytest.mark.parametrize("seed", range(6))
def test_recall_zero_rule_matches_the_published_ranking(seed):
    rng = np.random.default_rng(300 + seed)
    k = int(rng.integers(3, 7))
    n = int(rng.integers(20, 60))
    present = rng.choice(k, size=k - 1, replace=False)  # one label never a true label ...
    label = rng.choice(present, n)
    pred = np.where(rng.random(n) < 0.6, label, rng.integers(0, k, n))
    pred[:k] = np.arange(k)  # ... but every label is predicted somewhere (so scikit-learn keeps every label id)
    info = analyze(torch.from_numpy(label), torch.from_numpy(pred), torch.arange(n), num_classes=k, ranks=k,
                   no_true_input="recall_zero", kinds=ALL_KINDS)
    for kind, metric in (("tgt_fn", "recall"), ("tgt_fp", "precision")):
        for r in range(1, k + 1):
            name = f"{kind}_r{r}"
            expected = sklearn_rank(metric, label, pred, r)
            got = info["settings"][name]["label"] if name in info["settings"] else None
            if got is None:  # skipped: only when that label's I_neg is empty
                neg = (label == expected) & (pred != expected) if kind == "tgt_fn" else \
                    (pred == expected) & (label != expected)
                assert not neg.any() and name in info["skipped"]
            else:
                assert got == expected, name


# ------------------------------------------------------------------ tgt: the union of tgt_fp and tgt_fn, ranked by F1
def brute_force_tgt(label, pred, k):
    """{label: (F1 as 2PR/(P+R) with 0 on zero division, sorted I_neg positions)} by plain loops."""
    out = {}
    for l in range(k):
        tp = sum(1 for y, p in zip(label, pred) if y == l and p == l)
        n_pred = sum(1 for p in pred if p == l)
        n_true = sum(1 for y in label if y == l)
        if n_pred == 0 and n_true == 0:
            continue
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
        neg = [i for i, (y, p) in enumerate(zip(label, pred)) if y != p and (y == l or p == l)]
        out[l] = (f1, neg)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_tgt_against_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    k = int(rng.integers(3, 8))
    n = int(rng.integers(10, 90))
    label = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < rng.uniform(0.3, 0.9), label, rng.integers(0, k, n))
    index = rng.permutation(n) + 10
    info = analyze(torch.from_numpy(label), torch.from_numpy(pred), torch.from_numpy(index), num_classes=k, ranks=3,
                   kinds=("tgt",))
    assert not any(n.startswith(("src_tgt", "tgt_fp", "tgt_fn", "all")) for n in info["settings"])
    ref = brute_force_tgt(label.tolist(), pred.tolist(), k)
    order = sorted(ref, key=lambda l: (ref[l][0], l))
    for r in (1, 2, 3):
        name = f"tgt_r{r}"
        if r > len(order):
            assert name in info["skipped"]
            continue
        l = order[r - 1]
        if not ref[l][1]:
            assert name in info["skipped"] and name not in info["settings"]
            continue
        st = info["settings"][name]
        assert st["kind"] == "tgt" and st["label"] == l and st["f1"] == pytest.approx(ref[l][0], abs=1e-15)
        assert sorted(st["i_neg"]) == sorted(index[ref[l][1]].tolist())
        assert st["i_neg"] == sorted(st["i_neg"])
        # the union of the label's tgt_fp and tgt_fn inputs
        fp = index[(pred == l) & (label != l)].tolist()
        fn = index[(label == l) & (pred != l)].tolist()
        assert set(st["i_neg"]) == set(fp) | set(fn) and len(st["i_neg"]) == len(fp) + len(fn)
        assert sorted(st["i_pos_label"]) == sorted(index[(label == l) & (pred == l)].tolist())
        assert st["upstream"] == {"misclf_type": "tgt", "fpfn": None, "tgt_rank": r}
        m = target_mask(st, torch.from_numpy(label), torch.from_numpy(pred))
        assert sorted(index[m.numpy()].tolist()) == sorted(st["i_neg"])
        # against scikit-learn's F1 too (the published code's source of F1)
        from sklearn.metrics import f1_score

        if len(np.unique(np.r_[label, pred])) == k:
            assert st["f1"] == pytest.approx(f1_score(label, pred, average=None, zero_division=0)[l], abs=1e-12)


def test_tgt_is_not_a_default_setting():
    label, pred = table(ROWS)
    info = analyze(label, pred, torch.arange(len(label)), num_classes=5)
    assert not any(n.startswith("tgt_r") for n in list(info["settings"]) + list(info["skipped"]))
    assert info["options"]["kinds"] == ["src_tgt", "tgt_fp", "tgt_fn", "all"]


# ------------------------------------------------------------------ the published I_neg order
def published_selection(label, pred, index, k, ranks):
    """The published selection re-derived loop by loop: walk the split in dataset order (ascending sample index),
    ``mis[pred][true]`` lists the sample indices of each pair, the pair ranking is a stable descending sort of
    (pred, true, count) built pred-major; tgt_* / tgt concatenate ``mis[p][t]`` over p, then t, ascending where the
    condition holds; all concatenates every list in the same order. Returns {setting name: [sample indices]}."""
    from sklearn.metrics import precision_score, recall_score

    rows = np.argsort(index, kind="stable")
    mis = {p: {t: [] for t in range(k) if t != p} for p in range(k)}
    count = np.zeros((k, k), dtype=int)
    for i in rows:
        if pred[i] != label[i]:
            mis[pred[i]][label[i]].append(int(index[i]))
            count[pred[i], label[i]] += 1
    ranking = [(p, t, count[p, t]) for p in range(k) for t in range(k) if p != t]
    ranking.sort(key=lambda x: x[2], reverse=True)
    out = {}
    for r in range(1, ranks + 1):
        p, t, cnt = ranking[r - 1]
        if cnt:
            out[f"src_tgt_r{r}"] = list(mis[p][t])
    def f1_pinned(y, p, average=None, zero_division=0):
        # scikit-learn 1.0.2 (the published code's pinned version): (1 + beta^2) P R / (beta^2 P + R), a zero
        # denominator replaced by 1; later versions compute 2 TP / (#true + #pred), which breaks exact ties
        # differently in the last bit
        prec = precision_score(y, p, average=None, zero_division=0)
        rec = recall_score(y, p, average=None, zero_division=0)
        denom = 1.0 * prec + rec
        denom[denom == 0.0] = 1
        return (1 + 1.0) * prec * rec / denom

    for name, fn, cond in (("tgt_fp", precision_score, lambda p, t, l: p == l),
                           ("tgt_fn", recall_score, lambda p, t, l: t == l),
                           ("tgt", f1_pinned, lambda p, t, l: p == l or t == l)):
        scores = fn(label, pred, average=None, zero_division=0)
        for r in range(1, ranks + 1):
            l = sorted(enumerate(scores), key=lambda x: x[1])[r - 1][0]
            sel = []
            for p in range(k):
                for t in range(k):
                    if p != t and cond(p, t, l):
                        sel.extend(mis[p][t])
            if sel:
                out[f"{name}_r{r}"] = sel
    out["all"] = [i for mp in mis.values() for lst in mp.values() for i in lst]
    return out


@pytest.mark.parametrize("seed", list(range(8)) + [109, 113])
def test_published_i_neg_order_against_rederivation(seed):
    rng = np.random.default_rng(400 + seed)
    k = int(rng.integers(3, 7)) if seed < 100 else 30  # 30 labels: exact F1 ties among the worst labels
    n = int(rng.integers(30, 120)) if seed < 100 else 1500
    label = rng.integers(0, k, n)
    label[:k] = np.arange(k)  # every label is a true label (scikit-learn's label set is then 0..k-1)
    pred = np.where(rng.random(n) < 0.5, label, rng.integers(0, k, n))
    perm = rng.permutation(n)  # cache rows in any order: the order is defined on sample indices
    label, pred = label[perm], pred[perm]
    index = rng.choice(10 * n, size=n, replace=False)
    ranks = 3 if seed < 100 else 6
    info = analyze(torch.from_numpy(label), torch.from_numpy(pred), torch.from_numpy(index), num_classes=k,
                   ranks=ranks, kinds=ALL_KINDS)
    ref = published_selection(label, pred, index, k, ranks)
    got = {name: st["i_neg_published"] for name, st in info["settings"].items()}
    assert set(got) == set(ref)
    for name in ref:
        assert got[name] == ref[name], name
        assert sorted(got[name]) == info["settings"][name]["i_neg"], name
    # the order really differs from the ascending one somewhere (else this test could not fail on it)
    assert got["all"] != sorted(got["all"])


def test_published_order_on_a_hand_table():
    # samples (index: true -> pred): 0: 1->0, 1: 0->1, 2: 2->0, 3: 0->1, 4: 1->0, 5: 0->2
    label = torch.tensor([1, 0, 2, 0, 1, 0])
    pred = torch.tensor([0, 1, 0, 1, 0, 2])
    info = analyze(label, pred, torch.arange(6), num_classes=3, ranks=1, kinds=ALL_KINDS)
    # groups by (pred, true): (0,1): [0, 4], (0,2): [2], (1,0): [1, 3], (2,0): [5]
    assert info["settings"]["all"]["i_neg_published"] == [0, 4, 2, 1, 3, 5]
    assert info["settings"]["all"]["i_neg"] == [0, 1, 2, 3, 4, 5]
    # tgt_fn of label 0 (recall 0): (pred 1, true 0) then (pred 2, true 0)
    assert info["settings"]["tgt_fn_r1"]["label"] == 0
    assert info["settings"]["tgt_fn_r1"]["i_neg_published"] == [1, 3, 5]
    # src_tgt rank 1: the tie (0,1) x2 / (1,0) x2 -> (pred 0, true 1) first
    st = info["settings"]["src_tgt_r1"]
    assert (st["true"], st["pred"], st["i_neg_published"]) == (1, 0, [0, 4])


def test_options_pass_through_step_misclf(monkeypatch):
    """step_misclf hands its options to analyze (the model, states and files stubbed out)."""
    from types import SimpleNamespace

    import vitfl.pipeline.misclf as pl

    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    st = SimpleNamespace(label=torch.zeros(2), pred=torch.zeros(2), index=torch.arange(2), logits=torch.zeros(2, 3))
    monkeypatch.setattr(pl, "load_run", lambda store: SimpleNamespace(states=lambda split: st))
    monkeypatch.setattr(pl, "analyze", spy)
    layout = SimpleNamespace()
    with pytest.raises(Stop):
        pl.step_misclf(layout, ranks=2, seed=3, tie_order="true_pred", no_true_input="recall_zero",
                       kinds=("tgt", "all"))
    assert seen["tie_order"] == "true_pred" and seen["no_true_input"] == "recall_zero"
    assert tuple(seen["kinds"]) == ("tgt", "all") and seen["ranks"] == 2 and seen["seed"] == 3
    seen.clear()
    with pytest.raises(Stop):
        pl.step_misclf(layout)
    assert seen["tie_order"] == "pred_true" and seen["no_true_input"] == "skip"
