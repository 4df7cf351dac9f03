"""Patches (lightning_modules/repair/patch.py): JSON round trip, apply / revert on an FFN head and on full models,
and the patched FFN head predicts exactly what the patched full model predicts (tiny HF ViT)."""
import doctest
import json

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import vitfl.lightning_modules.repair.patch as patch_module
from vitfl.lightning_modules.repair.patch import Patch, PatchMismatchError, RepairInputError
from vitfl.localization.ffn import capture_ffn_states, last_ffn_head


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg).eval()


WEIGHTS = torch.tensor([[0, 3, 1], [0, 3, 7], [0, 60, 15], [1, 2, 3], [1, 2, 40], [1, 15, 3]])


def random_patch(target, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Patch.from_values(target, WEIGHTS, torch.randn(len(WEIGHTS), generator=g))


def test_doctests():
    r = doctest.testmod(patch_module)
    assert r.attempted > 0 and r.failed == 0


def test_json_round_trip_is_exact():
    model = tiny_vit()
    p = random_patch(model)
    q = Patch.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p and q.weights.dtype == torch.long
    assert p.to_dict()["n"] == len(WEIGHTS)
    assert not (Patch(p.weights, p.old, p.new + 1) == p)


def test_apply_revert_touches_only_located_weights():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = last_ffn_head(model)
    ptr = {head.fc_bef.weight.data_ptr(): 0, head.fc_aft.weight.data_ptr(): 1}
    p = random_patch(model)
    p.apply(model)
    for k, v in model.state_dict().items():
        diff = {tuple(d) for d in (v != before[k]).nonzero().tolist()}
        if v.data_ptr() in ptr:
            m = ptr[v.data_ptr()]
            assert diff == {tuple(w[1:]) for w in WEIGHTS.tolist() if w[0] == m}
        else:
            assert not diff, k
    got = torch.stack([(head.fc_bef if m == 0 else head.fc_aft).weight.detach()[r, c] for m, r, c in WEIGHTS.tolist()])
    assert torch.equal(got.double(), p.new.float().double())
    with pytest.raises(PatchMismatchError, match="already applied"):
        p.apply(model)
    p.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(PatchMismatchError):
        p.revert(model)
    with p.applied(model):
        assert not torch.equal(head.fc_aft.weight, before[next(k for k, v in model.state_dict().items()
                                                               if ptr.get(v.data_ptr()) == 1)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patch_for_another_model_is_refused():
    p = random_patch(tiny_vit(0))
    with pytest.raises(PatchMismatchError, match="another model"):
        p.apply(tiny_vit(1))


def test_patched_ffn_head_predicts_like_the_patched_full_model():
    model = tiny_vit()
    images = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with capture_ffn_states(model) as st, torch.no_grad():
        model(pixel_values=images)
    x = st["x"].clone()
    head = last_ffn_head(model).copy()  # an independent head, as the repair modules use
    g = torch.Generator().manual_seed(4)
    p = Patch.from_values(head, WEIGHTS, torch.randn(len(WEIGHTS), generator=g) * 3)
    with torch.no_grad():
        p.apply(head)
        p.apply(model)
        model_logits = model(pixel_values=images).logits
        head_logits = head(x)
        torch.testing.assert_close(head_logits, model_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(head_logits.argmax(1), model_logits.argmax(1))
        p.revert(model)
        assert not torch.allclose(model(pixel_values=images).logits, model_logits)


def test_patch_applies_through_the_lightning_classifier():
    from vitfl.lightning_modules.classifier import ImageClassifier

    clf = ImageClassifier("hf_vit", num_classes=10, backbone_kwargs=dict(
        image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    p = random_patch(clf)
    with p.applied(clf):
        assert float(last_ffn_head(clf).fc_aft.weight.detach()[15, 3]) == pytest.approx(float(p.new[-1]))
    assert float(last_ffn_head(clf).fc_aft.weight.detach()[15, 3]) == pytest.approx(float(p.old[-1]))


def test_bad_patches():
    model = tiny_vit()
    with pytest.raises(RepairInputError, match="3 weights, 2 old"):
        Patch(WEIGHTS[:3], torch.zeros(2), torch.zeros(3))
    with pytest.raises(RepairInputError, match="finite"):
        Patch(WEIGHTS[:1], torch.zeros(1), torch.tensor([float("nan")]))
    with pytest.raises(RepairInputError, match="budget 0"):
        Patch.from_values(model, torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(RepairInputError, match="format"):
        Patch.from_dict({"format": "other", "weights": [], "old": [], "new": []})
