"""The FL registry: unknown names, and every registered method runs on a tiny head with the right shape."""
from __future__ import annotations

import gc
import pickle

import pytest
import torch
from torch import nn

from vitfl.localization.base import (Localizer, UnknownMethodError, get_localizer, is_lazy_zeros, lazy_zeros,
                               registered_localizers)
from vitfl.localization.ffn import FFNHead
from vitfl.localization.ranking import localize

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


def _batch(n=16, d=4, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), torch.arange(n) % 2 == 0


def _lazy_names(loc):
    return sorted(getattr(loc, "_lazy_states", {}))


def _all_lazy(loc):
    return all(is_lazy_zeros(getattr(loc, k)) and getattr(loc, k).untyped_storage().nbytes() <= 8
               for k in _lazy_names(loc))


@pytest.mark.parametrize("name", sorted(m for m in EXPECTED if get_localizer(m).needs_inputs))
def test_large_states_cost_no_memory_until_the_first_update_and_reset_frees_them(name):
    head = tiny_head()
    x, y, neg = _batch()
    fresh = get_localizer(name)(head)
    if name not in {"ig", "tarantula", "ochiai", "dstar", "mean_act"}:  # these keep only small sums
        assert _lazy_names(fresh), "the per-weight / per-neuron-pair sums are lazily allocated"
    assert _all_lazy(fresh)
    fresh.update(x, y, neg)
    assert not any(is_lazy_zeros(getattr(fresh, k)) for k in _lazy_names(fresh))
    want = fresh.compute()
    # reset: the states are zero views again (their memory is freed) and the next run is a fresh run; the
    # defaults were never written into
    fresh.reset()
    assert _all_lazy(fresh)
    assert all(not bool(fresh._defaults[k].any()) for k in _lazy_names(fresh))
    fresh.update(x, y, neg)
    torch.testing.assert_close(fresh.compute(), want, rtol=0, atol=0)
    # a pickled fresh localizer (what ddp_spawn hands its workers) stays lazy and computes the same
    clone = pickle.loads(pickle.dumps(get_localizer(name)(head)))
    assert _all_lazy(clone)
    clone.update(x, y, neg)
    torch.testing.assert_close(clone.compute(), want, rtol=0, atol=0)


def test_lazy_zeros_is_a_read_only_view_of_one_zero():
    z = lazy_zeros(3, 4)
    assert z.shape == (3, 4) and z.dtype == torch.float64 and is_lazy_zeros(z) and not bool(z.any())
    with pytest.raises(RuntimeError):
        z.add_(1.0)  # written only after materialize_states
    assert not is_lazy_zeros(lazy_zeros(1)) and not is_lazy_zeros(torch.zeros(3, 4))


def test_localize_frees_the_states_of_the_localizer_it_made_but_not_of_one_given():
    head = tiny_head()
    x, y, neg = _batch()
    gc.collect()
    gc.disable()  # a torchmetrics Metric refers to itself: without the reset its states would live until a collection
    try:
        before = {id(o) for o in gc.get_objects() if isinstance(o, Localizer)}
        localize(head, x, y, neg, "ours", 10, batch_size=5)
        made = [o for o in gc.get_objects() if isinstance(o, Localizer) and id(o) not in before]
        assert made and all(_lazy_names(o) and _all_lazy(o) for o in made)
        given = get_localizer("ours")(head)
        localize(head, x, y, neg, given, 10, batch_size=5)
        assert not _all_lazy(given)  # the caller's localizer keeps what it accumulated
        torch.testing.assert_close(given.compute(), localize(head, x, y, neg, "ours", 10, batch_size=5).scores)
    finally:
        gc.enable()
