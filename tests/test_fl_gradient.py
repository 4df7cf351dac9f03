"""GL (gradient.py) against autograd of the FULL model's summed loss, plus bad input and side effects."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from vitfl.localization.base import get_localizer
from vitfl.localization.ffn import FFNHead, capture_ffn_states, last_ffn_head
from vitfl.localization.methods.gradient import grad_loss_sums


@pytest.fixture(scope="module")
def vit_and_states():
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    images = torch.randn(24, 1, 8, 8)
    labels = torch.randint(0, 10, (24,))
    with torch.no_grad(), capture_ffn_states(model) as st:
        model(pixel_values=images)
    return model, images, labels, st["x"].clone()


def full_model_grads(model, images, labels):
    """sum_x dL(x)/dW of the last FFN's weights by backprop through the whole ViT."""
    head = last_ffn_head(model)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(pixel_values=images).logits, labels, reduction="sum")
    loss.backward()
    g = head.index.join(head.fc_bef.weight.grad, head.fc_aft.weight.grad).clone()
    model.zero_grad(set_to_none=True)
    return g


def test_grad_loss_sums_equal_full_model_gradient(vit_and_states):
    model, images, labels, x = vit_and_states
    head = last_ffn_head(model)
    g_bef, g_aft = grad_loss_sums(head, x, labels)
    ref = full_model_grads(model, images, labels)
    torch.testing.assert_close(head.index.join(g_bef, g_aft), ref, rtol=1e-4, atol=1e-6)


def test_grad_loss_one_and_two_sided_vs_full_model(vit_and_states):
    model, images, labels, x = vit_and_states
    head = last_ffn_head(model)
    neg = torch.arange(24) % 3 == 0
    ref_neg = full_model_grads(model, images[neg], labels[neg]).abs()
    ref_pos = full_model_grads(model, images[~neg], labels[~neg]).abs()

    one = get_localizer("grad_loss")(head)
    for s in range(0, 24, 5):  # several updates: the signed sums add up before |.|
        one.update(x[s:s + 5], labels[s:s + 5], neg[s:s + 5])
    torch.testing.assert_close(one.compute(), ref_neg.double(), rtol=1e-4, atol=1e-6)

    two = get_localizer("grad_loss_2s")(head)
    two.update(x, labels, neg)
    torch.testing.assert_close(two.compute(), (ref_neg / (1 + ref_pos)).double(), rtol=1e-4, atol=1e-6)

    only = get_localizer("gradient_only")(head)
    only.update(x, labels, neg)
    torch.testing.assert_close(only.compute(), ref_neg.double(), rtol=1e-4, atol=1e-6)


def test_no_side_effects_on_parameters(vit_and_states):
    model, _, labels, x = vit_and_states
    head = last_ffn_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        gl = get_localizer("grad_loss")(head)
        gl.update(x, labels, torch.ones(24, dtype=torch.bool))
        assert gl.compute().abs().sum() > 0
        assert all(not p.requires_grad for p in model.parameters())
        assert all(p.grad is None for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_states_cached_in_inference_mode_and_no_grad_context(vit_and_states):
    model, _, labels, x = vit_and_states
    head = last_ffn_head(model)
    with torch.inference_mode():
        xi = x.clone()
    gl = get_localizer("grad_loss")(head)
    with torch.no_grad():  # Lightning's validation/test loops run under no_grad
        gl.update(xi, labels, torch.ones(24, dtype=torch.bool))
    ref = get_localizer("grad_loss")(head)
    ref.update(x, labels, torch.ones(24, dtype=torch.bool))
    torch.testing.assert_close(gl.compute(), ref.compute())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        get_localizer("grad_loss")(head).update(x, labels, torch.ones(24, dtype=torch.bool))


def small_head():
    torch.manual_seed(3)
    d = 4
    return FFNHead(nn.LayerNorm(d), nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d), None,
                   nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 3)), "hf")


def test_bad_inputs_raise_clear_errors():
    head = small_head()
    gl = get_localizer("grad_loss")(head)
    x, y, neg = torch.randn(5, 4), torch.randint(0, 3, (5,)), torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[B, d=4\]"):
        gl.update(torch.randn(5, 3), y, neg)
    with pytest.raises(ValueError, match="NaN"):
        gl.update(torch.full((5, 4), float("nan")), y, neg)
    with pytest.raises(ValueError, match="bool"):
        gl.update(x, y, torch.ones(5))
    with pytest.raises(ValueError, match="label"):
        gl.update(x, y[:4], neg)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gl.update(x, torch.full((5,), 3), neg)
    with pytest.raises(ValueError, match="integer"):
        gl.update(x, y.float(), neg)
    # empty I_neg
    gl2 = get_localizer("grad_loss")(head)
    gl2.update(x, y, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="I_neg"):
        gl2.compute()
    # two-sided without I_pos
    two = get_localizer("grad_loss_2s")(head)
    two.update(x, y, neg)
    with pytest.raises(ValueError, match="I_pos"):
        two.compute()
    # NaN in the weights
    with torch.no_grad():
        head.fc_aft.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W_aft"):
        get_localizer("grad_loss")(head)
    with pytest.raises(ValueError, match="Unexpected keyword"):
        get_localizer("grad_loss")(small_head(), no_such_option=1)
