"""The FL registry: unknown names, and every registered method runs on a tiny head with the right shape."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from localization.base import Localizer, UnknownMethodError, get_localizer, registered_localizers
from localization.ffn import FFNHead
from localization.ranking import localize

EXPECTED = {"random", "random_neuron", "vdiff", "mean_act", "vdiff_x_mean_act", "grad_loss", "grad_loss_2s",
            "gradient_only", "magnitude", "forward_impact", "forward_impact_2s", "bl", "arachne_w", "ours",
            "ours_fl5", "ig", "tarantula", "ochiai", "dstar", "grad_loss_reptran", "forward_impact_reptran",
            "arachne_w_reptran", "bl_reptran", "ours_reptran", "bl_fl5"}


def tiny_head(d=4, d_ff=12, c=5):
    torch.manual_seed(0)
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c)), "hf")


def test_unknown_method_lists_registered_ones():
    with pytest.raises(UnknownMethodError) as e:
        get_localizer("no_such_method")
    msg = str(e.value)
    assert "no_such_method" in msg and "grad_loss" in msg and "ours" in msg
    with pytest.raises(UnknownMethodError):
        localize(tiny_head(), None, None, None, "no_such_method", 5)


def test_every_method_is_registered():
    assert EXPECTED <= set(registered_localizers())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_registered_method_runs_with_the_right_shape(name):
    head = tiny_head()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    neg = torch.arange(16) % 2 == 0
    cls = get_localizer(name)
    assert issubclass(cls, Localizer) and cls.name == name
    r = localize(head, x, y, neg, name, 10, batch_size=5)
    n = head.index.total if cls.level == "weight" else head.d_ff
    assert r.scores.shape == (n,) and torch.isfinite(r.scores).all()
    assert r.weights.shape == (10, 3) and r.level == cls.level
    assert (r.neurons is None) == (cls.level == "weight")
    assert isinstance(r.provenance["options"], dict)
    assert r.scores.dtype == torch.float64
    # localizing again gives the same answer (no hidden state in the head), whatever the loader batch size: the
    # published batched formulas cut their own parts
    again = localize(head, x, y, neg, name, 10, batch_size=16)
    assert torch.equal(again.weights, r.weights)
    torch.testing.assert_close(again.scores, r.scores, rtol=1e-5, atol=1e-7)
