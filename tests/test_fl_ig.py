"""Knowledge-neuron IG (ig.py) against Captum and against closed forms on a linear head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods.ig import ig_attributions, paper_selection
from vitfl.localization.ranking import localize


def tiny_head(d=4, d_ff=8, c=5, seed=0):
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf").double()


def linear_head(d=3, d_ff=6, c=4, seed=0):
    """Identity activation, no LayerNorm after the residual: logits are affine in a."""
    torch.manual_seed(seed)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.Identity(), nn.Linear(d_ff, d), None,
                   nn.Linear(d, c), "hf").double()


def data(seed=0, n=7, d=4, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("m", [2, 5, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_ig_matches_captum_riemann_left(m, seed):
    head = tiny_head(seed=seed)
    x, y = data(seed)
    a = head.activation(x).detach()

    def prob(a_in, x_in):
        return torch.softmax(head.from_activation(x_in, a_in), dim=-1)

    ref = CaptumIG(prob, multiply_by_inputs=True).attribute(
        a, baselines=torch.zeros_like(a), target=y, additional_forward_args=(x,), n_steps=m,
        method="riemann_left")
    got = ig_attributions(head, x, y, m=m, max_rows=10)  # max_rows forces chunking
    # captum builds its step alphas in float32: agreement to ~1e-7 relative
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-9)


def test_ig_on_linear_head_logit_target_is_exact():
    head = linear_head()
    x, y = data(3, d=3, c=4)
    a = head.activation(x).detach()
    w = (head.post.weight @ head.fc_aft.weight).detach()  # d logit_c / d a = row c
    for m in (1, 20):
        got = ig_attributions(head, x, y, m=m, target="logit")
        torch.testing.assert_close(got, a * w[y], rtol=1e-12, atol=1e-12)


def test_ig_on_linear_head_prob_target_closed_form():
    """dP_y/da = W^T (P_y (e_y - P)) with W = W_post W_aft; the left Riemann sum written out in numpy."""
    head = linear_head(seed=2)
    x, y = data(2, d=3, c=4)
    m = 20
    a = head.activation(x).detach().numpy()
    w = (head.post.weight @ head.fc_aft.weight).detach().numpy()  # [c, d_ff]
    const = (head.post(x + head.fc_aft.bias)).detach().numpy()    # logits at a = 0
    ref = np.zeros_like(a)
    for r in range(a.shape[0]):
        total = np.zeros(a.shape[1])
        for k in range(m):
            z = const[r] + w @ (k / m * a[r])
            p = np.exp(z - z.max())
            p /= p.sum()
            e = np.zeros_like(p)
            e[y[r]] = 1.0
            total += w.T @ (p[y[r]] * (e - p))
        ref[r] = a[r] * total / m
    np.testing.assert_allclose(ig_attributions(head, x, y, m=m).numpy(), ref, rtol=1e-10, atol=1e-13)


def test_ig_completeness_for_large_m():
    head = tiny_head(seed=5)
    x, y = data(5)
    attr = ig_attributions(head, x, y, m=4000, max_rows=40000)
    p_full = torch.softmax(head(x), -1).gather(1, y.view(-1, 1)).squeeze(1)
    p_zero = torch.softmax(head.from_activation(x, torch.zeros(7, 8, dtype=torch.float64)), -1).gather(
        1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(attr.sum(1), (p_full - p_zero).detach(), rtol=0, atol=2e-3)


def test_ig_localizer_mean_over_the_chosen_set():
    head = tiny_head(seed=1)
    x, y = data(1, n=12)
    neg = torch.arange(12) % 2 == 0
    attr = ig_attributions(head, x, y)
    for on, rows in (("neg", neg), ("pos", ~neg), ("all", torch.ones(12, dtype=torch.bool))):
        loc = get_localizer("ig")(head, on=on)
        loc.update(x[:5], y[:5], neg[:5])
        loc.update(x[5:], y[5:], neg[5:])
        torch.testing.assert_close(loc.compute(), attr[rows].mean(0), rtol=1e-9, atol=1e-12)
        assert loc.level == "neuron"


def test_paper_selection_moves_p():
    share = torch.tensor([1.0, 0.9, 0.8, 0.75, 0.72, 0.71, 0.3, 0.1])
    kept, p = paper_selection(share, 0.7)  # 6 kept at 0.7 -> 0.75 keeps 4
    assert kept.tolist() == [0, 1, 2, 3] and p == pytest.approx(0.75)
    kept, p = paper_selection(torch.tensor([0.5, 0.45, 0.1, 0.0]), 0.7)  # 0 kept -> down to 0.45 keeps 2
    assert kept.tolist() == [0, 1] and p == pytest.approx(0.45)
    kept, p = paper_selection(torch.ones(8), 0.7)  # never fewer than 8: stops at p = 1
    assert kept.numel() == 8 and p == pytest.approx(1.0)
    kept, p = paper_selection(torch.tensor([0.8] * 6 + [0.0] * 2), 0.7)  # 6 -> 0 at 0.85: keep the 6
    assert kept.tolist() == [0, 1, 2, 3, 4, 5] and p == pytest.approx(0.8)


def test_ig_paper_selection_end_to_end():
    head = tiny_head(seed=2)
    x, y = data(2, n=30)
    neg = torch.ones(30, dtype=torch.bool)
    attr = ig_attributions(head, x, y)
    share = (attr >= 0.2 * attr.max(1, keepdim=True).values).double().mean(0)
    kept, _ = paper_selection(share, 0.7)
    r = localize(head, x, y, neg, "ig", "front", selection="paper")
    assert r.neurons.tolist() == kept.tolist()
    assert r.weights.shape == (kept.numel() * 2 * 4, 3)
    torch.testing.assert_close(r.scores, share)
    with pytest.raises(ValueError, match="own selection"):
        localize(head, x, y, neg, "ig", "front")  # selection="mean" has none


def test_ig_bad_options():
    head = tiny_head()
    for opts in ({"on": "both"}, {"selection": "top"}, {"target": "loss"}, {"m": 0}):
        with pytest.raises(ValueError):
            get_localizer("ig")(head, **opts)
