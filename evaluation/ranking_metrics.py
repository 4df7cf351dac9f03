"""Ranking metrics of an FL score vector against a ground truth (docs/methods.md, section 5), with random's exact
expectation beside each.

Inputs: ``scores [total]`` (higher = more suspicious; one per weight, global index W_bef then W_aft), a
ground-truth positive set (bool mask ``[total]`` or global indices) and optionally ground-truth scores
``[total]`` (e.g. |W(e) - W(e-1)|) for top-K overlap and Spearman correlation.

Metrics, for K = round(f * total) (at least 1) with f in :data:`DEFAULT_FRACTIONS` (0.1, 0.5, 1, 2, 5 %):

* hits@K = |top-K ∩ pos|;  P@K = hits/K;  R@K = hits/|pos|;  F1@K = 2 P R / (P + R) = 2 hits / (K + |pos|);
* overlap@K = |top-K(scores) ∩ top-K(gt_scores)| / K;
* AP = (1/|pos|) sum_i i / r_i with r_1 < r_2 < ... the ranks (1-based) of the positives (exact, no
  interpolation; equals ``sklearn.metrics.average_precision_score`` when scores have no ties);
* R-precision = P@|pos|;
* Spearman's rho between scores and gt_scores (``scipy.stats.spearmanr``, average ranks for ties).

**Ties** are broken deterministically: ``ties="index"`` (default) ranks the lower global index first (a stable
descending sort); ``ties="random"`` ranks tied scores in the order of a permutation drawn from ``seed``, which
removes the index order's preference for W_bef (the first block) without losing determinism. Spearman uses
average ranks (scipy) regardless. The ground truth's own top-K uses the same rule.

**Random's exact expectation** (a uniformly random ranking): hits@K ~ Hypergeom(total, |pos|, K), so
E[P@K] = |pos|/total, E[R@K] = K/total, E[F1@K] = 2 E[hits]/(K + |pos|) = 2 K |pos| / (total (K + |pos|))
(F1 is linear in hits, so this is exact; :func:`random_expectation` also computes it by summing the
``scipy.stats.hypergeom`` pmf as a check), E[overlap@K] = K/total, E[rho] = 0, and (Bestgen 2015, derived from
E[rel_j rel_k] of a random permutation)::

    E[AP] = H_N / N + (R - 1) (N - H_N) / (N (N - 1)),    N = total, R = |pos|, H_N = sum_{k=1}^N 1/k

which is exact (H_N computed as digamma(N + 1) + Euler's gamma). ``p_random@K`` = P(hits >= observed) under a
random ranking (the hypergeometric survival function): how surprising the method's hits are.

**K and the positive count** are ``round(f * total)`` (at least 1) by default (``k_rounding="round"``); the published
exp-fl-5-7 floored both (``int(f * total)``: ``k_rounding="floor"``, e.g. 65 / 327 / 655 / 1310 / 3276 instead of
66 / 328 / 655 / 1311 / 3277 at total = 65,536).

**The published positional comparison** (``comparison="published_positional"``, :func:`positional_metrics`).
exp-fl-5-1 saved, per matrix, the ground truth's global ranks *sorted ascending* (its weights' locations in a separate
file), exp-fl-5-5 / 5-6 saved the FL method's ranks the same way, and exp-fl-5-7 concatenated the two halves (W_bef then
W_aft) and compared the rank arrays *position by position*: item j is a positive if ``gt_rank[j] <= n_pos`` and
predicted if ``fl_rank[j] <= K``, never looking at which weight sits at position j. Since each half is sorted, the
first ``g_m`` positions of matrix m's half are positives (g_m = how many of the ground truth's top n_pos lie in matrix
m) and the first ``f_m(K)`` are predicted (f_m(K) = how many of the method's top K lie in m), so::

    hits@K (positional) = min(f_bef(K), g_bef) + min(f_aft(K), g_aft)
    overlap@K (positional) = (min(f_bef(K), g_bef(K)) + min(f_aft(K), g_aft(K))) / K

It measures only how the top K splits between W_bef and W_aft: any ranking whose top K splits like the ground
truth's scores ~1, even the *worst possible* one (least-changed weights first). Its random expectation is exact too
(f_bef(K) ~ Hypergeom(total, |W_bef|, K)). AP, R-precision and Spearman are not defined for it (NaN). The corrected
comparison (``"corrected"``, the default) compares the weights themselves, as everything above.

Everything is vectorised (one sort and one cumulative sum over the weights): 4.7M weights take about a second.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
from scipy import special
from scipy import stats as sps
from torch import Tensor

__all__ = [
    "DEFAULT_FRACTIONS",
    "COMPARISONS",
    "K_ROUNDINGS",
    "fraction_label",
    "k_of_fraction",
    "rank_order",
    "positives_mask",
    "top_fraction_positives",
    "hits_at",
    "average_precision",
    "expected_random_ap",
    "random_expectation",
    "spearman",
    "topk_overlap",
    "evaluate_ranking",
    "positional_metrics",
    "positional_random_expectation",
    "neuron_to_weight_scores",
]

#: K as fractions of the weights: 0.1, 0.5, 1, 2, 5 %.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.05)


def fraction_label(f: float) -> str:
    """0.001 -> '0.1%', 0.01 -> '1%'."""
    return f"{f * 100:g}%"


#: how the checkpoint benchmark compares a ranking with the ground truth (module docstring)
COMPARISONS = ("corrected", "published_positional")
#: how K and the positive count are made from a fraction: round (default) or floor (the published int(f N))
K_ROUNDINGS = ("round", "floor")


def k_of_fraction(f: float, total: int, rounding: str = "round") -> int:
    """K = round(f * total) (``rounding="floor"``: int(f * total), as the published code), at least 1 and at most
    total."""
    if not 0 < f <= 1:
        raise ValueError(f"K fraction must lie in (0, 1], got {f}")
    if rounding not in K_ROUNDINGS:
        raise ValueError(f"k_rounding must be one of {K_ROUNDINGS}, got {rounding!r}")
    k = round(f * total) if rounding == "round" else int(f * total)
    return int(min(total, max(1, k)))


def _check_scores(scores: Tensor, name: str = "scores") -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector over all weights, got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not scores.is_floating_point():
        scores = scores.double()
    if torch.isnan(scores).any():
        raise ValueError(f"{name} holds NaN values: an FL method must score every weight")
    return scores


def rank_order(scores: Tensor, ties: str = "index", seed: int = 0) -> Tensor:
    """Global indices sorted from most to least suspicious, ``[total]`` (ties: see the module docstring)."""
    scores = _check_scores(scores)
    if ties == "index":
        return torch.sort(scores, descending=True, stable=True).indices
    if ties == "random":
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(scores.numel(), generator=g)
        return perm[torch.sort(scores[perm], descending=True, stable=True).indices]
    raise ValueError(f"ties must be 'index' or 'random', got {ties!r}")


def positives_mask(positives: Tensor, total: int) -> Tensor:
    """A bool mask ``[total]`` from a mask or from global indices (duplicates and out-of-range refused)."""
    positives = torch.as_tensor(positives)
    if positives.dtype == torch.bool:
        if positives.shape != (total,):
            raise ValueError(f"positive mask has shape {tuple(positives.shape)}, expected ({total},)")
        mask = positives
    else:
        idx = positives.long().reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= total):
            raise ValueError(f"positive indices must lie in [0, {total}), got range [{idx.min()}, {idx.max()}]")
        if len(torch.unique(idx)) != len(idx):
            raise ValueError("positive indices contain duplicates")
        mask = torch.zeros(total, dtype=torch.bool)
        mask[idx] = True
    if not mask.any():
        raise ValueError("the ground truth has no positives")
    return mask


def top_fraction_positives(gt_scores: Tensor, fraction: float = 0.01, ties: str = "index", seed: int = 0,
                           rounding: str = "round") -> Tensor:
    """The mask of the top ``k_of_fraction(fraction, rounding=rounding)`` entries of ``gt_scores``."""
    gt_scores = _check_scores(gt_scores, "gt_scores")
    k = k_of_fraction(fraction, gt_scores.numel(), rounding)
    mask = torch.zeros(gt_scores.numel(), dtype=torch.bool)
    mask[rank_order(gt_scores, ties, seed)[:k]] = True
    return mask


def hits_at(order: Tensor, pos: Tensor, ks: Sequence[int]) -> Tensor:
    """hits@K for each K, from a ranking ``order`` and a positive mask (one cumulative sum)."""
    cum = torch.cumsum(pos[order].long(), 0)
    return cum[torch.as_tensor(ks, dtype=torch.long) - 1]


def average_precision(order: Tensor, pos: Tensor) -> float:
    """Exact AP = (1/|pos|) sum_i i / r_i over the positives' ranks r_i (1-based) in ``order``."""
    ranks = torch.nonzero(pos[order]).reshape(-1).double() + 1
    if len(ranks) == 0:
        raise ValueError("the ground truth has no positives")
    return float((torch.arange(1, len(ranks) + 1, dtype=torch.float64) / ranks).mean())


