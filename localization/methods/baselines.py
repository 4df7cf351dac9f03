"""Input-free baselines (docs/methods.md): weight magnitude, score(w) = |w| over W_bef ``[d_ff, d]`` then
W_aft ``[d, d_ff]``, ``[2 d d_ff]``. (The "gradient only" baseline needs inputs; it lives in ``gradient.py``.)"""
from __future__ import annotations

from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import InputFreeLocalizer, check_head

__all__ = ["magnitude_scores", "Magnitude"]


def magnitude_scores(head: FFNHead) -> Tensor:
    """|w| of every weight over the global index, ``[2 d d_ff]`` float64."""
    w_bef, w_aft = head.weights()
    return head.index.join(w_bef.detach().abs().double(), w_aft.detach().abs().double())


@register_localizer("magnitude")
class Magnitude(InputFreeLocalizer):
    """score(w) = |w|, ``[2 d d_ff]``; inputs are ignored."""

    level = "weight"

    def compute(self) -> Tensor:
        check_head(self.head)
        return magnitude_scores(self.head)
