"""The last-FFN adapter and the FFN head (docs/methods.md, section 1): the one place that knows where a ViT keeps its
last feed-forward block.

For both backbones (Hugging Face ``ViTForImageClassification`` and timm ``VisionTransformer``) the adapter returns
an :class:`FFNHead`, a small ``nn.Module`` that maps the CLS token's residual stream entering the last FFN,
``x`` of shape ``[N, d]``, to the model's logits ``[N, C]``::

    h = LN(x)                      # the FFN's LayerNorm         [N, d]
    z = h @ W_bef.T + b_bef        # W_bef: [4d, d]               [N, 4d]
    a = act(z)                     # GELU, the post-GELU activation (what the cache stores)
    o = ls(a @ W_aft.T + b_aft)    # W_aft: [d, 4d], ls = LayerScale or identity   [N, d]
    r = x + o                      # residual stream after the last block
    logits = post(r)               # HF: vit.layernorm -> classifier;  timm: norm -> fc_norm -> head

With CLS pooling only token 0 of the last block reaches the logits, so ``FFNHead(x)`` equals the full model's
logits (to float tolerance; ``tests/test_ffn_adapter.py`` checks this against the full model).

The head *shares* its modules with the model it came from (changing ``head.fc_bef.weight`` changes the model);
use :meth:`FFNHead.copy` for an independent copy.

Weights are addressed as ``(matrix, row, col)`` in PyTorch's (out, in) layout, matrix 0 = W_bef ``[4d, d]``,
matrix 1 = W_aft ``[d, 4d]``; a global index runs over W_bef (row-major) then W_aft.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "FFNHead",
    "UnsupportedModelError",
    "last_ffn_head",
    "capture_ffn_states",
    "model_fingerprint",
    "WeightIndex",
]

MATRIX_NAMES = ("W_bef", "W_aft")


class UnsupportedModelError(ValueError):
    """The model is not a ViT whose last FFN the adapter can reach (e.g. average pooling)."""


class FFNHead(nn.Module):
    """logits = post(x + ls(fc_aft(act(fc_bef(norm(x)))))) on the CLS residual stream ``x [N, d]``."""

    def __init__(self, norm: nn.Module, fc_bef: nn.Linear, act: nn.Module, fc_aft: nn.Linear,
                 layer_scale: nn.Module | None, post: nn.Module, backbone: str):
        super().__init__()
        self.norm = norm
        self.fc_bef = fc_bef
        self.act = act
        self.fc_aft = fc_aft
        self.layer_scale = layer_scale if layer_scale is not None else nn.Identity()
        self.post = post
        self.backbone = backbone

    # ----------------------------------------------------------------- shapes
    @property
    def d(self) -> int:
        return self.fc_bef.in_features

    @property
    def d_ff(self) -> int:
        return self.fc_bef.out_features

    @property
    def num_classes(self) -> int:
        return self.forward(torch.zeros(1, self.d, dtype=self.fc_bef.weight.dtype,
                                        device=self.fc_bef.weight.device)).shape[-1]

    @property
    def index(self) -> "WeightIndex":
        return WeightIndex(self.d, self.d_ff)

    def weights(self) -> tuple[Tensor, Tensor]:
        """(W_bef [4d, d], W_aft [d, 4d]) as the live parameters."""
        return self.fc_bef.weight, self.fc_aft.weight

    # ---------------------------------------------------------------- forward
    def activation(self, x: Tensor) -> Tensor:
        """Post-GELU activation a = act(W_bef LN(x) + b_bef), ``[N, 4d]``."""
        return self.act(self.fc_bef(self.norm(x)))

    def from_activation(self, x: Tensor, a: Tensor) -> Tensor:
        """Logits from the residual stream ``x [N, d]`` and a (possibly edited) activation ``a [N, 4d]``."""
        return self.post(x + self.layer_scale(self.fc_aft(a)))

    def forward(self, x: Tensor) -> Tensor:
        return self.from_activation(x, self.activation(x))

    def intermediates(self, x: Tensor) -> dict[str, Tensor]:
        """Every intermediate of the head: h = LN(x), z (pre-GELU), a, o (FFN output before the residual add,
        after LayerScale), logits."""
        h = self.norm(x)
        z = self.fc_bef(h)
        a = self.act(z)
        o = self.layer_scale(self.fc_aft(a))
        return {"h": h, "z": z, "a": a, "o": o, "logits": self.post(x + o)}

    def copy(self) -> "FFNHead":
        """An independent deep copy (for repair or interventions that must not touch the model)."""
        return copy.deepcopy(self)


@dataclass(frozen=True)
class WeightIndex:
    """Global weight index over W_bef [d_ff, d] (row-major) then W_aft [d, d_ff]."""

    d: int
    d_ff: int

    @property
    def sizes(self) -> tuple[int, int]:
        return (self.d_ff * self.d, self.d * self.d_ff)

    @property
    def total(self) -> int:
        return 2 * self.d * self.d_ff

    def shape(self, matrix: int) -> tuple[int, int]:
        return (self.d_ff, self.d) if matrix == 0 else (self.d, self.d_ff)

    def to_triples(self, flat: Tensor) -> Tensor:
        """Global indices ``[K]`` -> ``[K, 3]`` (matrix, row, col)."""
        flat = torch.as_tensor(flat, dtype=torch.long)
        n0 = self.sizes[0]
        matrix = (flat >= n0).long()
        local = torch.where(matrix == 0, flat, flat - n0)
        ncols = torch.where(matrix == 0, torch.full_like(flat, self.d), torch.full_like(flat, self.d_ff))
        return torch.stack([matrix, local // ncols, local % ncols], dim=1)

    def to_flat(self, triples: Tensor) -> Tensor:
        """``[K, 3]`` (matrix, row, col) -> global indices ``[K]``."""
        triples = torch.as_tensor(triples, dtype=torch.long)
        m, r, c = triples.unbind(1)
        return torch.where(m == 0, r * self.d + c, self.sizes[0] + r * self.d_ff + c)

    def neuron_of(self, flat: Tensor) -> Tensor:
        """The intermediate neuron j each weight belongs to (row j of W_bef, column j of W_aft)."""
        t = self.to_triples(flat)
        return torch.where(t[:, 0] == 0, t[:, 1], t[:, 2])

    def neuron_weights(self, neurons: Tensor) -> Tensor:
        """All global indices of the weights of the given neurons (row of W_bef, column of W_aft), ``[K*2d]``."""
        neurons = torch.as_tensor(neurons, dtype=torch.long).view(-1, 1)
        k = torch.arange(self.d).view(1, -1)
        bef = neurons * self.d + k
        aft = self.sizes[0] + k * self.d_ff + neurons
        return torch.cat([bef, aft], dim=1).reshape(-1)

    def split(self, flat_scores: Tensor) -> tuple[Tensor, Tensor]:
        """A flat per-weight vector ``[total]`` -> (``[d_ff, d]``, ``[d, d_ff]``) views."""
        n0 = self.sizes[0]
        return flat_scores[:n0].view(self.d_ff, self.d), flat_scores[n0:].view(self.d, self.d_ff)

    def join(self, bef: Tensor, aft: Tensor) -> Tensor:
        return torch.cat([bef.reshape(-1), aft.reshape(-1)])


# ---------------------------------------------------------------------------------------------------------- adapter
def _unwrap(model: nn.Module) -> nn.Module:
    # A LightningModule (or any wrapper) that keeps the backbone as `.backbone` or `.model`.
    for attr in ("backbone", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and inner is not model:
            return _unwrap(inner)
    return model


def _hf_parts(model: nn.Module):
    vit = model.vit
    layers = getattr(vit, "layers", None)
    if layers is None:  # transformers < 5 layout: vit.encoder.layer[-1].intermediate / .output
        block = vit.encoder.layer[-1]
        fc_bef, act, fc_aft = block.intermediate.dense, block.intermediate.intermediate_act_fn, block.output.dense
    else:
        block = layers[-1]
        fc_bef, act, fc_aft = block.mlp.fc1, block.mlp.activation_fn, block.mlp.fc2
    if getattr(model.config, "pooling", None) not in (None, "cls"):
        raise UnsupportedModelError("Hugging Face ViT with non-CLS pooling is not supported")
    post = nn.Sequential(vit.layernorm, model.classifier)
    return block.layernorm_after, fc_bef, act, fc_aft, None, post


def _timm_parts(model: nn.Module):
    if getattr(model, "attn_pool", None) is not None or getattr(model, "global_pool", "token") != "token":
        raise UnsupportedModelError(
            f"timm model uses global_pool={getattr(model, 'global_pool', None)!r}"
            f"{' with attention pooling' if getattr(model, 'attn_pool', None) is not None else ''}: every token of "
            "the last FFN reaches the logits, so the CLS-token FFN head cannot reproduce them. Create the model "
            "with global_pool='token' (class-token pooling).")
    block = model.blocks[-1]
    mlp = block.mlp
    if not hasattr(block, "norm2") or not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2"):
        raise UnsupportedModelError(f"timm block {type(block).__name__} has no norm2/mlp.fc1/mlp.fc2")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModelError("timm Mlp with an inner norm (scale_mlp_norm) is not supported")
    ls = block.ls2 if not isinstance(block.ls2, nn.Identity) else None
    post = nn.Sequential(model.norm, model.fc_norm, model.head)
    return block.norm2, mlp.fc1, mlp.act, mlp.fc2, ls, post


def backbone_kind(model: nn.Module) -> str:
    model = _unwrap(model)
    if hasattr(model, "vit") and hasattr(model, "classifier"):
        return "hf"
    if hasattr(model, "blocks") and hasattr(model, "head"):
        return "timm"
    raise UnsupportedModelError(
        f"{type(model).__name__} is neither a Hugging Face ViTForImageClassification nor a timm VisionTransformer")


def last_ffn_head(model: nn.Module) -> FFNHead:
    """The FFN head of ``model``'s last block (modules shared with ``model``)."""
    kind = backbone_kind(model)
    inner = _unwrap(model)
    parts = _hf_parts(inner) if kind == "hf" else _timm_parts(inner)
    return FFNHead(*parts, backbone=kind)


@contextlib.contextmanager
def capture_ffn_states(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the context, every forward of ``model`` stores the CLS token's residual stream entering the last FFN
    (``x [B, d]``) and the post-GELU activation (``a [B, 4d]``) in the yielded dict (last batch only)."""
    head = last_ffn_head(model)
    store: dict[str, Tensor] = {}

    def pre_norm(_m, args):
        store["x"] = args[0][:, 0].detach()

    def post_act(_m, _args, out):
        store["a"] = out[:, 0].detach()

    handles = [head.norm.register_forward_pre_hook(pre_norm), head.act.register_forward_hook(post_act)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes) of the backbone; the "checkpoint
    hash" that state caches and FL results carry."""
    sha = hashlib.sha256()
    for name, t in sorted(_unwrap(model).state_dict().items()):
        t = t.detach().cpu().contiguous()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()[:16]
