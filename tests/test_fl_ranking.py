"""localization/ranking.py: top-N with stable ties, minmax, Pareto front (vs brute force), budgets, localize()."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vitfl.localization.ffn import FFNHead, WeightIndex
from vitfl.localization.ranking import (BudgetError, localize, minmax, neurons_to_weights, pareto_front, select,
                                  top_n)


def tiny_head(d=4, d_ff=8, c=3, seed=0):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")


def brute_top(s, n):
    return sorted(range(len(s)), key=lambda i: (-float(s[i]), i))[:n]


def brute_front(f1, f2, keep_identical=True):
    n = len(f1)
    front = []
    for p in range(n):
        dominated = any(f1[q] >= f1[p] and f2[q] >= f2[p] and (f1[q] > f1[p] or f2[q] > f2[p]) for q in range(n))
        if not dominated:
            front.append(p)
    if not keep_identical:
        seen, kept = set(), []
        for p in front:
            key = (float(f1[p]), float(f2[p]))
            if key not in seen:
                seen.add(key)
                kept.append(p)
        front = kept
    return sorted(front)


# ------------------------------------------------------------------------------------------------------- top_n
@pytest.mark.parametrize("seed", range(5))
def test_top_n_matches_brute_force_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 6, (200,), generator=g).float()  # heavy ties
    for n in (1, 7, 50, 199, 200):
        assert top_n(s, n).tolist() == brute_top(s.tolist(), n)


def test_top_n_handles_inf_and_float64():
    s = torch.tensor([1.0, float("inf"), -float("inf"), 1.0, 3.0], dtype=torch.float64)
    assert top_n(s, 5).tolist() == [1, 4, 0, 3, 2]


@pytest.mark.parametrize("n", [0, -1, 6, 2.5, True])
def test_top_n_bad_n(n):
    with pytest.raises(BudgetError):
        top_n(torch.arange(5.0), n)


def test_top_n_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        top_n(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        top_n(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="empty"):
        top_n(torch.zeros(0), 1)


# ------------------------------------------------------------------------------------------------------ minmax
def test_minmax():
    v = torch.tensor([2.0, 4.0, 3.0, 2.0])
    assert torch.equal(minmax(v), torch.tensor([0.0, 1.0, 0.5, 0.0]))
    assert torch.equal(minmax(torch.full((3,), 7.0)), torch.zeros(3))
    with pytest.raises(ValueError):
        minmax(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        minmax(torch.zeros(0))


# ----------------------------------------------------------------------------------------------- Pareto front
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("keep_identical", [True, False])
def test_pareto_front_matches_brute_force(seed, keep_identical):
    g = torch.Generator().manual_seed(seed)
    n = 60
    if seed % 2:  # small integer grid: many identical points and ties in one coordinate
        f1 = torch.randint(0, 5, (n,), generator=g).double()
        f2 = torch.randint(0, 5, (n,), generator=g).double()
    else:
        f1, f2 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    got = pareto_front(f1, f2, keep_identical=keep_identical)
    assert sorted(got.tolist()) == brute_front(f1.tolist(), f2.tolist(), keep_identical)
    # ordered by f1 descending
    assert (f1[got][1:] <= f1[got][:-1]).all()


def brute_front_vectorised(f1, f2):
    """O(n^2) domination test in chunks (for n too large for the python loop)."""
    keep = torch.zeros(f1.numel(), dtype=torch.bool)
    for s in range(0, f1.numel(), 512):
        p1, p2 = f1[s:s + 512, None], f2[s:s + 512, None]
        dom = (f1[None] >= p1) & (f2[None] >= p2) & ((f1[None] > p1) | (f2[None] > p2))
        keep[s:s + 512] = ~dom.any(1)
    return torch.nonzero(keep).squeeze(1).tolist()


@pytest.mark.parametrize("kind", ["continuous", "grid", "antidiagonal", "skewed"])
def test_pareto_front_prefilter_path_matches_brute_force(kind):
    g = torch.Generator().manual_seed(7)
    n = 6000  # > 4096: the sample-based prefilter runs
    if kind == "continuous":
        f1, f2 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    elif kind == "grid":
        f1 = torch.randint(0, 30, (n,), generator=g).float()
        f2 = torch.randint(0, 30, (n,), generator=g).float()
    elif kind == "antidiagonal":  # every point on the front
        f1 = torch.randperm(n, generator=g).float()
        f2 = -f1
    else:  # a few huge values, as GL has
        f1 = torch.rand(n, generator=g) ** 8
        f2 = torch.rand(n, generator=g) ** 8
    ref = brute_front_vectorised(f1, f2)
    assert sorted(pareto_front(f1, f2).tolist()) == ref
    assert torch.equal(pareto_front(f1, f2), pareto_front(f1, f2, prefilter=False))
    # the hint only steers the prefilter's sample: even an adversarial one leaves the front exact
    assert sorted(pareto_front(f1, f2, hint=-(f1 + f2)).tolist()) == ref
    assert torch.equal(pareto_front(f1, f2, keep_identical=False),
                       pareto_front(f1, f2, keep_identical=False, prefilter=False))


def test_pareto_front_identical_points_all_kept_or_first():
    f1 = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    f2 = torch.tensor([5.0, 1.0, 1.0, 9.0, 0.5, 2.0])
    assert sorted(pareto_front(f1, f2).tolist()) == [0, 1, 2, 3, 5]
    assert sorted(pareto_front(f1, f2, keep_identical=False).tolist()) == [0, 1, 3, 5]


def test_pareto_front_neg_inf_and_errors():
    f1 = torch.tensor([2.0, 1.0])
    f2 = torch.tensor([-float("inf"), -float("inf")])
    assert pareto_front(f1, f2).tolist() == [0]
    with pytest.raises(ValueError, match="shape"):
        pareto_front(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        pareto_front(torch.tensor([float("nan")]), torch.zeros(1))


# ------------------------------------------------------------------------------------------------ budgets
def test_neurons_to_weights_fills_exactly_n():
    idx = WeightIndex(d=3, d_ff=5)
    w, used = neurons_to_weights(torch.tensor([4, 1, 2]), idx, n_weights=8)
    assert used.tolist() == [4, 1]
    assert w.shape == (8, 3)
    # neuron 4: row 4 of W_bef (3 weights), then column 4 of W_aft (3 weights); neuron 1: its first 2 weights
    expected = [[0, 4, 0], [0, 4, 1], [0, 4, 2], [1, 0, 4], [1, 1, 4], [1, 2, 4], [0, 1, 0], [0, 1, 1]]
    assert w.tolist() == expected
    w2, used2 = neurons_to_weights(torch.tensor([4, 1, 2]), idx, n_weights=8, whole_neurons=True)
    assert w2.shape == (12, 3) and used2.tolist() == [4, 1]
    with pytest.raises(BudgetError):
        neurons_to_weights(torch.tensor([4]), idx, n_weights=7)


def test_select_weight_and_neuron_levels():
    idx = WeightIndex(d=2, d_ff=4)
    scores = torch.arange(idx.total, dtype=torch.float32).flip(0)  # global index 0 is best
    w, neurons = select(scores, "weight", 3, idx)
    assert neurons is None and idx.to_flat(w).tolist() == [0, 1, 2]
    ns = torch.tensor([0.1, 0.9, 0.5, 0.9])
    w, neurons = select(ns, "neuron", 5, idx)
    assert neurons.tolist() == [1, 3] and w.shape == (5, 3)
    assert idx.neuron_of(idx.to_flat(w)).tolist() == [1, 1, 1, 1, 3]
    w, neurons = select(ns, "neuron", 2, idx, unit="neurons")
    assert neurons.tolist() == [1, 3] and w.shape == (8, 3)


def test_select_own_selection_and_errors():
    idx = WeightIndex(d=2, d_ff=4)
    scores = torch.rand(idx.total)
    w, _ = select(scores, "weight", "front", idx, own=torch.tensor([5, 0]))
    assert idx.to_flat(w).tolist() == [5, 0]
    with pytest.raises(BudgetError, match="own selection"):
        select(scores, "weight", "front", idx)
    with pytest.raises(BudgetError):
        select(scores, "weight", "top", idx)
    with pytest.raises(BudgetError, match="exceeds"):
        select(scores, "weight", idx.total + 1, idx)
    with pytest.raises(BudgetError):
        select(scores, "weight", 0, idx)
    with pytest.raises(BudgetError, match="exceeds"):
        select(torch.rand(4), "neuron", 5, idx, unit="neurons")
    with pytest.raises(ValueError, match="entries"):
        select(torch.rand(5), "neuron", 1, idx)
    with pytest.raises(ValueError, match="level"):
        select(scores, "layer", 1, idx)


# ----------------------------------------------------------------------------------------------- localize()
def test_localize_runs_a_method_in_batches_and_records_provenance():
    head = tiny_head()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    neg = torch.arange(30) % 3 == 0
    r1 = localize(head, x, y, neg, "grad_loss", 10, batch_size=4)
    r2 = localize(head, x, y, neg, "grad_loss", 10, batch_size=100)
    torch.testing.assert_close(r1.scores, r2.scores, rtol=1e-5, atol=1e-7)
    assert r1.weights.shape == (10, 3) and r1.level == "weight" and r1.budget == 10
    assert r1.provenance["n_neg"] == 10 and r1.provenance["n_pos"] == 20
    assert r1.provenance["wall_time_s"] >= 0
    assert torch.equal(head.index.to_flat(r1.weights), top_n(r1.scores, 10))
    r = localize(head, None, None, None, "magnitude", 5)
    assert r.weights.shape == (5, 3)
    with pytest.raises(ValueError, match="needs inputs"):
        localize(head, None, None, None, "grad_loss", 5)
    with pytest.raises(ValueError, match="rows"):
        localize(head, x, y[:5], neg, "grad_loss", 5)
