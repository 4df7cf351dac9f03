"""Layer outputs for test adequacy: which layers hold "neurons", how an output becomes one value per neuron, and
forward hooks that collect them.

A *neuron* is one feature of a layer's output, reduced to one value per input (docs/methods.md, section 8):

- ``[B, F]`` (a linear layer): unchanged;
- ``[B, C, H, W]`` (a conv layer): a channel is a neuron, its value the channel's spatial mean -> ``[B, C]``;
- ``[B, T, F]`` (a ViT token sequence): ``token_reduction="cls"`` keeps token 0 (the CLS token; the default, and the
  only token of the last FFN that reaches the logits), ``"mean"`` averages over the tokens -> ``[B, F]``.

Layers are addressed by their ``named_modules`` name (e.g. ``"features.3"``, ``"blocks.5.mlp.act"``) or passed as
modules. :func:`candidate_layers` lists a model's neuron layers in forward order: for a ViT, every block's FFN
activation (the last one is ``vitfl.localization.ffn.last_ffn_head(model).act``); otherwise every activation module
(``ReLU``, ``GELU``, ...), or, for a model without activation modules, every Conv/Linear layer but the output layer.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "TOKEN_REDUCTIONS",
    "reduce_output",
    "resolve_layers",
    "candidate_layers",
    "default_layer",
    "record_layers",
    "collect_activations",
    "predict",
]

TOKEN_REDUCTIONS = ("cls", "mean")
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus)


def reduce_output(out: Tensor | tuple, token_reduction: str = "cls") -> Tensor:
    """One value per neuron: ``[B, F]`` as is, ``[B, C, H, W]`` -> channel mean ``[B, C]``, ``[B, T, F]`` -> token 0
    (``"cls"``) or the token mean (``"mean"``) ``[B, F]``. A tuple output (Hugging Face layers) uses its first item."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"layer output must be a tensor (or a tuple starting with one), got {type(out).__name__}")
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS}, got {token_reduction!r}")
    if out.ndim == 2:
        return out
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out[:, 0] if token_reduction == "cls" else out.mean(dim=1)
    if out.ndim == 1:
        return out[:, None]
    raise ValueError(f"cannot reduce a layer output of shape {tuple(out.shape)} to [batch, neurons] "
                     "(expected 2-D [B, F], 3-D [B, T, F] or 4-D [B, C, H, W])")


def resolve_layers(model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module] | Mapping[str, nn.Module]
                   ) -> dict[str, nn.Module]:
    """Name -> module for ``layers`` given as names of ``model.named_modules()``, modules of ``model``, a list of
    either, a ready mapping, or ``"all"`` (every neuron layer, :func:`candidate_layers`: the end-to-end mode).
    Unknown names or foreign modules raise one ``ValueError``."""
    if isinstance(layers, Mapping):
        return dict(layers)
    if isinstance(layers, str) and layers == "all":
        return candidate_layers(model)
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Module] = {}
    for spec in layers:
        if isinstance(spec, str):
            try:
                out[spec] = model.get_submodule(spec)
            except AttributeError:
                raise ValueError(f"model {type(model).__name__} has no layer named {spec!r}; neuron layers: "
                                 f"{list(candidate_layers(model))[:20]}") from None
        elif isinstance(spec, nn.Module):
            if id(spec) not in names:
                raise ValueError(f"{type(spec).__name__} module is not a submodule of the given model")
            out[names[id(spec)]] = spec
        else:
            raise TypeError(f"a layer is a name or an nn.Module, got {type(spec).__name__}")
    if not out:
        raise ValueError("no layer given")
    return out


