"""The last-FFN adapter (localization/ffn.py): the FFN head on the captured CLS state reproduces the full model's
logits for both backbones (float32 and float64), matches a hand-written FFN from the raw weights, refuses average
pooling, and the weight index / fingerprint behave."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import D, D_FF, images, rel_err, tiny_classifier, tiny_hf_vit, tiny_timm_vit
from vitfl.localization.ffn import (FFNHead, UnsupportedModelError, WeightIndex, capture_ffn_states, last_ffn_head,
                              model_fingerprint)

MODELS = {
    "hf": lambda: tiny_hf_vit(seed=3),
    "timm": lambda: tiny_timm_vit(seed=4),
    "timm_layerscale": lambda: tiny_timm_vit(seed=5, init_values=0.1),
}


def full_logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------- an independent reference for each backbone
def raw_ffn_parts(model):
    """The last block's FFN pieces found by their documented module paths (docs/methods.md, section 1), not by the
    adapter: (ln module, W1, b1, W2, b2, gamma or None, final ln module, classifier)."""
    if hasattr(model, "vit"):
        vit = model.vit
        layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
        blk = layers[-1]
        if hasattr(blk, "mlp"):
            fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        else:
            fc1, fc2 = blk.intermediate.dense, blk.output.dense
        return blk.layernorm_after, fc1.weight, fc1.bias, fc2.weight, fc2.bias, None, vit.layernorm, model.classifier
    blk = model.blocks[-1]
    gamma = getattr(blk.ls2, "gamma", None)
    assert isinstance(model.fc_norm, torch.nn.Identity)  # token pooling: the final norm is `norm`
    return (blk.norm2, blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias, gamma, model.norm,
            model.head)


def hand_ffn(model, x):
    """logits and post-GELU activation from the raw tensors: F.layer_norm, x @ W.T + b, exact GELU, LayerScale."""
    ln, w1, b1, w2, b2, gamma, ln_f, clf = raw_ffn_parts(model)
    h = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)
    a = F.gelu(h @ w1.T + b1)
    o = a @ w2.T + b2
    if gamma is not None:
        o = o * gamma
    r = x + o
    r = F.layer_norm(r, (r.shape[-1],), ln_f.weight, ln_f.bias, ln_f.eps)
    return r @ clf.weight.T + clf.bias, a


def own_capture(model, pixels):
    """CLS token entering the last FFN's LayerNorm, captured by a hook of this test (not the adapter's)."""
    ln = raw_ffn_parts(model)[0]
    got = {}
    h = ln.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0][:, 0].detach().clone()))
    try:
        logits = full_logits(model, pixels)
    finally:
        h.remove()
    return got["x"], logits


# ------------------------------------------------------------------------------------ head == full model
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_head_reproduces_full_model_logits(name, dtype, tol):
    model = MODELS[name]().to(dtype)
    head = last_ffn_head(model)
    assert isinstance(head, FFNHead) and head.d == D and head.d_ff == D_FF
    pixels = images(7, seed=11, dtype=dtype)
    with torch.no_grad(), capture_ffn_states(model) as st:
        logits = full_logits(model, pixels)
    assert st["x"].shape == (7, D) and st["a"].shape == (7, D_FF) and st["x"].dtype == dtype
    with torch.no_grad():
        from_head = head(st["x"])
        from_act = head.from_activation(st["x"], st["a"])
    assert rel_err(from_head, logits) <= tol
    assert rel_err(from_act, logits) <= tol
    assert rel_err(head.activation(st["x"]).detach(), st["a"]) <= tol
    # the head must depend on x: a different row gives different logits (no constant head)
    assert rel_err(from_head[1:], from_head[:-1]) > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_hand_written_ffn_matches(name):
    model = MODELS[name]().double()
    pixels = images(5, seed=12, dtype=torch.float64)
    with torch.no_grad():
        x_own, logits = own_capture(model, pixels)
        with capture_ffn_states(model) as st:
            full_logits(model, pixels)
        hand_logits, hand_a = hand_ffn(model, x_own)
        head_logits = last_ffn_head(model)(x_own)
    torch.testing.assert_close(st["x"], x_own, rtol=0, atol=0)
    assert rel_err(hand_logits, logits) <= 1e-12
    assert rel_err(hand_a, st["a"]) <= 1e-12
    assert rel_err(head_logits, hand_logits) <= 1e-12


def test_layerscale_is_applied():
    """With LayerScale the head must scale the FFN output by gamma: dropping it changes the logits."""
    model = tiny_timm_vit(seed=5, init_values=0.1).double()
    head = last_ffn_head(model)
    assert not isinstance(head.layer_scale, torch.nn.Identity)
    x = torch.randn(4, D, dtype=torch.float64)
    without = head.post(x + head.fc_aft(head.activation(x)))
    assert rel_err(without, head(x)) > 1e-3


def test_intermediates_consistent():
    model = tiny_timm_vit(seed=5, init_values=0.1).double()
    head = last_ffn_head(model)
    x = torch.randn(3, D, dtype=torch.float64)
    it = head.intermediates(x)
    _, w1, b1, w2, b2, gamma, _, _ = raw_ffn_parts(model)
    torch.testing.assert_close(it["z"], it["h"] @ w1.T + b1)
    torch.testing.assert_close(it["a"], F.gelu(it["z"]))
    torch.testing.assert_close(it["o"], (it["a"] @ w2.T + b2) * gamma)
    torch.testing.assert_close(it["logits"], head(x))
    assert head.num_classes == 10


@pytest.mark.parametrize("backbone", ["hf_vit", "timm_vit"])
def test_through_image_classifier(backbone):
    """The adapter unwraps ImageClassifier.backbone (and HFLogits.model)."""
    model = tiny_classifier(backbone, seed=7).double()
    head = last_ffn_head(model)
    assert head.backbone == ("hf" if backbone == "hf_vit" else "timm")
    pixels = images(6, seed=13, dtype=torch.float64)
    with torch.no_grad(), capture_ffn_states(model) as st:
        logits = model(pixels)
    assert logits.shape == (6, 10)
    assert rel_err(head(st["x"]).detach(), logits) <= 1e-12
    # the same parameters as the raw backbone's
    inner = model.backbone.model if backbone == "hf_vit" else model.backbone
    assert head.fc_bef.weight is raw_ffn_parts(inner)[1]
    assert model_fingerprint(model) == model_fingerprint(inner)


def test_head_shares_modules_and_copy_is_independent():
    model = tiny_hf_vit(seed=3)
    head = last_ffn_head(model)
    pixels = images(4, seed=1)
    cp = head.copy()
    with torch.no_grad():
        before = full_logits(model, pixels).clone()
        head.fc_bef.weight[0].mul_(3.0)
        after = full_logits(model, pixels)
        cp.fc_aft.weight.zero_()
    assert rel_err(after, before) > 1e-4  # the head edits the model
    torch.testing.assert_close(full_logits(model, pixels).detach(), after)  # the copy does not
    assert not torch.equal(cp.fc_bef.weight, head.fc_bef.weight)


# ------------------------------------------------------------------------------------------ refusals
def test_average_pooling_is_refused():
    model = tiny_timm_vit(global_pool="avg")
    with pytest.raises(UnsupportedModelError, match=r"global_pool='avg'.*token"):
        last_ffn_head(model)
    with pytest.raises(UnsupportedModelError):
        with capture_ffn_states(model):
            pass


def test_non_vit_is_refused():
    with pytest.raises(UnsupportedModelError, match="neither"):
        last_ffn_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------ weight index
def enumerate_weights(d, d_ff):
    """Every (matrix, row, col) in global order: W_bef [d_ff, d] row-major, then W_aft [d, d_ff] row-major."""
    return ([(0, r, c) for r in range(d_ff) for c in range(d)] + [(1, r, c) for r in range(d) for c in range(d_ff)])


@pytest.mark.parametrize("d, d_ff", [(3, 5), (4, 16), (1, 1)])
def test_weight_index_matches_enumeration(d, d_ff):
    idx = WeightIndex(d, d_ff)
    table = torch.tensor(enumerate_weights(d, d_ff))
    assert idx.total == len(table) == 2 * d * d_ff
    flat = torch.randperm(idx.total, generator=torch.Generator().manual_seed(d * d_ff))
    torch.testing.assert_close(idx.to_triples(flat), table[flat])
    torch.testing.assert_close(idx.to_flat(table[flat]), flat)
    torch.testing.assert_close(idx.to_flat(idx.to_triples(flat)), flat)


@pytest.mark.parametrize("d, d_ff", [(3, 5), (4, 16)])
def test_neuron_weights_and_neuron_of(d, d_ff):
    idx = WeightIndex(d, d_ff)
    table = enumerate_weights(d, d_ff)
    neurons = torch.randperm(d_ff)[: max(1, d_ff // 2)]
    got = idx.neuron_weights(neurons)
    assert got.numel() == 2 * d * len(neurons)
    for k, j in enumerate(neurons.tolist()):
        block = got[k * 2 * d:(k + 1) * 2 * d].tolist()
        expected = [i for i, (m, r, c) in enumerate(table) if (m == 0 and r == j) or (m == 1 and c == j)]
        assert sorted(block) == expected
        # row j of W_bef by column, then column j of W_aft by row (the documented order)
        assert [table[i] for i in block] == [(0, j, c) for c in range(d)] + [(1, r, j) for r in range(d)]
    torch.testing.assert_close(idx.neuron_of(got), neurons.repeat_interleave(2 * d))
    every = torch.arange(idx.total)
    of = idx.neuron_of(every)
    for j in range(d_ff):  # every weight belongs to exactly one neuron, each neuron owns 2d weights
        assert sorted(torch.nonzero(of == j).squeeze(1).tolist()) == sorted(idx.neuron_weights([j]).tolist())


def test_split_join_and_live_weights():
    model = tiny_hf_vit(seed=3)
    head = last_ffn_head(model)
    idx = head.index
    w_bef, w_aft = head.weights()
    flat = idx.join(w_bef, w_aft)
    bef, aft = idx.split(flat)
    torch.testing.assert_close(bef, w_bef)
    torch.testing.assert_close(aft, w_aft)
    picks = torch.randint(0, idx.total, (50,), generator=torch.Generator().manual_seed(0))
    for i, (m, r, c) in zip(picks.tolist(), idx.to_triples(picks).tolist()):
        assert flat[i] == (w_bef if m == 0 else w_aft)[r, c]


# ------------------------------------------------------------------------------------------ fingerprint
@pytest.mark.parametrize("make", [lambda: tiny_hf_vit(seed=3), lambda: tiny_timm_vit(seed=4, init_values=0.1)])
def test_fingerprint_changes_with_one_weight(make):
    model = make()
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(copy.deepcopy(model))
    assert fp == model_fingerprint(make())  # deterministic for the same weights
    head = last_ffn_head(model)
    for p, pos in itertools.product([head.fc_bef.weight, head.fc_aft.bias], [0, -1]):
        old = p.data.view(-1)[pos].item()
        with torch.no_grad():
            p.view(-1)[pos] = torch.nextafter(torch.tensor(old), torch.tensor(float("inf"))).item()
        assert model_fingerprint(model) != fp
        with torch.no_grad():
            p.view(-1)[pos] = old
        assert model_fingerprint(model) == fp
    assert model_fingerprint(make().double()) != fp  # dtype is part of it
