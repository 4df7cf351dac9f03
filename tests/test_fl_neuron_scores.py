"""V-score, vdiff, mean_act, NeuronScore (neuron_scores.py) against a float64 numpy computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods.neuron_scores import v_score


def tiny_head(d=4, d_ff=10, c=3, seed=0):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")


def np_v_score(a):
    """V_j = Var(a_j) + sum_{k != j} |Cov(a_j, a_k)|, literally, from np.cov (ddof=1)."""
    cov = np.cov(a, rowvar=False, ddof=1)
    d = cov.shape[0]
    return np.array([cov[j, j] + sum(abs(cov[j, k]) for k in range(d) if k != j) for j in range(d)])


def np_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


@pytest.mark.parametrize("seed", range(3))
def test_v_score_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(17, 6)) * rng.uniform(0.1, 3, size=6) + rng.normal(size=6) * 5  # big means, mixed scale
    np.testing.assert_allclose(v_score(torch.from_numpy(a)).numpy(), np_v_score(a), rtol=1e-10)
    np.testing.assert_allclose(v_score(torch.from_numpy(a).float()).numpy(), np_v_score(a.astype(np.float32)),
                               rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_vdiff_mean_act_neuron_score_localizers(seed):
    head = tiny_head(seed=seed).double()  # float64 end to end: the comparison can be tight
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (40,), generator=g)
    neg = torch.rand(40, generator=g) < 0.4
    a = head.activation(x).detach().double().numpy()
    vd = np_minmax(np.abs(np_v_score(a[~neg.numpy()]) - np_v_score(a[neg.numpy()])))
    ma = np_minmax(a[neg.numpy()].mean(0))
    got = {}
    for name in ("vdiff", "mean_act", "vdiff_x_mean_act"):
        loc = get_localizer(name)(head)
        for s in range(0, 40, 7):
            loc.update(x[s:s + 7], y[s:s + 7], neg[s:s + 7])
        got[name] = loc.compute()
        assert got[name].shape == (10,) and got[name].dtype == torch.float64
    np.testing.assert_allclose(got["vdiff"].numpy(), vd, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["mean_act"].numpy(), ma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["vdiff_x_mean_act"].numpy(), vd * ma, rtol=1e-9, atol=1e-12)


def test_sets_too_small_raise():
    head = tiny_head()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    one_pos = torch.tensor([True, True, True, True, False])
    vd = get_localizer("vdiff")(head)
    vd.update(x, y, one_pos)
    with pytest.raises(ValueError, match=r"at least 2 input\(s\) in I_pos"):
        vd.compute()
    ma = get_localizer("mean_act")(head)  # I_neg only: one input is enough, I_pos is not needed
    ma.update(x[:1], y[:1], torch.tensor([True]))
    assert ma.compute().shape == (10,)
    ma2 = get_localizer("mean_act")(head)
    ma2.update(x, y, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="I_neg"):
        ma2.compute()
    with pytest.raises(ValueError, match="at least 2"):
        v_score(torch.randn(1, 3))


def test_second_moment_float32_keeps_covariance_accurate_with_large_means():
    """Raw float32 moments lose the covariance when means dwarf the spread; the centred product does not."""
    from vitfl.localization.methods.neuron_scores import second_moment, v_score_from_moments

    rng = np.random.default_rng(0)
    a32 = (rng.normal(size=(300, 8)) * 0.05 + rng.uniform(20, 60, size=8)).astype(np.float32)
    ref = np.cov(a32.astype(np.float64), rowvar=False, ddof=1)
    t = torch.from_numpy(a32)
    s1 = sum(t[s:s + 100].double().sum(0) for s in range(0, 300, 100))
    s2 = sum(second_moment(t[s:s + 100]) for s in range(0, 300, 100))
    cov = ((s2 - torch.outer(s1, s1) / 300) / 299).numpy()
    np.testing.assert_allclose(cov, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(v_score_from_moments(300, s1, s2).numpy(), np.abs(ref).sum(1), rtol=1e-4)
    naive = sum((t[s:s + 100].t() @ t[s:s + 100]).double() for s in range(0, 300, 100))
    bad = ((naive - torch.outer(s1, s1) / 300) / 299).numpy()
    assert np.abs(bad - ref).max() > 1e-2 * np.abs(ref).max()  # what the centring avoids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_second_moment_and_its_sum_match_float64(dtype, monkeypatch):
    """Above GRAM_MIN_WIDTH c^T c is formed from its upper blocks (each added with its transpose); widths that do
    not divide into the blocks included. The moment and the batch sum it adds match numpy float64."""
    import vitfl.localization.methods.neuron_scores as ns

    monkeypatch.setattr(ns, "GRAM_MIN_WIDTH", 8)  # small widths through the blocked path
    rng = np.random.default_rng(3)
    for width in (8, 11, 30):
        a = rng.normal(size=(57, width)) * rng.uniform(0.1, 2.0, size=width) + rng.uniform(-1, 3, size=width)
        t = torch.from_numpy(a).to(dtype)
        state = torch.zeros(width, width, dtype=torch.float64)
        total = torch.zeros(width, dtype=torch.float64)
        for s in range(0, 57, 20):
            ns.add_second_moment_(state, t[s:s + 20], sum_into=total)
        ref = t.double().numpy()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(state.numpy(), ref.T @ ref, rtol=tol, atol=tol * np.abs(ref.T @ ref).max())
        np.testing.assert_allclose(total.numpy(), ref.sum(0), rtol=tol, atol=tol * np.abs(ref).sum())
        torch.testing.assert_close(state, state.T, rtol=tol, atol=0)  # the lower blocks are the upper ones


def test_gram_blocks_are_used_at_vit_width():
    """ViT-B's d_ff = 3072 is above the threshold: the blocked path is the one that runs there."""
    import vitfl.localization.methods.neuron_scores as ns

    assert 3072 >= ns.GRAM_MIN_WIDTH and ns.GRAM_BLOCKS > 1


@pytest.mark.parametrize("vscore", ["abs_sum", "abs_mean", "signed_mean", "signed_sum"])
def test_v_score_from_moments_in_several_bands_matches_numpy(vscore):
    """d_ff = 2.5 bands of V_BAND_ROWS rows (the last one partial): every variant against np.cov, written out."""
    from vitfl.localization.methods import neuron_scores as ns

    d_ff = 2 * ns.V_BAND_ROWS + ns.V_BAND_ROWS // 2
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, d_ff)) * rng.uniform(0.1, 3, size=d_ff) + rng.normal(size=d_ff)
    cov = np.cov(a, rowvar=False, ddof=1)
    var = np.diag(cov).copy()
    off = (np.abs(cov) if vscore.startswith("abs") else cov).sum(1) - (np.abs(var) if vscore.startswith("abs") else var)
    ref = var + (off / (d_ff - 1) if vscore.endswith("mean") else off)
    t = torch.from_numpy(a)
    got = ns.v_score_from_moments(len(a), t.sum(0), t.T @ t, vscore)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
