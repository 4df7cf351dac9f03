"""Pieces every FL method shares: input checks, one pass through the FFN head (with the gradients the methods
need), :class:`SetLocalizer`, the base of methods whose states are sums over I_neg and/or I_pos, and the batching
of the published (RepTran) formulas.

Nothing here knows a method's formula; each method family file states its own.

**Precision.** Every state that sums over inputs is float64 (:data:`ACC_DTYPE`), whatever the head's dtype; the
per-batch products are formed in the head's dtype and added into the float64 states, so a float64 head is float64
end to end and a float32 head carries float32 rounding of one batch only. Every method's ``compute`` returns
float64 scores.

**Compat batching** (methods with class attribute ``batching = b``, the published RepTran formulas): the published
code cut each set S (I_neg, then I_pos) into ``np.array_split(S, ceil(|S| / b))`` parts (40 -> 20 + 20,
70 -> 24 + 23 + 23) in the order it held them (I_neg in the published order, I_pos ascending by sample index), and
its GL / FI are means of per-part values, so the parts must be the same here whatever the data loader does:

* :func:`compat_groups` gives every row its part ("compat batch") id, from the whole set sizes;
* the feeders (``vitfl.localization.ranking.localize`` and the FL LightningModule's batch sampler,
  ``lightning_modules/fl.py``) never cut a part across ``update`` calls or processes, and pass the ids as
  ``update(x, label, is_neg, group=ids)``;
* :meth:`SetLocalizer.update` then hands each side's rows with the part sizes to ``_accumulate(..., batches=)``;
  a part id seen in an earlier ``update`` is a cut part: a clear error. Without ``group`` each ``update``'s rows
  of a side are taken as the whole set and split as above (so one ``update`` with everything is right too).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from vitfl.localization.base import Localizer, lazy_zeros
from vitfl.localization.batching import (array_split_sizes, compat_groups, group_sizes,  # noqa: F401
                                   neg_first_order, whole_group_batches)
from vitfl.localization.ffn import FFNHead

SIDES = ("neg", "pos")
#: dtype of every state that sums over inputs (float64; no float dtype of a head is wider)
ACC_DTYPE = torch.float64


def acc_zeros(*shape: int) -> Tensor:
    """A zero float64 state default of ``shape``; a large one is allocated at the first update
    (:func:`vitfl.localization.base.lazy_zeros`)."""
    return lazy_zeros(*shape, dtype=ACC_DTYPE)


# ------------------------------------------------------------------------------------------- compat batching
def check_head(head: FFNHead) -> None:
    """Both FFN weight matrices (and their biases) must be finite."""
    if not isinstance(head, FFNHead):
        raise TypeError(f"FL methods work on an FFNHead (vitfl.localization.ffn.last_ffn_head(model)), got "
                        f"{type(head).__name__}")
    for name, mod in (("W_bef", head.fc_bef), ("W_aft", head.fc_aft)):
        for pname, t in (("weight", mod.weight), ("bias", mod.bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"the FFN head's {name} {pname} holds NaN or inf values")


def _check_token_states(head: FFNHead, x: Tensor, method: str | None) -> None:
    """A token head (:class:`~vitfl.localization.ffn.TokenFFNHead`) takes the token states ``[B, T, d]`` entering
    its block's FFN: a clear error naming the method and the block otherwise (not a shape error further on)."""
    try:
        head.check_states(x)
    except ValueError as e:
        who = f"FL method {method!r}" if method else "an FL method"
        raise ValueError(f"{who} on the FFN head of block {head.block}: {e}") from None


