"""Ours: vdiff + mean_act + grad_loss, and the checkpoint-benchmark variant ``ours_fl5`` as published.

**ours** (as in the repair experiments, RepTran's ``exp-repair-4-1-1``): every weight's two-sided GL and FI are
multiplied by the NeuronScore of its intermediate neuron j (row j of W_bef ``[d_ff, d]``, column j of W_aft
``[d, d_ff]``); no neuron is cut::

    NS_j   = vdiff_j * mean_act_j                               (neuron_scores.py)
    vdiff_j = minmax(|V_j(I_pos^y) - V_j(I_neg)|)               I_pos^y = the I_pos rows of label y = true_label
                                                                 (all I_pos rows when true_label is None)
    GL'(w) = NS_j(w) * GL(I_neg) / (1 + GL(I_pos))              (gradient.py; all I_pos rows)
    FI'(w) = NS_j(w) * FI(I_neg) / (1 + FI(I_pos))              (forward_impact.py; all I_pos rows)
    score(w) = (1 - p) minmax(GL') + p minmax(FI'),  p = 0.5, min/max joint over both matrices;  top N.

``true_label`` (class attribute ``uses_true_label = True``: the runner passes it): the setting's true label (s for
``src_tgt`` s -> t, l for ``tgt_fn`` l), None for ``tgt_fp`` / ``all`` / ``tgt``. The V-score is
Var(a_j) + sum_{k != j} |Cov(a_j, a_k)| by default (``vscore=``: the published variants of
:data:`vitfl.localization.methods.neuron_scores.VSCORE_VARIANTS`).

**ours_fl5** (RepTran's ``exp-fl-5-6`` with the ``vit_util`` of that time)::

    NS_j = alpha minmax(|V_j(I_pos) - V_j(I_neg)|) + (1 - alpha) minmax(mean_{I_neg} a_j),   alpha = 0.5
           V = Var(a_j) + sum_{k != j} Cov(a_j, a_k) / (d_ff - 1)  ("signed_mean"), I_pos = all correct inputs;
           with ``n``: NS_j = 0 outside the n neurons of largest NS (ties: lower index first)
    G(w) = minmax( mean_b d/dw [mean_{x in b} L(x)] )     over the batches b of I_neg (np.array_split into
           ceil(|I_neg| / 32) parts, published order; signed; min / max joint over both matrices)
    wscore(w) = 0.5 G(w) + 0.5 NS_j(w);   score(w) = |wscore(w)|

Its batching (``batching = 32``) follows ``vitfl.localization.methods._common``'s compat batching. Both methods need
I_neg and I_pos with >= 2 inputs each (the V-score's covariance).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import FFNPass, SetLocalizer, acc_zeros, array_split_sizes, ffn_pass
from vitfl.localization.methods._reptran import reptran_sums
from vitfl.localization.methods.arachne import GLFILocalizer, minmax_eps
from vitfl.localization.methods.neuron_scores import VStates
from vitfl.localization.ranking import minmax, top_n

__all__ = ["ours_score", "check_true_label", "Ours", "OursFL5"]


def ours_score(gl: Tensor, fi: Tensor, neuron_score_per_weight: Tensor, p: float = 0.5, eps: float = 0.0) -> Tensor:
    """(1 - p) minmax(NS * GL) + p minmax(NS * FI), all ``[2 d d_ff]``, float64 (``eps``: see
    :func:`vitfl.localization.methods.arachne.minmax_eps`)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    ns = neuron_score_per_weight.double()
    return minmax_eps(gl.double() * ns, eps).mul_(1.0 - p).add_(minmax_eps(fi.double() * ns, eps), alpha=p)


def check_true_label(true_label: Any) -> int | None:
    """None, or the class id as an int (numpy ints accepted); anything else: a clear error."""
    if true_label is None:
        return None
    try:
        if isinstance(true_label, bool):
            raise TypeError
        v = operator.index(true_label)
    except TypeError:
        raise ValueError(f"true_label must be a class id (int >= 0) or None, got {true_label!r}") from None
    if v < 0:
        raise ValueError(f"true_label must be a class id (int >= 0) or None, got {v}")
    return v


