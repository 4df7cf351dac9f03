"""Every compat option / published method against an independent plain-numpy re-derivation of the *upstream* code.

The references below are written from the published definitions (posl/RepTran-replication ``src/utils/arachne.py``
``calculate_bi_fi`` / ``calculate_top_n_flattened`` / ``approximate_pareto_front``, ``src/utils/vit_util.py``
``get_vscore`` / ``localize_neurons_with_mean_activation`` / ``get_batched_hs``, the scripts ``exp-fl-5-5``,
``exp-fl-5-6``, ``exp-repair-4-1-1``, ``-4-1-2``; EleutherAI knowledge-neurons ``scaled_input``), not from the
project's code: a numpy forward of the FFN head with a hand-written backward (LayerNorm, exact GELU), per-batch
loops over ``np.array_split`` parts, and the published per-weight tensors built explicitly ([B, out, in]).

Sizes: |I_neg| = 45 (parts 23 + 22) in a shuffled "published" order, |I_pos| = 70 (24 + 23 + 23) ascending; float64
heads with and without LayerScale; results must agree to rel <= 1e-10 through ``localize`` and through the FL
LightningModule with loader batches of 7 and 512 (and 2 processes, ``slow``).
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

from conftest import randomize_, retry_spawn_teardown_abort
from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import array_split_sizes, compat_groups
from vitfl.localization.methods.reptran_compat import sample_correct_inputs
from vitfl.localization.ranking import localize

D, D_FF, C = 8, 32, 6
N_NEG, N_POS = 45, 70
TOL = 1e-10


class Scale(nn.Module):
    """LayerScale: x * gamma."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.gamma


def make_head(seed=0, layer_scale=False):
    torch.manual_seed(seed)
    head = FFNHead(nn.LayerNorm(D), nn.Linear(D, D_FF), nn.GELU(), nn.Linear(D_FF, D),
                   Scale(D) if layer_scale else None, nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C)), "hf")
    return randomize_(head, seed + 1, scale=0.3).double()


