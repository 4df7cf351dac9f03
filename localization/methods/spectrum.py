"""DeepFault-style spectrum-based FL on the intermediate neurons (docs/methods.md; a cheap extra).

A neuron j is *activated* by input x when a_j(x) > 0 (post-GELU; on a token head a_j(x) is the head's token
statistic of the per-token activations, ``_common.per_input``). Failing inputs are I_neg (F of them), passing
ones I_pos (P of them). Per neuron: e_f = #failing inputs activating it, n_f = F - e_f, e_p = #passing inputs
activating it, n_p = P - e_p. Scores ``[d_ff]``::

    tarantula = (e_f / F) / (e_f / F + e_p / P)        0 where e_f = e_p = 0
    ochiai    = e_f / sqrt(F (e_f + e_p))              0 where e_f + e_p = 0
    dstar     = e_f^* / (e_p + n_f)    (* = 2)         where e_p + n_f = 0 (every failing and no passing input
                                                        activates j): F^* + 1, above every finite value

States (summed across processes): e_f, e_p ``[d_ff]`` and the counts F, P. Both sets must be non-empty.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import SetLocalizer, ffn_pass

__all__ = ["tarantula", "ochiai", "dstar", "Tarantula", "Ochiai", "DStar"]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def tarantula(e_f: Tensor, e_p: Tensor, n_fail: int, n_pass: int) -> Tensor:
    """(e_f / F) / (e_f / F + e_p / P), ``[d_ff]`` float64."""
    rf, rp = e_f.double() / n_fail, e_p.double() / n_pass
    return _ratio(rf, rf + rp)


def ochiai(e_f: Tensor, e_p: Tensor, n_fail: int) -> Tensor:
    """e_f / sqrt(F (e_f + e_p)), ``[d_ff]`` float64."""
    e_f, e_p = e_f.double(), e_p.double()
    return _ratio(e_f, torch.sqrt(n_fail * (e_f + e_p)))


def dstar(e_f: Tensor, e_p: Tensor, n_fail: int, star: float = 2.0) -> Tensor:
    """e_f^star / (e_p + n_f), ``[d_ff]`` float64; a zero denominator gives F^star + 1."""
    e_f, e_p = e_f.double(), e_p.double()
    den = e_p + (n_fail - e_f)
    return torch.where(den > 0, _ratio(e_f ** star, den), torch.full_like(e_f, float(n_fail) ** star + 1.0))


class _Spectrum(SetLocalizer):
    level = "neuron"

    def __init__(self, head: FFNHead, seed: int = 0, **kwargs: Any):
        super().__init__(head, seed=seed, sides=("neg", "pos"), **kwargs)
        for s in self.sides:
            self.add_state(f"activated_{s}", torch.zeros(head.d_ff, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        self.add_to(getattr(self, f"activated_{side}"), (ffn_pass(self.head, x).a > 0).sum(0))

    def _spectrum(self) -> tuple[Tensor, Tensor, int, int]:
        n_fail = self.require("neg")
        n_pass = self.require("pos", why="(a spectrum compares failing with passing inputs)")
        return self.activated_neg, self.activated_pos, n_fail, n_pass

    def options(self) -> dict[str, Any]:
        return {"activated": "a_j > 0"}


@register_localizer("tarantula")
class Tarantula(_Spectrum):
    """Tarantula on neurons, ``[d_ff]``."""

    def compute(self) -> Tensor:
        e_f, e_p, nf, np_ = self._spectrum()
        return tarantula(e_f, e_p, nf, np_)


@register_localizer("ochiai")
class Ochiai(_Spectrum):
    """Ochiai on neurons, ``[d_ff]``."""

    def compute(self) -> Tensor:
        e_f, e_p, nf, _ = self._spectrum()
        return ochiai(e_f, e_p, nf)


@register_localizer("dstar")
class DStar(_Spectrum):
    """D* (star = 2 by default) on neurons, ``[d_ff]``."""

    def __init__(self, head: FFNHead, seed: int = 0, star: float = 2.0, **kwargs: Any):
        self.star = float(star)
        super().__init__(head, seed=seed, **kwargs)

    def compute(self) -> Tensor:
        e_f, e_p, nf, _ = self._spectrum()
        return dstar(e_f, e_p, nf, self.star)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "star": self.star}