def _harmonic(n: int) -> float:
    return float(special.digamma(n + 1) + np.euler_gamma)


def expected_random_ap(total: int, n_pos: int) -> float:
    """Exact expected AP of a uniformly random ranking of ``total`` items with ``n_pos`` positives."""
    if not 1 <= n_pos <= total:
        raise ValueError(f"need 1 <= n_pos <= total, got n_pos={n_pos}, total={total}")
    if total == 1:
        return 1.0
    h = _harmonic(total)
    return h / total + (n_pos - 1) * (total - h) / (total * (total - 1))


def random_expectation(total: int, n_pos: int, k: int) -> dict[str, float]:
    """E[hits], E[P], E[R], E[F1], E[overlap] at K under a uniformly random ranking, and hits' std.

    hits ~ Hypergeom(total, n_pos, K); every metric is linear in hits, so its expectation is the metric of
    E[hits] = K n_pos / total (tests check them against Monte Carlo rankings). Cached: the benchmarks ask for the
    same (total, n_pos, K) once per method and setting."""
    return dict(_random_expectation(int(total), int(n_pos), int(k)))


@functools.lru_cache(maxsize=4096)
def _random_expectation(total: int, n_pos: int, k: int) -> dict[str, float]:
    if not (1 <= k <= total and 1 <= n_pos <= total):
        raise ValueError(f"need 1 <= K, n_pos <= total, got K={k}, n_pos={n_pos}, total={total}")
    with np.errstate(all="ignore"):  # scipy's kurtosis term divides by zero when K = total
        hits_std = float(sps.hypergeom(total, n_pos, k).std())
    e_hits = k * n_pos / total
    return {"hits": e_hits, "hits_std": hits_std, "precision": n_pos / total, "recall": k / total,
            "f1": 2 * e_hits / (k + n_pos), "overlap": k / total}