def make_data(seed=0):
    """x [115, D] (I_neg rows first, in a shuffled 'published' order of their sample ids; then I_pos ascending),
    labels, is_neg, and the sample ids of the rows."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(200)[: N_NEG + N_POS]
    neg_ids = ids[:N_NEG]                     # published order: not sorted
    pos_ids = np.sort(ids[N_NEG:])
    g = torch.Generator().manual_seed(seed)
    x_all = 1.5 * torch.randn(200, D, generator=g, dtype=torch.float64)
    y_all = torch.randint(0, C, (200,), generator=g)
    rows = np.concatenate([neg_ids, pos_ids])
    is_neg = torch.zeros(len(rows), dtype=torch.bool)
    is_neg[:N_NEG] = True
    return x_all[rows], y_all[rows], is_neg, rows


# ------------------------------------------------------------------------------ numpy head, hand-written backward
def params(head):
    p = {k: v.detach().double().numpy().copy() for k, v in head.state_dict().items()}
    ls = p.get("layer_scale.gamma", np.ones(D))
    return dict(g1=p["norm.weight"], b1=p["norm.bias"], e1=head.norm.eps, W1=p["fc_bef.weight"], c1=p["fc_bef.bias"],
                W2=p["fc_aft.weight"], c2=p["fc_aft.bias"], ls=ls, g2=p["post.0.weight"], b2=p["post.0.bias"],
                e2=head.post[0].eps, Wc=p["post.1.weight"], cc=p["post.1.bias"])


def ln(x, g, b, eps):
    mu = x.mean(1, keepdims=True)
    s = np.sqrt(((x - mu) ** 2).mean(1, keepdims=True) + eps)
    xh = (x - mu) / s
    return xh * g + b, xh, s


def ln_back(dy, xh, s, g):
    dyh = dy * g
    return (dyh - dyh.mean(1, keepdims=True) - xh * (dyh * xh).mean(1, keepdims=True)) / s


def gelu(z):
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def gelu_grad(z):
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def forward(P, x, a=None):
    """Every intermediate of the head on x [B, d] (``a`` given: the FFN activation replaced by it)."""
    h, _, _ = ln(x, P["g1"], P["b1"], P["e1"])
    z = h @ P["W1"].T + P["c1"]
    if a is None:
        a = gelu(z)
    n = a @ P["W2"].T + P["c2"]
    r = x + P["ls"] * n
    q, rh, rs = ln(r, P["g2"], P["b2"], P["e2"])
    logits = q @ P["Wc"].T + P["cc"]
    return dict(h=h, z=z, a=a, n=n, rh=rh, rs=rs, logits=logits)

def backward(P, f, dlogits):
    """(dW1, dW2, da, dz) for an upstream gradient on the logits [B, C]."""
    dq = dlogits @ P["Wc"]
    dr = ln_back(dq, f["rh"], f["rs"], P["g2"])
    dn = dr * P["ls"]
    dW2 = dn.T @ f["a"]
    da = dn @ P["W2"]
    dz = da * gelu_grad(f["z"])
    dW1 = dz.T @ f["h"]
    return dW1, dW2, da, dz


def softmax(v):
    e = np.exp(v - v.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- upstream formulas, re-derived
def up_bi_fi(P, xs, ys, b=32):
    """calculate_bi_fi over get_batched_hs(S, 32) = np.array_split(S, ceil(|S| / 32)): per part, bw = grad of
    the mean CE; fw = mean_x [W * o / (sum_k W o + 1e-8)] * grad of the summed logits (both per weight); then
    both averaged over the parts. Returns {"before": (bw, fw), "after": (bw, fw)}."""
    k = (len(xs) + b - 1) // b
    acc = {"before": [0.0, 0.0], "after": [0.0, 0.0]}
    for xb, yb in zip(np.array_split(xs, k), np.array_split(ys, k)):
        f = forward(P, xb)
        onehot = np.eye(C)[yb]
        bw1, bw2, _, _ = backward(P, f, (softmax(f["logits"]) - onehot) / len(xb))
        go1, go2, _, _ = backward(P, f, np.ones_like(f["logits"]))
        for name, W, o, bw, go in (("before", P["W1"], f["h"], bw1, go1), ("after", P["W2"], f["a"], bw2, go2)):
            impact = W[None, :, :] * o[:, None, :]                       # [B, out, in]
            norm = impact / (impact.sum(axis=2)[:, :, None] + 1e-8)
            fw = norm.mean(axis=0) * go
            acc[name][0] = acc[name][0] + bw
            acc[name][1] = acc[name][1] + fw
    return {n: (v[0] / k, v[1] / k) for n, v in acc.items()}


def up_two_sided(P, x, y, neg):
    pos_r, neg_r = up_bi_fi(P, x[~neg], y[~neg]), up_bi_fi(P, x[neg], y[neg])
    gl = [neg_r[ba][0] / (1 + pos_r[ba][0]) for ba in ("before", "after")]
    fi = [neg_r[ba][1] / (1 + pos_r[ba][1]) for ba in ("before", "after")]
    return gl, fi


def flat(pair):
    return np.concatenate([pair[0].reshape(-1), pair[1].reshape(-1)])


def up_top_n_scores(gl_list, fi_list, wg=0.5, wf=0.5):
    """calculate_top_n_flattened's weighted_scores: minmax with + 1e-8, jointly over both matrices."""
    g, f = flat(gl_list), flat(fi_list)
    return wg * (g - g.min()) / (g.max() - g.min() + 1e-8) + wf * (f - f.min()) / (f.max() - f.min() + 1e-8)


def up_pareto(g, f):
    """approximate_pareto_front, literally."""
    pts = np.stack([g, f], axis=1)
    mask = np.ones(len(pts), dtype=bool)
    for i, p in enumerate(pts):
        if mask[i]:
            mask[mask] &= ~(np.all(pts[mask] <= p, axis=1) & np.any(pts[mask] < p, axis=1))
    return np.where(mask)[0]


