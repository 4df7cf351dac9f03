"""random (random_.py) and magnitude (baselines.py)."""
from __future__ import annotations

import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.ranking import localize


def tiny_head():
    torch.manual_seed(0)
    return FFNHead(nn.LayerNorm(4), nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4), None,
                   nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)), "hf")


def test_random_is_seeded_uniform_float64():
    head = tiny_head()
    a = localize(head, None, None, None, "random", 10, seed=3)
    b = localize(head, None, None, None, "random", 10, seed=3)
    c = localize(head, None, None, None, "random", 10, seed=4)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert a.scores.shape == (64,) and a.scores.dtype == torch.float64
    assert torch.equal(a.weights, b.weights)
    n = localize(head, None, None, None, "random_neuron", 10, seed=3)
    assert n.scores.shape == (8,) and n.level == "neuron" and n.neurons.numel() == 2
    # roughly uniform: many draws
    big = get_localizer("random")(tiny_head(), seed=0)
    assert get_localizer("random").needs_inputs is False
    s = torch.cat([big.compute()] + [get_localizer("random")(tiny_head(), seed=k).compute() for k in range(1, 200)])
    assert abs(float(s.mean()) - 0.5) < 0.01 and 0 <= float(s.min()) and float(s.max()) < 1


def test_magnitude_is_abs_weight():
    head = tiny_head()
    r = localize(head, None, None, None, "magnitude", 5)
    ref = torch.cat([head.fc_bef.weight.detach().abs().reshape(-1), head.fc_aft.weight.detach().abs().reshape(-1)])
    assert torch.equal(r.scores, ref)
    top = ref.argsort(descending=True)[:5]
    assert head.index.to_flat(r.weights).tolist() == top.tolist()
