"""The block-addressed FFN view (localization/ffn.py ``ffn_head``): for every block of tiny HF and timm ViTs (token
and average pooling, fc_norm or not, LayerScale, register tokens, attention pooling, a DeiT distillation token) the
head on the states captured entering that block's FFN -- by this file's own hooks on the full model -- gives the
full model's logits (float64, 1e-10); the last-block CLS head is today's head; patched FFN weights and gradients
through the head equal the full model's; unsupported models and block indices get clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import C, images, randomize_, tiny_classifier
from vitfl.localization.ffn import (TOKEN_STATISTICS, BlockIndexError, FFNHead, TokenFFNHead, TokenPost,
                              UnsupportedModelError, capture_ffn_states, ffn_head, last_ffn_head, model_fingerprint,
                              num_ffn_blocks)

DEPTH, D, D_FF, N = 3, 16, 64, 5
TOL = 1e-10


# --------------------------------------------------------------------------------------------------- models
def hf_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=D, num_hidden_layers=DEPTH,
                    num_attention_heads=2, intermediate_size=D_FF, num_labels=C)
    return randomize_(ViTForImageClassification(cfg), seed + 1).double().eval()


def timm_vit(seed: int = 0, distilled: bool = False, **kw):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=8, patch_size=2, in_chans=1, num_classes=C, embed_dim=D, depth=DEPTH, num_heads=2, **kw)
    return randomize_(model, seed + 1).double().eval()


MODELS = {  # name: (builder, pooling the head must report, its prefix-token count)
    "hf": (lambda: hf_vit(1), "token", 1),
    "timm_token": (lambda: timm_vit(2), "token", 1),
    "timm_token_layerscale": (lambda: timm_vit(3, init_values=0.1), "token", 1),
    "timm_avg_fc_norm": (lambda: timm_vit(4, global_pool="avg"), "avg", 1),
    "timm_avg_no_fc_norm_layerscale": (lambda: timm_vit(5, global_pool="avg", fc_norm=False, init_values=0.1),
                                       "avg", 1),
    "timm_avg_registers_no_cls": (lambda: timm_vit(6, global_pool="avg", class_token=False, reg_tokens=2), "avg", 2),
    "timm_avgmax": (lambda: timm_vit(7, global_pool="avgmax"), "avgmax", 1),
    "timm_attention_pool": (lambda: timm_vit(8, global_pool="map"), "map", 1),
    "timm_distilled": (lambda: timm_vit(9, distilled=True), "distilled", 2),
    "timm_distilled_layerscale": (lambda: timm_vit(10, distilled=True, init_values=0.1), "distilled", 2),
}
CLS_MODELS = ["hf", "timm_token", "timm_token_layerscale"]


def logits_of(model, pixels):
    out = model(pixels)
    return out.logits if hasattr(out, "logits") else out


def blocks_of(model):
    """The transformer blocks by their documented module paths (not through the adapter)."""
    return list(model.vit.layers if hasattr(model, "vit") else model.blocks)


def ffn_modules(model, b):
    """(LayerNorm before the FFN, W_bef linear, W_aft linear) of block b, by module path."""
    blk = blocks_of(model)[b]
    if hasattr(model, "vit"):
        return blk.layernorm_after, blk.mlp.fc1, blk.mlp.fc2
    return blk.norm2, blk.mlp.fc1, blk.mlp.fc2


def own_capture(model, b, pixels):
    """Every token's residual stream entering block b's FFN LayerNorm, the activation GELU(W_bef LN(x)) and the
    full model's logits, captured by this test's own hooks."""
    ln, fc1, _ = ffn_modules(model, b)
    got = {}
    hooks = [ln.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0].detach().clone())),
             fc1.register_forward_hook(lambda _m, _a, out: got.__setitem__("a", F.gelu(out.detach())))]
    try:
        with torch.no_grad():
            logits = logits_of(model, pixels)
    finally:
        for h in hooks:
            h.remove()
    return got["x"], got["a"], logits


def max_err(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


@pytest.fixture(scope="module")
def pixels():
    return images(N, seed=21, dtype=torch.float64)


# ---------------------------------------------------------------------------- every block == the full model
@pytest.mark.parametrize("name", list(MODELS))
def test_every_block_head_equals_full_model(name, pixels):
    make, pooling, prefix = MODELS[name]
    model = make()
    assert num_ffn_blocks(model) == DEPTH
    captured = [own_capture(model, b, pixels) for b in range(DEPTH)]
    logits = captured[0][2]
    for b in range(DEPTH):
        x, a, full = captured[b]
        torch.testing.assert_close(full, logits, rtol=0, atol=0)
        for index in (b, b - DEPTH):  # positive and negative addressing give the same view
            head = ffn_head(model, index)
            legacy = b == DEPTH - 1 and pooling == "token"
            assert type(head) is (FFNHead if legacy else TokenFFNHead)
            assert head.block == b and head.d == D and head.d_ff == D_FF
            xs, as_ = (x[:, 0], a[:, 0]) if legacy else (x, a)
            with torch.no_grad():
                assert max_err(head(xs), logits) <= TOL
                assert max_err(head.from_activation(xs, as_), logits) <= TOL
                assert max_err(head.activation(xs), as_) <= TOL
            if not legacy:
                assert head.pooling == pooling and head.num_prefix_tokens == prefix
                assert head.identity() == {"block": b, "pooling": pooling, "tokens": "all",
                                           "token_statistic": "readout"}
                assert head.state_identity() == {"block": b, "pooling": pooling, "tokens": "all"}
                assert head.num_classes == C
        # the check can fail: the states of another block do not give the logits
        other = captured[(b + 1) % DEPTH][0]
        head = ffn_head(model, b, tokens=True)
        with torch.no_grad():
            assert max_err(head(other), logits) > 1e-4


@pytest.mark.parametrize("name", ["hf", "timm_token_layerscale", "timm_avg_fc_norm", "timm_distilled"])
def test_token_states_beyond_cls_reach_the_logits(name, pixels):
    """Why non-last blocks need every token: changing one patch token's state changes the logits (and for the
    last block with token pooling it does not: the CLS head loses nothing there)."""
    model = MODELS[name][0]()
    for b in range(DEPTH):
        x, _, _ = own_capture(model, b, pixels)
        head = ffn_head(model, b, tokens=True)
        x2 = x.clone()
        x2[:, -1] += torch.randn(D, generator=torch.Generator().manual_seed(b), dtype=x.dtype)  # (a constant shift
        # of a token would be invisible: every later LayerNorm removes it)
        with torch.no_grad():
            change = max_err(head(x2), head(x))
        if b == DEPTH - 1 and MODELS[name][1] in ("token", "distilled"):  # the last token is not read
            assert change == 0.0
        else:
            assert change > 1e-6


# ---------------------------------------------------------------------------- the last-block CLS head is unchanged
@pytest.mark.parametrize("name", CLS_MODELS)
def test_last_block_cls_head_is_todays_head(name, pixels):
    model = MODELS[name][0]()
    fp = model_fingerprint(model)
    old = last_ffn_head(model)
    with capture_ffn_states(model) as st:
        with torch.no_grad():
            logits = logits_of(model, pixels)
    for head in (ffn_head(model), ffn_head(model, -1), ffn_head(model, DEPTH - 1),
                 ffn_head(model, -1, token_statistic="cls")):
        assert type(head) is type(old) is FFNHead and not head.token_axis
        assert not isinstance(head.post, TokenPost)  # no remaining blocks: today's speed
        for part in ("norm", "fc_bef", "act", "fc_aft", "layer_scale"):
            m_new, m_old = getattr(head, part), getattr(old, part)
            assert m_new is m_old or (isinstance(m_new, torch.nn.Identity) and isinstance(m_old, torch.nn.Identity))
        assert [type(m) for m in head.post.modules()] == [type(m) for m in old.post.modules()]
        assert head.identity() == old.identity() == {} and head.state_identity() == old.state_identity() == {}
        assert head.backbone == old.backbone and head.block == old.block == DEPTH - 1
        with torch.no_grad():
            assert torch.equal(head(st["x"]), old(st["x"]))
            assert max_err(head(st["x"]), logits) <= TOL
        assert torch.equal(head.reduce_tokens(st["a"]), st["a"])
    assert model_fingerprint(model) == fp == model_fingerprint(copy.deepcopy(model))
    # block-addressed capture of the last block is today's capture
    with capture_ffn_states(model, block=-1) as st2:
        with torch.no_grad():
            logits_of(model, pixels)
    assert torch.equal(st2["x"], st["x"]) and torch.equal(st2["a"], st["a"])
    # the token-carrying head of the same block (forced) agrees, but is another view with another identity
    tok = ffn_head(model, -1, tokens=True)
    x_all, _, _ = own_capture(model, DEPTH - 1, pixels)
    assert isinstance(tok, TokenFFNHead)
    with torch.no_grad():
        assert max_err(tok(x_all), old(st["x"])) <= 1e-12
    assert tok.identity() == {"block": DEPTH - 1, "pooling": "token", "tokens": "all", "token_statistic": "readout"}
    assert type(ffn_head(model, -1, token_statistic="mean")) is TokenFFNHead  # needs every token


@pytest.mark.parametrize("name", ["timm_avg_fc_norm", "timm_distilled", "hf"])
def test_block_capture_matches_own_hooks(name, pixels):
    model = MODELS[name][0]()
    for b in range(DEPTH - 1):
        x, a, _ = own_capture(model, b, pixels)
        with capture_ffn_states(model, block=b) as st, torch.no_grad():
            logits_of(model, pixels)
        torch.testing.assert_close(st["x"], x, rtol=0, atol=0)
        assert max_err(st["a"], a) <= TOL and st["x"].shape == (N, x.shape[1], D)


# ---------------------------------------------------------------------------- repair / gradients through the head
PATCH_CASES = [("hf", 1), ("timm_token_layerscale", 0), ("timm_avg_fc_norm", DEPTH - 1),
               ("timm_avg_registers_no_cls", 1), ("timm_distilled", 1), ("hf", DEPTH - 1)]


@pytest.mark.parametrize("name, b", PATCH_CASES)
def test_patched_block_weights_match_full_model(name, b, pixels):
    """A repair writes located weights of block b into (a copy of) the head: the head's logits must equal the full
    model with the same weights changed."""
    from vitfl.lightning_modules.repair.patch import Patch

    model = MODELS[name][0]()
    x, _, before = own_capture(model, b, pixels)
    head = ffn_head(model, b).copy()
    xs = x if head.token_axis else x[:, 0]
    weights = torch.tensor([[1, 0, 3], [1, 5, 17], [1, D - 1, D_FF - 1], [0, 7, 2], [0, D_FF - 1, 0]])
    g = torch.Generator().manual_seed(b)
    patch = Patch.from_values(head, weights, torch.zeros(len(weights)))
    patch = Patch(weights, patch.old, patch.old + torch.randn(len(weights), generator=g, dtype=torch.float64),
                  block=patch.block)  # a patch of a token head records its block (None: the last-block CLS head)
    patch.apply(head)
    # the same change, written into a copy of the full model by module path
    changed = copy.deepcopy(model)
    _, fc1, fc2 = ffn_modules(changed, b)
    with torch.no_grad():
        for (m, r, c), v in zip(weights.tolist(), patch.new.tolist()):
            (fc1 if m == 0 else fc2).weight[r, c] = v
        after = logits_of(changed, pixels)
        assert max_err(head(xs), after) <= TOL
    assert max_err(after, before) > 1e-6  # the patch matters
    with torch.no_grad():  # and the head's copy left the model alone
        assert torch.equal(logits_of(model, pixels), before)
    # the patch can be reverted through the head
    patch.revert(head)
    with torch.no_grad():
        assert max_err(head(xs), before) <= TOL


@pytest.mark.parametrize("name, b", [("hf", 0), ("timm_avg_no_fc_norm_layerscale", 1), ("timm_distilled", 2),
                                     ("timm_attention_pool", 0)])
def test_gradients_through_head_match_full_model(name, b, pixels):
    model = MODELS[name][0]()
    label = torch.arange(N) % C
    x, _, _ = own_capture(model, b, pixels)
    head = ffn_head(model, b)
    _, fc1, fc2 = ffn_modules(model, b)
    params = [fc1.weight, fc2.weight, fc1.bias]
    via_head = torch.autograd.grad(F.cross_entropy(head(x), label, reduction="sum"), params)
    via_model = torch.autograd.grad(F.cross_entropy(logits_of(model, pixels), label, reduction="sum"), params)
    for gh, gm in zip(via_head, via_model):
        assert max_err(gh, gm) <= TOL and float(gm.abs().max()) > 1e-6


# ---------------------------------------------------------------------------- token statistics
@pytest.mark.parametrize("name, expected", [
    ("hf", lambda t: t[:, 0]),
    ("timm_token", lambda t: t[:, 0]),
    ("timm_avg_fc_norm", lambda t: t[:, 1:].mean(1)),
    ("timm_avg_registers_no_cls", lambda t: t[:, 2:].mean(1)),
    ("timm_distilled", lambda t: (t[:, 0] + t[:, 1]) / 2),
])
def test_token_statistics(name, expected, pixels):
    model = MODELS[name][0]()
    head = ffn_head(model, 0)
    x, _, _ = own_capture(model, 0, pixels)
    a = head.activation(x).detach()
    T = x.shape[1]
    torch.testing.assert_close(head.reduce_tokens(a), expected(a), rtol=0, atol=1e-15)
    torch.testing.assert_close(head.reduce_tokens(a, "cls"), a[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(head.reduce_tokens(a, "mean"), a.mean(1), rtol=0, atol=1e-15)
    for stat in TOKEN_STATISTICS:
        w = head.token_weights(T, stat)
        assert w.shape == (T,) and abs(float(w.sum()) - 1) < 1e-12
        torch.testing.assert_close(torch.einsum("ntk,t->nk", a, w), head.reduce_tokens(a, stat), rtol=1e-12,
                                   atol=1e-14)
    by_mean = ffn_head(model, 0, token_statistic="mean")
    assert by_mean.identity()["token_statistic"] == "mean" and by_mean.state_identity() == head.state_identity()


def test_average_pooling_statistic_is_exact_for_w_aft(pixels):
    """Last block, average pooling with fc_norm: the logits see the FFN only through the readout mean of its
    output, which is W_aft applied to the mean activation (the documented reason for the statistic)."""
    model = MODELS["timm_avg_no_fc_norm_layerscale"][0]()
    model.fc_norm, model.norm = torch.nn.LayerNorm(D).double(), torch.nn.Identity()  # norm after pooling
    randomize_(model.fc_norm, 3)
    x, _, logits = own_capture(model, DEPTH - 1, pixels)
    head = ffn_head(model, -1)
    it = head.intermediates(x)
    pooled_a = head.reduce_tokens(it["a"])
    pooled_r = head.reduce_tokens(x) + head.layer_scale(head.fc_aft(pooled_a))
    with torch.no_grad():
        assert max_err(model.head(model.fc_norm(pooled_r)), logits) <= TOL
        assert max_err(it["logits"], logits) <= TOL


# ---------------------------------------------------------------------------- through the toolkit's wrapper
@pytest.mark.slow  # imports Lightning (~5 s); the unwrapping is last_ffn_head's, tested in test_ffn_adapter.py
@pytest.mark.parametrize("backbone", ["hf_vit", "timm_vit"])
def test_through_image_classifier(backbone):
    model = tiny_classifier(backbone, seed=7).double()
    px = images(4, seed=5, dtype=torch.float64)
    inner = model.backbone.model if backbone == "hf_vit" else model.backbone
    x, _, _ = own_capture(inner, 0, px)
    head = ffn_head(model, 0)
    assert head.backbone == ("hf" if backbone == "hf_vit" else "timm")
    with torch.no_grad():
        assert max_err(head(x), model(px)) <= TOL


# ---------------------------------------------------------------------------- clear errors
def test_swin_and_convnext_are_refused():
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=16, patch_size=2, in_chans=1, window_size=4, embed_dim=8, depths=(1, 1),
                           num_heads=(1, 1), num_classes=C)
    with pytest.raises(UnsupportedModelError, match=r"timm SwinTransformer is not supported.*VisionTransformer.*"
                                                    r"has no `blocks`"):
        ffn_head(swin)
    convnext = ConvNeXt(in_chans=1, num_classes=C, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(UnsupportedModelError, match=r"timm ConvNeXt is not supported.*has no `blocks`.*"
                                                    r"`num_prefix_tokens`"):
        ffn_head(convnext, 0)
    with pytest.raises(UnsupportedModelError, match="neither"):
        ffn_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_hf_models_other_than_vit_classification_are_refused():
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTModel

    deit = DeiTForImageClassification(DeiTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=D,
                                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=D_FF,
                                                 num_labels=C))
    with pytest.raises(UnsupportedModelError, match=r"Hugging Face DeiTForImageClassification is not supported.*"
                                                    r"ViTForImageClassification.*has no `vit`"):
        ffn_head(deit)
    vit = ViTModel(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=D, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=D_FF))
    with pytest.raises(UnsupportedModelError, match=r"Hugging Face ViTModel is not supported.*has no `vit`.*"
                                                    r"`classifier`"):
        ffn_head(vit)


def test_other_timm_blocks_are_refused():
    from timm.models.vision_transformer import ResPostBlock

    model = timm_vit(11, block_fn=ResPostBlock)  # post-norm: the same modules in another order
    for build in (lambda: ffn_head(model, 0), lambda: last_ffn_head(model)):
        with pytest.raises(UnsupportedModelError, match="ResPostBlock is not supported.*pre-norm Block"):
            build()


def test_distillation_token_refused_by_cls_head():
    """The CLS-only head would drop head_dist(token 1): last_ffn_head refuses and points to ffn_head."""
    model = MODELS["timm_distilled"][0]()
    with pytest.raises(UnsupportedModelError, match=r"distillation token.*ffn_head"):
        last_ffn_head(model)
    assert isinstance(ffn_head(model, -1), TokenFFNHead)


@pytest.mark.parametrize("block", [DEPTH, -DEPTH - 1, 100])
def test_out_of_range_block(block):
    model = MODELS["timm_token"][0]()
    with pytest.raises(BlockIndexError, match=rf"block {block} is out of range: the model has {DEPTH} transformer "
                                              rf"blocks \(valid block indices: 0..{DEPTH - 1}"):
        ffn_head(model, block)
    with pytest.raises(IndexError):
        ffn_head(MODELS["hf"][0](), block)


@pytest.mark.parametrize("block", [1.0, True, "1", None])
def test_block_must_be_an_int(block):
    with pytest.raises(TypeError, match="block must be an int"):
        ffn_head(MODELS["timm_token"][0](), block)


def test_bad_statistic_and_bad_states(pixels):
    model = MODELS["timm_avg_fc_norm"][0]()
    with pytest.raises(ValueError, match="unknown token_statistic 'median'"):
        ffn_head(model, 0, token_statistic="median")
    head = ffn_head(model, 0)
    x, _, _ = own_capture(model, 0, pixels)
    with pytest.raises(ValueError, match=r"takes the token states .*x \[N, T >= 2, d=16\], got \[5, 16\]"):
        head(x[:, 0])
    with pytest.raises(ValueError, match="token states"):
        head.from_activation(x[:, 0], head.activation(x)[:, 0])
    with pytest.raises(ValueError, match="token states"):
        head(x[:, :1])  # the class token alone: no patch token for the average
