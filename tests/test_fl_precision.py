"""Precision: every registered FL method returns float64 scores, a float64 head gives float64 accuracy (rel 1e-12
against float64 numpy references written from the formulas, sets of 45 / 70 inputs fed in batches of 7), and a
float32 head still returns float64 scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitfl.localization.base import get_localizer, registered_localizers
from vitfl.localization.ranking import localize
from test_fl_reptran_compat import (C, D, D_FF, activations, assert_well_conditioned, backward, flat, forward,
                                    ln_back, make_data, make_head, params, reference, softmax, up_pareto, up_two_sided,
                                    up_vscore)

TOL = 1e-12


def np_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


def gl_sum(P, x, y):
    """sum_x dL(x)/dW (signed), flat over W_bef then W_aft."""
    f = forward(P, x)
    g1, g2, _, _ = backward(P, f, softmax(f["logits"]) - np.eye(C)[y])
    return np.concatenate([g1.reshape(-1), g2.reshape(-1)])


def fi_arachne(P, x):
    """front_ij = mean_x |o_i w_ji| / sum_k |o_k w_jk|, back_j = mean_x |dO/dn_j| / sum_l |dO/dn_l|, by loops."""
    f = forward(P, x)
    ones = np.ones_like(f["logits"])
    _, _, da, _ = backward(P, f, ones)  # dO/da: W_bef's output after GELU
    dn = ln_back(ones @ P["Wc"], f["rh"], f["rs"], P["g2"]) * P["ls"]  # dO/dn: W_aft's output before LayerScale
    out = []
    for W, o, g in ((P["W1"], f["h"], da), (P["W2"], f["a"], dn)):
        front = np.zeros_like(W)
        for r in range(len(x)):
            t = np.abs(o[r][None, :] * W)
            front += t / t.sum(1, keepdims=True)
        back = (np.abs(g) / np.abs(g).sum(1, keepdims=True)).mean(0)
        out.append(front / len(x) * back[:, None])
    return flat(out)


def per_weight(ns):
    return np.concatenate([np.repeat(ns, D), np.tile(ns, D)])


def ig_left(P, x, y, m=20):
    a = forward(P, x)["a"]
    total = np.zeros_like(a)
    for k in range(m):
        g = forward(P, x, a=(k / m) * a)
        p = softmax(g["logits"])
        py = p[np.arange(len(y)), y]
        _, _, da, _ = backward(P, g, py[:, None] * (np.eye(C)[y] - p))
        total += da
    return (a / m * total).mean(0)


def ref_scores(name, head, x, y, neg):
    P = params(head)
    xn, yn, nm = x.numpy(), y.numpy(), neg.numpy()
    a = activations(P, xn)
    vdiff = np_minmax(np.abs(up_vscore(a[~nm], True, False) - up_vscore(a[nm], True, False)))
    mean_act = np_minmax(a[nm].mean(0))
    gl_n, gl_p = np.abs(gl_sum(P, xn[nm], yn[nm])), np.abs(gl_sum(P, xn[~nm], yn[~nm]))
    fi_n, fi_p = fi_arachne(P, xn[nm]), fi_arachne(P, xn[~nm])
    gl2, fi2 = gl_n / (1 + gl_p), fi_n / (1 + fi_p)
    act_n, act_p = (a[nm] > 0).sum(0).astype(float), (a[~nm] > 0).sum(0).astype(float)
    F, Pn = nm.sum(), (~nm).sum()
    w = np.concatenate([P["W1"].reshape(-1), P["W2"].reshape(-1)])
    if name in ("random", "random_neuron"):
        n = w.size if name == "random" else D_FF
        return torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    simple = {
        "magnitude": lambda: np.abs(w),
        "grad_loss": lambda: gl_n, "gradient_only": lambda: gl_n, "grad_loss_2s": lambda: gl2,
        "forward_impact": lambda: fi_n, "forward_impact_2s": lambda: fi2,
        "vdiff": lambda: vdiff, "mean_act": lambda: mean_act, "vdiff_x_mean_act": lambda: vdiff * mean_act,
        "arachne_w": lambda: 0.5 * np_minmax(gl2) + 0.5 * np_minmax(fi2),
        "ours": lambda: 0.5 * np_minmax(gl2 * per_weight(vdiff * mean_act))
        + 0.5 * np_minmax(fi2 * per_weight(vdiff * mean_act)),
        "ig": lambda: ig_left(P, xn[nm], yn[nm]),
        "tarantula": lambda: np.where(act_n + act_p > 0, (act_n / F) / np.maximum(act_n / F + act_p / Pn, 1e-300),
                                      0.0),
        "ochiai": lambda: np.where(act_n + act_p > 0, act_n / np.sqrt(np.maximum(F * (act_n + act_p), 1e-300)), 0.0),
        "dstar": lambda: np.where(act_p + (F - act_n) > 0, act_n ** 2 / np.maximum(act_p + (F - act_n), 1e-300),
                                  F ** 2 + 1.0),
    }
    if name in simple:
        return simple[name]()
    if name == "bl":
        s = 0.5 * np_minmax(gl2) + 0.5 * np_minmax(fi2)
        s[up_pareto(gl2, fi2)] += 2.0
        return s
    if name == "bl_reptran":
        g, f = (flat(v) for v in up_two_sided(P, xn, yn, nm))
        s = 0.5 * np_minmax(g) + 0.5 * np_minmax(f)
        s[up_pareto(g, f)] += 2.0
        return s
    return reference(name, head, x, y, neg, {})


def test_every_registered_method_has_a_reference_here():
    missing = [m for m in registered_localizers() if m not in KNOWN]
    assert not missing, f"add a float64 reference for {missing}"


KNOWN = {"random", "random_neuron", "magnitude", "grad_loss", "gradient_only", "grad_loss_2s", "forward_impact",
         "forward_impact_2s", "vdiff", "mean_act", "vdiff_x_mean_act", "arachne_w", "ours", "ig", "tarantula",
         "ochiai", "dstar", "bl", "bl_reptran", "grad_loss_reptran", "forward_impact_reptran", "arachne_w_reptran",
         "ours_reptran", "ours_fl5", "bl_fl5"}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_float64_head_gives_float64_scores_to_1e12(name):
    head = make_head(seed=3)
    x, y, neg, _ = make_data(seed=5)
    assert_well_conditioned(head, x, y, neg)
    want = ref_scores(name, head, x, y, neg)
    got = localize(head, x, y, neg, name, 5, batch_size=7).scores
    assert got.dtype == torch.float64
    err = float(np.abs(got.numpy() - want).max() / np.abs(want).max())
    assert err <= TOL, (name, err)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_float32_head_returns_float64_scores(name):
    head = make_head(seed=3).float()
    x, y, neg, _ = make_data(seed=5)
    loc = get_localizer(name)(head)
    loc.update(x.float(), y, neg)
    s = loc.compute()
    assert s.dtype == torch.float64 and torch.isfinite(s).all()
    # the sums over inputs are float64 states whatever the head's dtype
    for k, v in loc.metric_state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype == torch.float64, (name, k, v.dtype)