def spearman(scores: Tensor, gt_scores: Tensor) -> float:
    """Spearman's rho (scipy, average ranks); NaN if either vector is constant."""
    a = _check_scores(scores).double().numpy()
    b = _check_scores(gt_scores, "gt_scores").double().numpy()
    if a.shape != b.shape:
        raise ValueError(f"scores {a.shape} and gt_scores {b.shape} differ in shape")
    if a.min() == a.max() or b.min() == b.max():
        return float("nan")
    return float(sps.spearmanr(a, b).statistic)


def topk_overlap(order: Tensor, gt_order: Tensor, k: int) -> float:
    """|top-K(order) ∩ top-K(gt_order)| / K."""
    a = torch.zeros(order.numel(), dtype=torch.bool)
    a[order[:k]] = True
    return float(a[gt_order[:k]].sum()) / k


def evaluate_ranking(scores: Tensor, positives: Tensor, gt_scores: Tensor | None = None,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS, ties: str = "index", seed: int = 0,
                     with_spearman: bool = True, k_rounding: str = "round") -> dict[str, float]:
    """All metrics in one flat dict (one table row): ``total``, ``n_pos``, per K label L (e.g. ``'1%'``):
    ``K@L``, ``hits@L``, ``P@L``, ``R@L``, ``F1@L``, ``overlap@L`` (NaN without gt_scores), ``p_random@L``,
    ``rand_P@L``, ``rand_R@L``, ``rand_F1@L``, ``rand_overlap@L``; then ``AP``, ``rand_AP``, ``R_precision``,
    ``rand_R_precision``, ``spearman`` (NaN without gt_scores), ``rand_spearman`` (0). ``k_rounding``: how K is
    made from each fraction (:func:`k_of_fraction`)."""
    scores = _check_scores(scores)
    total = scores.numel()
    pos = positives_mask(positives, total)
    n_pos = int(pos.sum())
    order = rank_order(scores, ties, seed)
    gt_order = None
    if gt_scores is not None:
        gt_scores = _check_scores(gt_scores, "gt_scores")
        if gt_scores.shape != scores.shape:
            raise ValueError(f"gt_scores {tuple(gt_scores.shape)} and scores {tuple(scores.shape)} differ in shape")
        gt_order = rank_order(gt_scores, ties, seed)
    ks = [k_of_fraction(f, total, k_rounding) for f in fractions]
    hits = hits_at(order, pos, ks + [n_pos]).tolist()
    row: dict[str, float] = {"total": total, "n_pos": n_pos}
    for f, k, h in zip(fractions, ks, hits):
        lab = fraction_label(f)
        p, r = h / k, h / n_pos
        rnd = random_expectation(total, n_pos, k)
        row.update({f"K@{lab}": k, f"hits@{lab}": h, f"P@{lab}": p, f"R@{lab}": r,
                    f"F1@{lab}": 2 * h / (k + n_pos),
                    f"overlap@{lab}": topk_overlap(order, gt_order, k) if gt_order is not None else float("nan"),
                    f"p_random@{lab}": float(sps.hypergeom(total, n_pos, k).sf(h - 1)),
                    f"rand_P@{lab}": rnd["precision"], f"rand_R@{lab}": rnd["recall"],
                    f"rand_F1@{lab}": rnd["f1"], f"rand_overlap@{lab}": rnd["overlap"]})
    row["AP"] = average_precision(order, pos)
    row["rand_AP"] = expected_random_ap(total, n_pos)
    row["R_precision"] = hits[-1] / n_pos
    row["rand_R_precision"] = n_pos / total
    row["spearman"] = spearman(scores, gt_scores) if (gt_scores is not None and with_spearman) else float("nan")
    row["rand_spearman"] = 0.0
    return row


