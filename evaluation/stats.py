"""Statistics for comparing methods (docs/methods.md, section 7), on ``scipy.stats`` and ``statsmodels``.

Paired comparisons (the same repetitions / ranks / inputs under two methods):

* Wilcoxon signed-rank test, ``zero_method="wilcox"`` (zero differences are dropped), two-sided by default;
* paired Cliff's delta  ``delta = (#{d_i > 0} - #{d_i < 0}) / n``  of the differences ``d = x - y``
  (``n`` counts every pair, zeros included);
* Holm's step-down correction across the method pairs of one question (one table row group;
  ``statsmodels.stats.multitest.multipletests(method="holm")``).

Unpaired comparisons:

* Mann-Whitney U with the Vargha-Delaney effect size  ``A12 = U1 / (n1 n2)`` where ``U1`` is the U statistic of
  the first sample, ``U1 = W1 - n1 (n1 + 1) / 2`` with ``W1`` its rank sum (``W1 / (n1 n2)`` is *not* A12);
  ``A12 = P(X > Y) + P(X = Y) / 2``;
* unpaired Cliff's delta ``(#{x_i > y_j} - #{x_i < y_j}) / (n1 n2) = 2 A12 - 1`` (from scipy's U).

Degenerate input (fewer than 2 pairs, every difference zero, an empty sample) gives ``NaN`` p-values and a
``note`` column saying why, never an exception; Holm ignores ``NaN`` p-values (they do not count towards m).
:func:`write_stats_table` writes one table per research question as CSV, Markdown and LaTeX.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from vitfl.core import style
from vitfl.core.io import atomic_write_text

__all__ = [
    "holm",
    "cliffs_delta_paired",
    "cliffs_delta",
    "cliffs_magnitude",
    "a12_magnitude",
    "MannWhitneyResult",
    "mann_whitney_a12",
    "WilcoxonResult",
    "wilcoxon_paired",
    "wilcoxon_holm",
    "mann_whitney_holm",
    "to_markdown",
    "to_latex",
    "write_stats_table",
]


def _as_1d(v, name: str) -> np.ndarray:
    a = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=float).reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN values: drop or impute them before testing")
    return a


# ---------------------------------------------------------------------------------------------------- corrections
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending ``p_(1) <= ... <= p_(m)``: ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    ``NaN`` entries stay ``NaN`` and are not counted in ``m``. Computed by statsmodels' ``multipletests``, whose
    Holm branch calls ``gc.collect()`` on every call (0.5 s in a process holding torch and Lightning, 173 s over the
    test suite's 200 calls): the process's objects are frozen out of that collection for the call (``gc.freeze``),
    which takes it to 50 us and changes nothing else.
    """
    import gc

    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float).reshape(-1)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)]}")
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok):
        gc.freeze()
        try:
            out[ok] = multipletests(p[ok], method="holm")[1]
        finally:
            gc.unfreeze()
    return out


# --------------------------------------------------------------------------------------------------- effect sizes
def cliffs_delta_paired(x, y) -> float:
    """Paired Cliff's delta ``(#{x_i > y_i} - #{x_i < y_i}) / n`` in [-1, 1]; NaN for n = 0."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    if len(x) == 0:
        return float("nan")
    d = x - y
    return float((np.sum(d > 0) - np.sum(d < 0)) / len(d))


def cliffs_delta(x, y) -> float:
    """Unpaired Cliff's delta ``(#{x_i > y_j} - #{x_i < y_j}) / (n1 n2) = 2 U1 / (n1 n2) - 1`` with U1 scipy's
    Mann-Whitney U of x (ties count 1/2); NaN if a sample is empty."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    if np.all(np.concatenate([x, y]) == x[0]):
        return 0.0
    u1 = float(sps.mannwhitneyu(x, y, alternative="two-sided").statistic)
    return 2 * u1 / (len(x) * len(y)) - 1


def cliffs_magnitude(delta: float) -> str:
    """Romano et al. (2006) thresholds on |delta|: 0.147 / 0.33 / 0.474."""
    if not np.isfinite(delta):
        return ""
    a = abs(delta)
    return "negligible" if a < 0.147 else "small" if a < 0.33 else "medium" if a < 0.474 else "large"


