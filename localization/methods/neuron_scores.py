"""Neuron scores from the activations alone (docs/methods.md): V-score difference, mean activation, and their
product NeuronScore. a_j(x) is the post-GELU activation of intermediate neuron j at the CLS token, ``[B, d_ff]``
(on a token head: the head's token statistic of the per-token activations, ``_common.per_input``).

    V_j(I)     = Var(a_j) + sum_{k != j} |Cov(a_j, a_k)| = sum_k |Cov(a_j, a_k)|   (sample covariance, ddof = 1)
                 (``vscore=``: the published variants "abs_mean", "signed_mean", "signed_sum",
                 :data:`VSCORE_VARIANTS`)
    vdiff_j    = minmax(|V_j(I_pos) - V_j(I_neg)|)
    mean_act_j = minmax(mean_{x in I_neg} a_j(x))                                    (MisAct)
    NeuronScore_j = vdiff_j * mean_act_j                                              (vdiff_x_mean_act)

States per set (summed across processes, float64): count n (of the rows that entered the moments),
sum_x a(x) ``[d_ff]`` and sum_x a(x) a(x)^T
``[d_ff, d_ff]``; then Cov = (sum a a^T - n mu mu^T) / (n - 1) with mu = sum a / n. A set needs >= 2 inputs for
the covariance (fewer: a clear error).

A batch's sum a a^T (:func:`add_second_moment_`) is formed around the batch mean K, which removes the
cancellation that makes raw float32 moments inaccurate: sum a a^T = C + s K^T + K s^T + b K K^T with c = a - K,
C = c^T c (a matmul in a's dtype: float32 activations at float32 speed) and s = sum c, added in float64. The
covariance then carries float32 rounding relative to the *covariance* (not to the raw second moment); float64
activations are handled in float64 throughout.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import FFNPass, SetLocalizer, acc_zeros, ffn_pass
from vitfl.localization.ranking import minmax

__all__ = ["VSCORE_VARIANTS", "check_vscore", "v_score", "v_score_from_moments", "second_moment",
           "add_second_moment_", "vdiff", "mean_act", "VStates",
           "VDiff", "MeanAct", "NeuronScore"]


#: V-score variants (the published ``get_vscore(abs, covavg)`` of RepTran's ``src/utils/vit_util.py``), with
#: C = the sample covariance of the activations (ddof = 1) and D = d_ff:
#:   "abs_sum"     V_j = Var(a_j) + sum_{k != j} |C_jk|                 (default; abs=True,  covavg=False)
#:   "abs_mean"    V_j = Var(a_j) + sum_{k != j} |C_jk| / (D - 1)       (abs=True,  covavg=True)
#:   "signed_mean" V_j = Var(a_j) + sum_{k != j} C_jk / (D - 1)         (abs=False, covavg=True; exp-fl-5's vit_util)
#:   "signed_sum"  V_j = Var(a_j) + sum_{k != j} C_jk                   (abs=False, covavg=False)
VSCORE_VARIANTS = ("abs_sum", "abs_mean", "signed_mean", "signed_sum")


def check_vscore(vscore: str) -> str:
    if vscore not in VSCORE_VARIANTS:
        raise ValueError(f"vscore must be one of {VSCORE_VARIANTS}, got {vscore!r}")
    return vscore


#: rows of the centred second moment formed at a time by :func:`v_score_from_moments` (3 MB float64 bands at
#: d_ff = 3072)
V_BAND_ROWS = 128


def v_score_from_moments(n: int, act_sum: Tensor, act_outer: Tensor, vscore: str = "abs_sum") -> Tensor:
    """V_j from n, sum a ``[d_ff]`` and sum a a^T ``[d_ff, d_ff]`` (float64), ``[d_ff]``; ``vscore`` picks the
    variant (:data:`VSCORE_VARIANTS`; default V_j = sum_k |Cov(a_j, a_k)|)."""
    check_vscore(vscore)
    if n < 2:
        raise ValueError(f"the V-score needs a sample covariance (ddof=1), so at least 2 inputs; got {n}")
    s1 = act_sum.double()
    outer = act_outer.double()
    d_ff = outer.shape[0]
    # (n - 1) Cov = sum a a^T - s s^T / n, formed in bands of V_BAND_ROWS rows (each band's row sums and diagonal
    # taken at once), so no second [d_ff, d_ff] float64 tensor is allocated (75 MB at d_ff = 3072); the same
    # element-wise arithmetic and whole-row sums as one full pass, so the same values
    rows = torch.empty(d_ff, dtype=torch.float64, device=outer.device)
    var = torch.empty(d_ff, dtype=torch.float64, device=outer.device)
    absolute = vscore.startswith("abs")
    for i in range(0, d_ff, V_BAND_ROWS):
        j = min(d_ff, i + V_BAND_ROWS)
        band = torch.addr(outer[i:j], s1[i:j], s1, alpha=-1.0 / n)
        var[i:j] = torch.diagonal(band[:, i:j])
        rows[i:j] = (band.abs_() if absolute else band).sum(1)
    if vscore == "abs_sum":
        return rows / (n - 1)
    if absolute:
        var = var.abs()  # a variance is >= 0; its rounding may not be
    others = rows - var
    if vscore.endswith("mean"):
        others = others / (d_ff - 1) if d_ff > 1 else torch.zeros_like(others)
    return (var + others) / (n - 1)


def add_second_moment_(state: Tensor, a: Tensor, sum_into: Tensor | None = None) -> Tensor:
    """state += sum_x a(x) a(x)^T in place (``state [d_ff, d_ff]`` float64, ``a [B, d_ff]``), centred around the
    batch mean K: sum a a^T = c^T c + u K^T + K u^T with c = a - K, u = sum c + (B / 2) K. c^T c is a matmul in
    a's dtype (its blocks on and above the diagonal only); u K^T + K u^T is one in-place float64 rank-2 update (no
    [d_ff, d_ff] temporaries besides the blocks of c^T c). ``sum_into`` (float64 ``[d_ff]``): sum_x a(x) = B K +
    sum c is added into it (the batch's sum of the centred rows in a's dtype, like the product)."""
    if a.dtype == torch.float64:
        if sum_into is not None:
            sum_into += a.sum(0)
        return state.addmm_(a.t(), a)
    k = a.mean(0)  # the shift, exactly representable in float64
    c = a - k
    k64 = k.to(state)
    sc = c.sum(0).to(state)  # ~0: the rounding of the mean
    if sum_into is not None:
        sum_into += a.shape[0] * k64 + sc.to(sum_into)
    u = sc + 0.5 * a.shape[0] * k64
    _add_gram_(state, c)  # float32 products, accumulated in float64
    # u K^T + K u^T as one rank-2 product (one float64 pass over the state)
    return state.addmm_(torch.stack([u, k64], 1), torch.stack([k64, u], 0))


#: c^T c is symmetric: above this width it is formed in GRAM_BLOCKS x GRAM_BLOCKS blocks, the upper ones only
#: (each added with its transpose), (nb + 1) / (2 nb) of the full product's MACs
GRAM_BLOCKS, GRAM_MIN_WIDTH = 4, 1024


def _add_gram_(state: Tensor, c: Tensor) -> None:
    """state += c^T c (``state [D, D]``, ``c [B, D]``), computing only the blocks on and above the diagonal."""
    D = c.shape[1]
    if D < GRAM_MIN_WIDTH:
        state += c.t() @ c
        return
    step = -(-D // GRAM_BLOCKS)
    for i in range(0, D, step):
        ci = c[:, i:i + step].t()
        for j in range(i, D, step):
            blk = ci @ c[:, j:j + step]
            state[i:i + step, j:j + step] += blk
            if j != i:
                state[j:j + step, i:i + step] += blk.t()


def second_moment(a: Tensor) -> Tensor:
    """sum_x a(x) a(x)^T, ``[d_ff, d_ff]`` float64, for ``a [B, d_ff]`` (centred product, see the module doc)."""
    return add_second_moment_(torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device), a)


def v_score(a: Tensor, vscore: str = "abs_sum") -> Tensor:
    """V-score of every neuron over the rows of ``a [n, d_ff]`` (float64), ``[d_ff]``."""
    a = a.double()
    return v_score_from_moments(a.shape[0], a.sum(0), a.t() @ a, vscore)


def vdiff(v_pos: Tensor, v_neg: Tensor) -> Tensor:
    """minmax(|V(I_pos) - V(I_neg)|), ``[d_ff]``."""
    return minmax((v_pos - v_neg).abs())


def mean_act(act_sum_neg: Tensor, n_neg: int) -> Tensor:
    """minmax(mean over I_neg of a_j), ``[d_ff]``."""
    if n_neg < 1:
        raise ValueError("mean_act needs at least one I_neg input")
    return minmax(act_sum_neg.double() / n_neg)


class VStates:
    """Mixin for a :class:`SetLocalizer`: states ``act_n_{side}`` (count), ``act_sum_{side}`` ``[d_ff]`` and
    (``outer=True``) ``act_outer_{side}`` ``[d_ff, d_ff]``, float64, for the sides in ``v_sides``.

    ``v_pos_label``: when not None, the I_pos moments take only the I_pos rows whose label equals it (``ours``'
    label-specific correct set); I_neg always takes all its rows. ``vscore``: the V-score variant
    (:data:`VSCORE_VARIANTS`)."""

    def _init_v(self, v_sides: tuple[str, ...], outer: bool, v_pos_label: int | None = None,
                vscore: str = "abs_sum") -> None:
        self.v_sides, self.v_outer = tuple(v_sides), outer
        self.v_pos_label = None if v_pos_label is None else int(v_pos_label)
        self.vscore = check_vscore(vscore)
        d_ff = self.head.d_ff
        for s in self.v_sides:
            self.add_state(f"act_n_{s}", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"act_sum_{s}", torch.zeros(d_ff, dtype=torch.float64), dist_reduce_fx="sum")
            if outer:
                self.add_state(f"act_outer_{s}", acc_zeros(d_ff, d_ff),
                               dist_reduce_fx="sum")

    def _acc_v(self, side: str, p: FFNPass, label: Tensor | None = None) -> None:
        if side not in self.v_sides:
            return
        a = p.a
        if side == "pos" and self.v_pos_label is not None:
            if label is None:  # pragma: no cover - internal misuse
                raise RuntimeError("the label-specific V-score needs the batch's labels")
            a = a[label == self.v_pos_label]
            if a.shape[0] == 0:
                return
        getattr(self, f"act_n_{side}").add_(a.shape[0])
        act_sum = getattr(self, f"act_sum_{side}")
        if self.v_outer:  # the sum comes with the second moment (from the same centred rows)
            state = getattr(self, f"act_outer_{side}")
            add_second_moment_(state, a.to(state.device), sum_into=act_sum)
        else:
            self.add_to(act_sum, a.sum(0, dtype=torch.float64))

    def _v_score(self, side: str) -> Tensor:
        n = int(getattr(self, f"act_n_{side}").item())
        if n < 2:
            if side == "pos" and self.v_pos_label is not None:
                raise ValueError(f"FL method {self.name!r} needs at least 2 I_pos inputs of the true label "
                                 f"{self.v_pos_label} (the V-score's sample covariance); got {n}")
            self.require(side, 2, why="(the V-score's sample covariance needs >= 2)")
        return v_score_from_moments(n, getattr(self, f"act_sum_{side}"), getattr(self, f"act_outer_{side}"),
                                    self.vscore)

    def _vdiff(self) -> Tensor:
        return vdiff(self._v_score("pos"), self._v_score("neg"))

    def _mean_act(self) -> Tensor:
        return mean_act(self.act_sum_neg, self.require("neg"))

    def _neuron_score(self) -> Tensor:
        """NeuronScore = vdiff * mean_act, ``[d_ff]``."""
        return self._vdiff() * self._mean_act()


class _ActivationLocalizer(VStates, SetLocalizer):
    level = "neuron"
    _sides: tuple[str, ...] = ("neg", "pos")
    _outer = True

    def __init__(self, head: FFNHead, seed: int = 0, vscore: str = "abs_sum", **kwargs: Any):
        super().__init__(head, seed=seed, sides=self._sides, **kwargs)
        self._init_v(self._sides, outer=self._outer, vscore=vscore)

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        self._acc_v(side, ffn_pass(self.head, x), label)

    def options(self) -> dict[str, Any]:
        return {"vscore": self.vscore} if self._outer else {}


@register_localizer("vdiff")
class VDiff(_ActivationLocalizer):
    """vdiff_j = minmax(|V_j(I_pos) - V_j(I_neg)|), ``[d_ff]``; both sets need >= 2 inputs."""

    def compute(self) -> Tensor:
        return self._vdiff()


@register_localizer("mean_act")
class MeanAct(_ActivationLocalizer):
    """mean_act_j = minmax(mean over I_neg of a_j) (MisAct), ``[d_ff]``; uses I_neg only."""

    _sides = ("neg",)
    _outer = False

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        super().__init__(head, seed=seed, **kwargs)

    def compute(self) -> Tensor:
        return self._mean_act()


@register_localizer("vdiff_x_mean_act")
class NeuronScore(_ActivationLocalizer):
    """NeuronScore_j = vdiff_j * mean_act_j, ``[d_ff]``."""

    def compute(self) -> Tensor:
        return self._neuron_score()
