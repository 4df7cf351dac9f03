"""GL and FI as the published RepTran code computed them, offered only under these ``*_reptran`` names (and
``bl_fl5``), never as the default, so published numbers can be recomputed beside the corrected ones.

Upstream: posl/RepTran-replication ``src/utils/arachne.py`` (``calculate_bi_fi``, ``calculate_top_n_flattened``,
``approximate_pareto_front``) with the batches of ``src/utils/vit_util.py`` (``get_batched_hs``), as called by
``src/exp-repair-4-1-1.py`` (ours), ``-4-1-2`` (ArachneW) and ``src/exp-fl-5-5.py`` ("bl"). ``docs/compat.md``
lists every difference from the defaults.

**Batches.** Each set S is cut as ``np.array_split(S, ceil(|S| / 32))`` (balanced: 40 -> 20 + 20, 70 -> 24 + 23 +
23), I_neg in the published order and I_pos ascending (class attribute ``batching = 32``; the feeders keep every
part whole, see ``vitfl.localization.methods._common``). For each part b of B_b inputs::

    GL_b(w)  = d/dw [ mean_{x in b} L(x) ]                                   signed, no |.|
    front_b  = w_ji * mean_{x in b} o_i(x) / (sum_k w_jk o_k(x) + 1e-8)      signed, no |.|, no bias in the sum
    back_b   = d/dw_ji [ sum_{x in b} sum_c logit_c(x) ]                     a per-*weight* gradient
    FI_b     = front_b * back_b

    GL(I) = mean_b GL_b,   FI(I) = mean_b FI_b                               (signed means of per-part values)
    two-sided (as published): GL = GL(I_neg) / (1 + GL(I_pos)), FI = FI(I_neg) / (1 + FI(I_pos))

o is LN(x) for W_bef and the post-GELU activation a for W_aft. States (float64, summed across processes): per set
the sums over parts of GL_b and of FI_b / w (w is multiplied in once, in ``compute``), and the number of parts.
The composites normalise as ``calculate_top_n_flattened`` did: (v - min) / (max - min + 1e-8) (``norm_eps``).

Registered: ``grad_loss_reptran``, ``forward_impact_reptran`` (two-sided, as published), ``arachne_w_reptran``
(exp-repair-4-1-2), ``bl_reptran`` (the Pareto front of these GL / FI), ``ours_reptran`` (exp-repair-4-1-1, with
the label-specific correct V-score and the |cov|-sum V-score), ``bl_fl5`` (exp-fl-5-5's "bl": really
``arachne_w_reptran`` with I_pos = a sample of |I_neg| correct inputs; ``pos_sample = "n_neg"``, the runner draws
the sample with :func:`sample_correct_inputs`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import (FFNPass, SetLocalizer, acc_zeros, array_split_sizes)
from vitfl.localization.methods.arachne import BL, ArachneW
from vitfl.localization.methods.ours import Ours

__all__ = ["EPS", "REPTRAN_BATCH", "ReptranSums", "reptran_sums", "sample_correct_inputs", "ReptranGLFI",
           "GradLossReptran", "ForwardImpactReptran", "ArachneWReptran", "BLReptran", "OursReptran", "BLFL5"]

from vitfl.localization.methods._reptran import EPS, REPTRAN_BATCH, ReptranSums, reptran_sums  # noqa: E402,F401


def sample_correct_inputs(pos_indices: Sequence[int] | np.ndarray | Tensor, n: int, seed: int) -> np.ndarray:
    """exp-fl-5-5's I_pos: ``n`` (= |I_neg|) sample indices drawn without replacement from the correct inputs
    ``pos_indices`` with ``np.random.default_rng(seed)``, returned in ascending order (the order the compat
    batching feeds I_pos); all of them when n >= their number (as the published ``sample_from_correct_samples``).

    The published draw was ``np.random.choice`` without a seed, so its sample cannot be replayed; this one is
    seeded (record the seed)."""
    pool = np.asarray(torch.as_tensor(pos_indices).cpu().numpy() if isinstance(pos_indices, Tensor) else pos_indices,
                      dtype=np.int64).reshape(-1)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n (the sample size, |I_neg|) must be a non-negative int, got {n!r}")
    if len(np.unique(pool)) != len(pool):
        raise ValueError("pos_indices holds repeated sample indices")
    if n >= len(pool):
        return np.sort(pool)
    return np.sort(np.random.default_rng(int(seed)).choice(pool, int(n), replace=False))


class ReptranGLFI:
    """Mixin replacing :class:`GLFILocalizer`'s GL / FI by the published variant (see the module docstring).
    Put it *before* the method class: ``class X(ReptranGLFI, ArachneW)``."""

    batching = REPTRAN_BATCH
    norm_eps = EPS
    #: the published sums this method needs ("gl", "fi"): states and work only for those
    reptran_kinds: tuple[str, ...] = ("gl", "fi")

    def _set_batch_size(self, batch_size: int) -> None:
        array_split_sizes(1, batch_size)  # a clear error unless a positive int
        self.batching = int(batch_size)

    def _init_glfi(self) -> None:
        for s in self.sides:
            for kind in self.reptran_kinds:
                self.add_state(f"r{kind}_{s}", acc_zeros(self.index.total), dist_reduce_fx="sum")
            self.add_state(f"batches_{s}", acc_zeros(), dist_reduce_fx="sum")

    def _accumulate(self, side: str, x: Tensor, label: Tensor, batches: list[int] | None = None) -> None:
        r = reptran_sums(self.head, x, label, batches or array_split_sizes(x.shape[0], self.batching),
                         fi="fi" in self.reptran_kinds, gl="gl" in self.reptran_kinds)
        for kind in self.reptran_kinds:
            self.add_weights(getattr(self, f"r{kind}_{side}"), getattr(r, f"{kind}_bef"), getattr(r, f"{kind}_aft"))
        getattr(self, f"batches_{side}").add_(r.n_batches)
        self._acc_more(side, FFNPass(h=r.h, a=r.a), label)

    def _acc_more(self, side: str, p: FFNPass, label: Tensor) -> None:
        """Extra states of a composite (ours: activation moments)."""

    def _reptran_value(self, kind: str) -> Tensor:
        def mean(side: str) -> Tensor:
            self.require(side)
            v = getattr(self, f"r{kind}_{side}") / getattr(self, f"batches_{side}")  # fresh: edited in place
            if kind == "fi":  # FI_b = W * (sums without W)
                w_bef, w_aft = self.index.split(v)
                w_bef.mul_(self.head.fc_bef.weight.detach().to(v))
                w_aft.mul_(self.head.fc_aft.weight.detach().to(v))
            return v

        v = mean("neg")
        return v.div_(mean("pos").add_(1.0)) if self.two_sided else v

    def gl_fi(self) -> tuple[Tensor, Tensor]:
        return self._reptran_value("gl"), self._reptran_value("fi")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "reptran_compat": True, "batch_size": self.batching,
                "batching": "np.array_split(S, ceil(|S| / batch_size))", "norm_eps": self.norm_eps}


class _ReptranSingle(ReptranGLFI, SetLocalizer):
    level = "weight"
    kind = "gl"

    @property
    def reptran_kinds(self) -> tuple[str, ...]:  # GL alone or FI alone
        return (self.kind,)

    def __init__(self, head: FFNHead, seed: int = 0, batch_size: int = REPTRAN_BATCH, two_sided: bool = True,
                 **kwargs: Any):
        self._set_batch_size(batch_size)
        self.two_sided = bool(two_sided)
        super().__init__(head, seed=seed, sides=("neg", "pos") if two_sided else ("neg",), **kwargs)
        self._init_glfi()

    def compute(self) -> Tensor:
        return self._reptran_value(self.kind)

    def options(self) -> dict[str, Any]:
        return {"reptran_compat": True, "batch_size": self.batching,
                "batching": "np.array_split(S, ceil(|S| / batch_size))", "two_sided": self.two_sided}


@register_localizer("grad_loss_reptran")
class GradLossReptran(_ReptranSingle):
    """Published GL (calculate_bi_fi "bw"): mean over 32-row parts of the part-mean loss gradient, signed;
    two-sided GL(I_neg) / (1 + GL(I_pos)), ``[2 d d_ff]``."""

    kind = "gl"


@register_localizer("forward_impact_reptran")
class ForwardImpactReptran(_ReptranSingle):
    """Published FI (calculate_bi_fi "fw"): mean over 32-row parts of (signed part-mean front) x (per-weight
    gradient of summed logits); two-sided, ``[2 d d_ff]``."""

    kind = "fi"


@register_localizer("arachne_w_reptran")
class ArachneWReptran(ReptranGLFI, ArachneW):
    """ArachneW as published (exp-repair-4-1-2): (1 - p) minmax'(GL) + p minmax'(FI) on the published GL / FI,
    minmax' = (v - min) / (max - min + 1e-8), ``[2 d d_ff]``."""

    def __init__(self, head: FFNHead, seed: int = 0, batch_size: int = REPTRAN_BATCH, p: float = 0.5,
                 two_sided: bool = True, norm_eps: float = EPS, **kwargs: Any):
        self._set_batch_size(batch_size)
        self.norm_eps = float(norm_eps)
        super().__init__(head, seed=seed, p=p, two_sided=two_sided, **kwargs)


