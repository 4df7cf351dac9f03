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

**Any block's FFN** (:func:`ffn_head`). ``ffn_head(model, block)`` gives the same view of the FFN of block ``L``
(``block`` indexes the transformer blocks like a Python list: 0 the first, -1 the last). For the last block of a
CLS-pooled model it *is* :func:`last_ffn_head` (an :class:`FFNHead` on the CLS token, unchanged identities and
speed). Everywhere else (a non-last block, average / max / attention pooling, a DeiT distillation token) it is a
:class:`TokenFFNHead`, which carries the token states ``x [N, T, d]`` entering block L's FFN (the same place as the
CLS head's ``x``: the residual stream after block L's attention sub-block, before the FFN's LayerNorm, now for every
token) and computes the same formulas per token, with ``post`` the rest of the network::

    r      = x + ls(W_aft a + b_aft)                                   [N, T, d]  (block L's output)
    logits = post(r) = readout(norm(blocks[L+1](... blocks[-1](r))))   [N, C]

with the remaining blocks run as the model's own modules (shared, like the FFN's) and the readout the model's
pooling and classifier (CLS token; the mean / max of the pooled tokens and ``fc_norm``; timm attention pooling; or
DeiT's ``(head(r_0) + head_dist(r_1)) / 2``, timm's eval-mode output). Per-input statistics over the tokens (what
a sum "per input" means for ``a [N, T, 4d]``) are given by :meth:`TokenFFNHead.reduce_tokens`, documented there.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import operator
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "FFNHead",
    "TokenFFNHead",
    "TokenPost",
    "UnsupportedModelError",
    "BlockIndexError",
    "TOKEN_STATISTICS",
    "ffn_head",
    "num_ffn_blocks",
    "last_ffn_head",
    "capture_ffn_states",
    "model_fingerprint",
    "WeightIndex",
]

MATRIX_NAMES = ("W_bef", "W_aft")


class UnsupportedModelError(ValueError):
    """The model is not a ViT whose last FFN the adapter can reach (e.g. average pooling)."""


class BlockIndexError(IndexError, ValueError):
    """A block index outside the model's transformer blocks."""


#: per-input token statistics of a :class:`TokenFFNHead` (see :meth:`TokenFFNHead.reduce_tokens`)
TOKEN_STATISTICS = ("readout", "cls", "mean")


class FFNHead(nn.Module):
    """logits = post(x + ls(fc_aft(act(fc_bef(norm(x)))))) on the CLS residual stream ``x [N, d]``."""

    #: whether states carry a token axis (``[N, T, d]``); False: one state per input (the CLS token, ``[N, d]``)
    token_axis: bool = False
    #: the pooling the head reproduces and the per-input token statistic (here: the CLS token itself)
    pooling: str = "token"
    token_statistic: str = "cls"

    def __init__(self, norm: nn.Module, fc_bef: nn.Linear, act: nn.Module, fc_aft: nn.Linear,
                 layer_scale: nn.Module | None, post: nn.Module, backbone: str, *, block: int | None = None,
                 num_blocks: int | None = None):
        super().__init__()
        self.norm = norm
        self.fc_bef = fc_bef
        self.act = act
        self.fc_aft = fc_aft
        self.layer_scale = layer_scale if layer_scale is not None else nn.Identity()
        self.post = post
        self.backbone = backbone
        #: the (non-negative) index of the transformer block whose FFN this is, and the model's number of blocks
        #: (None for a head built by hand)
        self.block = block
        self.num_blocks = num_blocks

    def identity(self) -> dict[str, object]:
        """What must join an FL / repair identity besides the model hash to name this view: nothing for the
        last-block CLS head (so every identity recorded before block addressing stays valid)."""
        return {}

    def state_identity(self) -> dict[str, object]:
        """What must join a state cache's identity besides the model hash (which states are cached): nothing for
        the last-block CLS head."""
        return {}

    def reduce_tokens(self, t: Tensor) -> Tensor:
        """Per-input statistic of a per-token tensor; the CLS head's tensors are per input already: ``t``."""
        return t

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