def up_vscore(a, abs_=True, covavg=True):
    """get_vscore(abs, covavg) (the pre-April-2025 version = abs False, covavg True)."""
    cov = np.cov(a, rowvar=False)
    if abs_:
        cov = np.abs(cov)
    var = np.diag(cov)
    s = np.nansum(cov, axis=0)
    term = (s - var) / (s.shape[0] - 1) if covavg else s - var
    return var + term


def up_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def up_neuron_score(a_cor, a_mis, abs_, covavg, alpha=None):
    """localize_neurons_with_mean_activation's neuron_score (all neurons)."""
    vd = np.abs(up_vscore(a_cor, abs_, covavg) - up_vscore(a_mis, abs_, covavg))
    ma = a_mis.mean(0)
    vd, ma = up_minmax(vd), up_minmax(ma)
    return vd * ma if alpha is None else alpha * vd + (1 - alpha) * ma


def activations(P, x):
    return forward(P, x)["a"]


def up_ours_reptran(P, x, y, neg, true_label):
    """exp-repair-4-1-1: NS (|cov| sum V-score, cor side = correct inputs of the true label) x published GL / FI
    (all correct inputs), then calculate_top_n_flattened's scores."""
    a = activations(P, x)
    cor = ~neg & (y == true_label) if true_label is not None else ~neg
    ns = up_neuron_score(a[cor], a[neg], abs_=True, covavg=False)
    gl, fi = up_two_sided(P, x, y, neg)
    gl = [gl[0] * ns[:, None], gl[1] * ns[None, :]]
    fi = [fi[0] * ns[:, None], fi[1] * ns[None, :]]
    return up_top_n_scores(gl, fi)


def up_ours_fl5(P, x, y, neg, n=None):
    """exp-fl-5-6 with the vit_util of that time (signed-mean V-score): |0.5 G + 0.5 NS|."""
    a = activations(P, x)
    ns = up_neuron_score(a[~neg], a[neg], abs_=False, covavg=True, alpha=0.5)
    if n is not None:
        top = np.argsort(-ns, kind="stable")[:n]
        keep = np.zeros_like(ns)
        keep[top] = ns[top]
        ns = keep
    g = up_bi_fi(P, x[neg], y[neg])
    gb, ga = g["before"][0], g["after"][0]
    lo, hi = min(gb.min(), ga.min()), max(gb.max(), ga.max())
    gb, ga = (gb - lo) / (hi - lo), (ga - lo) / (hi - lo)
    wb = 0.5 * gb + 0.5 * ns[:, None]
    wa = 0.5 * ga + 0.5 * ns[None, :]
    return np.abs(np.concatenate([wb.reshape(-1), wa.reshape(-1)]))


def up_ig(P, x, y, m=20, linspace=True, times_activation=True):
    """EleutherAI knowledge-neurons: scaled_input = a * linspace(0, 1, m); attr = a / m * sum_k dP(y)/da.
    RepTran exp-fl-2-1: scaled_input = a * i / m, i = 0..m-1; score = the bare sum_k dP(y)/da. Mean over x."""
    f = forward(P, x)
    a = f["a"]
    total = np.zeros_like(a)
    for alpha in (np.linspace(0.0, 1.0, m) if linspace else [i / m for i in range(m)]):
        g = forward(P, x, a=alpha * a)
        p = softmax(g["logits"])
        py = p[np.arange(len(y)), y]
        dlogits = py[:, None] * (np.eye(C)[y] - p)  # d p_y / d logits
        _, _, da, _ = backward(P, g, dlogits)
        total += da
    return (a / m * total if times_activation else total).mean(0)