def a12_magnitude(a12: float) -> str:
    """Vargha and Delaney (2000) thresholds on |A12 - 0.5|: 0.06 / 0.14 / 0.21."""
    if not np.isfinite(a12):
        return ""
    a = abs(a12 - 0.5)
    return "negligible" if a < 0.06 else "small" if a < 0.14 else "medium" if a < 0.21 else "large"


# ----------------------------------------------------------------------------------------------------------- tests
@dataclass(frozen=True)
class MannWhitneyResult:
    u1: float     #: U statistic of the first sample (scipy's ``statistic``)
    p: float      #: p-value (scipy's default method: exact for small samples without ties, else asymptotic)
    a12: float    #: U1 / (n1 n2)
    n1: int
    n2: int
    note: str = ""


def mann_whitney_a12(x, y, alternative: str = "two-sided") -> MannWhitneyResult:
    """Mann-Whitney U test of x against y with Vargha-Delaney ``A12 = U1 / (n1 n2)``."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return MannWhitneyResult(float("nan"), float("nan"), float("nan"), n1, n2, "empty sample")
    allv = np.concatenate([x, y])
    if np.all(allv == allv[0]):
        # every value tied: U1 = n1 n2 / 2 by definition, but the test's variance is 0
        return MannWhitneyResult(n1 * n2 / 2, float("nan"), 0.5, n1, n2, "all values equal: no test")
    r = sps.mannwhitneyu(x, y, alternative=alternative)
    u1 = float(r.statistic)
    return MannWhitneyResult(u1, float(r.pvalue), u1 / (n1 * n2), n1, n2)


@dataclass(frozen=True)
class WilcoxonResult:
    statistic: float
    p: float
    n: int           #: pairs
    n_nonzero: int   #: pairs with a non-zero difference (what zero_method="wilcox" tests)
    note: str = ""


def wilcoxon_paired(x, y, alternative: str = "two-sided") -> WilcoxonResult:
    """Wilcoxon signed-rank test on ``x - y`` with ``zero_method="wilcox"`` (scipy's default method choice:
    exact for small n without ties, else the normal approximation)."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    d = x - y
    n, nz = len(d), int(np.count_nonzero(d))
    if n < 2:
        return WilcoxonResult(float("nan"), float("nan"), n, nz, f"n={n} < 2 pairs: no test")
    if nz == 0:
        return WilcoxonResult(float("nan"), float("nan"), n, nz, "all differences are zero: no test")
    r = sps.wilcoxon(x, y, zero_method="wilcox", alternative=alternative)
    note = "" if nz >= 6 else f"only {nz} non-zero differences: p cannot be small"
    return WilcoxonResult(float(r.statistic), float(r.pvalue), n, nz, note)


