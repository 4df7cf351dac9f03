"""Knowledge-neuron integrated gradients (IG; Dai et al.; docs/methods.md), on the intermediate neurons.

    Attr_j(x) = a_j(x) / m * sum_{k=0}^{m-1} dP(y | x, (k/m) a(x)) / da_j          m = 20

P the softmax probability of the label y given the residual stream x and the (scaled) activation, computed by
``head.from_activation(x, (k/m) a(x))``: zero baseline, the whole layer scaled at once, left Riemann sum
(k = 0..m-1) as the knowledge-neurons paper's code.
``times_activation=False``: RepTran's ``src/exp-fl-2-1.py`` (its ``scaled_input`` steps k/m, k = 0..m-1, and
the score is the bare gradient sum, without the a_j / m factor). ``riemann="linspace"``: EleutherAI's
knowledge-neurons package (``knowledge_neurons/knowledge_neurons.py``,
``scaled_input``: ``torch.linspace(0, 1, steps)``), scales k / (m - 1), k = 0..m-1 (1 included, 0 too), still
times a_j / m.
``target="logit"`` attributes the label's logit instead of its probability.

Selection:

* ``selection="mean"`` (default, exp-fl-2): score_j = mean over the set of Attr_j(x), ``[d_ff]``; rank, top X.
* ``selection="paper"``: per input keep neurons with Attr_j(x) >= t max_k Attr_k(x) (t = 0.2); keep neurons kept
  by >= p of the inputs (p = 0.7), moving p by 0.05 (up while more than 5 neurons are kept, down while fewer
  than 2) until 2-5 neurons remain. If p would leave [0.05, 1] or turn back, it stops at the last p with more
  than 5 neurons (or at 0.05 / 1.0). score_j = the share of inputs keeping j; :meth:`own_selection` = the set
  (budget ``"front"``).

The set is I_neg by default (``on="neg"``; ``"pos"``: I_pos, ``"all"``: both, exp-fl-2's "all data"), y = the
true label. States (summed across processes): sum_x Attr(x) (float64), per-neuron keep counts, input count.
The m scaled copies are batched: one forward/backward over ``m * b`` rows, at most ``max_rows`` rows at a time.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitfl.localization.base import register_localizer
from vitfl.localization.ffn import FFNHead
from vitfl.localization.methods._common import SetLocalizer

__all__ = ["RIEMANN", "ig_alphas", "ig_attributions", "paper_selection", "IntegratedGradients"]


RIEMANN = ("left", "linspace")


def ig_alphas(m: int, riemann: str = "left", dtype=torch.float64, device=None) -> Tensor:
    """The m scale factors: k / m, k = 0..m-1 (``"left"``), or ``linspace(0, 1, m)`` = k / (m - 1)
    (``"linspace"``, EleutherAI's knowledge-neurons ``scaled_input``; m = 1 gives [0])."""
    if riemann not in RIEMANN:
        raise ValueError(f"riemann must be one of {RIEMANN}, got {riemann!r}")
    if riemann == "left":
        return torch.arange(m, dtype=dtype, device=device) / m
    return torch.linspace(0.0, 1.0, m, dtype=dtype, device=device)


def ig_attributions(head: FFNHead, x: Tensor, label: Tensor, m: int = 20, target: str = "prob",
                    max_rows: int = 8192, riemann: str = "left", times_activation: bool = True) -> Tensor:
    """Attr(x) ``[B, d_ff]`` for ``x [B, d]`` (a token head: ``x [B, T, d]``, the per-token attributions summed
    over the tokens, :func:`_token_ig`), ``label [B]`` (zero baseline, m steps; left Riemann or
    ``riemann="linspace"``), Attr_j = a_j / m * sum_k dP/da_j at alpha_k a (``times_activation=False``: the bare
    sum_k dP/da_j, as RepTran's exp-fl-2-1)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if target not in ("prob", "logit"):
        raise ValueError(f"target must be 'prob' or 'logit', got {target!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("IG needs autograd, but torch.inference_mode() is on: run the Trainer with "
                           "inference_mode=False")
    with torch.no_grad():
        a = head.activation(x)
    if head.token_axis:
        return _token_ig(head, x, a, label, m, target, max_rows, riemann, times_activation)
    out = torch.empty_like(a)
    chunk = max(1, max_rows // m)
    alphas = ig_alphas(m, riemann, dtype=a.dtype, device=a.device)
    for s in range(0, x.shape[0], chunk):
        xa, aa, ya = x[s:s + chunk], a[s:s + chunk], label[s:s + chunk]
        b = xa.shape[0]
        with torch.enable_grad():
            scaled = (alphas.view(m, 1, 1) * aa.unsqueeze(0)).reshape(m * b, -1).requires_grad_(True)
            logits = head.from_activation(xa.repeat(m, 1), scaled)  # row k*b + i = input i at step k
            if target == "prob":
                logits = torch.softmax(logits, dim=-1)
            t = logits.gather(1, ya.repeat(m).view(-1, 1)).sum()
            (g,) = torch.autograd.grad(t, scaled)
        gs = g.view(m, b, -1).sum(0)
        out[s:s + b] = aa * gs / m if times_activation else gs
    return out


def _token_ig(head: FFNHead, x: Tensor, a: Tensor, label: Tensor, m: int, target: str, max_rows: int,
              riemann: str, times_activation: bool) -> Tensor:
    """:func:`ig_attributions` on a token head (``x [B, T, d]``, ``a [B, T, d_ff]``): the whole layer (every
    token) is scaled at once, the per-token attributions a_tj / m sum_k dP/da_tj are summed over the tokens (IG is
    additive, so this is neuron j's attribution as one feature over all tokens; the sum over j keeps IG's
    completeness); ``times_activation=False``: sum_t sum_k dP/da_tj. ``max_rows`` counts inputs x steps."""
    b_all, t_len, d_ff = a.shape
    out = torch.empty(b_all, d_ff, dtype=a.dtype, device=a.device)
    chunk = max(1, max_rows // m)
    alphas = ig_alphas(m, riemann, dtype=a.dtype, device=a.device)
    for s in range(0, b_all, chunk):
        xa, aa, ya = x[s:s + chunk], a[s:s + chunk], label[s:s + chunk]
        b = xa.shape[0]
        with torch.enable_grad():
            scaled = (alphas.view(m, 1, 1, 1) * aa.unsqueeze(0)).reshape(m * b, t_len, d_ff).requires_grad_(True)
            logits = head.from_activation(xa.repeat(m, 1, 1), scaled)  # row k*b + i = input i at step k
            if target == "prob":
                logits = torch.softmax(logits, dim=-1)
            t = logits.gather(1, ya.repeat(m).view(-1, 1)).sum()
            (g,) = torch.autograd.grad(t, scaled)
        gs = g.view(m, b, t_len, d_ff).sum(0)
        out[s:s + b] = (aa * gs / m if times_activation else gs).sum(1)
    return out


def paper_selection(share: Tensor, p: float = 0.7, step: float = 0.05, lo: int = 2,
                    hi: int = 5) -> tuple[Tensor, float]:
    """Neurons whose share of inputs keeping them is >= p, p moved by ``step`` until ``lo``..``hi`` remain.

    share ``[d_ff]`` in [0, 1]. Returns (kept neuron ids ordered by share desc, ties by id; the final p).
    """
    def kept(q: float) -> Tensor:
        return torch.nonzero(share >= q - 1e-9).squeeze(1)

    q, direction, last_many = p, 0, None
    while True:
        k = kept(q)
        if lo <= k.numel() <= hi:
            break
        want = 1 if k.numel() > hi else -1
        if k.numel() > hi:
            last_many = (k, q)
        nq = round(q + want * step, 10)
        if (direction and want != direction) or nq < step - 1e-9 or nq > 1.0 + 1e-9:
            if direction and want != direction and last_many is not None:
                k, q = last_many
            break
        direction, q = want, nq
    order = torch.sort(share[k], descending=True, stable=True).indices
    return k[order], q


@register_localizer("ig")
class IntegratedGradients(SetLocalizer):
    """Knowledge-neuron IG; scores ``[d_ff]`` = mean attribution over the set (or keep share, ``"paper"``)."""

    level = "neuron"

    def __init__(self, head: FFNHead, seed: int = 0, m: int = 20, on: str = "neg", selection: str = "mean",
                 target: str = "prob", t: float = 0.2, p: float = 0.7, max_rows: int = 8192, riemann: str = "left",
                 times_activation: bool = True, **kwargs: Any):
        self.times_activation = bool(times_activation)
        if riemann not in RIEMANN:
            raise ValueError(f"riemann must be one of {RIEMANN}, got {riemann!r}")
        self.riemann = riemann
        sides = {"neg": ("neg",), "pos": ("pos",), "all": ("neg", "pos")}
        if on not in sides:
            raise ValueError(f"on must be one of {sorted(sides)}, got {on!r}")
        if selection not in ("mean", "paper"):
            raise ValueError(f"selection must be 'mean' or 'paper', got {selection!r}")
        if target not in ("prob", "logit"):
            raise ValueError(f"target must be 'prob' or 'logit', got {target!r}")
        if int(m) < 1 or int(max_rows) < 1:
            raise ValueError(f"m and max_rows must be positive, got m={m}, max_rows={max_rows}")
        self.m, self.on, self.selection, self.target = int(m), on, selection, target
        self.t, self.p, self.max_rows = float(t), float(p), int(max_rows)
        self._selected: Tensor | None = None
        super().__init__(head, seed=seed, sides=sides[on], **kwargs)
        self.add_state("attr_sum", torch.zeros(head.d_ff, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("keep_count", torch.zeros(head.d_ff, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, side: str, x: Tensor, label: Tensor) -> None:
        attr = ig_attributions(self.head, x, label, self.m, self.target, self.max_rows, self.riemann,
                               self.times_activation)
        self.add_to(self.attr_sum, attr.double().sum(0))
        keep = attr >= self.t * attr.max(dim=1, keepdim=True).values
        self.add_to(self.keep_count, keep.sum(0))

    def compute(self) -> Tensor:
        n = sum(self.require(s) for s in self.sides)
        if self.selection == "mean":
            return self.attr_sum / n
        share = (self.keep_count / n).double()
        self._selected, self._p_final = paper_selection(share, self.p)
        return share

    @classmethod
    def uses_own_selection(cls, options: dict[str, Any]) -> bool:
        """Only the paper rule (``selection="paper"``) selects its own neurons; ranking by the mean takes budgets."""
        return options.get("selection", "mean") == "paper"

    def own_selection(self) -> Tensor | None:
        """The paper rule's neurons (``selection="paper"``), else None."""
        if self.selection != "paper":
            return None
        if self._selected is None:
            self.compute()
        return self._selected

    def reset(self) -> None:
        super().reset()
        self._selected = None

    def options(self) -> dict[str, Any]:
        opts = {"m": self.m, "on": self.on, "selection": self.selection, "target": self.target,
                "baseline": "zero", "riemann": self.riemann, "times_activation": self.times_activation}
        if self.selection == "paper":
            opts.update(t=self.t, p=self.p, p_final=getattr(self, "_p_final", None))
        return opts
