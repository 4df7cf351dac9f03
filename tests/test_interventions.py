import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitfl.evaluation.interventions import (Target, compare_to_random, edited_logits, patched_head, random_target,
                                      run_interventions, summarize_interventions)
from vitfl.localization.base import FLResult
from vitfl.localization.ffn import capture_ffn_states, last_ffn_head


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16,
                                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                num_labels=10)).eval()
    images = torch.randn(12, 1, 8, 8)
    with torch.no_grad(), capture_ffn_states(model) as st:
        logits = model(pixel_values=images).logits
    return model, images, st["x"].clone(), logits


def _model_logits(model, images, hook_module=None, hook=None):
    h = hook_module.register_forward_hook(hook) if hook_module is not None else None
    try:
        with torch.no_grad():
            return model(pixel_values=images).logits
    finally:
        if h is not None:
            h.remove()


@pytest.mark.parametrize("mode", ["zero", "double"])
def test_weight_edit_through_head_equals_full_model(tiny, mode):
    model, images, x, _ = tiny
    head = last_ffn_head(model)
    w = torch.tensor([[0, 3, 5], [0, 40, 0], [1, 7, 12], [1, 0, 63], [1, 15, 33]])
    via_head = edited_logits(head, x, Target("weight", weights=w), mode)
    import copy

    m2 = copy.deepcopy(model)
    h2 = last_ffn_head(m2)
    f = 0.0 if mode == "zero" else 2.0
    with torch.no_grad():
        for m, r, c in w.tolist():
            lin = h2.fc_bef if m == 0 else h2.fc_aft
            lin.weight[r, c] *= f
    full = _model_logits(m2, images)
    torch.testing.assert_close(via_head, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(via_head, _model_logits(model, images), atol=1e-6)  # the edit did something
    # the head given in was not modified
    torch.testing.assert_close(head(x), _model_logits(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,where", [("zero", "post"), ("double", "post"), ("double", "pre"), ("zero", "pre")])
def test_neuron_edit_through_head_equals_full_model(tiny, mode, where):
    model, images, x, _ = tiny
    head = last_ffn_head(model)
    j = torch.tensor([1, 17, 42])
    f = 0.0 if mode == "zero" else 2.0
    via_head = edited_logits(head, x, Target("neuron", neurons=j), mode, where)

    def hook(_m, _inp, out):
        out = out.clone()
        out[..., j] *= f
        return out

    full = _model_logits(model, images, head.act if where == "post" else head.fc_bef, hook)
    torch.testing.assert_close(via_head, full, atol=1e-5, rtol=1e-5)
    if where == "post":
        # post-GELU x f on neuron j == scaling column j of W_aft
        cols = torch.cat([torch.stack([torch.ones(16, dtype=torch.long), torch.arange(16),
                                       torch.full((16,), int(jj))], 1) for jj in j])
        torch.testing.assert_close(via_head, patched_head(head, cols, mode)(x), atol=1e-5, rtol=1e-5)


def test_bad_input(tiny):
    model, _, x, _ = tiny
    head = last_ffn_head(model)
    with pytest.raises(ValueError, match="outside"):
        patched_head(head, torch.tensor([[0, 64, 0]]))
    with pytest.raises(ValueError, match="mode"):
        edited_logits(head, x, Target("neuron", neurons=torch.tensor([0])), "triple")
    with pytest.raises(ValueError, match="at least one"):
        Target("neuron", neurons=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="x must be"):
        edited_logits(head, x[:, :3], Target("neuron", neurons=torch.tensor([0])))


def test_run_interventions_tables(tiny):
    model, _, x, logits = tiny
    head = last_ffn_head(model)
    label = logits.argmax(-1)
    label[:4] = (label[:4] + 1) % 10  # 4 misclassified inputs
    idx = torch.arange(100, 112)
    # a "method" that zeroes the neurons with the largest mean activation must move p more than random
    a = head.activation(x).detach()
    top = a.mean(0).argsort(descending=True)[:8]
    res = {"top_act": FLResult("top_act", "neuron", 8, a.mean(0), torch.zeros(0, 3, dtype=torch.long), top),
           "w": FLResult("w", "weight", 3, torch.zeros(2048), torch.tensor([[0, 1, 1], [1, 2, 2], [1, 3, 3]]))}
    rec = run_interventions(head, x, label, idx, i_neg=[100, 101, 102, 103], i_pos=[104, 105, 106], results=res,
                            n_random=2)
    assert set(rec["group"]) == {"I_neg", "I_pos", "rest"}
    assert (rec.groupby(["method", "mode", "rep"]).size() == 12).all()
    assert set(rec["method"]) == {"top_act", "w", "random@top_act", "random@w"}
    r = rec[(rec.method == "top_act") & (rec["mode"] == "zero")]
    np.testing.assert_allclose(r["delta_p"], r["p_after"] - r["p_before"])
    assert (r["flipped"] == (r["pred_before"] != r["pred_after"])).all()
    assert not (r["fixed"] & r["broken"]).any()
    summ = summarize_interventions(rec)
    assert set(summ["method"]) == set(rec["method"])
    top_mean = summ[(summ.method == "top_act") & (summ["mode"] == "zero")]["mean_abs_delta_p"].mean()
    rnd_mean = summ[(summ.method == "random@top_act") & (summ["mode"] == "zero")]["mean_abs_delta_p"].mean()
    assert top_mean > rnd_mean
    cmp = compare_to_random(rec)
    assert set(cmp["method_b"]) == {"random@top_act", "random@w"}
    assert {"p", "p_holm", "cliffs_delta"} <= set(cmp.columns)


def test_random_target_same_count_and_level(tiny):
    head = last_ffn_head(tiny[0])
    t = random_target(Target("weight", weights=torch.zeros(7, 3, dtype=torch.long)), head.index, seed=1)
    assert t.level == "weight" and t.count == 7 and len(set(head.index.to_flat(t.weights).tolist())) == 7
    t2 = random_target(Target("neuron", neurons=torch.arange(5)), head.index, seed=1)
    assert t2.level == "neuron" and t2.count == 5


def test_wide_roundtrip(tiny):
    from vitfl.evaluation.interventions import records_to_wide, wide_to_records

    model, _, x, logits = tiny
    head = last_ffn_head(model)
    label = logits.argmax(-1)
    label[:3] = (label[:3] + 1) % 10
    res = {"m": FLResult("m", "weight", 2, torch.zeros(2048), torch.tensor([[0, 1, 1], [1, 2, 2]]))}
    rec = run_interventions(head, x, label, torch.arange(12), [0, 1, 2], [5, 6], res, n_random=2)
    wide = records_to_wide(rec)
    assert len(wide) == 12 and "p_double_rand1" in wide.columns
    back = wide_to_records(wide, "m")
    cols = ["method", "baseline_of", "mode", "rep", "sample_index", "group", "pred_after", "p_after", "flipped",
            "fixed", "broken"]
    key = ["method", "mode", "rep", "sample_index"]
    a = rec[cols].sort_values(key).reset_index(drop=True)
    b = back[cols].sort_values(key).reset_index(drop=True)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b, check_dtype=False)