def _first_counts(order: Tensor, n_first: int, ks: Sequence[int]) -> list[int]:
    """For each K: how many of the top K of ``order`` have a global index below ``n_first`` (lie in W_bef)."""
    cum = torch.cumsum((order < n_first).long(), 0)
    return cum[torch.as_tensor(ks, dtype=torch.long) - 1].tolist()


def hypergeom_pmf(total: int, n_success: int, draws: int, k: np.ndarray) -> np.ndarray:
    """P(X = k) for X ~ Hypergeom(total, n_success, draws), from log-gamma (vectorised; scipy's per-element pmf is
    ~1000x slower at these sizes; agrees with it to a relative 1e-8 at 4.7M weights, 1e-12 at 65k)."""
    k = np.asarray(k, dtype=np.float64)
    lg = special.gammaln
    M, n, N = float(total), float(n_success), float(draws)
    with np.errstate(invalid="ignore"):
        logp = (lg(n + 1) - lg(k + 1) - lg(n - k + 1) + lg(M - n + 1) - lg(N - k + 1) - lg(M - n - N + k + 1)
                - lg(M + 1) + lg(N + 1) + lg(M - N + 1))
    ok = (k >= max(0.0, N - (M - n))) & (k <= min(n, N))
    return np.where(ok, np.exp(np.where(ok, logp, 0.0)), 0.0)


