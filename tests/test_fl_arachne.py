"""BL (Pareto front of GL, FI) and ArachneW (arachne.py) against brute force and independently computed GL / FI."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.ranking import localize, top_n


def tiny_head(d=3, d_ff=6, c=4, seed=0):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")


def data(seed=0, n=20, d=3, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), torch.arange(n) % 3 == 0


def scores_of(name, head, x, y, neg, **opts):
    loc = get_localizer(name)(head, **opts)
    loc.update(x, y, neg)
    return loc.compute()


def brute_front(f1, f2, keep_identical=True):
    n = len(f1)
    front = [p for p in range(n)
             if not any(f1[q] >= f1[p] and f2[q] >= f2[p] and (f1[q] > f1[p] or f2[q] > f2[p]) for q in range(n))]
    if not keep_identical:
        seen, kept = set(), []
        for p in front:
            if (f1[p], f2[p]) not in seen:
                seen.add((f1[p], f2[p]))
                kept.append(p)
        front = kept
    return sorted(front)


def np_minmax(v):
    return (v - v.min()) / (v.max() - v.min())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("two_sided", [True, False])
def test_bl_front_is_brute_force_pareto_front_of_gl_fi(seed, two_sided):
    head = tiny_head(seed=seed)
    x, y, neg = data(seed)
    suffix = "_2s" if two_sided else ""
    gl = scores_of("grad_loss" + suffix, head, x, y, neg)
    fi = scores_of("forward_impact" + suffix, head, x, y, neg)
    ref = brute_front(gl.tolist(), fi.tolist())
    r = localize(head, x, y, neg, "bl", "front", two_sided=two_sided)
    assert sorted(head.index.to_flat(r.weights).tolist()) == ref
    # the score vector puts the whole front first
    assert sorted(top_n(r.scores, len(ref)).tolist()) == ref
    assert (r.scores[ref] >= 2).all() and (r.scores[[i for i in range(len(gl)) if i not in ref]] <= 1).all()
    # an int budget larger than the front continues below it
    r2 = localize(head, x, y, neg, "bl", len(ref) + 3, two_sided=two_sided)
    assert sorted(head.index.to_flat(r2.weights)[:len(ref)].tolist()) == ref


def test_bl_identical_points_kept_or_first_only():
    """Twin neurons (equal W_bef rows, biases and W_aft columns) give identical (GL, FI) points; made dominant
    (large W_aft column), they sit on the front: all twins are kept, or only the first with keep_identical=False."""
    head = tiny_head(seed=4)
    with torch.no_grad():
        head.fc_bef.weight[1] = head.fc_bef.weight[0]
        head.fc_bef.bias[1] = head.fc_bef.bias[0]
        head.fc_aft.weight[:, 0] *= 8.0
        head.fc_aft.weight[:, 1] = head.fc_aft.weight[:, 0]
    x, y, neg = data(4)
    gl = scores_of("grad_loss_2s", head, x, y, neg).tolist()
    fi = scores_of("forward_impact_2s", head, x, y, neg).tolist()
    ref_all, ref_first = brute_front(gl, fi, True), brute_front(gl, fi, False)
    assert len(ref_all) > len(ref_first)  # the test needs identical points on the front
    for keep, ref in ((True, ref_all), (False, ref_first)):
        bl = get_localizer("bl")(head, keep_identical=keep)
        bl.update(x, y, neg)
        bl.compute()
        assert sorted(bl.own_selection().tolist()) == ref


@pytest.mark.parametrize("p", [0.5, 0.2, 1.0])
def test_arachne_w_is_weighted_minmax_of_gl_fi(p):
    head = tiny_head(seed=1)
    x, y, neg = data(1)
    gl = scores_of("grad_loss_2s", head, x, y, neg).double().numpy()
    fi = scores_of("forward_impact_2s", head, x, y, neg).double().numpy()
    ref = (1 - p) * np_minmax(gl) + p * np_minmax(fi)
    got = scores_of("arachne_w", head, x, y, neg, p=p)
    torch.testing.assert_close(got, torch.from_numpy(ref), rtol=1e-5, atol=1e-6)
    r = localize(head, x, y, neg, "arachne_w", 7, p=p)
    assert head.index.to_flat(r.weights).tolist() == top_n(r.scores, 7).tolist()


def test_errors():
    head = tiny_head()
    x, y, neg = data()
    with pytest.raises(ValueError, match="p must"):
        get_localizer("arachne_w")(head, p=1.5)
    aw = get_localizer("arachne_w")(head)
    aw.update(x, y, torch.ones(20, dtype=torch.bool))
    with pytest.raises(ValueError, match="I_pos"):
        aw.compute()
    with pytest.raises(ValueError, match="own selection"):
        localize(head, x, y, neg, "arachne_w", "front")
