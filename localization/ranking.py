"""Selection helpers for FL scores (docs/methods.md, "Budgets") and :func:`localize`, the one way to run a
localizer over cached states without a Trainer.

Conventions used by every caller (FL LightningModule, FL evaluation, repair sweep):

* a *weight-level* score vector is ``[2 d d_ff]`` over the global weight index (W_bef row-major, then W_aft);
  a *neuron-level* one is ``[d_ff]``; higher = more suspicious;
* ranks break ties stably: equal scores are ordered by ascending index (:func:`top_n`);
* a budget is an int N (number of weights; ``unit="neurons"`` counts neurons for neuron-level methods), a share
  of the layer written ``"P%"`` (``"0.01%"``: N = max(1, round(P / 100 * layer size)), so one config scales from
  the testbed to ViT-B: 0.005 / 0.01 / 0.02 % of 4,718,592 are 236 / 472 / 944; :func:`parse_budget`,
  :func:`budget_size`), or ``"front"`` / ``None``: the method's own selection (BL's Pareto front, IG's paper
  rule), whose size the method decides; ``"avg"`` (N_avg, the mean front size of BL) is resolved by the FL step;
  a budget *label* as given (canonical) and the number *n* of weights it selects are resolved together, once per
  (run, method), into a :class:`ResolvedBudget` (:func:`vitfl.pipeline.localize.resolve_budgets`) that callers carry;
* a neuron-level method's weights for a weight budget N are the weights of its top neurons, neuron by neuron in
  rank order, each neuron contributing its 2d weights in the order (row j of W_bef by column, then column j of
  W_aft by row), until N weights are filled; the last neuron may be cut (its first weights in that order).
  ``whole_neurons=True`` takes whole neurons instead (ceil(N / 2d) neurons, possibly more than N weights).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitfl.core.quiet import COMPUTE_BEFORE_UPDATE
from vitfl.localization.base import FLResult, Localizer, get_localizer
from vitfl.localization.ffn import FFNHead, WeightIndex

__all__ = [
    "top_n",
    "minmax",
    "pareto_front",
    "neurons_to_weights",
    "select",
    "localize",
    "BudgetError",
    "parse_budget",
    "budget_size",
    "ResolvedBudget",
    "DEFAULT_BUDGETS",
]

#: the default FL / repair budgets: the published 236 / 472 / 944 weights of ViT-B/16's 4,718,592, as the shares of
#: the layer they are, so a smaller model gets the same shares (the 32,768-weight testbed: 2 / 3 / 7)
DEFAULT_BUDGETS: tuple[str, ...] = ("0.005%", "0.01%", "0.02%")


class BudgetError(ValueError):
    """A budget the selection cannot honour (larger than the layer, not positive, unknown string)."""


def parse_budget(b: Any) -> int | str:
    """A budget as given (an int, ``"236"``, ``"0.01%"``, ``"avg"``, ``"front"``) in its one canonical form: an
    int, ``"P%"`` (P as the shortest decimal, ``0 < P <= 100``), ``"avg"`` or ``"front"``; anything else is
    :class:`BudgetError`. Counts must be >= 1 (checked against the layer by :func:`budget_size`).

    >>> [parse_budget(b) for b in (236, "472", "0.010%", " 1% ", "avg", "front")]
    [236, 472, '0.01%', '1%', 'avg', 'front']
    """
    if isinstance(b, bool):
        raise BudgetError(f"budget {b!r}: expected a positive int, a share 'P%' of the layer, 'avg' or 'front'")
    if isinstance(b, int):
        if b < 1:
            raise BudgetError(f"budget {b} is not a positive number of weights")
        return b
    if isinstance(b, str):
        t = b.strip()
        if t in ("avg", "front"):
            return t
        if t.isdigit():
            return parse_budget(int(t))
        if t.endswith("%"):
            try:
                p = float(t[:-1])
            except ValueError:
                p = float("nan")
            if p == p and 0 < p <= 100:
                from decimal import Decimal

                return f"{format(Decimal(repr(p)).normalize(), 'f')}%"
    raise BudgetError(f"budget {b!r}: expected a positive int, a share 'P%' of the layer (e.g. '0.01%'), 'avg' or "
                      "'front'")


def budget_size(b: int | str, total: int) -> int:
    """The number of weights an int or ``"P%"`` budget selects from a layer of ``total`` weights (a share rounds
    to the nearest int, at least 1); :class:`BudgetError` when it exceeds the layer.

    >>> [budget_size(b, 4_718_592) for b in ("0.005%", "0.01%", "0.02%")], budget_size("1%", 32768)
    ([236, 472, 944], 328)
    """
    b = parse_budget(b)
    if isinstance(b, str) and b.endswith("%"):
        n = max(1, round(float(b[:-1]) / 100 * total))
    elif isinstance(b, int):
        n = b
    else:
        raise BudgetError(f"budget {b!r} has no fixed size (it is resolved by the FL step)")
    if n > total:
        raise BudgetError(f"budget {b} is outside [1, {total}] (the number of last-FFN weights)")
    return n


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget resolved for one run and method: ``label``, the budget as given in canonical form
    (:func:`parse_budget`: ``236``, ``"0.01%"``, ``"avg"``, ``"front"``; what tables and result records show), and
    ``n``, the number of weights it selects (``None`` only for ``"front"``, whose size the method decides per
    setting). :func:`vitfl.pipeline.localize.resolve_budgets` makes them once per (run, method); callers carry them.

    >>> [ResolvedBudget.resolve(b, 4_718_592, n_avg=17).value for b in (236, "0.01%", "avg", "front")]
    [236, 472, 17, 'front']
    """
    label: int | str
    n: int | None

    def __post_init__(self) -> None:
        if parse_budget(self.label) != self.label:
            raise BudgetError(f"budget label {self.label!r} is not canonical (parse_budget gives "
                              f"{parse_budget(self.label)!r})")
        if self.label == "front":
            if self.n is not None:
                raise BudgetError(f"budget 'front' has no fixed size, got n = {self.n!r}")
        elif isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise BudgetError(f"budget {self.label!r} needs a positive int size, got n = {self.n!r}")

    @property
    def value(self) -> int | str:
        """What :func:`select` takes and FL results and run-store identities record as the budget: n, or
        ``"front"``."""
        return "front" if self.n is None else self.n

    @classmethod
    def resolve(cls, label: Any, total: int, n_avg: int | None = None) -> "ResolvedBudget":
        """``label`` (any form :func:`parse_budget` takes) against a layer of ``total`` weights: an int or a share
        ``"P%"`` -> :func:`budget_size`; ``"avg"`` -> ``n_avg`` (N_avg of the run, required then); ``"front"`` ->
        no size. Use :func:`vitfl.pipeline.localize.resolve_budgets` for a run's budgets (it finds N_avg)."""
        label = parse_budget(label)
        if label == "front":
            return cls(label, None)
        if label == "avg":
            if n_avg is None:
                raise BudgetError("budget 'avg' (N_avg) needs the run's N_avg (vitfl.pipeline.localize.resolve_budgets)")
            return cls(label, int(n_avg))
        return cls(label, budget_size(label, total))


