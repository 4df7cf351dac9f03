"""Fitness and its evaluators (lightning_modules/repair/fitness.py): the batched changed-weights-only evaluator
equals the full head for every candidate (float64, both matrices, shared rows/columns), the formula equals a
hand-written reference, and bad input raises."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vitfl.lightning_modules.repair.fitness import (EPILOGUES, FullBatchFitness, LoopFitness, NonFiniteFitnessError,
                                              SparseFitness, fused_scores, make_fitness, repair_fitness)
from vitfl.lightning_modules.repair.patch import RepairInputError, read_values
from vitfl.localization.ffn import FFNHead

D, C = 8, 5


pytestmark = pytest.mark.usefixtures("one_thread")


class LayerScale(nn.Module):  # timm's: x * gamma
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.gamma


class Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def head(kind="plain", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    post = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C))
    if kind == "unfoldable":
        post = nn.Sequential(nn.LayerNorm(D), Tanh(), nn.Linear(D, C))
    if kind == "nested":
        post = nn.Sequential(nn.LayerNorm(D), nn.Sequential(nn.Identity(), nn.Dropout(0.1)), nn.Linear(D, C))
    h = FFNHead(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D),
                LayerScale(D) if kind == "layerscale" else None, post, "hf")
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return h.to(dtype).eval()


# several weights in the same W_bef row (neuron 1), the same W_aft row (2) and column (1, also a touched neuron),
# a W_aft weight whose column is a touched neuron (1) and one whose column is not (7)
WEIGHTS = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 5, 0], [0, 30, 7], [1, 2, 1], [1, 2, 5], [1, 3, 1], [1, 0, 7],
                        [1, 7, 30]])


def data(n=30, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    neg = torch.rand(n, generator=g) < 0.4
    neg[0] = True
    return x, y, neg


def candidates(p=7, k=len(WEIGHTS), seed=2, dtype=torch.float64):
    return torch.randn(p, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_fitness(h, weights, values, x, y, neg, alpha=10.0):
    """Independent reference: a full head copy per candidate, the formula written out input by input."""
    out = []
    for v in values:
        hc = h.copy()
        with torch.no_grad():
            for (m, r, c), val in zip(weights.tolist(), v):
                (hc.fc_bef if m == 0 else hc.fc_aft).weight[r, c] = val
            logits = hc(x)
        total = 0.0
        for i in range(len(x)):
            loss = float(F.cross_entropy(logits[i:i + 1], y[i:i + 1]))
            right = int(logits[i].argmax()) == int(y[i])
            term = 1.0 if right else 1.0 / (loss + 1.0)
            total += alpha * term if neg[i] else term
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["plain", "layerscale", "unfoldable", "nested"])
@pytest.mark.parametrize("evaluator,opts", [("sparse", {"kernel": "explicit", "chunk_size": 3}),
                                            ("sparse", {"kernel": "folded", "chunk_size": 2}),
                                            ("sparse", {"kernel": "auto"}), ("full", {"chunk_size": 3})])
def test_batched_fitness_equals_full_head_for_every_candidate(kind, evaluator, opts):
    h = head(kind)
    x, y, neg = data()
    vals = candidates()
    if kind == "unfoldable" and opts.get("kernel") == "folded":
        with pytest.raises(RepairInputError, match="folded"):
            make_fitness(evaluator, h, WEIGHTS, x, y, neg, **opts)
        return
    ev = make_fitness(evaluator, h, WEIGHTS, x, y, neg, **opts)
    loop = LoopFitness(h, WEIGHTS, x, y, neg)
    torch.testing.assert_close(ev.logits(vals), loop.logits(vals), rtol=1e-10, atol=1e-10)
    res = ev(vals)
    torch.testing.assert_close(res.fitness, reference_fitness(h, WEIGHTS, vals, x, y, neg), rtol=1e-10, atol=1e-10)
    ref = loop(vals)
    assert torch.equal(res.n_patched, ref.n_patched) and torch.equal(res.n_broken, ref.n_broken)


@pytest.mark.parametrize("which", ["bef_only", "aft_only", "single"])
def test_sparse_fitness_with_one_matrix_only(which):
    h = head()
    x, y, neg = data()
    w = {"bef_only": WEIGHTS[WEIGHTS[:, 0] == 0], "aft_only": WEIGHTS[WEIGHTS[:, 0] == 1],
         "single": WEIGHTS[:1]}[which]
    vals = candidates(k=len(w))
    loop = LoopFitness(h, w, x, y, neg).logits(vals)
    for kernel in ("explicit", "folded"):
        torch.testing.assert_close(SparseFitness(h, w, x, y, neg, kernel=kernel).logits(vals), loop,
                                   rtol=1e-10, atol=1e-10)


def test_original_values_reproduce_the_heads_logits_and_head_is_untouched():
    h = head()
    x, y, neg = data()
    before = [p.clone() for p in h.parameters()]
    for ev in (SparseFitness(h, WEIGHTS, x, y, neg), LoopFitness(h, WEIGHTS, x, y, neg),
               FullBatchFitness(h, WEIGHTS, x, y, neg)):
        out = ev.logits(torch.stack([ev.old, candidates(1)[0]]))
        torch.testing.assert_close(out[0], h(x), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, h.parameters()))


def test_float32_sparse_close_to_loop():
    h = head(dtype=torch.float32)
    x, y, neg = data(dtype=torch.float32)
    vals = candidates(dtype=torch.float32) * 0.1
    for kernel in ("explicit", "folded"):
        torch.testing.assert_close(SparseFitness(h, WEIGHTS, x, y, neg, kernel=kernel).logits(vals),
                                   LoopFitness(h, WEIGHTS, x, y, neg).logits(vals), rtol=1e-4, atol=1e-4)


def test_fitness_formula_variants_by_hand():
    logits = torch.tensor([[[3.0, 0.0, 0.0],    # neg, correct (label 0)
                            [0.0, 2.0, 0.0],    # neg, wrong (label 2)
                            [0.0, 0.0, 1.0],    # pos, correct (label 2)
                            [1.0, 0.0, 0.0]]], dtype=torch.float64)  # pos, wrong (label 1)
    y = torch.tensor([0, 2, 2, 1])
    neg = torch.tensor([True, True, False, False])
    L1 = math.log(math.exp(0) + math.exp(2) + math.exp(0)) - 0.0
    L3 = math.log(math.exp(1) + 2) - 0.0
    pos_b, neg_b = 1 + 1 / (L3 + 1), 1 + 1 / (L1 + 1)
    r = repair_fitness(logits, y, neg, alpha=10.0)
    assert r.fitness.item() == pytest.approx(pos_b + 10 * neg_b)
    assert r.n_patched.item() == 1 and r.n_broken.item() == 1
    r = repair_fitness(logits, y, neg, alpha=10.0, variant="reptran")
    assert r.fitness.item() == pytest.approx(10 / 11 * neg_b / 2 + 1 / 11 * pos_b / 2)
    p = logits[0].softmax(-1)
    Lq = [float(torch.logsumexp(p[i], 0) - p[i, y[i]]) for i in range(4)]
    r = repair_fitness(logits, y, neg, alpha=2.0, loss="softmax_ce")
    assert r.fitness.item() == pytest.approx((1 + 1 / (Lq[3] + 1)) + 2 * (1 + 1 / (Lq[1] + 1)))


def test_reptran_variant_matches_reference_on_random_inputs():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (12,), generator=g)
    neg = torch.arange(12) < 5
    loss = torch.stack([F.cross_entropy(l, y, reduction="none") for l in logits])
    term = torch.where(logits.argmax(-1) == y, 1.0, 1 / (loss + 1)).double()
    ref = 10 / 11 * term[:, neg].mean(1) + 1 / 11 * term[:, ~neg].mean(1)
    torch.testing.assert_close(repair_fitness(logits, y, neg, variant="reptran").fitness, ref)
    ref = term[:, ~neg].sum(1) + 3.0 * term[:, neg].sum(1)
    torch.testing.assert_close(repair_fitness(logits, y, neg, alpha=3.0).fitness, ref)


def test_bad_inputs_raise_clear_errors():
    h = head()
    x, y, neg = data()
    with pytest.raises(RepairInputError, match="I_neg is empty"):
        SparseFitness(h, WEIGHTS, x, y, torch.zeros_like(neg))
    with pytest.raises(RepairInputError, match="budget 0"):
        SparseFitness(h, torch.zeros(0, 3, dtype=torch.long), x, y, neg)
    with pytest.raises(RepairInputError, match="duplicates"):
        SparseFitness(h, torch.cat([WEIGHTS, WEIGHTS[:1]]), x, y, neg)
    with pytest.raises(RepairInputError, match="out of range"):
        SparseFitness(h, torch.tensor([[0, 4 * D, 0]]), x, y, neg)
    with pytest.raises(RepairInputError, match="matrix ids"):
        SparseFitness(h, torch.tensor([[2, 0, 0]]), x, y, neg)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(RepairInputError, match="NaN"):
        SparseFitness(h, WEIGHTS, bad, y, neg)
    with pytest.raises(RepairInputError, match="unknown fitness variant"):
        SparseFitness(h, WEIGHTS, x, y, neg, variant="nope")
    with pytest.raises(RepairInputError, match="unknown fitness evaluator"):
        make_fitness("nope", h, WEIGHTS, x, y, neg)
    with pytest.raises(RepairInputError, match="labels outside"):
        SparseFitness(h, WEIGHTS, x, y + C, neg)
    ev = SparseFitness(h, WEIGHTS, x, y, neg)
    with pytest.raises(RepairInputError, match=r"\[P, K="):
        ev(torch.zeros(2, 3))


@pytest.mark.parametrize("evaluator", ["sparse", "full", "loop"])
def test_nan_fitness_from_a_bad_head_raises(evaluator):
    h = head()
    with torch.no_grad():
        h.post[1].bias[0] = float("nan")
    x, y, neg = data()
    ev = make_fitness(evaluator, h, WEIGHTS, x, y, neg)
    with pytest.raises(NonFiniteFitnessError, match="NaN"):
        ev(candidates(2))


def test_doctests():
    import doctest

    import vitfl.lightning_modules.repair.fitness as fitness_module

    r = doctest.testmod(fitness_module)
    assert r.attempted > 0 and r.failed == 0


# ----------------------------------------------------------------------------------------------- placements
def placement(kind, seed=0, n=40):
    """Located weights of a given shape on the D = 8, 4D = 32 head: ``random`` (spread over both matrices),
    ``clustered`` (few neurons / rows, both matrices), ``aft_heavy`` (few W_bef rows, many W_aft rows, as ours
    picks), ``aft_on_touched`` (W_aft weights on the columns of the touched neurons: the per-candidate bmm),
    ``aft_on_touched_sparse`` (one such weight among many rows: the segment-sum path)."""
    g = torch.Generator().manual_seed(seed)
    d_ff = 4 * D
    if kind == "random":
        flat = torch.randperm(2 * D * d_ff, generator=g)[:n]
        m = (flat >= D * d_ff).long()
        rest = flat - m * D * d_ff
        rows = torch.where(m == 0, rest // D, rest // d_ff)
        cols = torch.where(m == 0, rest % D, rest % d_ff)
        return torch.stack([m, rows, cols], 1)
    if kind == "clustered":
        bef = [[0, j, c] for j in (3, 9) for c in range(D)]
        aft = [[1, i, c] for i in (1, 6) for c in torch.randperm(d_ff, generator=g)[:6].tolist()]
        return torch.tensor(bef + aft)
    if kind == "aft_heavy":
        bef = [[0, 4, c] for c in (0, 5)]
        aft = [[1, i, c] for i in range(D) for c in torch.randperm(d_ff, generator=g)[:3].tolist()]
        return torch.tensor(bef + aft)
    if kind == "aft_on_touched":
        bef = [[0, j, c] for j in (2, 7) for c in (1, 4)]
        aft = [[1, i, j] for i in range(D) for j in (2, 7)] + [[1, 0, 11], [1, 3, 20]]
        return torch.tensor(bef + aft)
    if kind == "aft_on_touched_sparse":
        bef = [[0, j, c] for j in range(0, 24, 3) for c in (0, 6)]
        aft = [[1, 5, 3]] + [[1, i, 30 - i] for i in range(D)]
        return torch.tensor(bef + aft)
    raise ValueError(kind)


PLACEMENTS = ["random", "clustered", "aft_heavy", "aft_on_touched", "aft_on_touched_sparse"]


@pytest.mark.parametrize("kind", PLACEMENTS)
@pytest.mark.parametrize("kernel", ["explicit", "folded", "auto"])
@pytest.mark.parametrize("head_kind", ["plain", "layerscale"])
@pytest.mark.parametrize("epilogue", ["eager", "compiled"])
def test_fused_fitness_equals_full_head_in_every_placement(kind, kernel, head_kind, epilogue):
    h = head(head_kind, seed=3)
    w = placement(kind)
    x, y, neg = data(n=45, seed=4)
    vals = read_values(h, w) + 0.7 * candidates(p=9, k=len(w), seed=5)  # near the head: right and wrong inputs
    loop = LoopFitness(h, w, x, y, neg)
    ref_logits = loop.logits(vals)
    correct = ref_logits.argmax(-1) == y
    assert 0 < int(correct.sum()) < correct.numel()  # both branches of the fused pass are exercised
    for variant, loss in (("arachne", "logits"), ("reptran", "logits"), ("arachne", "softmax_ce")):
        ev = SparseFitness(h, w, x, y, neg, kernel=kernel, chunk_size=4, variant=variant, loss=loss,
                           epilogue=epilogue)
        if kernel != "auto":
            assert ev.kernel == kernel  # the forced kernel is the one evaluated, not only a correct one
        ref = LoopFitness(h, w, x, y, neg, variant=variant, loss=loss)(vals)
        res = ev(vals)
        torch.testing.assert_close(res.fitness, ref.fitness, rtol=0, atol=1e-10)
        assert torch.equal(res.n_patched, ref.n_patched) and torch.equal(res.n_broken, ref.n_broken)
    torch.testing.assert_close(ev.logits(vals), ref_logits, rtol=1e-10, atol=1e-10)
    if kind == "aft_on_touched":
        assert ev._a1_flat is not None  # the per-candidate bmm path
    if kind == "aft_on_touched_sparse":
        assert ev._seg_a1 is not None  # the segment-sum path


def test_fused_correctness_breaks_ties_like_argmax():
    """Classes 0 and 1 with identical classifier rows tie exactly: argmax picks class 0, so an input labelled 1
    is wrong and one labelled 0 is right, in the fused pass as in the full head."""
    h = head("plain", seed=6)
    with torch.no_grad():
        h.post[1].weight[1] = h.post[1].weight[0]
        h.post[1].bias[1] = h.post[1].bias[0] + 50.0  # ... and both far above the other classes
        h.post[1].bias[0] += 50.0
    x, _, neg = data(n=20, seed=7)
    y = torch.tensor([0, 1] * 10)
    w = placement("clustered")
    vals = read_values(h, w) + 0.1 * candidates(p=3, k=len(w), seed=8)
    logits = LoopFitness(h, w, x, y, neg).logits(vals)
    assert bool((logits[..., 0] == logits[..., 1]).all())  # the tie is exact in the reference
    ref = repair_fitness(logits, y, neg)
    assert bool((ref.n_patched + ref.n_broken > 0).all())
    for kernel, epilogue in itertools.product(("explicit", "folded"), EPILOGUES):
        ev = SparseFitness(h, w, x, y, neg, kernel=kernel, epilogue=epilogue)
        zs = ev.logits(vals)
        if not bool((zs[..., 0] == zs[..., 1]).all()):
            pytest.fail("the fused kernel broke the exact tie of identical classifier rows")
        res = ev(vals)
        torch.testing.assert_close(res.fitness, ref.fitness, rtol=0, atol=1e-10)
        assert torch.equal(res.n_patched, ref.n_patched) and torch.equal(res.n_broken, ref.n_broken)


@pytest.mark.parametrize("kind", ["random", "aft_heavy"])
@pytest.mark.parametrize("update", ["deferred", "immediate"])
def test_de_trajectory_with_the_fused_fitness_equals_the_full_head(kind, update):
    """A fixed seed gives the same search with the fused evaluator as with the full head: best and mean fitness
    after every generation (float64, <= 1e-10) and the same final population."""
    from vitfl.lightning_modules.repair.de import DifferentialEvolution, matrix_bounds, matrix_init_stats

    h = head("plain", seed=9)
    w = placement(kind, seed=1, n=30)
    x, y, neg = data(n=40, seed=10)
    lo, hi, mu, sd = (torch.empty(len(w), dtype=torch.float64) for _ in range(4))
    for k, W in enumerate(h.weights()):
        sel = w[:, 0] == k
        lo[sel], hi[sel] = matrix_bounds(W.detach())
        mu[sel], sd[sel] = matrix_init_stats(W.detach())

    def trajectory(ev):
        de = DifferentialEvolution(ev, lo, hi, mu, sd, pop_size=12, generations=10, update=update, seed=3,
                                   dtype=torch.float64, num_vars=len(w))
        de.initialize()
        out = [(float(de.fit.max()), float(de.fit.mean()))]
        while not de.done:
            de.step()
            out.append((float(de.fit.max()), float(de.fit.mean())))
        return torch.tensor(out, dtype=torch.float64), de.pop

    ref, ref_pop = trajectory(LoopFitness(h, w, x, y, neg))
    assert float(ref[-1, 0]) > float(ref[0, 0])  # the search moved
    for kernel, epilogue in itertools.product(("explicit", "folded"), EPILOGUES):
        got, pop = trajectory(SparseFitness(h, w, x, y, neg, kernel=kernel, epilogue=epilogue))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(pop, ref_pop, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "aft_heavy"])
def test_sync_free_path_equals_the_cpu_path(kind):
    """The CUDA path (argmax, loss of every input, no data-dependent shapes) run on the CPU gives the same
    fitness as the default CPU path and the full head."""
    h = head("layerscale", seed=11)
    w = placement(kind, seed=2)
    x, y, neg = data(n=36, seed=12)
    vals = read_values(h, w) + 0.7 * candidates(p=6, k=len(w), seed=13)
    ref = LoopFitness(h, w, x, y, neg)(vals)
    for kernel in ("explicit", "folded"):
        ev = SparseFitness(h, w, x, y, neg, kernel=kernel)
        assert not ev.sync_free
        ev.sync_free = True
        res = ev(vals)
        torch.testing.assert_close(res.fitness, ref.fitness, rtol=0, atol=1e-10)
        assert torch.equal(res.n_patched, ref.n_patched) and torch.equal(res.n_broken, ref.n_broken)


#: calls that make the host wait for a CUDA device: a tensor read into Python, or a shape that depends on values
HOST_SYNCS = frozenset({"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero",
                        "argwhere", "unique", "unique_consecutive", "masked_select"})


class SyncCounter(TorchFunctionMode):
    """Records the torch calls made inside it that would synchronise with a CUDA device (counted on the CPU, so
    the GPU path's contract is checked without a GPU): :data:`HOST_SYNCS`, indexing with a bool mask, and
    ``repeat_interleave`` without ``output_size``."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        idx = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if (name in HOST_SYNCS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
                or (name == "repeat_interleave" and "output_size" not in kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("kernel", ["explicit", "folded"])
def test_gpu_path_evaluation_syncs_once_whatever_the_chunking(kernel):
    """The CUDA path of SparseFitness (``sync_free``) reads nothing back per candidate or per chunk: one host
    synchronisation per evaluation (the finiteness check), for 1, 4 or 12 chunks of 12 candidates; the CPU path,
    which computes the loss of the wrong inputs only, synchronises per chunk (the counter sees it)."""
    h = head("layerscale", seed=11)
    w = placement("random", seed=2)
    x, y, neg = data(n=36, seed=12)
    vals = read_values(h, w) + 0.7 * candidates(p=12, k=len(w), seed=13)
    counts = {}
    for sync_free, chunk in itertools.product((True, False), (1, 3, 12)):
        ev = SparseFitness(h, w, x, y, neg, kernel=kernel, chunk_size=chunk)
        ev.sync_free = sync_free
        ev(vals[:1])  # work buffers allocated
        with SyncCounter() as sc:
            ev(vals)
        counts[sync_free, chunk] = sc.calls
    for chunk in (1, 3, 12):
        assert counts[True, chunk] == ["__bool__"], counts[True, chunk]
    assert len(counts[False, 1]) > len(counts[False, 12]) > 1  # the counter detects per-chunk reads


def test_deferred_de_generation_syncs_a_fixed_number_of_times():
    """A deferred DE generation on the GPU path reads back once for the fitness check and once for its statistics
    (plus F, drawn on the CPU): the count does not grow with the population or the number of chunks, and the
    statistics equal those recomputed from the population."""
    from vitfl.lightning_modules.repair.de import DifferentialEvolution

    h = head("plain", seed=9)
    w = placement("random", seed=1, n=30)
    x, y, neg = data(n=40, seed=10)
    per_step = {}
    for pop_size, chunk in ((8, 2), (24, 3), (24, 24)):
        ev = SparseFitness(h, w, x, y, neg, chunk_size=chunk)
        ev.sync_free = True
        old = read_values(h, w)
        de = DifferentialEvolution(ev, old - 1, old + 1, old, 0.5, pop_size=pop_size, generations=6, seed=3,
                                   dtype=torch.float64, num_vars=len(w))
        de.initialize()
        de.step()
        with SyncCounter() as sc:
            stats = de.step()
        per_step[pop_size, chunk] = sorted(sc.calls)
        assert stats["best_fitness"] == float(de.fit.max()) and stats["mean_fitness"] == float(de.fit.mean())
        b = int(de.fit.argmax())
        assert stats["n_patched"] == int(de.aux["n_patched"][b]) and stats["n_broken"] == int(de.aux["n_broken"][b])
        ref = ev(de.pop)
        assert torch.equal(ref.fitness, de.fit) and torch.equal(ref.n_patched, de.aux["n_patched"])
    assert len(set(map(tuple, per_step.values()))) == 1, per_step
    assert len(per_step[8, 2]) <= 3, per_step  # F (CPU), the evaluator's finiteness check, the statistics


@pytest.mark.parametrize("loss", ["logits", "softmax_ce"])
def test_fused_scores_equal_argmax_and_cross_entropy_row_by_row(loss):
    """fused_scores (the compiled epilogue's formula, run eagerly) against a loop over inputs: argmax (ties on
    small integer logits: the first index wins) and torch's cross-entropy, with and without base and 1 / std."""
    g = torch.Generator().manual_seed(21)
    p, n, c = 4, 25, 6
    num = torch.randint(-2, 3, (p, n, c), generator=g).double()
    base = torch.randint(-1, 2, (n, c), generator=g).double()
    istd = torch.rand(p, n, generator=g, dtype=torch.float64) + 0.25
    y = torch.randint(0, c, (n,), generator=g)
    for b, s in ((None, None), (base, istd)):
        score, correct = fused_scores(num, y, b, s, loss)
        z = num if b is None else (num + b) * s[..., None]
        for q in range(p):
            for i in range(n):
                right = int(z[q, i].argmax()) == int(y[i])
                zi = z[q, i].softmax(-1) if loss == "softmax_ce" else z[q, i]
                ce = float(F.cross_entropy(zi[None], y[i:i + 1]))
                assert bool(correct[q, i]) == right
                assert float(score[q, i]) == pytest.approx(1.0 if right else 1.0 / (ce + 1.0), rel=0, abs=1e-12)
    ties = (num + base == (num + base).amax(-1, keepdim=True)).sum(-1) > 1
    assert bool(ties.any())  # the tie rule was exercised


def test_unknown_epilogue_is_a_clear_error():
    h = head("plain")
    x, y, neg = data()
    with pytest.raises(RepairInputError, match="epilogue 'fast'.*eager"):
        SparseFitness(h, WEIGHTS, x, y, neg, epilogue="fast")
