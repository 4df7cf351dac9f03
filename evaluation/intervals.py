"""95 % intervals for the repair tables: Wilson score intervals for rates from pooled counts
(``statsmodels.stats.proportion.proportion_confint(method="wilson")``), and bootstrap intervals
(``scipy.stats.bootstrap``) for means over runs.

Rates (RR = fixed / targets, BR = broken / correct-before) are pooled: the counts of every run of a table cell
are summed, and the rate is ``k / n`` with the Wilson score interval

    centre = (k + z^2/2) / (n + z^2),   half = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4),

``z`` the (1 + confidence) / 2 normal quantile. It always lies in [0, 1] (unlike mean +- std), and it exists
for k = 0 and k = n. A rate without a denominator (n = 0: no target input in the test fold) is ``None`` and
printed "n/a", never 0.

Means over runs (delta accuracy) get a bootstrap interval over the runs (BCa by default; percentile when BCa
is undefined, e.g. for very few distinct values); with one run, or all runs equal, the interval is the value
itself only if every run agrees, else None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

__all__ = ["wilson_interval", "Rate", "pooled_rate", "MeanCI", "bootstrap_mean", "fmt_rate", "fmt_mean"]


def _check_count(v, name: str) -> int:
    if isinstance(v, bool) or not float(v).is_integer() or v < 0:
        raise ValueError(f"{name} must be a non-negative whole number (a count), got {v!r}")
    return int(v)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of ``k`` successes in ``n`` trials; None when n = 0 (no rate)."""
    k, n = _check_count(k, "k"), _check_count(n, "n")
    if k > n:
        raise ValueError(f"k = {k} successes exceed n = {n} trials")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if n == 0:
        return None
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    lo = 0.0 if k == 0 else max(0.0, float(lo))  # exact bounds at the ends (no float residue)
    hi = 1.0 if k == n else min(1.0, float(hi))
    return lo, hi


@dataclass(frozen=True)
class Rate:
    """A pooled rate ``k / n`` with its Wilson interval; ``rate``, ``lo``, ``hi`` are None when n = 0."""
    k: int
    n: int
    rate: float | None
    lo: float | None
    hi: float | None
    confidence: float = 0.95

    def __str__(self) -> str:
        return fmt_rate(self)


def pooled_rate(k: Sequence[int] | int, n: Sequence[int] | int, confidence: float = 0.95) -> Rate:
    """Sum the per-run counts ``k`` (e.g. fixed) and ``n`` (e.g. targets) and give the rate with its interval."""
    ks = np.atleast_1d(np.asarray(k, dtype=float))
    ns = np.atleast_1d(np.asarray(n, dtype=float))
    if ks.shape != ns.shape:
        raise ValueError(f"k and n need one count per run each, got {ks.shape} and {ns.shape}")
    if np.isnan(ks).any() or np.isnan(ns).any():
        raise ValueError("counts hold NaN: every run has counts (0 where it had no target)")
    if (ks > ns).any():
        raise ValueError(f"a run has more successes than trials: k={ks[ks > ns].tolist()}, n={ns[ks > ns].tolist()}")
    K, N = _check_count(ks.sum(), "k"), _check_count(ns.sum(), "n")
    ci = wilson_interval(K, N, confidence)
    if ci is None:
        return Rate(K, N, None, None, None, confidence)
    return Rate(K, N, K / N, ci[0], ci[1], confidence)


@dataclass(frozen=True)
class MeanCI:
    """A mean over ``n`` runs with its bootstrap interval (``lo``/``hi`` None when it cannot be computed)."""
    n: int
    mean: float | None
    lo: float | None
    hi: float | None
    method: str = ""
    confidence: float = 0.95

    def __str__(self) -> str:
        return fmt_mean(self)


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 9999,
                   method: str = "BCa", seed: int = 0) -> MeanCI:
    """Mean of ``values`` (NaN entries are an error: drop them first and count them) with a
    ``scipy.stats.bootstrap`` interval over the values, seeded (``seed``) so tables are reproducible."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if np.isnan(v).any():
        raise ValueError("values hold NaN: drop the runs without a value first (and report how many)")
    n = len(v)
    if n == 0:
        return MeanCI(0, None, None, None, "", confidence)
    mean = float(v.mean())
    if n == 1 or np.ptp(v) == 0:
        # no spread to resample: the interval is the value only when every run agrees (n >= 2)
        return MeanCI(n, mean, mean if n > 1 else None, mean if n > 1 else None, "degenerate", confidence)
    used = method
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = sps.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method=method, random_state=np.random.default_rng(seed), vectorized=True)
            lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
            if not (np.isfinite(lo) and np.isfinite(hi)) and method != "percentile":
                used = "percentile"
                r = sps.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                  method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
                lo, hi = float(r.confidence_interval.low), float(r.confidence_interval.high)
    return MeanCI(n, mean, lo, hi, used, confidence)


def fmt_rate(r: Rate, digits: int = 3, what: str = "") -> str:
    """``0.421 [0.231, 0.637] (8/19)``, or ``n/a (0 targets)`` without a denominator."""
    if r.rate is None:
        return f"n/a (0{' ' + what if what else ''})"
    return f"{r.rate:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}] ({r.k}/{r.n})"


def fmt_mean(m: MeanCI, digits: int = 4) -> str:
    """``+0.0012 [-0.0004, +0.0031] (n=15)``; ``n/a (n=0)``; a mean without an interval shows it alone."""
    if m.mean is None:
        return "n/a (n=0)"
    if m.lo is None:
        return f"{m.mean:+.{digits}f} (n={m.n}, no interval)"
    return f"{m.mean:+.{digits}f} [{m.lo:+.{digits}f}, {m.hi:+.{digits}f}] (n={m.n})"
