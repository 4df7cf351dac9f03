"""Neuron importance by Captum layer attributions (DeepImportance's first step), input attributions, rank voting.

For a layer with neurons j (see :mod:`vitfl.adequacy.activations`) and an input x of label y, a layer attribution method
gives ``R_j(x)``, the relevance of neuron j for the logit of class y (Captum's ``target``). Methods (a config
choice, ``method=``):

- ``lrp``: ``captum.attr.LayerLRP`` (epsilon rule). CNNs only: Captum's LRP has no rule for GELU, LayerNorm or
  attention, so it refuses ViTs (:class:`UnsupportedAttributionError`);
- ``ig``: ``captum.attr.LayerIntegratedGradients``; complete (below);
- ``conductance``: ``captum.attr.LayerConductance``; complete up to integration error;
- ``deeplift``: ``captum.attr.LayerDeepLift`` (rescale rule; GELU, which has no rule, falls back to gradients);
- ``gradxact``: ``captum.attr.LayerGradientXActivation``, ``a_j * df_y/da_j``, no baseline.

Baselines (ig, conductance, deeplift) are an input of constant ``baseline`` (default 0, i.e. the mean image in
normalised space). Completeness of the layer methods: ``sum_j R_j(x) = f_y(x) - f_y(x | layer output := its value
at the baseline input)``; with no path around the layer (a plain CNN) the right side is ``f_y(x) - f_y(baseline)``,
in a ViT the residual stream keeps x.

A layer output is reduced to one relevance per neuron by *summing* the relevance of its parts (so completeness
carries over): ``[B, C, H, W]`` -> sum over H, W; ``[B, T, F]`` -> token 0 (``"cls"``; for the last FFN of a
CLS-pooled ViT the other tokens have zero relevance) or the sum over tokens (``"mean"``, the relevance of the
token-mean neuron). LRP on an activation module (ReLU has no LRP rule in Captum) is read at the input of the module
that consumes its output.

**Importance** of neuron j over a set X (DeepImportance): ``I_j = sum_{x in X, f(x) = y} R_j(x)``, signed, over the
correctly classified inputs only. :func:`rank_vote` combines several methods' importances by their mean rank
(a Borda count).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitfl.adequacy.activations import TOKEN_REDUCTIONS, predict, resolve_layers
from vitfl.adequacy import require

__all__ = [
    "LAYER_METHODS",
    "INPUT_METHODS",
    "UnsupportedAttributionError",
    "default_method",
    "reduce_attribution",
    "layer_attributions",
    "neuron_importance",
    "rank_vote",
    "top_neurons",
    "input_attributions",
]

LAYER_METHODS = ("lrp", "ig", "conductance", "deeplift", "gradxact")
INPUT_METHODS = ("ig", "saliency", "gradxinput", "deeplift", "lrp")


class UnsupportedAttributionError(ValueError):
    """The attribution method cannot run on this model (e.g. LRP on a ViT)."""


def _is_vit(model: nn.Module) -> bool:
    try:
        from vitfl.localization.ffn import UnsupportedModelError, backbone_kind
    except ImportError:  # pragma: no cover
        return False
    try:
        backbone_kind(model)
        return True
    except UnsupportedModelError:
        return False


def default_method(model: nn.Module) -> str:
    """``"lrp"`` for CNNs (DeepImportance), ``"ig"`` for ViTs."""
    return "ig" if _is_vit(model) else "lrp"


def reduce_attribution(attr: Tensor, token_reduction: str = "cls") -> Tensor:
    """Per-neuron relevance ``[B, F]`` from a layer attribution: 4-D summed over space, 3-D token 0 (``"cls"``) or
    summed over tokens (``"mean"``), 2-D as is."""
    if isinstance(attr, (tuple, list)):
        attr = attr[0]
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS}, got {token_reduction!r}")
    if attr.ndim == 2:
        return attr
    if attr.ndim == 4:
        return attr.sum(dim=(2, 3))
    if attr.ndim == 3:
        return attr[:, 0] if token_reduction == "cls" else attr.sum(dim=1)
    raise ValueError(f"cannot reduce an attribution of shape {tuple(attr.shape)}")


def _lrp_anchor(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[nn.Module, bool]:
    """Where LayerLRP can read a layer's relevance: the layer itself if it has an LRP rule (Conv, Linear, pooling),
    else (an activation such as ReLU, which Captum's LRP passes through without a rule) the input of the module
    that consumes the layer's output. Returns (module, attribute_to_layer_input)."""
    SUPPORTED_LAYERS_WITH_RULES = require("captum.attr._core.lrp", "captum").SUPPORTED_LAYERS_WITH_RULES

    if isinstance(layer, tuple(SUPPORTED_LAYERS_WITH_RULES)):
        return layer, False
    seen: dict[str, object] = {}
    consumer: list[nn.Module] = []

    def out_hook(_m, _a, out):
        seen["out"] = out

    def in_hook(m, args):
        if "out" in seen and not consumer and args and args[0] is seen["out"]:
            consumer.append(m)

    leaves = [m for m in model.modules() if not list(m.children()) and m is not layer]
    handles = [layer.register_forward_hook(out_hook)] + [m.register_forward_pre_hook(in_hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if not consumer or not isinstance(consumer[0], tuple(SUPPORTED_LAYERS_WITH_RULES)):
        raise UnsupportedAttributionError(
            f"LayerLRP needs a layer with an LRP rule: {type(layer).__name__} has none and its output does not feed a "
            "Conv/Linear/pooling module directly; measure that module instead or use another method")
    return consumer[0], True


def _layer_attributor(model: nn.Module, layer: nn.Module, method: str, probe: Tensor):
    ca = require("captum.attr", "captum")

    if method == "lrp":
        if _is_vit(model):
            raise UnsupportedAttributionError(
                "Captum's LayerLRP has no propagation rule for GELU, LayerNorm or attention, so it cannot run on a "
                "ViT; use method='ig', 'conductance', 'deeplift' or 'gradxact'")
        anchor, to_input = _lrp_anchor(model, layer, probe)
        return ca.LayerLRP(model, anchor), to_input
    if method == "ig":
        return ca.LayerIntegratedGradients(model, layer), False
    if method == "conductance":
        return ca.LayerConductance(model, layer), False
    if method == "deeplift":
        return ca.LayerDeepLift(model, layer), False
    if method == "gradxact":
        return ca.LayerGradientXActivation(model, layer), False
    raise ValueError(f"unknown attribution method {method!r}; expected one of {LAYER_METHODS}")


def _check_inputs(inputs: Tensor, targets: Tensor | Sequence[int]) -> Tensor:
    if not isinstance(inputs, Tensor) or inputs.ndim < 2:
        raise ValueError("inputs must be a tensor [N, ...] of images")
    targets = torch.as_tensor(targets, dtype=torch.long).view(-1)
    if len(targets) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    if len(inputs) == 0:
        raise ValueError("no inputs given")
    return targets


def layer_attributions(model: nn.Module, layer, inputs: Tensor, targets: Tensor | Sequence[int],
                       method: str = "ig", token_reduction: str = "cls", baseline: float = 0.0, n_steps: int = 32,
                       batch_size: int = 64, progress: bool = False) -> Tensor:
    """Per-input neuron relevance ``R [N, F]`` of one layer (a name or module of ``model``) for the logit of
    ``targets [N]``. The model runs in eval mode (restored afterwards)."""
    targets = _check_inputs(inputs, targets)
    resolved = resolve_layers(model, layer)
    if len(resolved) != 1:
        raise ValueError(f"layer_attributions takes one layer, got {list(resolved)}")
    (name, module), = resolved.items()
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = []
    try:
        attributor, to_input = _layer_attributor(model, module, method, inputs[:1].to(device))
        for i in tqdm(range(0, len(inputs), batch_size), desc=f"{method} {name}", disable=not progress, leave=False):
            x = inputs[i:i + batch_size].to(device).clone().requires_grad_(True)
            t = targets[i:i + batch_size].to(device)
            if method == "lrp":
                a = attributor.attribute(x, target=t, attribute_to_layer_input=to_input)
            elif method == "gradxact":
                a = attributor.attribute(x, target=t)
            elif method == "deeplift":
                a = attributor.attribute(x, baselines=torch.full_like(x, baseline), target=t)
            else:  # ig, conductance
                a = attributor.attribute(x, baselines=torch.full_like(x, baseline), target=t, n_steps=n_steps)
            chunks.append(reduce_attribution(a, token_reduction).detach().float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def neuron_importance(model: nn.Module, layers, inputs: Tensor, labels: Tensor | Sequence[int],
                      method: str = "ig", only_correct: bool = True, token_reduction: str = "cls",
                      return_per_input: bool = False, **kw) -> dict[str, Tensor]:
    """DeepImportance's importance ``I_j = sum_x R_j(x)`` (signed) over the inputs the model classifies correctly
    (``only_correct``), for each layer: name -> ``[F]``. ``kw`` go to :func:`layer_attributions`. With
    ``return_per_input`` the values are the per-input relevances ``[N_correct, F]`` instead."""
    labels = _check_inputs(inputs, labels)
    if only_correct:
        keep = predict(model, inputs).argmax(1) == labels
        if not keep.any():
            raise ValueError("the model classifies none of the given inputs correctly: no importance to compute")
        inputs, labels = inputs[keep], labels[keep]
    out = {}
    for name, module in resolve_layers(model, layers).items():
        r = layer_attributions(model, {name: module}, inputs, labels, method=method,
                               token_reduction=token_reduction, **kw)
        out[name] = r if return_per_input else r.sum(0)
    return out


def rank_vote(scores: Mapping[str, Tensor | np.ndarray]) -> Tensor:
    """Combine importances ``{method: [F]}`` by rank voting (Borda count): each method ranks the neurons (1 = least
    important, ties averaged; ``scipy.stats.rankdata``) and the combined score is the mean rank ``[F]`` (higher =
    more important)."""
    if not scores:
        raise ValueError("rank_vote needs at least one method's scores")
    arrs = [np.asarray(torch.as_tensor(s).detach().cpu(), dtype=np.float64).reshape(-1) for s in scores.values()]
    if len({a.size for a in arrs}) != 1:
        raise ValueError(f"every method must score the same neurons, got sizes {[a.size for a in arrs]}")
    return torch.as_tensor(np.mean([rankdata(a) for a in arrs], axis=0), dtype=torch.float32)


def top_neurons(importance: Tensor, m: int) -> Tensor:
    """Indices ``[m]`` of the m largest importances (ties broken by the lower index), most important first."""
    importance = torch.as_tensor(importance).reshape(-1)
    if not 1 <= m <= importance.numel():
        raise ValueError(f"m must be in [1, {importance.numel()}] (the layer's neuron count), got {m}")
    order = np.lexsort((np.arange(importance.numel()), -importance.double().numpy()))
    return torch.as_tensor(order[:m], dtype=torch.long)


def input_attributions(model: nn.Module, inputs: Tensor, targets: Tensor | Sequence[int], method: str = "ig",
                       baseline: float = 0.0, n_steps: int = 32, batch_size: int = 64, progress: bool = False
                       ) -> Tensor:
    """Per-pixel relevance ``[N, C, H, W]`` for the logit of ``targets`` by a Captum input attribution
    (``ig`` IntegratedGradients, ``saliency`` |gradient|, ``gradxinput`` InputXGradient, ``deeplift``, ``lrp``)."""
    ca = require("captum.attr", "captum")

    targets = _check_inputs(inputs, targets)
    if method not in INPUT_METHODS:
        raise ValueError(f"unknown input attribution method {method!r}; expected one of {INPUT_METHODS}")
    if method == "lrp" and _is_vit(model):
        raise UnsupportedAttributionError("Captum's LRP cannot run on a ViT (no rule for GELU / LayerNorm)")
    cls = {"ig": ca.IntegratedGradients, "saliency": ca.Saliency, "gradxinput": ca.InputXGradient,
           "deeplift": ca.DeepLift, "lrp": ca.LRP}[method]
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    attributor = cls(model)
    chunks = []
    try:
        for i in tqdm(range(0, len(inputs), batch_size), desc=f"input {method}", disable=not progress, leave=False):
            x = inputs[i:i + batch_size].to(device)
            t = targets[i:i + batch_size].to(device)
            kw: dict = {"target": t}
            if method in ("ig", "deeplift"):
                kw["baselines"] = torch.full_like(x, baseline)
            if method == "ig":
                kw["n_steps"] = n_steps
            chunks.append(attributor.attribute(x, **kw).detach().float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)