def reference(name, head, x, y, neg, opts):
    P = params(head)
    x, y, neg = x.numpy(), y.numpy(), neg.numpy()
    if name == "grad_loss_reptran":
        return flat(up_two_sided(P, x, y, neg)[0])
    if name == "forward_impact_reptran":
        return flat(up_two_sided(P, x, y, neg)[1])
    if name in ("arachne_w_reptran", "bl_fl5"):
        return up_top_n_scores(*up_two_sided(P, x, y, neg))
    if name == "ours_reptran":
        return up_ours_reptran(P, x, y, neg, opts.get("true_label"))
    if name == "ours_fl5":
        return up_ours_fl5(P, x, y, neg, opts.get("n"))
    if name == "ig":
        return up_ig(P, x[neg], y[neg], linspace=opts.get("riemann") == "linspace",
                     times_activation=opts.get("times_activation", True))
    if name in ("vdiff", "vdiff_x_mean_act"):
        variant = {"abs_sum": (True, False), "abs_mean": (True, True), "signed_mean": (False, True),
                   "signed_sum": (False, False)}[opts["vscore"]]
        a = activations(P, x)
        vd = up_minmax(np.abs(up_vscore(a[~neg], *variant) - up_vscore(a[neg], *variant)))
        return vd if name == "vdiff" else vd * up_minmax(a[neg].mean(0))
    raise KeyError(name)