def _check_scores(scores: Tensor, name: str = "scores") -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got "
                         f"{type(scores).__name__}{'' if not isinstance(scores, Tensor) else list(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} holds {int(torch.isnan(scores).sum())} NaN values; cannot rank them")
    return scores


def top_n(scores: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` largest scores, best first; equal scores in ascending index order (stable).

    Same result as ``sorted(range(len(s)), key=lambda i: (-s[i], i))[:n]`` but O(len) memory and time plus a
    sort of the n winners (``torch.topk`` finds the n-th value, the ties at it are taken by index).

    >>> top_n(torch.tensor([0.5, 2.0, 0.5, 3.0, 0.5]), 3).tolist()
    [3, 1, 0]
    """
    _check_scores(scores)
    if isinstance(n, bool) or not isinstance(n, int):
        raise BudgetError(f"n must be an int, got {n!r}")
    if n < 1 or n > scores.numel():
        raise BudgetError(f"n = {n} is outside [1, {scores.numel()}] (the number of scores)")
    kth = torch.topk(scores, n, sorted=False).values.min()
    above = torch.nonzero(scores > kth).squeeze(1)
    ties = torch.nonzero(scores == kth).squeeze(1)[: n - above.numel()]
    idx = torch.cat([above, ties])  # ascending index within each part; every tie sits below every `above`
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return idx[order]


def minmax(v: Tensor) -> Tensor:
    """minmax(v) = (v - min v) / (max v - min v); a constant vector maps to zeros (no information to rank by).

    >>> minmax(torch.tensor([1.0, 3.0, 2.0])).tolist()
    [0.0, 1.0, 0.5]
    """
    if not isinstance(v, Tensor) or v.numel() == 0:
        raise ValueError("minmax needs a non-empty tensor")
    lo, hi = torch.aminmax(v)  # NaN propagates into both
    if torch.isnan(lo) or torch.isnan(hi):
        raise ValueError("minmax of a tensor holding NaN")
    if not torch.isfinite(lo) or not torch.isfinite(hi):
        raise ValueError("minmax of a tensor holding inf")
    if hi == lo:
        return torch.zeros_like(v)
    return torch.sub(v, lo).div_(hi - lo)


def pareto_front(f1: Tensor, f2: Tensor, keep_identical: bool = True, prefilter: bool = True,
                 hint: Tensor | None = None) -> Tensor:
    """Indices of the first Pareto front of the points (f1_k, f2_k), both objectives maximised.

    A point p is dominated when some q has f1_q >= f1_p and f2_q >= f2_p with at least one strict. Identical
    points do not dominate each other, so all of them stay on the front (``keep_identical=True``, RepTran); with
    ``keep_identical=False`` only the first (lowest index) of identical front points is kept (Arachne).

    O(n log n) time and O(n) memory, no [n, n] comparison: sort by f1 descending (ties: f2 descending, then
    index); p is on the front iff f2_p is the largest f2 among points with the same f1 and is strictly larger than
    the running max of f2 over all points with larger f1. With ``prefilter`` (n > 4096), points strictly worse in
    both objectives than some front point of a small sample (the top 256 by f1, by f2 and by minmax(f1) +
    minmax(f2), or by ``hint`` when given: any score, only the prefilter's speed depends on it) are dropped first
    by one binary search each (exact: such points are dominated, and no front point or copy of one is dropped),
    so the sort runs on the few survivors. For ViT-B's 4,718,592 weights this needs a few vectors of that
    length.

    Returns the front's indices ordered by f1 descending (ties: f2 descending, index ascending).
    """
    _check_scores(f1, "f1")
    _check_scores(f2, "f2")
    if f1.shape != f2.shape:
        raise ValueError(f"f1 {list(f1.shape)} and f2 {list(f2.shape)} differ in shape")
    if prefilter and f1.numel() > 4096:
        keep = _not_strictly_dominated_by_sample(f1, f2, hint)
        return keep[_front_sorted(f1[keep], f2[keep], keep_identical)]
    return _front_sorted(f1, f2, keep_identical)


def _front_sorted(f1: Tensor, f2: Tensor, keep_identical: bool) -> Tensor:
    n = f1.numel()
    # lexicographic sort (f1 desc, f2 desc, index asc) by two stable sorts, least significant key first
    o = torch.sort(f2, descending=True, stable=True).indices
    o = o[torch.sort(f1[o], descending=True, stable=True).indices]
    g1, g2 = f1[o], f2[o]
    new_group = torch.ones(n, dtype=torch.bool, device=f1.device)
    new_group[1:] = g1[1:] != g1[:-1]
    group_start = torch.cummax(torch.where(new_group, torch.arange(n, device=f1.device), 0), 0).values
    group_best = g2[group_start]  # f2 is sorted descending within a group
    run_max = torch.cummax(g2, 0).values
    before = torch.full_like(g2, float("-inf"))
    has_before = group_start > 0
    before[has_before] = run_max[group_start[has_before] - 1]
    on_front = (g2 == group_best) & (~has_before | (g2 > before))
    if not keep_identical:
        first = torch.ones(n, dtype=torch.bool, device=f1.device)
        first[1:] = (g1[1:] != g1[:-1]) | (g2[1:] != g2[:-1])
        on_front &= first
    return o[on_front]


def _not_strictly_dominated_by_sample(f1: Tensor, f2: Tensor, hint: Tensor | None = None,
                                      k: int = 256) -> Tensor:
    """Ascending indices of the points that no front point of a small sample beats in *both* objectives."""
    picks = [torch.topk(f1, k).indices, torch.topk(f2, k).indices]
    if hint is not None:
        if hint.shape != f1.shape:
            raise ValueError(f"hint {list(hint.shape)} and f1 {list(f1.shape)} differ in shape")
        picks.append(torch.topk(hint, k).indices)
    elif bool(torch.isfinite(f1).all()) and bool(torch.isfinite(f2).all()):
        picks.append(torch.topk(minmax(f1.double()) + minmax(f2.double()), k).indices)
    sample = torch.unique(torch.cat(picks))
    ref = sample[_front_sorted(f1[sample], f2[sample], True)]  # f1 descending, f2 ascending
    r1, r2 = f1[ref], f2[ref]
    # refs with r1 > f1_p form a prefix of `ref`; the largest r2 among them is the prefix maximum
    n_better = ref.numel() - torch.searchsorted(r1.flip(0).contiguous(), f1, right=True)
    best_r2 = torch.cummax(r2, 0).values[(n_better - 1).clamp(min=0)]
    dominated = (n_better > 0) & (best_r2 > f2)
    return torch.nonzero(~dominated).squeeze(1)


def neurons_to_weights(neurons: Tensor, index: WeightIndex, n_weights: int | None = None,
                       whole_neurons: bool = False) -> tuple[Tensor, Tensor]:
    """Ranked neurons ``[K]`` -> (weights ``[n, 3]`` (matrix, row, col), the neurons used ``[k]``).

    Each neuron j contributes its 2d weights: row j of W_bef (columns 0..d-1), then column j of W_aft (rows
    0..d-1). With ``n_weights`` = N, neurons are taken in rank order until N weights are filled and the last one
    is cut to what is left; ``whole_neurons=True`` keeps it whole. ``n_weights=None``: all weights of all neurons.
    """
    neurons = torch.as_tensor(neurons, dtype=torch.long).reshape(-1).cpu()
    per = 2 * index.d
    if n_weights is None:
        used = neurons
        flat = index.neuron_weights(used)
    else:
        if isinstance(n_weights, bool) or not isinstance(n_weights, int) or n_weights < 1:
            raise BudgetError(f"weight budget must be a positive int, got {n_weights!r}")
        k = -(-n_weights // per)
        if k > neurons.numel():
            raise BudgetError(f"weight budget {n_weights} needs {k} neurons of {per} weights each, but only "
                              f"{neurons.numel()} ranked neurons are available")
        used = neurons[:k]
        flat = index.neuron_weights(used)
        if not whole_neurons:
            flat = flat[:n_weights]
    return index.to_triples(flat), used


def select(scores: Tensor, level: str, budget: int | str | None, index: WeightIndex, *,
           own: Tensor | None = None, unit: str = "weights",
           whole_neurons: bool = False) -> tuple[Tensor, Tensor | None]:
    """Pick the located weights (and neurons) from a score vector.

    scores: ``[index.total]`` (``level="weight"``) or ``[index.d_ff]`` (``level="neuron"``).
    budget: int N -> the top-N weights (weight level), or the weights of the top neurons until N weights are
    filled (neuron level, see :func:`neurons_to_weights`; ``unit="neurons"``: N neurons, all their weights);
    ``"front"`` / ``None`` -> the method's own selection ``own`` (global weight indices for weight level, neuron
    ids for neuron level; BL's Pareto front, IG's paper rule), required then.

    Returns (weights ``[n, 3]`` (matrix, row, col) most suspicious first, neurons ``[k]`` ranked or None).
    """
    if level not in ("weight", "neuron"):
        raise ValueError(f"level must be 'weight' or 'neuron', got {level!r}")
    if unit not in ("weights", "neurons"):
        raise ValueError(f"unit must be 'weights' or 'neurons', got {unit!r}")
    _check_scores(scores)
    expected = index.total if level == "weight" else index.d_ff
    if scores.numel() != expected:
        raise ValueError(f"{level}-level scores must have {expected} entries for d={index.d}, d_ff={index.d_ff}; "
                         f"got {scores.numel()}")
    scores = scores.detach().cpu()
    if budget is None or isinstance(budget, str):
        if budget not in (None, "front"):
            raise BudgetError(f"budget must be an int, 'front' or None, got {budget!r}")
        if own is None:
            raise BudgetError("budget 'front'/None means the method's own selection (BL's Pareto front, IG's "
                              "paper rule); this method has none: give an int budget")
        own = torch.as_tensor(own, dtype=torch.long).reshape(-1).cpu()
        if level == "weight":
            return index.to_triples(own), None
        return neurons_to_weights(own, index)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise BudgetError(f"budget must be an int, 'front' or None, got {budget!r}")
    if budget < 1:
        raise BudgetError(f"budget must be positive, got {budget}")
    if level == "weight":
        if unit == "neurons":
            raise BudgetError("unit='neurons' is for neuron-level methods only")
        if budget > index.total:
            raise BudgetError(f"budget {budget} exceeds the layer's {index.total} weights")
        return index.to_triples(top_n(scores, budget)), None
    if unit == "neurons":
        if budget > index.d_ff:
            raise BudgetError(f"budget {budget} neurons exceeds the layer's {index.d_ff} neurons")
        ranked = top_n(scores, budget)
        return neurons_to_weights(ranked, index)
    if budget > index.total:
        raise BudgetError(f"budget {budget} exceeds the layer's {index.total} weights")
    k = -(-budget // (2 * index.d))
    return neurons_to_weights(top_n(scores, k), index, budget, whole_neurons=whole_neurons)


def localize(head: FFNHead, x: Tensor | None, label: Tensor | None, is_neg: Tensor | None,
             method: str | Localizer, budget: int | str | None, batch_size: int = 4096, seed: int = 0,
             unit: str = "weights", whole_neurons: bool = False, **opts: Any) -> FLResult:
    """Run one FL method over cached states without a Trainer: ``update`` in batches of ``batch_size`` rows,
    ``compute``, then :func:`select` the budget.

    head: the FFN head; x ``[N, d]`` cached CLS residual streams; label ``[N]``; is_neg ``[N]`` bool (True = I_neg,
    the rest I_pos); the three may be None for methods that ignore inputs (random, magnitude).
    method: a registered name (``opts`` go to its constructor) or a ready :class:`Localizer` instance.
    The result's provenance records the method's options, seed, set sizes, batch size and wall time (seconds,
    data pass + compute + selection). Scores (float64) do not depend on ``batch_size``: for the published
    formulas whose value depends on their batches (a localizer with ``batching`` = b, the ``*_reptran`` family,
    ``ours_fl5``, ``bl_fl5``) the I_neg rows (in the order given: the published one) are fed first, then the
    I_pos rows (in the order given: ascending sample index); each set is cut as
    ``np.array_split(S, ceil(|S| / b))`` (:func:`vitfl.localization.methods._common.compat_groups`), and every
    ``update`` holds whole parts only (a part longer than ``batch_size`` gets an update of its own), with
    ``group=`` the part ids. Larger batches amortise the per-batch work on the 4.7M-entry per-weight states.
    """
    owned = not isinstance(method, Localizer)
    if not owned:
        loc = method
        if opts:
            raise ValueError("options are given to the Localizer's constructor, not to localize(), when a "
                             "Localizer instance is passed")
    else:
        loc = get_localizer(method)(head, seed=seed, **opts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    t0 = time.perf_counter()
    n_neg = n_pos = None
    if type(loc).needs_inputs:
        if x is None or label is None or is_neg is None:
            raise ValueError(f"method {loc.name!r} needs inputs: give x, label and is_neg")
        n = x.shape[0]
        if label.shape[:1] != (n,) or is_neg.shape[:1] != (n,):
            raise ValueError(f"x has {n} rows but label has {tuple(label.shape)} and is_neg {tuple(is_neg.shape)}")
        b = getattr(loc, "batching", None)
        if b is None:
            for s in range(0, n, batch_size):
                loc.update(x[s:s + batch_size], label[s:s + batch_size], is_neg[s:s + batch_size])
        else:
            from vitfl.localization.batching import compat_groups, neg_first_order, whole_group_batches

            order = neg_first_order(is_neg)  # each set keeps the order given (the published one, from the runner)
            if not torch.equal(order, torch.arange(n)):
                x, label, is_neg = x[order], label[order], is_neg[order]
            group = compat_groups(is_neg, b)
            for lo, hi in whole_group_batches(group, batch_size):
                loc.update(x[lo:hi], label[lo:hi], is_neg[lo:hi], group=group[lo:hi])
        n_neg = int(torch.as_tensor(is_neg).sum())
        n_pos = n - n_neg
        scores = loc.compute()
    else:
        with warnings.catch_warnings():  # compute before update is the point for input-free methods
            warnings.filterwarnings("ignore", message=COMPUTE_BEFORE_UPDATE)
            scores = loc.compute()
    own_sel = getattr(loc, "own_selection", None)
    own = own_sel() if callable(own_sel) and budget in (None, "front") else None
    weights, neurons = select(scores, loc.level, budget, head.index, own=own, unit=unit,
                              whole_neurons=whole_neurons)
    if owned:  # free the states now: a torchmetrics Metric refers to itself, so only the cycle collector would
        loc.reset()  # (repeated calls would otherwise hold every earlier method's states and run slower)
    wall = time.perf_counter() - t0
    provenance = {"method": loc.name, "options": loc.options(), "seed": seed, "n_neg": n_neg, "n_pos": n_pos,
                  "batch_size": batch_size, "unit": unit, "whole_neurons": whole_neurons, "wall_time_s": wall}
    return FLResult(method=loc.name, level=loc.level, budget=budget if budget is not None else "front",
                    scores=scores.detach().cpu().double(), weights=weights, neurons=neurons, provenance=provenance)