def positional_random_expectation(total: int, n_first: int, k: int, g_first: int, g_second: int
                                  ) -> tuple[float, Any]:
    """E[hits] and the distribution of the positional hits@K of a uniformly random ranking: f = how many of its top K
    lie in the first matrix ~ Hypergeom(total, n_first, K); hits = min(f, g_first) + min(K - f, g_second).
    Returns (E[hits], (support of hits, pmf))."""
    f = np.arange(max(0, k - (total - n_first)), min(k, n_first) + 1)
    pmf = hypergeom_pmf(total, n_first, k, f)
    h = np.minimum(f, g_first) + np.minimum(k - f, g_second)
    return float((pmf * h).sum()), (h, pmf)


def positional_metrics(scores: Tensor, gt_scores: Tensor, n_first: int, n_pos: int,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, ties: str = "index", seed: int = 0,
                       k_rounding: str = "round") -> dict[str, float]:
    """The published exp-fl-5-7 comparison of sorted per-matrix rank arrays, position by position (module
    docstring): the same keys as :func:`evaluate_ranking` (P/R/F1/overlap@K with random's exact expectation and
    ``p_random``), AP / R-precision / Spearman NaN. ``n_first`` = the size of the first matrix (W_bef) in the global
    index, ``n_pos`` = the ground truth's positive count (the top ``n_pos`` of ``gt_scores``)."""
    scores = _check_scores(scores)
    gt_scores = _check_scores(gt_scores, "gt_scores")
    total = scores.numel()
    if gt_scores.shape != scores.shape:
        raise ValueError(f"gt_scores {tuple(gt_scores.shape)} and scores {tuple(scores.shape)} differ in shape")
    if not 0 < n_first < total:
        raise ValueError(f"the first matrix must hold 1..{total - 1} of the {total} weights, got {n_first}")
    if not 1 <= n_pos <= total:
        raise ValueError(f"need 1 <= n_pos <= total, got n_pos={n_pos}, total={total}")
    order, gt_order = rank_order(scores, ties, seed), rank_order(gt_scores, ties, seed)
    ks = [k_of_fraction(f, total, k_rounding) for f in fractions]
    fl_first = _first_counts(order, n_first, ks)
    gt_first_k = _first_counts(gt_order, n_first, ks)
    g1 = _first_counts(gt_order, n_first, [n_pos])[0]
    g2 = n_pos - g1
    row: dict[str, float] = {"total": total, "n_pos": n_pos}
    for f, k, f1, gk in zip(fractions, ks, fl_first, gt_first_k):
        lab = fraction_label(f)
        h = min(f1, g1) + min(k - f1, g2)
        ov = (min(f1, gk) + min(k - f1, k - gk)) / k
        e_h, (support, pmf) = positional_random_expectation(total, n_first, k, g1, g2)
        e_ov, _ = positional_random_expectation(total, n_first, k, gk, k - gk)
        row.update({f"K@{lab}": k, f"hits@{lab}": h, f"P@{lab}": h / k, f"R@{lab}": h / n_pos,
                    f"F1@{lab}": 2 * h / (k + n_pos), f"overlap@{lab}": ov,
                    f"p_random@{lab}": float(pmf[support >= h].sum()),
                    f"rand_P@{lab}": e_h / k, f"rand_R@{lab}": e_h / n_pos, f"rand_F1@{lab}": 2 * e_h / (k + n_pos),
                    f"rand_overlap@{lab}": e_ov / k})
    nan = float("nan")
    row.update({"AP": nan, "rand_AP": nan, "R_precision": nan, "rand_R_precision": nan, "spearman": nan,
                "rand_spearman": nan, "n_first": n_first, "gt_in_first": g1, "gt_in_second": g2})
    return row


def neuron_to_weight_scores(neuron_scores: Tensor, index) -> Tensor:
    """Spread neuron scores ``[d_ff]`` onto every weight of the neuron (row j of W_bef, column j of W_aft):
    ``[total]`` in the global order. ``index``: a :class:`vitfl.localization.ffn.WeightIndex`."""
    s = torch.as_tensor(neuron_scores).reshape(-1)
    if s.numel() != index.d_ff:
        raise ValueError(f"neuron scores have {s.numel()} entries, the FFN has {index.d_ff} neurons")
    bef = s.view(-1, 1).expand(index.d_ff, index.d)
    aft = s.view(1, -1).expand(index.d, index.d_ff)
    return index.join(bef, aft)
