"""Forward impact (FI, Arachne; docs/methods.md).

For weight w_ij from input i to output neuron j of a layer (PyTorch stores it as ``W[j, i]``)::

    front_ij = mean_x |o_i(x) w_ij| / sum_k |o_k(x) w_kj|
    back_j   = mean_x |dO(x)/dn_j| / sum_l |dO(x)/dn_l|          O = sum of the logits (not softmax)
    FI_ij    = front_ij * back_j
    one-sided (forward_impact): FI(I_neg);  two-sided (forward_impact_2s): FI(I_neg) / (1 + FI(I_pos))

with o the layer's input and n its output after its activation, as in Arachne's Keras layers:

* W_bef ``[d_ff, d]``: o = LN(x) ``[B, d]``, n = the post-GELU activation a ``[B, d_ff]``;
* W_aft ``[d, d_ff]``: o = a, n = W_aft a + b_aft ``[B, d]``, the FFN output *before* LayerScale (timm ``ls2``,
  absent in HF ViT) and before the residual add. LayerScale is not part of the layer W_aft belongs to, so n is
  taken before it (dO/dn then carries the LayerScale factor).

No per-input per-weight tensor is built: front_ij = |w_ij| * (1/n) sum_x |o_i(x)| / D_j(x) with
D = |O| @ |W|^T ``[B, out]``, so the sum over x is the matmul (1/D)^T @ |O| ``[out, in]``. The states are
S = sum_x |o_i(x)| / D_j(x) (per weight) and sum_x |g_j(x)| / sum_l |g_l(x)| (per output neuron), per set,
float64;
an input whose denominator is 0 (all o or all g zero) contributes 0.

On a token head (states ``[N, T, d]``) o and the per-input gradients are the head's token statistic of the per-token
tensors (``_common.per_input``: the CLS token for token pooling, the mean over the pooled tokens for average
pooling), each reduced as it is (signed); docs/methods.md, section 1.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import FFNPass, SetLocalizer, acc_zeros, ffn_pass

__all__ = ["fi_front_sum", "fi_back_sum", "forward_impact_from_sums", "forward_impact", "FIStates",
           "ForwardImpact", "ForwardImpactTwoSided"]


def _safe_reciprocal(t: Tensor, inplace: bool = False) -> Tensor:
    """1 / t where t > 0, else 0 (t >= 0 here: sums of absolute values); ``inplace``: t is overwritten."""
    zero = t <= 0
    r = t.reciprocal_() if inplace else t.reciprocal()
    return r.masked_fill_(zero, 0.0)


def fi_front_sum(weight: Tensor, o: Tensor, abs_weight: Tensor | None = None) -> Tensor:
    """S_ji = sum_x |o_i(x)| / sum_k |o_k(x) w_jk|, ``[out, in]`` for ``weight [out, in]`` and ``o [B, in]``
    (``abs_weight``: |weight| when the caller holds it)."""
    ao = o.abs()
    denom = ao @ (weight.abs() if abs_weight is None else abs_weight).t()  # [B, out]
    return _safe_reciprocal(denom, inplace=True).t() @ ao


def fi_back_sum(g: Tensor) -> Tensor:
    """sum_x |g_j(x)| / sum_l |g_l(x)|, ``[out]`` for per-input gradients ``g [B, out]``."""
    ag = g.abs()
    return (ag * _safe_reciprocal(ag.sum(1, keepdim=True))).sum(0)


def forward_impact_from_sums(weight: Tensor, front_sum: Tensor, back_sum: Tensor, n: int,
                             out: Tensor | None = None) -> Tensor:
    """FI_ji = |w_ji| front_sum_ji / n * back_sum_j / n, ``[out, in]`` (written into ``out`` when given)."""
    return torch.mul(weight.abs(), front_sum, out=out).mul_((back_sum / (n * n)).unsqueeze(1))


def forward_impact(head: FFNHead, x: Tensor) -> tuple[Tensor, Tensor]:
    """FI of W_bef ``[d_ff, d]`` and W_aft ``[d, d_ff]`` over the rows of ``x [B, d]`` (one set)."""
    p = ffn_pass(head, x, back=True)
    w_bef, w_aft = head.fc_bef.weight.detach(), head.fc_aft.weight.detach()
    n = x.shape[0]
    return (forward_impact_from_sums(w_bef, fi_front_sum(w_bef, p.h), fi_back_sum(p.back_a), n),
            forward_impact_from_sums(w_aft, fi_front_sum(w_aft, p.a), fi_back_sum(p.back_n), n))


class FIStates:
    """Mixin for a :class:`SetLocalizer`: states ``fi_front_{side}`` ``[2 d d_ff]`` (S over the global weight
    index) and ``fi_back_{side}`` ``[d_ff + d]`` (back sums of W_bef's outputs a, then W_aft's outputs n)."""

    def _init_fi(self) -> None:
        for s in self.sides:
            self.add_state(f"fi_front_{s}", acc_zeros(self.index.total), dist_reduce_fx="sum")
            self.add_state(f"fi_back_{s}", acc_zeros(self.head.d_ff + self.head.d), dist_reduce_fx="sum")

    def _abs_weights(self) -> tuple[Tensor, Tensor]:
        """|W_bef|, |W_aft|, kept while neither weight tensor changes (its storage and version counter)."""
        ws = [w.detach() for w in (self.head.fc_bef.weight, self.head.fc_aft.weight)]
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
        cached = getattr(self, "_abs_w_cache", None)
        if cached is None or cached[0] != key:
            cached = self._abs_w_cache = (key, tuple(w.abs() for w in ws))
        return cached[1]

    def _acc_fi(self, side: str, p: FFNPass) -> None:
        w_bef, w_aft = self.head.fc_bef.weight.detach(), self.head.fc_aft.weight.detach()
        abs_bef, abs_aft = self._abs_weights()
        self.add_weights(getattr(self, f"fi_front_{side}"), fi_front_sum(w_bef, p.h, abs_bef),
                         fi_front_sum(w_aft, p.a, abs_aft))
        back = getattr(self, f"fi_back_{side}")
        self.add_to(back[: self.head.d_ff], fi_back_sum(p.back_a))
        self.add_to(back[self.head.d_ff:], fi_back_sum(p.back_n))

    def _fi_side(self, side: str) -> Tensor:
        n = self.require(side)
        front = getattr(self, f"fi_front_{side}")
        back = getattr(self, f"fi_back_{side}")
        w_bef, w_aft = (w.detach().to(front) for w in self.head.weights())
        f_bef, f_aft = self.index.split(front)
        d_ff = self.head.d_ff
        fi = torch.empty_like(front)  # both matrices written in place into one flat vector (no concatenation)
        o_bef, o_aft = self.index.split(fi)
        forward_impact_from_sums(w_bef, f_bef, back[:d_ff], n, out=o_bef)
        forward_impact_from_sums(w_aft, f_aft, back[d_ff:], n, out=o_aft)
        return fi

    def _fi_value(self, two_sided: bool) -> Tensor:
        """FI(I_neg) or FI(I_neg) / (1 + FI(I_pos)), ``[2 d d_ff]``."""
        fi = self._fi_side("neg")
        if two_sided:
            self.require("pos", why="for the two-sided FI(I_neg) / (1 + FI(I_pos))")
            fi = fi.div_(self._fi_side("pos").add_(1.0))
        return fi


@register_localizer("forward_impact")
class ForwardImpact(FIStates, SetLocalizer):
    """One-sided FI on I_neg: score(w_ij) = front_ij * back_j over I_neg, ``[2 d d_ff]``."""

    level = "weight"
    two_sided = False

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        super().__init__(head, seed=seed, sides=("neg", "pos") if self.two_sided else ("neg",), **kwargs)
        self._init_fi()

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        self._acc_fi(side, ffn_pass(self.head, x, back=True))

    def compute(self) -> Tensor:
        return self._fi_value(self.two_sided)

    def options(self) -> dict[str, Any]:
        return {"two_sided": self.two_sided, "sets": "I_neg, I_pos" if self.two_sided else "I_neg",
                "n_aft": "before LayerScale"}


@register_localizer("forward_impact_2s")
class ForwardImpactTwoSided(ForwardImpact):
    """Two-sided FI: score = FI(I_neg) / (1 + FI(I_pos)), ``[2 d d_ff]``."""

    two_sided = True