class TokenFFNHead(FFNHead):
    """The FFN head of any block ``L`` on the token states ``x [N, T, d]`` entering its FFN (before the FFN's
    LayerNorm, every token): ``logits = post(x + ls(fc_aft(act(fc_bef(norm(x))))))`` with ``post`` a
    :class:`TokenPost` (the blocks after L, the final norm, the pooling and the classifier).

    The interface is :class:`FFNHead`'s, with a token axis on every state: :meth:`activation` ``[N, T, 4d]``,
    :meth:`from_activation` ``(x [N, T, d], a [N, T, 4d]) -> [N, C]``, :meth:`intermediates` (h, z, a, o per
    token, logits per input); ``norm`` / ``fc_bef`` / ``act`` / ``fc_aft`` / ``layer_scale`` act on the last axis
    and ``post`` takes block L's output ``[N, T, d]``, so code written as ``post(x + ls(fc_aft(a)))`` runs
    unchanged. Weight-shaped sums over inputs become sums over (input, token) rows: dL/dW_bef =
    sum_n sum_t g_nt h_nt^T, which autograd through the head gives exactly.

    **Per-input token statistic** (:meth:`reduce_tokens`, chosen by ``token_statistic``; a linear average over
    tokens, its weights :meth:`token_weights`):

    * ``"readout"`` (default): the tokens the classifier reads, weighted as the readout weighs them: the CLS token
      for token pooling (HF ViT, timm ``global_pool='token'``); for average pooling (and max / avgmax / attention
      pooling) the mean over the tokens the pool reads (the patch tokens; the prefix tokens too where timm's
      ``pool_include_prefix``); for a DeiT distillation token the mean of token 0 and token 1 (timm averages
      ``head(token 0)`` and ``head_dist(token 1)``). Why: on the last block with the final norm after pooling
      (average pooling with ``fc_norm``) the logits see the FFN only through ``mean_t(W_aft a_t) = W_aft
      mean_t(a_t)``, so the mean activation is exactly what each W_aft column feeds the classifier; with token
      pooling it is the CLS convention of the last-block head. On a non-last block every token reaches the logits
      through the later attention, so no single token is exact there; the readout tokens are the ones the
      classifier finally reads, and gradient methods need no statistic (they differentiate the exact head).
    * ``"cls"``: token 0 (the class token; for models without one, the first token).
    * ``"mean"``: the mean over all T tokens, prefix tokens included.
    """

    token_axis = True

    def __init__(self, norm: nn.Module, fc_bef: nn.Linear, act: nn.Module, fc_aft: nn.Linear,
                 layer_scale: nn.Module | None, post: nn.Module, backbone: str, *, block: int, num_blocks: int,
                 pooling: str, num_prefix_tokens: int, pool_include_prefix: bool = False,
                 token_statistic: str = "readout"):
        super().__init__(norm, fc_bef, act, fc_aft, layer_scale, post, backbone, block=block, num_blocks=num_blocks)
        if token_statistic not in TOKEN_STATISTICS:
            raise ValueError(f"unknown token_statistic {token_statistic!r}; expected one of {TOKEN_STATISTICS}")
        self.pooling = pooling
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.pool_include_prefix = bool(pool_include_prefix)
        self.token_statistic = token_statistic

    # ------------------------------------------------------------------------------------------ identity
    def identity(self) -> dict[str, object]:
        """``{"block": L (non-negative), "pooling": ..., "token_statistic": ...}``: joins the model hash in every
        FL / repair identity of this view."""
        return {**self.state_identity(), "token_statistic": self.token_statistic}

    def state_identity(self) -> dict[str, object]:
        """``{"block": L, "pooling": ..., "tokens": "all"}``: joins the model hash in the identity of a cache of this
        view's states (every token entering block L's FFN; the token statistic does not change what is cached)."""
        return {"block": self.block, "pooling": self.pooling, "tokens": "all"}

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def pooled_start(self) -> int:
        """The first token the pool reads (average / max / attention pooling)."""
        return 0 if self.pool_include_prefix else self.num_prefix_tokens

    @property
    def min_tokens(self) -> int:
        """The fewest tokens a state must have for the readout (and the statistic) to be defined."""
        if self.pooling == "token":
            return 1
        if self.pooling == "distilled":
            return 2
        return self.pooled_start + 1

    def _statistic(self, statistic: str | None) -> str:
        statistic = self.token_statistic if statistic is None else statistic
        if statistic not in TOKEN_STATISTICS:
            raise ValueError(f"unknown token statistic {statistic!r}; expected one of {TOKEN_STATISTICS}")
        return statistic

    def reduce_tokens(self, t: Tensor, statistic: str | None = None) -> Tensor:
        """The per-input statistic ``[N, ...]`` of a per-token tensor ``t [N, T, ...]`` (e.g. the activations
        ``a [N, T, 4d]`` -> ``[N, 4d]``); ``statistic`` overrides the head's ``token_statistic`` (class docstring)."""
        statistic = self._statistic(statistic)
        if t.dim() < 2 or t.shape[1] < self.min_tokens:
            raise ValueError(f"reduce_tokens takes a per-token tensor [N, T >= {self.min_tokens}, ...], got "
                             f"{list(t.shape)}")
        if statistic == "cls":
            return t[:, 0]
        if statistic == "mean":
            return t.mean(dim=1)
        if self.pooling == "token":
            return t[:, 0]
        if self.pooling == "distilled":
            return (t[:, 0] + t[:, 1]) / 2
        return t[:, self.pooled_start:].mean(dim=1)

    def token_weights(self, num_tokens: int, statistic: str | None = None, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> Tensor:
        """The statistic as weights over the tokens, ``w [T]`` with ``reduce_tokens(t) = sum_t w_t t[:, t]``."""
        statistic = self._statistic(statistic)
        if num_tokens < self.min_tokens:
            raise ValueError(f"{num_tokens} tokens: the readout needs at least {self.min_tokens}")
        w = torch.zeros(num_tokens, dtype=dtype, device=device)
        if statistic == "cls" or (statistic == "readout" and self.pooling == "token"):
            w[0] = 1
        elif statistic == "mean":
            w[:] = 1 / num_tokens
        elif self.pooling == "distilled":
            w[:2] = 0.5
        else:
            w[self.pooled_start:] = 1 / (num_tokens - self.pooled_start)
        return w

    def check_states(self, x: Tensor) -> None:
        """``x`` must be token states ``[N, T, d]`` (T >= :attr:`min_tokens`): a clear error otherwise."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d or x.shape[1] < self.min_tokens:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the FFN head of block {self.block} ({self.pooling} pooling) takes the token states "
                             f"entering that block's FFN, x [N, T >= {self.min_tokens}, d={self.d}], got {shape} (a "
                             "[N, d] CLS state is what the last-block CLS head, last_ffn_head, takes)")

    # ----------------------------------------------------------------------------------------- shapes / forward
    @property
    def num_classes(self) -> int:
        w = self.fc_bef.weight
        return self.forward(torch.zeros(1, self.min_tokens, self.d, dtype=w.dtype, device=w.device)).shape[-1]

    def activation(self, x: Tensor) -> Tensor:
        """Post-GELU activation per token, ``[N, T, 4d]``."""
        self.check_states(x)
        return super().activation(x)

    def from_activation(self, x: Tensor, a: Tensor) -> Tensor:
        """Logits ``[N, C]`` from the token states ``x [N, T, d]`` and (possibly edited) activations
        ``a [N, T, 4d]``."""
        self.check_states(x)
        return super().from_activation(x, a)

    def intermediates(self, x: Tensor) -> dict[str, Tensor]:
        """h, z, a, o per token (``[N, T, .]``), logits ``[N, C]``."""
        self.check_states(x)
        return super().intermediates(x)


class TokenPost(nn.Module):
    """``post`` of a :class:`TokenFFNHead`: block L's output ``r [N, T, d]`` -> logits ``[N, C]`` through the model's
    own remaining blocks (shared modules), its final norm and its readout (pooling and classifier)."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module, readout: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.readout = readout

    def forward(self, r: Tensor) -> Tensor:
        for blk in self.blocks:
            out = blk(r)
            r = out[0] if isinstance(out, tuple) else out  # transformers < 5 layers return a tuple
        return self.readout(self.norm(r))


class _ClsReadout(nn.Module):
    """classifier(drop(fc_norm(r[:, 0]))): HF ViT, timm token pooling."""

    def __init__(self, fc_norm: nn.Module, head: nn.Module, head_drop: nn.Module | None = None):
        super().__init__()
        self.fc_norm = fc_norm
        self.head_drop = head_drop if head_drop is not None else nn.Identity()
        self.head = head

    def forward(self, r: Tensor) -> Tensor:
        return self.head(self.head_drop(self.fc_norm(r[:, 0])))


class _PoolReadout(nn.Module):
    """timm ``forward_head`` for average / max / avgmax / attention ("map") pooling."""

    def __init__(self, pool_type: str, start: int, attn_pool: nn.Module | None, fc_norm: nn.Module, head: nn.Module,
                 head_drop: nn.Module | None = None):
        super().__init__()
        self.pool_type = pool_type
        self.start = start
        self.attn_pool = attn_pool
        self.fc_norm = fc_norm
        self.head_drop = head_drop if head_drop is not None else nn.Identity()
        self.head = head

    def forward(self, r: Tensor) -> Tensor:
        x = r[:, self.start:] if self.start else r
        if self.attn_pool is not None:
            x = self.attn_pool(x)
        elif self.pool_type == "avg":
            x = x.mean(dim=1)
        elif self.pool_type == "max":
            x = x.amax(dim=1)
        else:  # avgmax
            x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        return self.head(self.head_drop(self.fc_norm(x)))


class _DistilledReadout(nn.Module):
    """timm DeiT ``VisionTransformerDistilled.forward_head`` in eval mode: (head(r_0) + head_dist(r_1)) / 2."""

    def __init__(self, head: nn.Module, head_dist: nn.Module, head_drop: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.head_dist = head_dist
        self.head_drop = head_drop if head_drop is not None else nn.Identity()

    def forward(self, r: Tensor) -> Tensor:
        return (self.head(self.head_drop(r[:, 0])) + self.head_dist(self.head_drop(r[:, 1]))) / 2


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
            "with global_pool='token' (class-token pooling), or use localization.ffn.ffn_head(model, block), which "
            "carries every token.")
    if _has_dist_token(model):
        raise UnsupportedModelError(
            f"timm {type(model).__name__} has a distillation token: its logits average head(token 0) and "
            "head_dist(token 1), so the CLS-token FFN head cannot reproduce them. Use "
            "vitfl.localization.ffn.ffn_head(model, block=-1), which carries every token.")
    block = model.blocks[-1]
    mlp = block.mlp
    if not hasattr(block, "norm2") or not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2"):
        raise UnsupportedModelError(f"timm block {type(block).__name__} has no norm2/mlp.fc1/mlp.fc2")
    _check_timm_block_forward(block)
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
    n = _num_blocks_or_none(inner, kind)
    return FFNHead(*parts, backbone=kind, block=None if n is None else n - 1, num_blocks=n)


@contextlib.contextmanager
def capture_ffn_states(model: nn.Module, block: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Within the context, every forward of ``model`` stores the CLS token's residual stream entering the last FFN
    (``x [B, d]``) and the post-GELU activation (``a [B, 4d]``) in the yielded dict (last batch only).

    With ``block`` (an index as in :func:`ffn_head`) the states of that block's FFN in the form its
    :func:`ffn_head` takes: ``x [B, d]`` / ``a [B, 4d]`` at the CLS token where that is the :class:`FFNHead`,
    else every token, ``x [B, T, d]`` / ``a [B, T, 4d]``."""
    if block is not None:
        with _capture_block_states(model, block) as store:
            yield store
        return
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


# ------------------------------------------------------------------------------------------ any block's FFN
#: what the FFN head reads from a model: (name in an error message, attribute paths of which one must exist)
_HF_NEEDS = (("vit", ("vit",)), ("vit.layers", ("vit.layers", "vit.encoder.layer")),
             ("vit.layernorm", ("vit.layernorm",)), ("classifier", ("classifier",)))
_TIMM_NEEDS = tuple((a, (a,)) for a in ("blocks", "norm", "fc_norm", "head", "global_pool", "num_prefix_tokens"))


def _has_dist_token(model: nn.Module) -> bool:
    return getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")


def _check_timm_block_forward(block: nn.Module) -> None:
    """A block (and its Mlp) defined by timm must compute x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x)) with
    mlp = fc2(act(fc1 .)): timm's ``Block`` and ``Mlp``. Other timm blocks (post-norm ``ResPostBlock``, parallel
    blocks) and MLPs (``GluMlp``, ``SwiGLU``) place the same modules differently."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    for mod, ref, what in ((block, Block, "block"), (getattr(block, "mlp", None), Mlp, "MLP")):
        cls = type(mod)
        if cls.__module__.startswith("timm.") and getattr(cls, "forward", None) is not ref.forward:
            raise UnsupportedModelError(
                f"timm {what} {cls.__name__} is not supported: the FFN head reproduces timm's pre-norm {ref.__name__} "
                f"({'x + ls2(mlp(norm2(x)))' if what == 'block' else 'fc2(act(fc1(x)))'}) only")