def _vit_ffn_acts(model: nn.Module) -> dict[str, nn.Module] | None:
    try:
        from vitfl.localization.ffn import UnsupportedModelError, backbone_kind, last_ffn_head
    except ImportError:  # pragma: no cover
        return None
    try:
        backbone_kind(model)
        last = last_ffn_head(model).act
    except (UnsupportedModelError, AttributeError):
        return None
    # every block's FFN activation has the same name as the last one up to the block index
    names = {id(m): n for n, m in model.named_modules()}
    last_name = names.get(id(last))
    if last_name is None:
        return None
    parts = last_name.split(".")
    idx = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), None)
    if idx is None:
        return {last_name: last}
    out = {}
    for n, m in model.named_modules():
        p = n.split(".")
        if len(p) == len(parts) and p[:idx] == parts[:idx] and p[idx + 1:] == parts[idx + 1:] and p[idx].isdigit():
            out[n] = m
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split(".")[idx])))


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's neuron layers in forward (registration) order; see the module docstring."""
    vit = _vit_ffn_acts(model)
    if vit:
        return vit
    acts = {n: m for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)}
    if acts:
        return acts
    lin = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    if len(lin) > 1:
        lin.pop(list(lin)[-1])  # the output layer's neurons are the logits
    if not lin:
        raise ValueError(f"{type(model).__name__} has no activation, Conv or Linear layer to measure")
    return lin


def default_layer(model: nn.Module) -> dict[str, nn.Module]:
    """The one layer measured by default: a ViT's last FFN activation, else the last neuron layer."""
    layers = candidate_layers(model)
    name = list(layers)[-1]
    return {name: layers[name]}


@contextlib.contextmanager
def record_layers(layers: Mapping[str, nn.Module], token_reduction: str = "cls", reduce: bool = True
                  ) -> Iterator[dict[str, Tensor]]:
    """Within the context every forward stores each layer's (reduced, detached) output of the last batch in the
    yielded dict, keyed by layer name."""
    store: dict[str, Tensor] = {}

    def hook(name):
        def fn(_m, _args, out):
            o = out[0] if isinstance(out, (tuple, list)) else out
            store[name] = (reduce_output(o, token_reduction) if reduce else o).detach()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _batches(inputs: Tensor | Iterable, batch_size: int) -> Iterator[Tensor]:
    if isinstance(inputs, Tensor):
        for i in range(0, len(inputs), batch_size):
            yield inputs[i:i + batch_size]
    else:  # a DataLoader of (image, label, ...) items or of images
        for b in inputs:
            yield b[0] if isinstance(b, (tuple, list)) else b


@torch.no_grad()
def collect_activations(model: nn.Module, layers, inputs: Tensor | Iterable, batch_size: int = 256,
                        token_reduction: str = "cls", progress: bool = False, return_logits: bool = False,
                        desc: str = "activations") -> dict[str, Tensor]:
    """Each layer's neuron values over ``inputs`` (a tensor ``[N, C, H, W]`` or a DataLoader): name -> ``[N, F]``
    (float32, CPU); with ``return_logits`` also ``"logits" -> [N, classes]``. The model is put in eval mode
    (and restored)."""
    layers = resolve_layers(model, layers)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks: dict[str, list[Tensor]] = {n: [] for n in layers}
    logits = []
    try:
        with record_layers(layers, token_reduction) as store:
            total = (len(inputs) + batch_size - 1) // batch_size if isinstance(inputs, Tensor) else None
            for x in tqdm(_batches(inputs, batch_size), total=total, desc=desc, disable=not progress, leave=False):
                out = model(x.to(device))
                for n in layers:
                    chunks[n].append(store[n].float().cpu())
                if return_logits:
                    logits.append((out.logits if hasattr(out, "logits") else out).float().cpu())
    finally:
        model.train(was_training)
    if not any(chunks.values()):
        raise ValueError("no inputs given")
    res = {n: torch.cat(c) for n, c in chunks.items()}
    if return_logits:
        res["logits"] = torch.cat(logits)
    return res


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int = 512) -> Tensor:
    """Logits ``[N, classes]`` (float32, CPU) in eval mode."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        out = [model(inputs[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no inputs given")
    return torch.cat(out)