def _pairs(names: list[str], pairs: Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    pairs = list(itertools.combinations(names, 2)) if pairs is None else [tuple(p) for p in pairs]
    for a, b in pairs:
        for m in (a, b):
            if m not in names:
                raise KeyError(f"method {m!r} of pair ({a!r}, {b!r}) has no values; methods: {names}")
    return pairs


def wilcoxon_holm(values: Mapping[str, Sequence[float]], pairs: Iterable[tuple[str, str]] | None = None,
                  alternative: str = "two-sided", question: str | None = None) -> pd.DataFrame:
    """Paired comparison of every method pair of one question.

    ``values``: method -> paired values (same length and order for every method: repetition / rank / input).
    ``pairs``: the (a, b) pairs to test, default every pair in ``values`` order. One row per pair with
    n, n_nonzero, median_a, median_b, median_diff (of a - b), statistic, p (raw), p_holm (Holm over this
    call's pairs), cliffs_delta (paired, a - b), magnitude and note.
    """
    names = list(values)
    arrays = {k: _as_1d(v, k) for k, v in values.items()}
    lengths = {k: len(v) for k, v in arrays.items()}
    rows = []
    for a, b in _pairs(names, pairs):
        if lengths[a] != lengths[b]:
            raise ValueError(f"paired values of {a!r} ({lengths[a]}) and {b!r} ({lengths[b]}) differ in length")
        xa, xb = arrays[a], arrays[b]
        w = wilcoxon_paired(xa, xb, alternative)
        delta = cliffs_delta_paired(xa, xb)
        rows.append({"question": question, "method_a": a, "method_b": b, "n": w.n, "n_nonzero": w.n_nonzero,
                     "median_a": float(np.median(xa)) if len(xa) else np.nan,
                     "median_b": float(np.median(xb)) if len(xb) else np.nan,
                     "median_diff": float(np.median(xa - xb)) if len(xa) else np.nan,
                     "statistic": w.statistic, "p": w.p, "cliffs_delta": delta,
                     "magnitude": cliffs_magnitude(delta), "note": w.note})
    df = pd.DataFrame(rows, columns=["question", "method_a", "method_b", "n", "n_nonzero", "median_a", "median_b",
                                     "median_diff", "statistic", "p", "cliffs_delta", "magnitude", "note"])
    df.insert(df.columns.get_loc("p") + 1, "p_holm", holm(df["p"].to_numpy()) if len(df) else [])
    if question is None:
        df = df.drop(columns="question")
    return df


def mann_whitney_holm(values: Mapping[str, Sequence[float]], pairs: Iterable[tuple[str, str]] | None = None,
                      alternative: str = "two-sided", question: str | None = None) -> pd.DataFrame:
    """Unpaired twin of :func:`wilcoxon_holm`: Mann-Whitney U, A12 = U1/(n1 n2), unpaired Cliff's delta, Holm."""
    names = list(values)
    arrays = {k: _as_1d(v, k) for k, v in values.items()}
    rows = []
    for a, b in _pairs(names, pairs):
        r = mann_whitney_a12(arrays[a], arrays[b], alternative)
        delta = cliffs_delta(arrays[a], arrays[b])
        rows.append({"question": question, "method_a": a, "method_b": b, "n_a": r.n1, "n_b": r.n2,
                     "median_a": float(np.median(arrays[a])) if r.n1 else np.nan,
                     "median_b": float(np.median(arrays[b])) if r.n2 else np.nan,
                     "U1": r.u1, "p": r.p, "a12": r.a12, "a12_magnitude": a12_magnitude(r.a12),
                     "cliffs_delta": delta, "magnitude": cliffs_magnitude(delta), "note": r.note})
    df = pd.DataFrame(rows, columns=["question", "method_a", "method_b", "n_a", "n_b", "median_a", "median_b", "U1",
                                     "p", "a12", "a12_magnitude", "cliffs_delta", "magnitude", "note"])
    df.insert(df.columns.get_loc("p") + 1, "p_holm", holm(df["p"].to_numpy()) if len(df) else [])
    if question is None:
        df = df.drop(columns="question")
    return df


# ---------------------------------------------------------------------------------------------------------- tables
#: the one Markdown table writer and cell format of the toolkit (core/style.py)
to_markdown = style.markdown_table
_fmt = style.format_cell


def to_latex(df: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs LaTeX table (pandas ``to_latex``), floats as in :func:`to_markdown`."""
    formatters = {c: _fmt for c in df.columns if pd.api.types.is_float_dtype(df[c])}
    return df.to_latex(index=False, formatters=formatters, caption=caption, label=label, escape=True,
                       na_rep="NaN")


def write_stats_table(df: pd.DataFrame, path_stem: str | Path, caption: str | None = None) -> dict[str, Path]:
    """Write one question's table as ``{stem}.csv`` (full precision), ``{stem}.md`` and ``{stem}.tex``, each
    atomically. Returns the paths by suffix."""
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".md", ".tex"):
        stem = stem.with_suffix("")
    out = {"csv": stem.with_name(stem.name + ".csv"), "md": stem.with_name(stem.name + ".md"),
           "tex": stem.with_name(stem.name + ".tex")}
    atomic_write_text(out["csv"], df.to_csv(index=False))
    md = (f"**{caption}**\n\n" if caption else "") + to_markdown(df)
    atomic_write_text(out["md"], md)
    atomic_write_text(out["tex"], to_latex(df, caption=caption, label=f"tab:{stem.name}"))
    return out