def _num_blocks_or_none(model: nn.Module, kind: str) -> int | None:
    try:
        return len(_hf_layers(model.vit) if kind == "hf" else model.blocks)
    except (AttributeError, TypeError):
        return None


def _hf_layers(vit: nn.Module):
    layers = getattr(vit, "layers", None)
    return vit.encoder.layer if layers is None else layers  # transformers < 5: vit.encoder.layer


def _missing(model: nn.Module, needs) -> list[str]:
    return [f"`{name}`" for name, paths in needs if not any(_has_path(model, p) for p in paths)]


def _has_path(model: nn.Module, path: str) -> bool:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _supported_kind(model: nn.Module) -> str:
    """'hf' or 'timm' for the models :func:`ffn_head` supports; a clear error naming what is missing otherwise."""
    name = type(model).__name__
    module = type(model).__module__
    if module.startswith("transformers.") or hasattr(model, "vit"):
        try:
            from transformers import ViTForImageClassification
        except ImportError:  # pragma: no cover - transformers is a dependency
            ViTForImageClassification = None
        if ViTForImageClassification is None or not isinstance(model, ViTForImageClassification):
            missing = _missing(model, _HF_NEEDS)
            raise UnsupportedModelError(
                f"Hugging Face {name} is not supported: the FFN head supports ViTForImageClassification (a ViT encoder "
                "`vit` whose `layers` are pre-norm blocks, the final `vit.layernorm` and a `classifier` on token 0)"
                + (f"; {name} has no {', '.join(missing)}" if missing else f"; {name} is not that class"))
        if getattr(model.config, "pooling", None) not in (None, "cls"):
            raise UnsupportedModelError("Hugging Face ViT with non-CLS pooling is not supported")
        return "hf"
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = None
    if VisionTransformer is not None and isinstance(model, VisionTransformer):
        return "timm"
    if module.startswith("timm."):
        missing = _missing(model, _TIMM_NEEDS)
        raise UnsupportedModelError(
            f"timm {name} is not supported: the FFN head supports timm VisionTransformer (and DeiT's "
            "VisionTransformerDistilled): a flat `blocks` list of pre-norm transformer blocks (norm2 -> mlp.fc1 -> act "
            "-> mlp.fc2, LayerScale ls2), the final `norm`, class-token or average pooling (`global_pool`, "
            "`num_prefix_tokens`, `fc_norm`) and a `head`"
            + (f"; {name} has no {', '.join(missing)}" if missing
               else f"; {name} is not a VisionTransformer (its blocks are not run as blocks(x))"))
    backbone_kind(model)  # raises: neither HF nor timm
    raise UnsupportedModelError(
        f"{name} is neither a Hugging Face ViTForImageClassification nor a timm VisionTransformer")


