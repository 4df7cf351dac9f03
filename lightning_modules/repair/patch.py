"""A repair patch: the located weights, their old values and their new values (docs/methods.md, section 6).

A patch touches only the located weights ``(matrix, row, col)`` of one FFN (matrix 0 = W_bef ``[4d, d]``,
matrix 1 = W_aft ``[d, 4d]``, PyTorch's (out, in) layout, as in :mod:`vitfl.localization.ffn`). It applies to and reverts
from an :class:`~vitfl.localization.ffn.FFNHead` or a full model (through :func:`vitfl.localization.ffn.last_ffn_head`, whose
modules are shared with the model), and round-trips through JSON exactly (float32 values are stored as doubles).

**Which FFN** (``block``): None (the default) is the last block's FFN as the last-block CLS head sees it (every patch
made before block addressing; its JSON has no ``"block"`` key, byte for byte as before). A patch made on a
:class:`~vitfl.localization.ffn.TokenFFNHead` (any block of :func:`vitfl.localization.ffn.ffn_head`, or the last
block of an average-pooled model) records the head's non-negative block index; on a full model it goes through
``ffn_head(model, block)``. Applying a patch to a head of another block is a :class:`PatchMismatchError`; a
``block=None`` patch fits the CLS head and a token head of the model's last block.

>>> import torch
>>> from torch import nn
>>> from vitfl.localization.ffn import FFNHead
>>> head = FFNHead(nn.LayerNorm(4), nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4), None,
...                nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)), "hf")
>>> p = Patch.from_values(head, torch.tensor([[0, 2, 1], [1, 3, 15]]), torch.tensor([0.5, -0.25]))
>>> with p.applied(head):
...     float(head.fc_bef.weight.detach()[2, 1])
0.5
>>> Patch.from_dict(p.to_dict()) == p
True
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from vitfl.localization.ffn import FFNHead, WeightIndex, ffn_head, last_ffn_head

__all__ = ["Patch", "PatchMismatchError", "RepairInputError", "UnsupportedRepairHeadError", "check_weights", "read_values", "write_values",
           "as_head", "patch_block", "check_block"]

PATCH_FORMAT = "vitfl-patch/1"


class RepairInputError(ValueError):
    """Bad input to a repair: no located weights, duplicates, out-of-range ids, empty I_neg, mismatched shapes."""


class UnsupportedRepairHeadError(RepairInputError):
    """A repair method that cannot run on this FFN head (e.g. the LP optimiser on a token head): the case is not
    applicable, recorded as such by the sweeps (never counted as a failed run)."""


class PatchMismatchError(RuntimeError):
    """The target's current values at the patch's weights are not the patch's ``old`` values (another model, or the
    patch is already applied)."""


def check_weights(weights: Any, index: WeightIndex) -> Tensor:
    """Validate located weights: ``[K, 3]`` (matrix, row, col), K >= 1, in range, no duplicates. Returns int64."""
    w = torch.as_tensor(weights)
    if w.is_floating_point() or w.is_complex():
        if not torch.equal(w, w.round()):
            raise RepairInputError("located weights must be integer (matrix, row, col) triples")
    w = w.to(torch.long).cpu()
    if w.ndim != 2 or w.shape[1] != 3:
        raise RepairInputError(f"located weights must have shape [K, 3] (matrix, row, col), got {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise RepairInputError("no located weights (budget 0): a repair needs at least one weight to change")
    m, r, c = w.unbind(1)
    if not bool(((m == 0) | (m == 1)).all()):
        raise RepairInputError(f"matrix ids must be 0 (W_bef) or 1 (W_aft), got {sorted(set(m.tolist()))}")
    nrows = torch.where(m == 0, index.d_ff, index.d)
    ncols = torch.where(m == 0, index.d, index.d_ff)
    bad = (r < 0) | (r >= nrows) | (c < 0) | (c >= ncols)
    if bool(bad.any()):
        first = w[bad][0].tolist()
        raise RepairInputError(f"{int(bad.sum())} located weights out of range, e.g. {first}; W_bef is "
                               f"[{index.d_ff}, {index.d}], W_aft is [{index.d}, {index.d_ff}]")
    flat = index.to_flat(w)
    if flat.unique().numel() != flat.numel():
        raise RepairInputError(f"located weights contain {flat.numel() - flat.unique().numel()} duplicates")
    return w


def as_head(target: nn.Module, block: int | None = None) -> FFNHead:
    """The FFN head of ``target``: itself if it is one (checked to be block ``block``'s when ``block`` is given,
    :func:`check_block`); else the adapter's head of the model, sharing the model's modules: the last-FFN CLS head
    (:func:`~vitfl.localization.ffn.last_ffn_head`) for ``block=None``, ``ffn_head(target, block)`` otherwise."""
    if isinstance(target, FFNHead):
        if block is not None:
            check_block(target, block)
        return target
    return last_ffn_head(target) if block is None else ffn_head(target, block)


def patch_block(head: FFNHead) -> int | None:
    """The ``block`` a patch made on ``head`` records: None for the last-block CLS head (an :class:`FFNHead`
    without a token axis: every patch before block addressing), else the token head's non-negative block index."""
    if not getattr(head, "token_axis", False):
        return None
    if head.block is None:
        raise RepairInputError("a token FFN head without a block index: build it with "
                               "vitfl.localization.ffn.ffn_head(model, block)")
    return int(head.block)


