"""Spectrum-based FL (spectrum.py) against hand-computed counts."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods.spectrum import dstar, ochiai, tarantula


def test_formulas_on_hand_counts():
    # F = 4 failing, P = 5 passing inputs
    e_f = torch.tensor([4.0, 0.0, 2.0, 3.0])
    e_p = torch.tensor([0.0, 0.0, 5.0, 1.0])
    t = tarantula(e_f, e_p, 4, 5)
    assert t.tolist() == pytest.approx([1.0, 0.0, 0.5 / (0.5 + 1.0), 0.75 / (0.75 + 0.2)])
    o = ochiai(e_f, e_p, 4)
    assert o.tolist() == pytest.approx([4 / math.sqrt(16), 0.0, 2 / math.sqrt(4 * 7), 3 / math.sqrt(4 * 4)])
    d = dstar(e_f, e_p, 4)
    # neuron 0: e_p + n_f = 0 -> F^2 + 1 = 17, above every finite value
    assert d.tolist() == pytest.approx([17.0, 0.0, 4 / (5 + 2), 9 / (1 + 1)])
    assert dstar(e_f, e_p, 4, star=3).tolist()[3] == pytest.approx(27 / 2)


def test_localizers_count_activations_a_gt_0():
    torch.manual_seed(0)
    d, d_ff = 3, 7
    # ReLU: exact zeros, so "activated" = a > 0 (not >= 0) matters
    head = FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2)), "hf")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, d, generator=g)
    y = torch.randint(0, 2, (25,), generator=g)
    neg = torch.rand(25, generator=g) < 0.4
    a = head.activation(x).detach()
    # hand counts by a python loop
    e_f = [sum(1 for r in range(25) if neg[r] and a[r, j] > 0) for j in range(d_ff)]
    e_p = [sum(1 for r in range(25) if not neg[r] and a[r, j] > 0) for j in range(d_ff)]
    n_f, n_p = int(neg.sum()), int((~neg).sum())
    refs = {"tarantula": tarantula(torch.tensor(e_f), torch.tensor(e_p), n_f, n_p),
            "ochiai": ochiai(torch.tensor(e_f), torch.tensor(e_p), n_f),
            "dstar": dstar(torch.tensor(e_f), torch.tensor(e_p), n_f)}
    for name, ref in refs.items():
        loc = get_localizer(name)(head)
        loc.update(x[:10], y[:10], neg[:10])
        loc.update(x[10:], y[10:], neg[10:])
        got = loc.compute()
        assert got.shape == (d_ff,) and loc.level == "neuron"
        torch.testing.assert_close(got, ref.double())
    loc = get_localizer("ochiai")(head)
    loc.update(x, y, torch.ones(25, dtype=torch.bool))
    with pytest.raises(ValueError, match="I_pos"):
        loc.compute()
