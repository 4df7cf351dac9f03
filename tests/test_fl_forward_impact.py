"""FI (forward_impact.py) against a brute-force python loop over a tiny layer, float64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods.forward_impact import fi_back_sum, fi_front_sum, forward_impact


class Scale(nn.Module):  # a LayerScale (timm ls2)
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, d))

    def forward(self, t):
        return t * self.gamma


def tiny_head(layer_scale=False, seed=0, d=3, d_ff=5, c=4):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d),
                   Scale(d) if layer_scale else None, nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)),
                   "timm").double()


def brute_force_fi(head, x):
    """FI_ij = front_ij * back_j for W_bef and W_aft by explicit loops over inputs, outputs and inputs."""
    w_bef = head.fc_bef.weight.detach()
    w_aft = head.fc_aft.weight.detach()
    results = []
    for mat, w in ((0, w_bef), (1, w_aft)):
        out_dim, in_dim = w.shape
        front = torch.zeros(out_dim, in_dim, dtype=torch.float64)
        back = torch.zeros(out_dim, dtype=torch.float64)
        for r in range(x.shape[0]):
            xr = x[r:r + 1]
            h = head.norm(xr).detach()
            a = head.act(head.fc_bef(h)).detach()
            o = (h if mat == 0 else a)[0]
            # per-input gradient of the summed logits w.r.t. the layer's output n
            if mat == 0:
                a_leaf = a.clone().requires_grad_(True)
                logits = head.from_activation(xr, a_leaf)
                (g,) = torch.autograd.grad(logits.sum(), a_leaf)
            else:
                n_leaf = head.fc_aft(a).detach().requires_grad_(True)
                logits = head.post(xr + head.layer_scale(n_leaf))
                (g,) = torch.autograd.grad(logits.sum(), n_leaf)
            g = g[0]
            for j in range(out_dim):
                denom = sum(abs(o[k] * w[j, k]) for k in range(in_dim))
                for i in range(in_dim):
                    front[j, i] += abs(o[i] * w[j, i]) / denom
                back[j] += abs(g[j]) / sum(abs(g[l]) for l in range(out_dim))
        n = x.shape[0]
        results.append(front / n * (back / n).unsqueeze(1))
    return results


@pytest.mark.parametrize("layer_scale", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_impact_matches_brute_force(layer_scale, seed):
    head = tiny_head(layer_scale, seed)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fi_bef, fi_aft = forward_impact(head, x)
    ref_bef, ref_aft = brute_force_fi(head, x)
    torch.testing.assert_close(fi_bef, ref_bef, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fi_aft, ref_aft, rtol=1e-10, atol=1e-12)


def test_layer_scale_changes_back_of_w_aft_only_through_n_before_it():
    """n for W_aft is taken before LayerScale: a brute force with n *after* it must disagree."""
    head = tiny_head(True, 0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, fi_aft = forward_impact(head, x)
    gamma = head.layer_scale.gamma.detach()
    g_after = []
    for r in range(4):
        a = head.activation(x[r:r + 1]).detach()
        o_leaf = head.layer_scale(head.fc_aft(a)).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(head.post(x[r:r + 1] + o_leaf).sum(), o_leaf)
        g_after.append(g[0])
    g_after = torch.stack(g_after)
    # dO/dn = gamma * dO/do, so the two back terms differ unless gamma is constant
    assert not torch.allclose(fi_back_sum(g_after), fi_back_sum(g_after * gamma))


def test_localizer_one_and_two_sided():
    head = tiny_head(False, 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    neg = torch.arange(12) < 5
    ref_neg = head.index.join(*brute_force_fi(head, x[neg]))
    ref_pos = head.index.join(*brute_force_fi(head, x[~neg]))
    one = get_localizer("forward_impact")(head)
    one.update(x[:7], y[:7], neg[:7])
    one.update(x[7:], y[7:], neg[7:])
    torch.testing.assert_close(one.compute(), ref_neg, rtol=1e-12, atol=1e-15)  # float64 head: float64 end to end
    two = get_localizer("forward_impact_2s")(head)
    two.update(x, y, neg)
    torch.testing.assert_close(two.compute(), ref_neg / (1 + ref_pos), rtol=1e-12, atol=1e-15)
    empty = get_localizer("forward_impact")(head)
    empty.update(x, y, torch.zeros(12, dtype=torch.bool))
    with pytest.raises(ValueError, match="I_neg"):
        empty.compute()


def test_zero_denominators_contribute_zero():
    w = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    o = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    s = fi_front_sum(w, o)  # input 0 is all zero; output 1 has zero weights
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, torch.tensor([[1 / 7, 3 / 7], [0.0, 0.0]]))
    b = fi_back_sum(torch.tensor([[0.0, 0.0], [1.0, -3.0]]))
    torch.testing.assert_close(b, torch.tensor([0.25, 0.75]))


def test_cached_abs_weights_follow_an_in_place_change_of_the_head():
    """|W| is kept between updates, but a weight edited in place (version counter) is seen: the states equal a
    fresh localizer's on the edited head."""
    head = tiny_head(False, 4)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    neg = torch.ones(10, dtype=torch.bool)
    loc = get_localizer("forward_impact")(head)
    loc.update(x[:5], y[:5], neg[:5])
    first = loc.fi_front_neg.clone()
    with torch.no_grad():
        head.fc_bef.weight.mul_(-3.0)
        head.fc_aft.weight[0, 0] = 7.0
    loc.update(x[5:], y[5:], neg[5:])
    fresh = get_localizer("forward_impact")(head)
    fresh.update(x[5:], y[5:], neg[5:])
    torch.testing.assert_close(loc.fi_front_neg - first, fresh.fi_front_neg, rtol=1e-12, atol=1e-15)