def _timm_pooling(model: nn.Module) -> str:
    if _has_dist_token(model):
        if getattr(model, "global_pool", "token") != "token":
            raise UnsupportedModelError(f"timm {type(model).__name__} with a distillation token and "
                                        f"global_pool={model.global_pool!r} is not supported")
        return "distilled"
    if getattr(model, "attn_pool", None) is not None:
        return "map"
    pool = getattr(model, "global_pool", "token")
    if pool in ("token", "avg", "avgmax", "max"):
        return pool
    raise UnsupportedModelError(
        f"timm model with global_pool={pool!r} is not supported: without pooling its output is per-token features, "
        "not logits (supported: 'token', 'avg', 'avgmax', 'max', 'map')")


def _block_index(block: int, n: int) -> int:
    try:
        if isinstance(block, bool):
            raise TypeError
        b = operator.index(block)
    except TypeError:
        raise TypeError(f"block must be an int (0 the first block, -1 the last), got {block!r}") from None
    if not -n <= b < n:
        raise BlockIndexError(f"block {b} is out of range: the model has {n} transformer blocks (valid block "
                              f"indices: 0..{n - 1}, or -{n}..-1 from the end)")
    return b % n


def num_ffn_blocks(model: nn.Module) -> int:
    """The number of transformer blocks (each with one FFN) of a model :func:`ffn_head` supports."""
    inner = _unwrap(model)
    kind = _supported_kind(inner)
    return len(_hf_layers(inner.vit) if kind == "hf" else inner.blocks)