#: (method, options) of every compat method / option
CASES = [
    ("grad_loss_reptran", {}),
    ("forward_impact_reptran", {}),
    ("arachne_w_reptran", {}),
    ("bl_fl5", {}),
    ("ours_reptran", {"true_label": 2}),
    ("ours_reptran", {"true_label": None}),
    ("ours_fl5", {}),
    ("ours_fl5", {"n": 7}),
    ("ig", {"riemann": "linspace"}),
    ("ig", {"times_activation": False}),
    ("vdiff", {"vscore": "abs_mean"}),
    ("vdiff", {"vscore": "signed_mean"}),
    ("vdiff", {"vscore": "signed_sum"}),
    ("vdiff_x_mean_act", {"vscore": "signed_mean"}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CASES]


def assert_well_conditioned(head, x, y, neg, at_least=1e-3):
    """The published two-sided GL / FI divide by 1 + GL(I_pos) / 1 + FI(I_pos), which are *signed*: where one
    comes near 0, any two float64 implementations (different summation orders) differ by far more than 1e-10 at
    that weight (measured: |1 + FI_pos| = 1.6e-4 gave rel 1e-9). The test data keep every such denominator
    >= ``at_least`` in magnitude, so the comparison measures the formula, not the conditioning."""
    pr = up_bi_fi(params(head), x[~neg].numpy(), y[~neg].numpy())
    worst = min(float(np.abs(1 + pr[ba][k]).min()) for ba in ("before", "after") for k in (0, 1))
    assert worst >= at_least, f"test data ill-conditioned for the two-sided published formula ({worst:.2e})"


def rel(got, want):
    got = np.asarray(got, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def trainer(**kw):
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "inference_mode": False, "use_distributed_sampler": False,
                        "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kw})


def module_scores(head, name, x, y, neg, opts, batch_size, **kw):
    from vitfl.lightning_modules.fl import FLModule

    module = FLModule(head, name, x, y, neg, method_options=opts, batch_size=batch_size)
    trainer(**kw).test(module, verbose=False)
    return module


# ---------------------------------------------------------------------------------------------------- tests
def test_array_split_sizes_match_numpy():
    for n in (0, 1, 31, 32, 33, 40, 45, 64, 70, 97, 1000):
        for b in (1, 7, 32):
            want = [len(p) for p in np.array_split(np.arange(n), max(1, -(-n // b)))] if n else []
            assert array_split_sizes(n, b) == want, (n, b)
    assert array_split_sizes(70, 32) == [24, 23, 23] and array_split_sizes(40, 32) == [20, 20]
    g = compat_groups(torch.tensor([True] * 45 + [False] * 70), 32)
    assert torch.unique_consecutive(g, return_counts=True)[1].tolist() == [23, 22, 24, 23, 23]
    with pytest.raises(ValueError, match="positive int"):
        array_split_sizes(5, 0)


@pytest.mark.parametrize("layer_scale", [False, True])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compat_matches_upstream_through_localize(case, layer_scale):
    name, opts = case
    head = make_head(seed=3 + layer_scale, layer_scale=layer_scale)
    x, y, neg, _ = make_data(seed=5 + layer_scale)
    assert_well_conditioned(head, x, y, neg)
    want = reference(name, head, x, y, neg, opts)
    for bs in (7, 512):
        got = localize(head, x, y, neg, name, 5, batch_size=bs, **opts).scores
        assert got.dtype == torch.float64
        assert rel(got.numpy(), want) <= TOL, (name, opts, bs, rel(got.numpy(), want))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in ("vdiff", "vdiff_x_mean_act")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] not in ("vdiff", "vdiff_x_mean_act")])
def test_compat_matches_upstream_through_the_fl_module(case):
    name, opts = case
    head = make_head(seed=10, layer_scale=True)
    x, y, neg, _ = make_data(seed=11)
    assert_well_conditioned(head, x, y, neg)
    want = reference(name, head, x, y, neg, opts)
    for bs in (7, 512):
        got = module_scores(head, name, x, y, neg, opts, bs).scores
        assert got.dtype == torch.float64
        assert rel(got.numpy(), want) <= TOL, (name, opts, bs, rel(got.numpy(), want))


def test_bl_reptran_front_is_the_published_pareto_front():
    head = make_head(seed=11)
    x, y, neg, _ = make_data(seed=12)
    P = params(head)
    gl, fi = up_two_sided(P, x.numpy(), y.numpy(), neg.numpy())
    want = up_pareto(flat(gl), flat(fi))
    for bs in (7, 512):
        r = localize(head, x, y, neg, "bl_reptran", "front", batch_size=bs)
        assert sorted(head.index.to_flat(r.weights).tolist()) == sorted(want.tolist())
        m = module_scores(head, "bl_reptran", x, y, neg, {}, bs)
        assert sorted(m.localizer.own_selection().tolist()) == sorted(want.tolist())


def test_published_order_of_i_neg_matters_and_is_kept():
    """The I_neg order the runner gives decides the parts: reversing it changes the published GL."""
    head = make_head(seed=13)
    x, y, neg, _ = make_data(seed=14)
    a = localize(head, x, y, neg, "grad_loss_reptran", 5).scores
    order = torch.cat([torch.arange(N_NEG).flip(0), torch.arange(N_NEG, N_NEG + N_POS)])
    b = localize(head, x[order], y[order], neg[order], "grad_loss_reptran", 5).scores
    assert rel(a.numpy(), b.numpy()) > 1e-6
    want = reference("grad_loss_reptran", head, x[order], y[order], neg[order], {})
    assert rel(b.numpy(), want) <= TOL
    # interleaved rows: each set keeps the order given (a stable partition), same as feeding them grouped
    mix = torch.randperm(N_NEG + N_POS, generator=torch.Generator().manual_seed(0))
    keep = torch.cat([mix[neg[mix]], mix[~neg[mix]]])
    c = localize(head, x[mix], y[mix], neg[mix], "grad_loss_reptran", 5, batch_size=9).scores
    d = localize(head, x[keep], y[keep], neg[keep], "grad_loss_reptran", 5).scores
    assert rel(c.numpy(), d.numpy()) <= TOL


def test_a_cut_compat_batch_is_an_error():
    head = make_head()
    x, y, neg, _ = make_data()
    loc = get_localizer("grad_loss_reptran")(head)
    g = compat_groups(neg, 32)
    loc.update(x[:10], y[:10], neg[:10], group=g[:10])
    with pytest.raises(ValueError, match="more than one update"):
        loc.update(x[10:], y[10:], neg[10:], group=g[10:])


def test_sample_correct_inputs():
    pool = np.arange(100, 400, 3)
    s = sample_correct_inputs(pool, 45, seed=1)
    assert len(s) == 45 and len(set(s.tolist())) == 45 and set(s.tolist()) <= set(pool.tolist())
    assert (np.diff(s) > 0).all()
    assert np.array_equal(s, sample_correct_inputs(pool, 45, seed=1))
    assert not np.array_equal(s, sample_correct_inputs(pool, 45, seed=2))
    assert np.array_equal(sample_correct_inputs(pool[::-1], 500, seed=1), pool)  # n >= |pool|: all of them
    with pytest.raises(ValueError, match="repeated"):
        sample_correct_inputs([1, 1, 2], 1, seed=0)
    from vitfl.localization.base import method_meta

    assert method_meta("bl_fl5")["pos_sample"] == "n_neg" and method_meta("bl_fl5")["batching"] == 32
    assert method_meta("ours")["uses_true_label"] and method_meta("ours_reptran")["uses_true_label"]


class SaveScores(L.Callback):
    """Rank 0 writes the module's scores (a spawned process's results do not come back otherwise)."""

    def __init__(self, path: str):
        self.path = path

    def on_test_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.scores, self.path)


@pytest.mark.slow  # two spawned processes import torch and lightning
@pytest.mark.parametrize("case", [("ours_reptran", {"true_label": 2}), ("forward_impact_reptran", {}),
                                  ("ours_fl5", {"n": 7}), ("bl_fl5", {})], ids=lambda c: c[0])
def test_compat_two_processes_match_upstream(case, tmp_path):
    name, opts = case
    head = make_head(seed=9, layer_scale=True)
    x, y, neg, _ = make_data(seed=10)
    assert_well_conditioned(head, x, y, neg)
    want = reference(name, head, x, y, neg, opts)
    for bs in (7, 512):
        retry_spawn_teardown_abort(lambda: module_scores(head.copy(), name, x, y, neg, opts, bs,
                                                         callbacks=[SaveScores(str(tmp_path / "s.pt"))],
                                                         strategy="ddp_spawn", devices=2))
        got = torch.load(tmp_path / "s.pt", weights_only=False)
        assert got.dtype == torch.float64
        assert rel(got.numpy(), want) <= TOL, (name, bs, rel(got.numpy(), want))


@pytest.mark.parametrize("n_neg,n_pos", [(45, 70), (0, 33), (5, 0), (64, 1)])
@pytest.mark.parametrize("batch_size", [1, 7, 40, 512])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_compat_batch_sampler_keeps_parts_whole_and_covers_each_row_once(n_neg, n_pos, batch_size, world):
    from vitfl.lightning_modules.fl import CompatBatchSampler

    group = compat_groups(torch.tensor([True] * n_neg + [False] * n_pos), 32)
    batches = [b for r in range(world) for b in CompatBatchSampler(group, batch_size, r, world)]
    rows = [i for b in batches for i in b]
    assert sorted(rows) == list(range(n_neg + n_pos)) and len(rows) == len(set(rows))
    where = {}
    for k, b in enumerate(batches):
        assert b == list(range(b[0], b[-1] + 1))  # contiguous rows
        assert len(b) <= batch_size or len(set(group[b].tolist())) == 1  # over-long only for one part
        for g in set(group[b].tolist()):
            assert where.setdefault(g, k) == k  # a part lies in one batch only
    assert set(where) == set(group.tolist())


def test_single_published_sums_keep_only_their_own_states():
    """grad_loss_reptran computes and keeps the GL sums only, forward_impact_reptran the FI sums only (no
    4.7M-entry state and no backward for the other); the composites keep both."""
    head = FFNHead(nn.LayerNorm(D), nn.Linear(D, D_FF), nn.GELU(), nn.Linear(D_FF, D), None,
                   nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C)), "hf").double()
    kinds = {"grad_loss_reptran": {"rgl"}, "forward_impact_reptran": {"rfi"}, "arachne_w_reptran": {"rgl", "rfi"}}
    for name, want in kinds.items():
        loc = get_localizer(name)(head)
        have = {k.split("_")[0] for k in loc._defaults if k.startswith(("rgl_", "rfi_"))}
        assert have == want, name