def check_block(head: FFNHead, block: int | None) -> None:
    """A :class:`PatchMismatchError` unless ``head`` is the FFN of ``block`` (None: the last block, as the CLS head
    or a token head of the last block sees it)."""
    if block is None:
        last = head.block is not None and head.num_blocks is not None and head.block == head.num_blocks - 1
        if getattr(head, "token_axis", False) and not last:
            raise PatchMismatchError(f"this patch is of the last block's FFN (block None: the last-block CLS head), "
                                     f"but the head is the FFN head of block {head.block}")
        return
    if head.block is None:
        raise PatchMismatchError(f"this patch is of block {block}'s FFN, but the head records no block index (build "
                                 "it with vitfl.localization.ffn.ffn_head(model, block))")
    if int(head.block) != int(block):
        raise PatchMismatchError(f"this patch is of block {block}'s FFN, but the head is the FFN head of block "
                                 f"{head.block}: a patch applies to its own block only")


def read_values(head: FFNHead, weights: Tensor) -> Tensor:
    """Current values ``[K]`` of the located weights (in the head's dtype and device)."""
    w = weights.to(head.fc_bef.weight.device)
    m, r, c = w.unbind(1)
    out = torch.empty(len(w), dtype=head.fc_bef.weight.dtype, device=w.device)
    for k, param in enumerate(head.weights()):
        sel = m == k
        out[sel] = param.detach()[r[sel], c[sel]]
    return out


@torch.no_grad()
def write_values(head: FFNHead, weights: Tensor, values: Tensor) -> None:
    """Set the located weights to ``values [K]`` in place (cast to each matrix's dtype)."""
    w = weights.to(head.fc_bef.weight.device)
    m, r, c = w.unbind(1)
    for k, param in enumerate(head.weights()):
        sel = m == k
        if bool(sel.any()):
            param[r[sel], c[sel]] = values[sel.to(values.device)].to(param.device, param.dtype)


