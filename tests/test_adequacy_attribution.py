"""Layer attributions (adequacy/attribution.py) and neuron layers (adequacy/activations.py): Captum's completeness
for IG on a CNN and a ViT's last FFN, LRP conservation, grad x activation by hand, rank voting, layer discovery."""
import warnings

import numpy as np
import pytest
import torch

from vitfl.adequacy.activations import candidate_layers, collect_activations, default_layer, reduce_output
from vitfl.adequacy.attribution import (UnsupportedAttributionError, input_attributions, layer_attributions,
                                  neuron_importance, rank_vote, top_neurons)
from vitfl.lightning_modules.cnn import LeNet5, SmallCNN

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a busy shared CPU; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet5(num_classes=10, in_channels=1, image_size=8).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _out_diff(model, x, t, baseline=0.0):
    with torch.no_grad():
        return model(x)[torch.arange(len(x)), t] - model(torch.full_like(x, baseline))[torch.arange(len(x)), t]


@pytest.mark.parametrize("layer", ["features.1", "features.4", "classifier.1", "classifier.3"])
def test_ig_completeness_cnn(lenet, batch, layer):
    x, t = batch
    r = layer_attributions(lenet, layer, x, t, method="ig", n_steps=64)
    # a conv neuron's relevance is summed over space, so sum_j R_j = f(x)_t - f(baseline)_t still holds
    np.testing.assert_allclose(r.sum(1).numpy(), _out_diff(lenet, x, t).numpy(), atol=2e-3, rtol=2e-2)


def test_conductance_and_deeplift_completeness_cnn(lenet, batch):
    x, t = batch
    for method in ("conductance", "deeplift"):
        r = layer_attributions(lenet, "classifier.1", x, t, method=method, n_steps=64)
        np.testing.assert_allclose(r.sum(1).numpy(), _out_diff(lenet, x, t).numpy(), atol=5e-3, rtol=5e-2)


def test_gradxact_by_hand(lenet, batch):
    x, t = batch
    r = layer_attributions(lenet, "classifier.3", x, t, method="gradxact")
    store = {}
    h = lenet.classifier[3].register_forward_hook(lambda m, a, o: store.__setitem__("a", o))
    out = lenet(x)
    h.remove()
    g = torch.autograd.grad(out[torch.arange(len(x)), t].sum(), store["a"])[0]
    np.testing.assert_allclose(r.numpy(), (g * store["a"]).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_lrp_conservation_without_biases(batch):
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    x, t = batch
    with torch.no_grad():
        logit = model(x)[torch.arange(len(x)), t]
    for layer in ("classifier.1", "features.4"):  # ReLU layers: read at the next module's input
        r = layer_attributions(model, layer, x, t, method="lrp")
        # epsilon-LRP without biases conserves relevance: the layer's total equals the target logit
        np.testing.assert_allclose(r.sum(1).numpy(), logit.numpy(), rtol=1e-3, atol=1e-4)


def test_small_cnn_lrp_runs():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, in_channels=3, width=4).eval()
    x = torch.randn(3, 3, 8, 8)
    r = layer_attributions(model, "features.8", x, torch.tensor([0, 1, 2]), method="lrp")
    assert r.shape == (3, 8)


@pytest.fixture(scope="module")
def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    from vitfl.lightning_modules.backbones import HFLogits

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=4)
    return HFLogits(ViTForImageClassification(cfg)).eval()


def test_vit_layers_and_ig_completeness_at_cls(hf_vit):
    from vitfl.localization.ffn import last_ffn_head

    layers = candidate_layers(hf_vit)
    assert len(layers) == 2
    (name, mod), = default_layer(hf_vit).items()
    assert mod is last_ffn_head(hf_vit).act
    x = torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 1, 2, 3, 0])
    r = layer_attributions(hf_vit, name, x, t, method="ig", n_steps=64)
    assert r.shape == (5, 32)
    # Layer IG interpolates the layer's output only (the residual stream keeps x), so completeness reads
    # sum_j R_j = f(x) - f(x with the layer output set to its value at the baseline input); and only the CLS token
    # of the last FFN reaches the logits, so the CLS relevances alone are complete.
    store = {}
    h = mod.register_forward_hook(lambda m, a, o: store.__setitem__("base", o.detach()))
    with torch.no_grad():
        hf_vit(torch.zeros_like(x))
    h.remove()
    h = mod.register_forward_hook(lambda m, a, o: store["base"])
    with torch.no_grad():
        counterfactual = hf_vit(x)[torch.arange(5), t]
    h.remove()
    with torch.no_grad():
        full = hf_vit(x)[torch.arange(5), t]
    np.testing.assert_allclose(r.sum(1).numpy(), (full - counterfactual).numpy(), atol=2e-4, rtol=2e-2)
    acts = collect_activations(hf_vit, name, x)
    assert acts[name].shape == (5, 32)
    with pytest.raises(UnsupportedAttributionError, match="ViT"):
        layer_attributions(hf_vit, name, x, t, method="lrp")


def test_neuron_importance_sums_over_correct_inputs_only(lenet, batch):
    x, _ = batch
    with torch.no_grad():
        pred = lenet(x).argmax(1)
    y = pred.clone()
    y[:4] = (pred[:4] + 1) % 10  # 4 misclassified
    imp = neuron_importance(lenet, "classifier.3", x, y, method="gradxact")["classifier.3"]
    ref = layer_attributions(lenet, "classifier.3", x[4:], y[4:], method="gradxact").sum(0)
    np.testing.assert_allclose(imp.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="none of the given inputs"):
        neuron_importance(lenet, "classifier.3", x[:4], y[:4], method="gradxact")


def test_rank_vote_and_top_neurons():
    v = rank_vote({"a": torch.tensor([0.1, 0.5, 0.3]), "b": np.array([1.0, 5.0, 3.0])})
    assert v.tolist() == [1.0, 3.0, 2.0]
    v = rank_vote({"a": [3.0, 1.0, 2.0], "b": [1.0, 3.0, 2.0], "c": [1.0, 2.0, 3.0]})
    np.testing.assert_allclose(v.numpy(), [5 / 3, 2.0, 7 / 3])
    assert top_neurons(v, 2).tolist() == [2, 1]
    assert top_neurons(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]  # ties: lower index first
    with pytest.raises(ValueError, match="same neurons"):
        rank_vote({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError):
        top_neurons(v, 4)


def test_input_attributions_ig_complete(lenet, batch):
    x, t = batch
    a = input_attributions(lenet, x, t, method="ig", n_steps=64)
    assert a.shape == x.shape
    np.testing.assert_allclose(a.sum((1, 2, 3)).numpy(), _out_diff(lenet, x, t).numpy(), atol=2e-3, rtol=2e-2)


def test_reduce_output_shapes_and_errors():
    assert reduce_output(torch.ones(2, 3, 4, 4)).shape == (2, 3)
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(reduce_output(x, "cls"), x[:, 0])
    assert torch.equal(reduce_output(x, "mean"), x.mean(1))
    with pytest.raises(ValueError, match="token_reduction"):
        reduce_output(x, "max")
    with pytest.raises(ValueError, match="no layer named"):
        collect_activations(LeNet5(), "nope", torch.zeros(1, 1, 8, 8))
    assert list(candidate_layers(LeNet5())) == ["features.1", "features.4", "classifier.1", "classifier.3"]
