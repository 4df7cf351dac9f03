"""ours and ours_fl5 (ours.py) against their formulas (independently tested parts, numpy, per-part autograd), on
hand-built cases where the true label's correct set differs from all correct inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.ranking import localize, top_n


def tiny_head(d=3, d_ff=6, c=4, seed=0):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf").double()


def data(seed=0, n=24, d=3, c=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, c, (n,), generator=g), torch.rand(n, generator=g) < 0.4


def run(name, head, x, y, neg, **opts):
    loc = get_localizer(name)(head, **opts)
    loc.update(x, y, neg)
    return loc.compute().double().numpy()


def np_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def np_v(a):
    cov = np.cov(a, rowvar=False, ddof=1)
    return np.abs(cov).sum(1)


def neuron_per_weight(ns, d, d_ff):
    """weight (0, j, i) and (1, i, j) -> neuron j, by explicit loops over the global index."""
    out = []
    for j in range(d_ff):
        for _i in range(d):
            out.append(ns[j])
    for _i in range(d):
        for j in range(d_ff):
            out.append(ns[j])
    return np.array(out)


@pytest.mark.parametrize("seed", range(3))
def test_ours_formula(seed):
    head = tiny_head(seed=seed)
    x, y, neg = data(seed)
    a = head.activation(x).detach().numpy()
    nm = neg.numpy()
    vdiff = np_minmax(np.abs(np_v(a[~nm]) - np_v(a[nm])))
    mean_act = np_minmax(a[nm].mean(0))
    ns_w = neuron_per_weight(vdiff * mean_act, 3, 6)
    gl = run("grad_loss_2s", head, x, y, neg) * ns_w
    fi = run("forward_impact_2s", head, x, y, neg) * ns_w
    ref = 0.5 * np_minmax(gl) + 0.5 * np_minmax(fi)
    got = run("ours", head, x, y, neg)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    r = localize(head, x, y, neg, "ours", 9, batch_size=5)
    np.testing.assert_allclose(r.scores.numpy(), ref, rtol=1e-12, atol=1e-14)  # batching does not matter
    assert head.index.to_flat(r.weights).tolist() == top_n(r.scores, 9).tolist()


def np_v_signed_mean(a):
    """Var(a_j) + sum_{k != j} Cov(a_j, a_k) / (d_ff - 1), ddof = 1."""
    cov = np.cov(a, rowvar=False, ddof=1)
    var = np.diag(cov)
    return var + (cov.sum(1) - var) / (cov.shape[0] - 1)


def part_mean_grads(head, x, y, b=32):
    """mean over np.array_split(S, ceil(|S| / b)) of d/dW [mean CE of the part], by one autograd call per part."""
    k = -(-len(x) // b)
    ws = [head.fc_bef.weight, head.fc_aft.weight]
    acc = None
    for xb, yb in zip(np.array_split(x.numpy(), k), np.array_split(y.numpy(), k)):
        loss = torch.nn.functional.cross_entropy(head(torch.from_numpy(xb)), torch.from_numpy(yb))
        g = torch.autograd.grad(loss, ws)
        flat = torch.cat([g[0].reshape(-1), g[1].reshape(-1)]).numpy()
        acc = flat if acc is None else acc + flat
    return acc / k


@pytest.mark.parametrize("n", [None, 2])
@pytest.mark.parametrize("seed", range(2))
def test_ours_fl5_formula(seed, n):
    """|0.5 minmax(G) + 0.5 NS|, NS = 0.5 minmax(vdiff, signed-mean V) + 0.5 minmax(mean_act), zero outside the
    top n neurons; G over I_neg's np.array_split parts of 32 (45 rows: 23 + 22) in the order given."""
    head = tiny_head(seed=seed)
    x, y, _ = data(seed, n=80)
    neg = torch.zeros(80, dtype=torch.bool)
    neg[:45] = True
    a = head.activation(x).detach().numpy()
    nm = neg.numpy()
    ns = 0.5 * np_minmax(np.abs(np_v_signed_mean(a[~nm]) - np_v_signed_mean(a[nm]))) + 0.5 * np_minmax(a[nm].mean(0))
    if n is not None:
        cut = np.zeros_like(ns)
        top = np.argsort(-ns, kind="stable")[:n]
        cut[top] = ns[top]
        ns = cut
    g = np_minmax(part_mean_grads(head, x[neg], y[neg]))
    ref = np.abs(0.5 * g + 0.5 * neuron_per_weight(ns, 3, 6))
    opts = {} if n is None else {"n": n}
    np.testing.assert_allclose(run("ours_fl5", head, x, y, neg, **opts), ref, rtol=1e-12, atol=1e-14)
    for bs in (7, 512):
        got = localize(head, x, y, neg, "ours_fl5", 9, batch_size=bs, **opts).scores.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_ours_true_label_uses_the_label_specific_correct_set():
    """Hand-built: I_pos holds label 0 (true label of the setting) and label 3, whose activations spread far more;
    the vdiff of ``ours`` with true_label=0 takes the V-score over the label-0 rows only, GL / FI keep all I_pos."""
    head = tiny_head(seed=4)
    g = torch.Generator().manual_seed(4)
    x_neg = torch.randn(9, 3, generator=g, dtype=torch.float64)
    x_pos0 = 0.3 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    x_pos3 = 3.0 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    x = torch.cat([x_neg, x_pos0, x_pos3])
    y = torch.cat([torch.full((9,), 0), torch.full((8,), 0), torch.full((10,), 3)])
    neg = torch.arange(27) < 9
    a = head.activation(x).detach().numpy()
    nm, own = neg.numpy(), (~neg & (y == 0)).numpy()
    mean_act = np_minmax(a[nm].mean(0))
    gl2 = run("grad_loss_2s", head, x, y, neg)
    fi2 = run("forward_impact_2s", head, x, y, neg)

    def ref(pos_rows):
        ns = neuron_per_weight(np_minmax(np.abs(np_v(a[pos_rows]) - np_v(a[nm]))) * mean_act, 3, 6)
        return 0.5 * np_minmax(gl2 * ns) + 0.5 * np_minmax(fi2 * ns)

    got0 = run("ours", head, x, y, neg, true_label=0)
    np.testing.assert_allclose(got0, ref(own), rtol=1e-12, atol=1e-14)
    got_all = run("ours", head, x, y, neg, true_label=None)
    np.testing.assert_allclose(got_all, ref(~nm), rtol=1e-12, atol=1e-14)
    assert np.abs(got0 - got_all).max() > 1e-3  # the case tells the two sets apart
    r = localize(head, x, y, neg, "ours", 9, batch_size=4, true_label=0)
    np.testing.assert_allclose(r.scores.numpy(), ref(own), rtol=1e-12, atol=1e-14)
    assert r.provenance["options"]["true_label"] == 0
    # too few correct inputs of the true label: a clear error naming it
    loc = get_localizer("ours")(head, true_label=5)
    loc.update(x, y, neg)
    with pytest.raises(ValueError, match="true label 5"):
        loc.compute()
    with pytest.raises(ValueError, match="true_label"):
        get_localizer("ours")(head, true_label="cat")


def test_ours_needs_two_inputs_per_set():
    head = tiny_head()
    x, y, _ = data()
    neg = torch.zeros(24, dtype=torch.bool)
    neg[0] = True
    for name in ("ours", "ours_fl5"):
        loc = get_localizer(name)(head)
        loc.update(x, y, neg)
        with pytest.raises(ValueError, match="I_neg"):
            loc.compute()