@pytest.mark.parametrize("band_bytes", [960, 1])
@pytest.mark.parametrize("name", ["forward_impact_reptran", "ours_reptran"])
def test_published_fi_in_row_bands_matches_upstream(monkeypatch, band_bytes, name):
    """On the CPU the per-part FI products run in row bands of each sum sized to the cache, the longer side of the
    weight as the rows (W_aft's sum formed transposed); forced small here (960 bytes: bands of 5 rows with a last
    band of 2 of both [32, 8] sums; 1: every band one row), the scores must still match the upstream
    re-derivation."""
    from vitfl.localization.methods import _reptran

    monkeypatch.setattr(_reptran, "CPU_BAND_BYTES", band_bytes)
    head = make_head(seed=4, layer_scale=True)
    x, y, neg, _ = make_data(seed=6)
    assert_well_conditioned(head, x, y, neg)
    opts = {"true_label": 2} if name == "ours_reptran" else {}
    want = reference(name, head, x, y, neg, opts)
    got = localize(head, x, y, neg, name, 5, batch_size=512, **opts).scores
    assert rel(got.numpy(), want) <= TOL, rel(got.numpy(), want)


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (9, 9)])
@pytest.mark.parametrize("band_bytes", [1, 200, 32 << 20])
def test_part_products_match_a_loop_over_the_parts(monkeypatch, shape, band_bytes):
    """acc += sum_b (r_b^T o_b) * (g_b^T o_b) / B_b, formed with either side of the weight as the rows and in any
    band size, equals a float64 loop over the parts written from the formula (random inputs, uneven parts)."""
    from vitfl.localization.methods import _reptran

    monkeypatch.setattr(_reptran, "CPU_BAND_BYTES", band_bytes)
    out, inn = shape
    g = torch.Generator().manual_seed(out * 100 + inn)
    n = 23
    r, gr, o = (torch.randn(n, k, generator=g, dtype=torch.float64) for k in (out, out, inn))
    sizes = [5, 1, 8, 9]
    start = torch.randn(out, inn, generator=g, dtype=torch.float64)
    want = start.clone()
    s = 0
    for b in sizes:
        for i in range(out):
            for j in range(inn):
                want[i, j] += sum(r[s + k, i] * o[s + k, j] for k in range(b)) * \
                    sum(gr[s + k, i] * o[s + k, j] for k in range(b)) / b
        s += b
    got = start.clone()
    _reptran._part_products(got, r, gr, o, sizes)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), float((got - want).abs().max())


