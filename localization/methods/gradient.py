"""Gradient of the loss (GL, Arachne's "gradient loss"; docs/methods.md).

For every weight w of W_bef ``[d_ff, d]`` and W_aft ``[d, d_ff]``::

    GL_I(w) = | sum_{x in I} dL(x)/dw |          L = cross-entropy on the logits of the FFN head
    one-sided  (grad_loss, gradient_only):  GL(I_neg)
    two-sided  (grad_loss_2s):              GL(I_neg) / (1 + GL(I_pos))

The signed sums sum_x dL(x)/dw are the states (float64, summed across processes); the absolute value is taken in
``compute``, after every input has been added. The gradients come from ``torch.autograd.grad`` on the two weight
tensors of the FFN head (never the full model): the head reproduces the model's logits from the cached CLS state,
so they equal the full model's gradients (``tests/test_fl_gradient.py`` checks this). On a token head (states
``[N, T, d]`` of any block, docs/methods.md section 1) the same autograd sums over every input and token: exact,
no token statistic.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import SetLocalizer, acc_zeros, ffn_pass

__all__ = ["grad_loss_sums", "grad_loss_score", "GLStates", "GradLoss", "GradLossTwoSided", "GradientOnly"]


def grad_loss_sums(head: FFNHead, x: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """Signed sum_x dL(x)/dW for W_bef ``[d_ff, d]`` and W_aft ``[d, d_ff]`` over the rows of ``x [B, d]``."""
    p = ffn_pass(head, x, label, gl=True)
    return p.gl_bef, p.gl_aft


def grad_loss_score(sum_neg: Tensor, sum_pos: Tensor | None = None) -> Tensor:
    """|sum_neg| (one-sided) or |sum_neg| / (1 + |sum_pos|) (two-sided), elementwise."""
    gl = sum_neg.abs()
    return gl if sum_pos is None else gl.div_(sum_pos.abs().add_(1.0))  # in place on fresh tensors


class GLStates:
    """Mixin for a :class:`SetLocalizer`: state ``gl_{side}`` ``[2 d d_ff]`` = signed sum_x dL(x)/dw over the
    global weight index, for each side in ``gl_sides`` (default: the localizer's sides)."""

    def _init_gl(self, gl_sides: tuple[str, ...] | None = None) -> None:
        self.gl_sides = tuple(gl_sides or self.sides)
        for s in self.gl_sides:
            self.add_state(f"gl_{s}", acc_zeros(self.index.total), dist_reduce_fx="sum")

    def _acc_gl(self, side: str, p) -> None:
        if side in self.gl_sides:
            self.add_weights(getattr(self, f"gl_{side}"), p.gl_bef, p.gl_aft)

    def _gl_value(self, two_sided: bool) -> Tensor:
        """GL(I_neg) or GL(I_neg) / (1 + GL(I_pos)), ``[2 d d_ff]``."""
        self.require("neg")
        if two_sided:
            self.require("pos", why="for the two-sided GL(I_neg) / (1 + GL(I_pos))")
            return grad_loss_score(self.gl_neg, self.gl_pos)
        return grad_loss_score(self.gl_neg)


@register_localizer("grad_loss")
class GradLoss(GLStates, SetLocalizer):
    """One-sided GL on I_neg: score(w) = |sum_{x in I_neg} dL(x)/dw|, ``[2 d d_ff]``."""

    level = "weight"
    two_sided = False

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        super().__init__(head, seed=seed, sides=("neg", "pos") if self.two_sided else ("neg",), **kwargs)
        self._init_gl()

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        self._acc_gl(side, ffn_pass(self.head, x, label, gl=True))

    def compute(self) -> Tensor:
        return self._gl_value(self.two_sided)

    def options(self) -> dict[str, Any]:
        return {"two_sided": self.two_sided, "sets": "I_neg, I_pos" if self.two_sided else "I_neg"}


@register_localizer("grad_loss_2s")
class GradLossTwoSided(GradLoss):
    """Two-sided GL: score(w) = GL(I_neg) / (1 + GL(I_pos)), ``[2 d d_ff]``."""

    two_sided = True


@register_localizer("gradient_only")
class GradientOnly(GradLoss):
    """The "gradient only" baseline (exp-fl-3): GL on I_neg over all weights, no neuron pre-selection. Its scores
    equal ``grad_loss``'s; the name is kept so tables from the published experiments keep their row."""
