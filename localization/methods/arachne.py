"""Arachne's bidirectional localization (BL) and its controllable variant ArachneW (docs/methods.md).

Both use, for every weight of W_bef ``[d_ff, d]`` and W_aft ``[d, d_ff]``, the gradient loss GL
(``gradient.py``) and the forward impact FI (``forward_impact.py``), two-sided by default as in Arachne's
Algorithm 1 (``two_sided=False``: I_neg only)::

    GL(w) = GL(I_neg) / (1 + GL(I_pos)),   FI(w) = FI(I_neg) / (1 + FI(I_pos))

* **bl**: the first Pareto front of (GL, FI), both maximised, over all 4,718,592 weights
  (:func:`vitfl.localization.ranking.pareto_front`, O(n log n), no [n, n] tensor); identical points are all kept
  (RepTran), ``keep_identical=False`` keeps the first only (Arachne). Its size is not controllable: use budget
  ``"front"`` (or None). BL's score vector, for rank-based benchmarks and int budgets, is
  ``2 + s(w)`` on the front and ``s(w)`` elsewhere, with s = the ArachneW score below (p = 0.5) in [0, 1]: the
  front always ranks first, s orders within and outside it.
* **arachne_w** ("ArachneV3"): score(w) = (1 - p) minmax(GL) + p minmax(FI), min and max taken jointly over both
  matrices, p = 0.5; take the top N.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import FFNPass, SetLocalizer, ffn_pass
from vitfl.localization.methods.forward_impact import FIStates
from vitfl.localization.methods.gradient import GLStates
from vitfl.localization.ranking import minmax, pareto_front

__all__ = ["minmax_eps", "arachne_w_score", "bl_scores", "GLFILocalizer", "ArachneW", "BL"]


def minmax_eps(v: Tensor, eps: float = 0.0) -> Tensor:
    """minmax(v) for ``eps == 0``; else (v - min v) / (max v - min v + eps), the published normalisation of
    RepTran's ``calculate_top_n_flattened`` (``src/utils/arachne.py``; eps = 1e-8). float64."""
    v = v.double()
    if eps == 0.0:
        return minmax(v)
    lo, hi = torch.aminmax(v)
    return torch.sub(v, lo).div_(hi - lo + eps)


def arachne_w_score(gl: Tensor, fi: Tensor, p: float = 0.5, eps: float = 0.0) -> Tensor:
    """(1 - p) minmax(GL) + p minmax(FI), float64, over the flat ``[2 d d_ff]`` vectors (joint normalisation);
    ``eps`` > 0: the published minmax with ``+ eps`` in the denominator (:func:`minmax_eps`)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return minmax_eps(gl, eps).mul_(1.0 - p).add_(minmax_eps(fi, eps), alpha=p)


def bl_scores(gl: Tensor, fi: Tensor, keep_identical: bool = True) -> tuple[Tensor, Tensor]:
    """(scores ``[n]`` = 2 [w on the front] + s(w), the front's indices ordered by score, best first)."""
    scores = arachne_w_score(gl, fi, 0.5)
    front = pareto_front(gl, fi, keep_identical=keep_identical, hint=scores)
    scores[front] += 2.0
    # sort the front in index order first, so equal scores keep ascending index
    front_by_index = torch.sort(front).values
    order = torch.sort(scores[front_by_index], descending=True, stable=True).indices
    return scores, front_by_index[order]


class GLFILocalizer(GLStates, FIStates, SetLocalizer):
    """Base of the weight-level methods built on GL and FI (bl, arachne_w, ours). One head pass per set gives
    both the loss gradient and the per-input dO/dn for FI's back term."""

    level = "weight"
    #: the minmax's ``+ eps`` (0: exact minmax; the published RepTran variants: 1e-8)
    norm_eps: float = 0.0

    def __init__(self, head: FFNHead, seed: int = 0, two_sided: bool = True, **kwargs: Any):
        super().__init__(head, seed=seed, sides=("neg", "pos") if two_sided else ("neg",), **kwargs)
        self.two_sided = bool(two_sided)
        self._init_glfi()

    # --- hooks a variant (reptran_compat) replaces
    def _init_glfi(self) -> None:
        self._init_gl()
        self._init_fi()

    def _pass_flags(self) -> dict[str, bool]:
        return {"gl": True, "back": True}

    def _acc_glfi(self, side: str, x: Tensor, label: Tensor, p: FFNPass) -> None:
        self._acc_gl(side, p)
        self._acc_fi(side, p)

    def gl_fi(self) -> tuple[Tensor, Tensor]:
        """(GL ``[2 d d_ff]``, FI ``[2 d d_ff]``), two-sided unless ``two_sided=False``."""
        return self._gl_value(self.two_sided), self._fi_value(self.two_sided)

    # ---
    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        p = ffn_pass(self.head, x, label, **self._pass_flags())
        self._acc_glfi(side, x, label, p)
        self._acc_more(side, p, label)

    def _acc_more(self, side: str, p: FFNPass, label: Tensor) -> None:
        """Extra states of a subclass (ours: activation moments)."""

    def options(self) -> dict[str, Any]:
        return {"two_sided": self.two_sided}


@register_localizer("arachne_w")
class ArachneW(GLFILocalizer):
    """score(w) = (1 - p) minmax(GL) + p minmax(FI) (two-sided GL, FI; joint over both matrices), ``[2 d d_ff]``."""

    def __init__(self, head: FFNHead, seed: int = 0, p: float = 0.5, two_sided: bool = True, **kwargs: Any):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)
        super().__init__(head, seed=seed, two_sided=two_sided, **kwargs)

    def compute(self) -> Tensor:
        gl, fi = self.gl_fi()
        return arachne_w_score(gl, fi, self.p, self.norm_eps)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "p": self.p}


@register_localizer("bl")
class BL(GLFILocalizer):
    """First Pareto front of (GL, FI); scores ``[2 d d_ff]`` = 2 [on front] + ArachneW score (p = 0.5);
    :meth:`own_selection` = the front (budget ``"front"``)."""

    def __init__(self, head: FFNHead, seed: int = 0, keep_identical: bool = True, two_sided: bool = True,
                 **kwargs: Any):
        self.keep_identical = bool(keep_identical)
        self._front: Tensor | None = None
        super().__init__(head, seed=seed, two_sided=two_sided, **kwargs)

    def compute(self) -> Tensor:
        gl, fi = self.gl_fi()
        scores, self._front = bl_scores(gl, fi, self.keep_identical)
        return scores

    def own_selection(self) -> Tensor:
        """The Pareto front's global weight indices, best BL score first (call ``compute`` first)."""
        if self._front is None:
            self.compute()
        return self._front

    def reset(self) -> None:
        super().reset()
        self._front = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "keep_identical": self.keep_identical}