@register_localizer("bl_reptran")
class BLReptran(ReptranGLFI, BL):
    """BL (approximate_pareto_front, identical points all kept) on the published GL / FI, ``[2 d d_ff]``."""

    def __init__(self, head: FFNHead, seed: int = 0, batch_size: int = REPTRAN_BATCH, keep_identical: bool = True,
                 two_sided: bool = True, **kwargs: Any):
        self._set_batch_size(batch_size)
        super().__init__(head, seed=seed, keep_identical=keep_identical, two_sided=two_sided, **kwargs)


@register_localizer("ours_reptran")
class OursReptran(ReptranGLFI, Ours):
    """Ours as published (exp-repair-4-1-1): NS_j x published GL / FI, minmax' with + 1e-8, the correct side's
    V-score (|cov| sum) over the true label's correct inputs, ``[2 d d_ff]``."""

    def __init__(self, head: FFNHead, seed: int = 0, batch_size: int = REPTRAN_BATCH, p: float = 0.5,
                 true_label: int | None = None, vscore: str = "abs_sum", norm_eps: float = EPS, **kwargs: Any):
        self._set_batch_size(batch_size)
        self.norm_eps = float(norm_eps)
        super().__init__(head, seed=seed, p=p, true_label=true_label, vscore=vscore, **kwargs)

    def _acc_more(self, side: str, p: FFNPass, label: Tensor) -> None:
        self._acc_v(side, p, label)


@register_localizer("bl_fl5")
class BLFL5(ArachneWReptran):
    """exp-fl-5-5's "bl": not a Pareto front but ``arachne_w_reptran`` (weighted top-n, p = 0.5) with I_pos = a
    seeded sample of |I_neg| correct inputs (``pos_sample = "n_neg"``), ``[2 d d_ff]``."""

    pos_sample = "n_neg"

    def options(self) -> dict[str, Any]:
        return {**super().options(), "pos_sample": "n_neg (seeded sample of |I_neg| correct inputs)"}