@dataclass(eq=False)
class Patch:
    """``weights [K, 3]`` (matrix, row, col); ``old [K]`` and ``new [K]`` values (float64 on the CPU); ``block``:
    the FFN's transformer block (None: the last block as the last-block CLS head sees it; else the non-negative
    index of the token head it was made on)."""

    weights: Tensor
    old: Tensor
    new: Tensor
    block: int | None = None

    def __post_init__(self):
        if self.block is not None:
            if isinstance(self.block, bool) or int(self.block) != self.block or int(self.block) < 0:
                raise RepairInputError(f"a patch's block is None (the last-block CLS head) or a non-negative block "
                                       f"index, got {self.block!r}")
            self.block = int(self.block)
        self.weights = torch.as_tensor(self.weights, dtype=torch.long).cpu().reshape(-1, 3)
        self.old = torch.as_tensor(self.old).detach().to(torch.float64).cpu().reshape(-1)
        self.new = torch.as_tensor(self.new).detach().to(torch.float64).cpu().reshape(-1)
        if not (len(self.weights) == len(self.old) == len(self.new)):
            raise RepairInputError(f"patch has {len(self.weights)} weights, {len(self.old)} old and "
                                   f"{len(self.new)} new values")
        if not (torch.isfinite(self.old).all() and torch.isfinite(self.new).all()):
            raise RepairInputError("patch values must be finite")

    @classmethod
    def from_values(cls, target: nn.Module, weights: Tensor, new: Tensor) -> "Patch":
        """The patch that sets ``weights`` of ``target`` (head or model) to ``new``; old values read from it."""
        head = as_head(target)
        w = check_weights(weights, head.index)
        return cls(w, read_values(head, w), torch.as_tensor(new), block=patch_block(head))

    def __len__(self) -> int:
        return len(self.weights)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Patch) and self.block == other.block and torch.equal(self.weights, other.weights)
                and torch.equal(self.old, other.old) and torch.equal(self.new, other.new))

    @property
    def delta(self) -> Tensor:
        return self.new - self.old

    def head_of(self, target: nn.Module) -> FFNHead:
        """The FFN head this patch writes in ``target`` (a head, checked to be this patch's block, or a full model:
        ``last_ffn_head`` for block None, else ``ffn_head(model, block)``)."""
        head = as_head(target, self.block)
        check_block(head, self.block)
        return head

    def _set(self, target: nn.Module, expect: Tensor, values: Tensor, check: bool) -> FFNHead:
        head = self.head_of(target)
        w = check_weights(self.weights, head.index)
        if check:
            cur = read_values(head, w).to(torch.float64).cpu()
            expect_cast = expect.to(head.fc_bef.weight.dtype).to(torch.float64)
            if not torch.equal(cur, expect_cast):
                n = int((cur != expect_cast).sum())
                raise PatchMismatchError(
                    f"{n} of {len(w)} weights do not hold the values this patch expects: the target is another "
                    "model (check the checkpoint hash) or the patch is already applied / not applied")
        write_values(head, w, values)
        return head

    def apply(self, target: nn.Module, check: bool = True) -> nn.Module:
        """Set the weights to ``new`` in ``target`` (FFNHead or full model), in place; checks ``old`` first."""
        self._set(target, self.old, self.new, check)
        return target

    def revert(self, target: nn.Module, check: bool = True) -> nn.Module:
        """Set the weights back to ``old``; checks they hold ``new`` first."""
        self._set(target, self.new, self.old, check)
        return target

    @contextlib.contextmanager
    def applied(self, target: nn.Module, check: bool = True) -> Iterator[nn.Module]:
        """Apply within the context, revert on exit (also on error)."""
        self.apply(target, check)
        try:
            yield target
        finally:
            self.revert(target, check=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"format", "n", "weights": [[m, r, c], ...], "old": [...], "new": [...]}``, plus
        ``"block": L`` for a patch of a token head (a ``block=None`` patch is exactly what it always was)."""
        d = {"format": PATCH_FORMAT, "n": len(self), "weights": self.weights.tolist(),
             "old": self.old.tolist(), "new": self.new.tolist()}
        if self.block is not None:
            d["block"] = self.block
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Patch":
        if d.get("format", PATCH_FORMAT) != PATCH_FORMAT:
            raise RepairInputError(f"patch format {d.get('format')!r}, expected {PATCH_FORMAT!r}")
        return cls(torch.tensor(d["weights"], dtype=torch.long).reshape(-1, 3),
                   torch.tensor(d["old"], dtype=torch.float64), torch.tensor(d["new"], dtype=torch.float64),
                   block=d.get("block"))