def check_batch(head: FFNHead, x: Tensor, label: Tensor, is_neg: Tensor,
                num_classes: int | None = None, method: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Validate one batch and move it to the head's device / dtype.

    x ``[B, d]`` finite float (a token head, ``head.token_axis``: the token states ``[B, T, d]``), label ``[B]``
    integer in [0, C), is_neg ``[B]`` bool (True = I_neg); ``method``: the method's name for the error messages.
    """
    w = head.fc_bef.weight
    if head.token_axis:
        _check_token_states(head, x, method)
    elif not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != head.d:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be [B, d={head.d}] (cached CLS residual streams), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    b = x.shape[0]
    if not isinstance(label, Tensor) or label.shape != (b,):
        raise ValueError(f"label must be [B={b}], got "
                         f"{list(label.shape) if isinstance(label, Tensor) else type(label).__name__}")
    if label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"label must hold integer class ids, got {label.dtype}")
    if not isinstance(is_neg, Tensor) or is_neg.shape != (b,) or is_neg.dtype != torch.bool:
        raise ValueError(f"is_neg must be a bool tensor [B={b}] marking I_neg rows, got "
                         f"{(is_neg.dtype, list(is_neg.shape)) if isinstance(is_neg, Tensor) else type(is_neg)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf values")
    if num_classes is not None and b and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes}), got [{int(label.min())}, "
                         f"{int(label.max())}]")
    x = x.detach()
    if x.is_inference():  # cached in inference mode: autograd may not save it, a clone may be
        x = x.clone()
    return x.to(device=w.device, dtype=w.dtype), label.to(w.device).long(), is_neg.to(w.device)


@contextlib.contextmanager
def weights_require_grad(head: FFNHead) -> Iterator[None]:
    """Temporarily make W_bef and W_aft require grad (a frozen model stays frozen afterwards)."""
    params = (head.fc_bef.weight, head.fc_aft.weight)
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)


def _no_inference_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("gradient-based FL methods need autograd, but torch.inference_mode() is on: run the "
                           "Trainer with inference_mode=False")


# ------------------------------------------------------------------------------------------------ the head pass
@dataclass
class FFNPass:
    """One forward of the FFN head on ``x [B, d]``, all tensors detached. On a token head (``x [B, T, d]``) every
    per-input tensor (h, a, back_a, back_n) is the head's token statistic of the per-token one (:func:`per_input`);
    gl_bef / gl_aft sum over every input and token (exact).

    h ``[B, d]`` = LN(x) (W_bef's input); a ``[B, d_ff]`` post-GELU activation (W_aft's input); logits ``[B, C]``
    (None if not needed); gl_bef ``[d_ff, d]`` / gl_aft ``[d, d_ff]`` = sum_x dL(x)/dW with L the cross-entropy
    on logits (signed; None unless asked); back_a ``[B, d_ff]`` / back_n ``[B, d]`` = per-input dO(x)/da and
    dO(x)/dn with O the sum of the logits and n = W_aft a + b_aft, the FFN output *before* LayerScale and the
    residual add (None unless asked).
    """

    h: Tensor
    a: Tensor
    logits: Tensor | None = None
    gl_bef: Tensor | None = None
    gl_aft: Tensor | None = None
    back_a: Tensor | None = None
    back_n: Tensor | None = None


def ffn_pass(head: FFNHead, x: Tensor, label: Tensor | None = None, *, gl: bool = False,
             back: bool = False, logits: bool = False) -> FFNPass:
    """Forward ``x [B, d]`` through the head once; with ``gl`` the summed cross-entropy's gradient w.r.t. W_bef and
    W_aft (``torch.autograd.grad`` on those two tensors only: no ``.grad`` is left on any parameter), with
    ``back`` the per-input gradient of the summed logits w.r.t. a and n (inputs are independent in the head:
    LayerNorms act per row, so one backward of the batch sum gives every row's own gradient)."""
    if not (gl or back):
        with torch.no_grad():
            h = head.norm(x)
            a = head.act(head.fc_bef(h))
            out = head.post(x + head.layer_scale(head.fc_aft(a))) if logits else None
        return per_input(head, FFNPass(h=h, a=a, logits=out))
    if gl and label is None:
        raise ValueError("the loss gradient needs labels")
    _no_inference_mode()
    with torch.enable_grad(), weights_require_grad(head):
        h = head.norm(x)
        a = head.act(head.fc_bef(h))
        n = head.fc_aft(a)
        out = head.post(x + head.layer_scale(n))
        p = FFNPass(h=h.detach(), a=a.detach(), logits=out.detach())
        if gl:
            loss = F.cross_entropy(out, label, reduction="sum")
            p.gl_bef, p.gl_aft = torch.autograd.grad(loss, [head.fc_bef.weight, head.fc_aft.weight],
                                                     retain_graph=back)
        if back:
            p.back_a, p.back_n = torch.autograd.grad(out.sum(), [a, n])
    return per_input(head, p)


def per_input(head: FFNHead, p: FFNPass) -> FFNPass:
    """A token head's pass (``h [B, T, d]``, ``a [B, T, d_ff]``, ``back_a`` / ``back_n`` per token) reduced to one
    vector per input by the head's token statistic (:meth:`~vitfl.localization.ffn.TokenFFNHead.reduce_tokens`:
    the CLS token for token pooling, the mean over the pooled tokens for average pooling, or the head's
    ``token_statistic``), each tensor reduced as it is (signed); the loss gradients (weight-shaped sums over every
    input and token, exact through the head) and the logits are kept. The CLS head's pass is returned as it is."""
    if not head.token_axis:
        return p
    red = head.reduce_tokens
    return FFNPass(h=red(p.h), a=red(p.a), logits=p.logits, gl_bef=p.gl_bef, gl_aft=p.gl_aft,
                   back_a=None if p.back_a is None else red(p.back_a),
                   back_n=None if p.back_n is None else red(p.back_n))


# ------------------------------------------------------------------------------------------------ base class
class SetLocalizer(Localizer):
    """A localizer whose states are sums over the inputs of I_neg and/or I_pos (``self.sides``).

    ``update`` validates the batch, splits it into the sides the method uses and calls
    ``self._accumulate(side, x_s, label_s)`` for each non-empty one (methods with ``batching``:
    ``self._accumulate(side, x_s, label_s, batches=[part sizes])``, see the module docstring); it also counts the
    inputs per side (states ``n_neg`` / ``n_pos``, float64, summed across processes).
    """

    sides: tuple[str, ...] = ("neg",)
    #: None, or the batch size b of a published formula that depends on its batches (see the module docstring)
    batching: int | None = None

    def __init__(self, head: FFNHead, seed: int = 0, *, sides: tuple[str, ...] | None = None, **kwargs: Any):
        super().__init__(head, seed=seed, **kwargs)
        check_head(head)
        if sides is not None:
            self.sides = tuple(sides)
        if not self.sides or any(s not in SIDES for s in self.sides):
            raise ValueError(f"sides must be a non-empty subset of {SIDES}, got {self.sides}")
        self._num_classes: int | None = None
        self._seen_groups: set[int] = set()
        for s in self.sides:
            self.add_state(f"n_{s}", torch.zeros((), dtype=ACC_DTYPE), dist_reduce_fx="sum")

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            with torch.no_grad():
                self._num_classes = self.head.num_classes
        return self._num_classes

    def update(self, x: Tensor, label: Tensor, is_neg: Tensor, group: Tensor | None = None) -> None:
        """Add a batch: ``x [B, d]``, ``label [B]``, ``is_neg [B]`` bool; ``group [B]`` int: compat batch ids
        (only for methods with ``batching``; :func:`compat_groups`), else ignored."""
        x, label, is_neg = check_batch(self.head, x, label, is_neg, self.num_classes, method=self.name)
        self.materialize_states()
        if self.batching is not None and group is not None:
            group = torch.as_tensor(group).reshape(-1).to(is_neg.device).long()
            if group.shape != is_neg.shape:
                raise ValueError(f"group must be [B={is_neg.numel()}] compat batch ids, got {list(group.shape)}")
            ids = set(torch.unique(group).tolist())
            cut = ids & self._seen_groups
            if cut:
                raise ValueError(f"compat batch(es) {sorted(cut)[:5]} arrived in more than one update: a batch of the "
                                 f"published {self.batching}-row batching must reach update() whole (see "
                                 "vitfl.localization.methods._common.compat_groups)")
            self._seen_groups |= ids
        for side in self.sides:
            mask = is_neg if side == "neg" else ~is_neg
            k = int(mask.sum())
            if k == 0:
                continue
            if self.batching is None:
                self._accumulate(side, x[mask], label[mask])
            else:
                sizes = group_sizes(group[mask]) if group is not None else array_split_sizes(k, self.batching)
                self._accumulate(side, x[mask], label[mask], batches=sizes)
            count = getattr(self, f"n_{side}")
            count += k

    def reset(self) -> None:
        super().reset()
        self._seen_groups = set()

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # helpers for compute()
    def count(self, side: str) -> int:
        return int(getattr(self, f"n_{side}").item())

    def require(self, side: str, at_least: int = 1, why: str = "") -> int:
        """The number of inputs seen on ``side``; a clear ValueError when fewer than ``at_least``."""
        n = self.count(side)
        if n < at_least:
            name = "I_neg" if side == "neg" else "I_pos"
            flag = "True" if side == "neg" else "False"
            raise ValueError(f"FL method {self.name!r} needs at least {at_least} input(s) in {name} "
                             f"(rows with is_neg={flag}){' ' + why if why else ''}; got {n}")
        return n

    @staticmethod
    def add_to(state: Tensor, value: Tensor) -> None:
        state += value.to(device=state.device, dtype=state.dtype)

    def add_weights(self, state: Tensor, bef: Tensor, aft: Tensor) -> None:
        """Add W_bef-shaped ``[d_ff, d]`` and W_aft-shaped ``[d, d_ff]`` values into a per-weight state
        ``[2 d d_ff]`` in place (through views: no 4.7M-element concatenation per batch)."""
        s_bef, s_aft = self.index.split(state)
        self.add_to(s_bef, bef)
        self.add_to(s_aft, aft)

    def per_weight(self, neuron_values: Tensor) -> Tensor:
        """Broadcast a per-neuron vector ``[d_ff]`` to every weight ``[2 d d_ff]``: weight (0, j, i) and (1, i, j)
        get neuron j's value (row j of W_bef, column j of W_aft)."""
        d, d_ff = self.head.d, self.head.d_ff
        v = neuron_values.reshape(-1)
        return self.index.join(v.view(d_ff, 1).expand(d_ff, d), v.view(1, d_ff).expand(d, d_ff))


class InputFreeLocalizer(Localizer):
    """Base of methods that ignore the inputs (random, magnitude): ``update`` does nothing and ``compute`` is valid
    without it (no torchmetrics "compute before update" warning)."""

    needs_inputs = False

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        super().__init__(head, seed=seed, **kwargs)
        check_head(head)
        self.update()  # nothing to accumulate: one (empty) update makes computing valid, through the public API

    def update(self, x: Tensor | None = None, label: Tensor | None = None, is_neg: Tensor | None = None,
               **kwargs: Any) -> None:
        """Inputs are ignored."""

    def reset(self) -> None:
        super().reset()
        self.update()