def test_published_fi_with_other_linear_layers():
    """The FI's o W^T is taken from the forward's product before the bias for a plain nn.Linear; a Linear
    subclass (its forward may differ) is called as a module and o W^T formed again, and a Linear without a bias
    has no bias to add. Each matches the upstream re-derivation (the bias-free head through a zero bias)."""

    class OwnLinear(nn.Linear):
        pass

    head = make_head(seed=3)
    x, y, neg, _ = make_data(seed=5)
    assert_well_conditioned(head, x, y, neg)
    want = reference("forward_impact_reptran", head, x, y, neg, {})
    sub = make_head(seed=3)
    for attr in ("fc_bef", "fc_aft"):
        old = getattr(sub, attr)
        new = OwnLinear(old.in_features, old.out_features).double()
        new.load_state_dict(old.state_dict())
        setattr(sub, attr, new)
    got = localize(sub, x, y, neg, "forward_impact_reptran", 5, batch_size=512).scores
    assert rel(got.numpy(), want) <= TOL

    zero = make_head(seed=3)
    with torch.no_grad():
        zero.fc_bef.bias.zero_()
        zero.fc_aft.bias.zero_()
    want = reference("forward_impact_reptran", zero, x, y, neg, {})
    nobias = make_head(seed=3)
    for attr in ("fc_bef", "fc_aft"):
        old = getattr(nobias, attr)
        new = nn.Linear(old.in_features, old.out_features, bias=False).double()
        with torch.no_grad():
            new.weight.copy_(old.weight)
        setattr(nobias, attr, new)
    got = localize(nobias, x, y, neg, "forward_impact_reptran", 5, batch_size=512).scores
    assert rel(got.numpy(), want) <= TOL