def ffn_head(model: nn.Module, block: int = -1, *, token_statistic: str = "readout",
             tokens: bool = False) -> FFNHead:
    """The FFN head of transformer block ``block`` of ``model`` (modules shared with ``model``).

    ``block`` is a list index over the blocks (0 the first, -1 the last; out of range: :class:`BlockIndexError`).
    For the last block of a CLS-pooled model (HF ViTForImageClassification, timm ``global_pool='token'`` without a
    distillation token) it returns :func:`last_ffn_head`'s :class:`FFNHead` on the CLS state ``[N, d]``
    (``identity() == {}``); otherwise -- or with ``tokens=True``, or ``token_statistic="mean"``, which needs every
    token -- a :class:`TokenFFNHead` on the token states ``[N, T, d]`` entering the block's FFN, exact against the
    full model for every block and every supported pooling. ``token_statistic``: see :class:`TokenFFNHead`.

    Supported: HF ``ViTForImageClassification``; timm ``VisionTransformer`` with timm's pre-norm ``Block`` / ``Mlp``
    (LayerScale or not) and class-token, average, max, avgmax or attention pooling (``fc_norm`` or not), and DeiT's
    ``VisionTransformerDistilled`` (eval-mode averaging of its two heads). Anything else: an
    :class:`UnsupportedModelError` that names what is missing.
    """
    if token_statistic not in TOKEN_STATISTICS:
        raise ValueError(f"unknown token_statistic {token_statistic!r}; expected one of {TOKEN_STATISTICS}")
    inner = _unwrap(model)
    kind = _supported_kind(inner)
    blocks = list(_hf_layers(inner.vit) if kind == "hf" else inner.blocks)
    n = len(blocks)
    b = _block_index(block, n)
    pooling = "token" if kind == "hf" else _timm_pooling(inner)
    if b == n - 1 and pooling == "token" and not tokens and token_statistic in ("readout", "cls"):
        return last_ffn_head(model)
    blk = blocks[b]
    if kind == "hf":
        if hasattr(blk, "mlp"):
            fc_bef, act, fc_aft = blk.mlp.fc1, blk.mlp.activation_fn, blk.mlp.fc2
        else:  # transformers < 5
            fc_bef, act, fc_aft = blk.intermediate.dense, blk.intermediate.intermediate_act_fn, blk.output.dense
        norm, ls = blk.layernorm_after, None
        post = TokenPost(blocks[b + 1:], inner.vit.layernorm, _ClsReadout(nn.Identity(), inner.classifier))
        prefix, include_prefix = 1, False
    else:
        for later in blocks[b:]:
            if not hasattr(later, "norm2") or not hasattr(getattr(later, "mlp", None), "fc1"):
                raise UnsupportedModelError(f"timm block {type(later).__name__} has no norm2/mlp.fc1/mlp.fc2")
            _check_timm_block_forward(later)
        mlp = blk.mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError("timm Mlp with an inner norm (scale_mlp_norm) is not supported")
        norm, fc_bef, act, fc_aft = blk.norm2, mlp.fc1, mlp.act, mlp.fc2
        ls = blk.ls2 if not isinstance(blk.ls2, nn.Identity) else None
        prefix = int(getattr(inner, "num_prefix_tokens", 1))
        include_prefix = bool(getattr(inner, "pool_include_prefix", False))
        drop = getattr(inner, "head_drop", None)
        if pooling == "distilled":
            readout = _DistilledReadout(inner.head, inner.head_dist, drop)
        elif pooling == "token":
            readout = _ClsReadout(inner.fc_norm, inner.head, drop)
        else:
            readout = _PoolReadout(pooling, 0 if include_prefix else prefix, getattr(inner, "attn_pool", None),
                                   inner.fc_norm, inner.head, drop)
        post = TokenPost(blocks[b + 1:], inner.norm, readout)
    return TokenFFNHead(norm, fc_bef, act, fc_aft, ls, post, kind, block=b, num_blocks=n, pooling=pooling,
                        num_prefix_tokens=prefix, pool_include_prefix=include_prefix,
                        token_statistic=token_statistic)


@contextlib.contextmanager
def _capture_block_states(model: nn.Module, block: int) -> Iterator[dict[str, Tensor]]:
    head = ffn_head(model, block)
    store: dict[str, Tensor] = {}
    per_token = head.token_axis

    def pre_norm(_m, args):
        x = args[0]
        store["x"] = (x if per_token else x[:, 0]).detach()

    def post_fc_bef(_m, _args, out):  # the activation from W_bef's output (an activation module may be shared)
        with torch.no_grad():
            a = head.act(out if per_token else out[:, 0])
        store["a"] = a.detach()

    handles = [head.norm.register_forward_pre_hook(pre_norm), head.fc_bef.register_forward_hook(post_fc_bef)]
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