@register_localizer("ours")
class Ours(VStates, GLFILocalizer):
    """Ours (exp-repair-4-1-1): score(w) = (1 - p) minmax(NS_j GL(w)) + p minmax(NS_j FI(w)), NS = vdiff x
    mean_act with the correct side's V-score over the true label's correct inputs, ``[2 d d_ff]``."""

    uses_true_label = True

    def __init__(self, head: FFNHead, seed: int = 0, p: float = 0.5, true_label: int | None = None,
                 vscore: str = "abs_sum", **kwargs: Any):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p = float(p)
        self.true_label = check_true_label(true_label)
        super().__init__(head, seed=seed, two_sided=True, **kwargs)
        self._init_v(("neg", "pos"), outer=True, v_pos_label=self.true_label, vscore=vscore)

    def _acc_more(self, side: str, p: FFNPass, label: Tensor) -> None:
        self._acc_v(side, p, label)

    def compute(self) -> Tensor:
        ns = self._neuron_score()
        gl, fi = self.gl_fi()
        return ours_score(gl, fi, self.per_weight(ns), self.p, self.norm_eps)

    def options(self) -> dict[str, Any]:
        return {"two_sided": True, "p": self.p, "neuron_score": "vdiff * mean_act", "vscore": self.vscore,
                "true_label": self.true_label,
                "vdiff_pos": "I_pos of true_label" if self.true_label is not None else "all I_pos"}


@register_localizer("ours_fl5")
class OursFL5(VStates, SetLocalizer):
    """Ours as published in exp-fl-5-6: score(w) = |0.5 minmax(G)(w) + 0.5 NS_j(w)|, NS = 0.5 vdiff + 0.5 mean_act
    (signed-mean V-score, optional top-n neurons), G = signed mean of per-batch mean loss gradients over I_neg's
    32-row batches, ``[2 d d_ff]``."""

    level = "weight"
    batching = 32

    def __init__(self, head: FFNHead, seed: int = 0, n: int | None = None, alpha: float = 0.5,
                 vscore: str = "signed_mean", batch_size: int = 32, **kwargs: Any):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= head.d_ff):
            raise ValueError(f"n (top neurons) must be None or an int in [1, d_ff={head.d_ff}], got {n!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        array_split_sizes(1, batch_size)  # validates batch_size
        self.n, self.alpha = n, float(alpha)
        super().__init__(head, seed=seed, sides=("neg", "pos"), **kwargs)
        self.batching = int(batch_size)
        self.add_state("rgl_neg", acc_zeros(self.index.total), dist_reduce_fx="sum")
        self.add_state("batches_neg", acc_zeros(), dist_reduce_fx="sum")
        self._init_v(("neg", "pos"), outer=True, vscore=vscore)

    def _accumulate(self, side: str, x: Tensor, label: Tensor, batches: list[int] | None = None) -> None:
        if side == "neg":
            r = reptran_sums(self.head, x, label, batches or array_split_sizes(x.shape[0], self.batching), fi=False)
            self.add_weights(self.rgl_neg, r.gl_bef, r.gl_aft)
            self.batches_neg.add_(r.n_batches)
            self._acc_v(side, FFNPass(h=r.h, a=r.a), label)
        else:
            self._acc_v(side, ffn_pass(self.head, x), label)

    def neuron_score(self) -> Tensor:
        """NS ``[d_ff]`` float64 (zero outside the top n when ``n`` is given)."""
        ns = self.alpha * self._vdiff() + (1.0 - self.alpha) * self._mean_act()
        if self.n is not None:
            keep = top_n(ns, self.n)
            out = torch.zeros_like(ns)
            out[keep] = ns[keep]
            ns = out
        return ns

    def compute(self) -> Tensor:
        self.require("neg")
        g = minmax(self.rgl_neg / self.batches_neg)
        return (0.5 * g + 0.5 * self.per_weight(self.neuron_score())).abs()

    def options(self) -> dict[str, Any]:
        return {"neuron_score": f"{self.alpha} vdiff + {1 - self.alpha} mean_act", "alpha": self.alpha,
                "n": self.n, "vscore": self.vscore, "batch_size": self.batching,
                "gl": "signed mean of per-batch mean gradients, I_neg only", "rank_by": "|0.5 G + 0.5 NS|"}
