"""The headline of an FL evaluation: for each benchmark, the methods sorted by their score, with an interval, a test
against random and one sentence saying whether the benchmark separates any method from random on this run.

Inputs are the benchmark tables the FL evaluation writes (one row per method and setting / seed, with the ranking
metrics of :mod:`vitfl.evaluation.ranking_metrics`) and the pooled repair table of the cross-validated repair; outputs are
plain DataFrames and Markdown. Nothing here reads or writes files.

**Per benchmark block** (one ground truth x comparison of the checkpoint benchmark, one strength of the injected
faults), per method:

* ``mean`` of the metric (P@1 % by default) over the rows (settings or seeds) with a bootstrap 95 % interval
  (:func:`vitfl.evaluation.intervals.bootstrap_mean`; with few rows the interval is wide, and ``n`` says how many);
* ``E[random]``: random's exact expectation, averaged over the same rows;
* the test against a random ranking: under the null that the method's ranking is unrelated to the ground truth,
  hits@K of row r follows its own hypergeometric law (the positional comparison: the law of
  min(f, g_bef) + min(K - f, g_aft), f hypergeometric). The pooled hits H = sum_r hits_r are tested against the law
  of their sum: for independent rows (injected faults: a new fault per seed) the convolution of the rows' laws
  (exact, FFT); for rows that share the ground truth and the model (the checkpoint benchmark's settings, whose
  rankings are close to each other) the comonotone coupling, i.e. every row at the same quantile of its law: exact
  when the rows rank alike, conservative otherwise (a method that ranks identically in every setting gets the p of
  one setting, not ten). ``p_above`` = P(H >= observed), ``p_below`` = P(H <= observed), ``p`` =
  min(1, 2 min(p_above, p_below)) two-sided, Holm-adjusted across the methods of the block (``p_holm``);
* the Wilcoxon signed-rank test of the per-row metric against the per-row expectation (two-sided, Holm across the
  block): it cannot be small with fewer than 6 rows, which is said;
* ``verdict``: "above random" / "below random" when ``p_holm`` < alpha on that side, else "not separated".

Control rows (the worst possible ranking) are kept at the bottom of their block and never tested.

**Repairability block** (the ``lp`` repair of the located weights, pooled over folds): per FL method and budget the
held-out repair rate with its Wilson interval, its break rate, the in-sample rate, DE's held-out rate at the same
budget when present, and Fisher's exact test of the fixed counts against the random FL method's at the same budget
(Holm across methods).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import signal
from scipy import stats as sps

from vitfl.evaluation.intervals import bootstrap_mean, wilson_interval
from vitfl.evaluation.ranking_metrics import hypergeom_pmf
from vitfl.evaluation.stats import holm, wilcoxon_paired

__all__ = ["HeadlineBlock", "repair_verdicts", "pooled_hits_test", "benchmark_block", "repairability_block", "blocks_markdown",
           "ALPHA"]

#: the significance level of the verdicts
ALPHA = 0.05


@dataclass
class HeadlineBlock:
    """One benchmark's headline: ``table`` (sorted), ``sentence`` and what produced it (``what``)."""
    title: str
    what: str
    table: pd.DataFrame
    sentence: str
    metric: str = "P@1%"
    split: str = ""   #: where the inputs behind the numbers come from (stated above the table)
    n: str = ""       #: what one row's n counts


# ---------------------------------------------------------------------------------------------- exact pooled test
def _row_null(row: dict[str, Any], lab: str, comparison: str) -> np.ndarray:
    """The null pmf of hits@K of one row over 0..max (a random ranking)."""
    total, k = int(row["total"]), int(row[f"K@{lab}"])
    if comparison == "published_positional":
        n_first, g1, g2 = int(row["n_first"]), int(row["gt_in_first"]), int(row["gt_in_second"])
        f = np.arange(max(0, k - (total - n_first)), min(k, n_first) + 1)
        pmf = hypergeom_pmf(total, n_first, k, f)
        h = np.minimum(f, g1) + np.minimum(k - f, g2)
        return np.bincount(h, weights=pmf)
    n_pos = int(row["n_pos"])
    h = np.arange(0, min(k, n_pos) + 1)
    return hypergeom_pmf(total, n_pos, k, h)


def _comonotone_tails(pmfs: list[np.ndarray], h: int) -> tuple[float, float]:
    """P(S >= h), P(S <= h) for S = sum_r Q_r(U), U ~ U(0, 1) shared (the rows' null laws coupled comonotonically:
    every row at the same quantile), exactly: S is a nondecreasing step function of u, so each tail is the length
    of the u-interval where it holds."""
    cdfs = [np.minimum(np.cumsum(p), 1.0) for p in pmfs]
    cuts = np.unique(np.concatenate([[0.0, 1.0], *[c[:-1] for c in cdfs]]))
    mids = (cuts[:-1] + cuts[1:]) / 2
    total = np.zeros(len(mids))
    for c in cdfs:  # Q_r(u) = the smallest k with F_r(k) >= u
        total += np.minimum(np.searchsorted(c, mids, side="left"), len(c) - 1)
    width = np.diff(cuts)
    return float(width[total >= h].sum()), float(width[total <= h].sum())


def pooled_hits_test(rows: pd.DataFrame, lab: str = "1%", comparison: str = "corrected",
                     dependence: str = "independent") -> tuple[float, float]:
    """(p_above, p_below) of the pooled hits@K of ``rows`` against random rankings (module docstring).

    ``dependence="independent"``: the rows' hits are independent under the null (e.g. one injected fault per seed):
    the exact law of their sum (convolution). ``"comonotone"``: the rows share the ground truth and the model (the
    checkpoint benchmark's settings), so their hits may be strongly dependent; the test then takes the worst case
    of full positive dependence (all rows at the same quantile of their null law), which is exact for identical
    rankings and conservative otherwise."""
    if not len(rows):
        return float("nan"), float("nan")
    if dependence not in ("independent", "comonotone"):
        raise ValueError(f"dependence must be 'independent' or 'comonotone', got {dependence!r}")
    pmfs = [_row_null(row, lab, comparison) for row in rows.to_dict("records")]
    h = int(round(float(rows[f"hits@{lab}"].sum())))
    if dependence == "comonotone":
        pa, pb = _comonotone_tails(pmfs, h)
        return min(1.0, pa), min(1.0, pb)
    dist = np.array([1.0])
    for pmf in pmfs:
        dist = signal.fftconvolve(dist, pmf) if len(dist) * len(pmf) > 1_000_000 else np.convolve(dist, pmf)
        dist = np.clip(dist, 0.0, None)
        dist /= dist.sum()
    p_above = float(dist[min(h, len(dist) - 1):].sum()) if h < len(dist) else 0.0
    p_below = float(dist[:h + 1].sum())
    return min(1.0, p_above), min(1.0, p_below)


def _fmt_p(p: float) -> str:
    if p != p:
        return "n/a"
    return "< 1e-12" if p < 1e-12 else f"{p:.2g}"


def _fmt_ci(m) -> str:
    if m.mean is None:
        return "n/a"
    if m.lo is None:
        return f"{m.mean:.4f}"
    return f"{m.mean:.4f} [{m.lo:.4f}, {m.hi:.4f}]"


# ----------------------------------------------------------------------------------------------- benchmark blocks
def benchmark_block(df: pd.DataFrame, title: str, what: str, metric: str = "P@1%", unit: str = "settings",
                    comparison: str = "corrected", controls: Sequence[str] = ("worst_possible",),
                    extra: Sequence[str] = (), alpha: float = ALPHA, split: str = "",
                    dependence: str = "independent",
                    wilcoxon: dict[str, tuple[float, float, str]] | None = None) -> HeadlineBlock:
    """The headline of one benchmark variant: ``df`` = its rows (one per method and setting / seed, error-free),
    ``metric`` e.g. ``"P@1%"`` (its K label is the part after '@'), ``unit`` what a row is (for the sentence).
    ``wilcoxon``: method -> (p, p_holm, note) already computed for this block (else computed here)."""
    lab = metric.split("@", 1)[1]
    rows, ctl = [], []
    for method, g in df.groupby("method", sort=False):
        g = g[g[metric].notna()]
        if not len(g):
            continue
        m = bootstrap_mean(g[metric].to_numpy(dtype=float))
        entry = {"method": method, "n": len(g), "mean": m.mean, metric: _fmt_ci(m),
                 "E[random]": float(g[f"rand_{metric}"].mean())}
        for c in extra:
            if c in g:
                entry[c] = float(g[c].mean())
        if method in controls:
            entry.update({"p_above": float("nan"), "p_below": float("nan"), "p": float("nan"),
                          "wilcoxon_p": float("nan"), "verdict": "control (never tested)"})
            ctl.append(entry)
            continue
        pa, pb = pooled_hits_test(g, lab, comparison, dependence)
        if wilcoxon is not None and method in wilcoxon:
            wp, wph, note = wilcoxon[method]
        else:
            w = wilcoxon_paired(g[metric].to_numpy(dtype=float), g[f"rand_{metric}"].to_numpy(dtype=float))
            wp, wph, note = w.p, None, w.note
        entry.update({"p_above": pa, "p_below": pb, "p": min(1.0, 2 * min(pa, pb)), "wilcoxon_p": wp,
                      "wilcoxon_p_holm": wph, "wilcoxon_note": note})
        rows.append(entry)
    t = pd.DataFrame(rows)
    if len(t):
        t["p_holm"] = holm(t["p"].to_numpy())
        if t["wilcoxon_p_holm"].isna().all() or wilcoxon is None:
            t["wilcoxon_p_holm"] = holm(t["wilcoxon_p"].to_numpy(dtype=float))
        t["verdict"] = [("above random" if r.p_holm < alpha and r.p_above <= r.p_below else
                         "below random" if r.p_holm < alpha else "not separated") for r in t.itertuples()]
        t = t.sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)
    if ctl:
        t = pd.concat([t, pd.DataFrame(ctl)], ignore_index=True)
    return HeadlineBlock(title, what, t, _sentence(t, title, what, metric, unit, alpha, dependence), metric, split,
                         f"{unit} per method (column n)")


def _sentence(t: pd.DataFrame, title: str, what: str, metric: str, unit: str, alpha: float,
              dependence: str = "independent") -> str:
    if not len(t) or "verdict" not in t:
        return f"{title} ({what}): no method could be evaluated."
    tested = t[~t["verdict"].str.startswith("control")]
    n_rows = int(tested["n"].max()) if len(tested) else 0
    above = tested[tested["verdict"] == "above random"]
    below = tested[tested["verdict"] == "below random"]

    def names(d):
        return ", ".join(f"{r['method']} ({metric} {r['mean']:.4f} vs E[random] {r['E[random]']:.4f})"
                         for _, r in d.iterrows())

    how = ("exact pooled test against random rankings" if dependence == "independent" else
           f"pooled test against random rankings, conservative for {unit} that share the ground truth")
    head = (f"**{title}** ({what}; {len(tested)} methods, up to {n_rows} {unit} each; {how}, Holm-adjusted, "
            f"alpha = {alpha}): ")
    if not len(above) and not len(below):
        body = "it separates **no** method from random on this run."
    else:
        parts = []
        if len(above):
            parts.append(f"**{len(above)}** above random: {names(above)}")
        if len(below):
            parts.append(f"**{len(below)}** below random: {names(below)}")
        body = "; ".join(parts) + f"; the other {len(tested) - len(above) - len(below)} are not separated from it."
    ctl = t[t["verdict"].str.startswith("control")]
    if len(ctl):
        body += " Control: " + ", ".join(f"{r['method']} scores {r['mean']:.4f}" for _, r in ctl.iterrows()) + "."
    return head + body


# ----------------------------------------------------------------------------------------------- repairability
def repairability_block(pooled: pd.DataFrame, title: str = "Repairability@N", what: str = "",
                        repair: str = "lp", baseline: str = "random", compare: str = "de",
                        alpha: float = ALPHA) -> HeadlineBlock:
    split = "held out: the k test folds (each evaluation input once); in-sample: the folds' repair splits"
    """From the cross-validated pooled table (columns repair, fl_method, budget, test_fixed, test_targets,
    test_broken, test_correct, repair_targets, rr_in_sample, and optionally repair_fixed): per FL method and budget
    the held-out repairability (Wilson 95 %), break rate, in-sample rate and ``compare``'s held-out rate at the same
    budget; Fisher's exact test of fixed / targets against ``baseline``'s at the same budget, Holm across methods."""
    if pooled is None or not len(pooled) or repair not in set(pooled["repair"]):
        return HeadlineBlock(title, what, pd.DataFrame(), f"{title}: no `{repair}` repair runs in this run.",
                             "repairability", split)
    ours = pooled[pooled["repair"] == repair]
    other = pooled[pooled["repair"] == compare].set_index(["fl_method", "budget"]) if compare else None
    rows = []
    for r in ours.to_dict("records"):
        t, f = int(r["test_targets"]), int(r["test_fixed"])
        c, b = int(r["test_correct"]), int(r["test_broken"])
        ci = wilson_interval(f, t) if t else None
        bci = wilson_interval(b, c) if c else None
        entry = {"fl_method": r["fl_method"], "budget": str(r["budget"]), "runs": int(r["runs"]),
                 "repairability": f / t if t else float("nan"),
                 "held out (Wilson 95%)": (f"{f / t:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({f}/{t})" if t else
                                           "n/a (0 targets)"),
                 "break rate held out": (f"{b / c:.4f} [{bci[0]:.4f}, {bci[1]:.4f}] ({b}/{c})" if c else
                                         "n/a (0 correct)"),
                 "in-sample": r.get("rr_in_sample", float("nan")), "test_fixed": f, "test_targets": t}
        rf, rt = r.get("repair_fixed"), r.get("repair_targets")
        if rf is not None and rt:
            ici = wilson_interval(int(rf), int(rt))
            entry["in-sample (Wilson 95%)"] = f"{rf / rt:.3f} [{ici[0]:.3f}, {ici[1]:.3f}] ({int(rf)}/{int(rt)})"
        if other is not None and (r["fl_method"], r["budget"]) in other.index:
            o = other.loc[(r["fl_method"], r["budget"])]
            ot = int(o["test_targets"])
            entry[f"{compare} held out"] = (f"{int(o['test_fixed']) / ot:.3f} ({int(o['test_fixed'])}/{ot})" if ot
                                           else "n/a (0 targets)")
        rows.append(entry)
    t = pd.DataFrame(rows)
    base = t[t["fl_method"] == baseline].set_index("budget")
    ps = []
    for r in t.itertuples():
        if r.fl_method == baseline or r.budget not in base.index or not r.test_targets:
            ps.append(float("nan"))
            continue
        bf, bt = int(base.loc[r.budget, "test_fixed"]), int(base.loc[r.budget, "test_targets"])
        if not bt:
            ps.append(float("nan"))
            continue
        ps.append(float(sps.fisher_exact([[r.test_fixed, r.test_targets - r.test_fixed], [bf, bt - bf]]).pvalue))
    t[f"Fisher p vs {baseline}"] = ps
    t["p_holm"] = holm(np.asarray(ps, dtype=float))
    base_rate = {b: (int(v["test_fixed"]) / int(v["test_targets"]) if int(v["test_targets"]) else float("nan"))
                 for b, v in base.iterrows()}
    t["verdict"] = [("baseline" if r.fl_method == baseline else
                     "n/a" if r.p_holm != r.p_holm else
                     ("above random" if r.repairability > base_rate.get(r.budget, float("nan")) else "below random")
                     if r.p_holm < alpha else "not separated") for r in t.itertuples()]
    t = t.sort_values(["budget", "repairability"], ascending=[True, False], kind="stable").reset_index(drop=True)
    n_tested = int((~t["verdict"].isin(["baseline", "n/a"])).sum())
    sep = t[t["verdict"].isin(["above random", "below random"])]
    head = (f"**{title}** ({what}; the `{repair}` optimiser's share of I_neg fixed on each FL method's located "
            f"weights, held out over the folds; Fisher's exact test against `{baseline}` at the same budget, "
            f"Holm-adjusted, alpha = {alpha}): ")
    if not n_tested:
        body = f"no method could be compared with `{baseline}`."
    elif not len(sep):
        body = f"**no** FL method's weights are more (or less) repairable than `{baseline}`'s ({n_tested} tested)."
    else:
        body = (f"{len(sep)} of {n_tested} differ from `{baseline}`: "
                + ", ".join(f"{r.fl_method} at N = {r.budget} ({r.verdict}, {r.repairability:.3f})"
                            for r in sep.itertuples()) + ".")
    return HeadlineBlock(title, what, t, head + body, "repairability", split,
                         "targets / correct inputs pooled over folds, settings and repetitions (in the cells)")


# ------------------------------------------------------------------------------------------------------- markdown
_SHOW = ["method", "n", "P@1%", "R@1%", "E[random]", "p_above", "p_below", "p_holm", "wilcoxon_p_holm", "verdict"]


def blocks_markdown(blocks: Sequence[HeadlineBlock]) -> str:
    """The headline blocks as Markdown: each sentence, then its sorted table."""
    from vitfl.evaluation.stats import to_markdown

    out = []
    for b in blocks:
        out += [b.sentence, ""]
        if not len(b.table):
            continue
        out += [f"split: {b.split or 'see the sentence'}; n: {b.n or 'column n'}", ""]
        t = b.table.copy()
        if b.metric == "repairability":
            cols = [c for c in t.columns if c not in ("repairability", "test_fixed", "test_targets", "in-sample")]
            t["p_holm"] = t["p_holm"].map(_fmt_p)
            t[[c for c in cols if c.startswith("Fisher")]] = t[[c for c in cols if c.startswith("Fisher")]].map(_fmt_p)
        else:
            cols = [c for c in [*_SHOW[:2], b.metric, *[c for c in t.columns if c.startswith("R@")], *_SHOW[4:]]
                    if c in t.columns]
            for c in ("p_above", "p_below", "p_holm", "wilcoxon_p_holm"):
                if c in t:
                    t[c] = t[c].map(_fmt_p)
            t["E[random]"] = t["E[random]"].map(lambda v: f"{v:.4f}")
            for c in cols:
                if c.startswith("R@") and c != b.metric:
                    t[c] = t[c].map(lambda v: f"{v:.4f}")
        out += [to_markdown(t[cols]), ""]
    return "\n".join(out).rstrip() + "\n"


def repair_verdicts(table: pd.DataFrame, paired: pd.DataFrame, metric: str = "rr", alpha: float = 0.05,
                    reference: str = "random") -> pd.DataFrame:
    """The repair results in one table a reader can act on: per (dataset, repair, budget), the FL methods sorted by
    pooled held-out RR (best first) with Wilson intervals and counts, pooled BR, and each method's paired verdict
    against ``reference`` on ``metric`` (Wilcoxon signed-rank over runs matched by (setting, rep), Holm-adjusted
    within the cell): "above random", "below random", "not separated" (with p_Holm) or "no paired runs". A ``block``
    column (results of several transformer blocks) makes each block its own cells, named as the statistics name them.

    ``table``: :func:`vitfl.pipeline.repair.summary_table`'s columns (``rr_pooled``, ``rr_lo``, ``rr_hi``,
    ``n_test_fixed``, ``n_test_targets``, ``br_pooled``, ``br_lo``, ``br_hi``, ``n_test_broken``,
    ``n_test_correct``); ``paired``: its Wilcoxon table (``question``, ``method_a``, ``method_b``, ``median_diff``,
    ``p_holm``, ``n``)."""
    from vitfl.core.style import budget_key

    rows = []
    blocks = ["block"] if "block" in table.columns else []  # results of several blocks: each block its own cells
    for key, g in table.groupby(["dataset", *blocks, "repair", "budget"], sort=False):
        dataset, repair, budget = key[0], key[-2], key[-1]
        where = f"{dataset} (block {key[1]})" if blocks else dataset  # as the statistics name the cell
        q = f"{where} / {repair} / n={budget} / {metric} (test fold)"
        st = paired[paired["question"] == q] if len(paired) and "question" in paired.columns else paired
        for _, r in g.iterrows():
            m = r["fl_method"]
            verdict = "-" if m == reference else "no paired runs"
            if m != reference and len(st):
                hit = st[((st["method_a"] == m) & (st["method_b"] == reference))
                         | ((st["method_a"] == reference) & (st["method_b"] == m))]
                if len(hit):
                    h = hit.iloc[0]
                    diff = h["median_diff"] if h["method_a"] == m else -h["median_diff"]
                    p = h["p_holm"]
                    if p == p and p < alpha and diff != 0:
                        verdict = f"{'above' if diff > 0 else 'below'} {reference} (p_Holm {_fmt_p(p)}, n {int(h['n'])})"
                    else:
                        verdict = f"not separated (p_Holm {_fmt_p(p)}, n {int(h['n'])})"
            rr = ("n/a (0 targets)" if not r["n_test_targets"] else
                  f"{r['rr_pooled']:.3f} [{r['rr_lo']:.3f}, {r['rr_hi']:.3f}] ({int(r['n_test_fixed'])}/"
                  f"{int(r['n_test_targets'])})")
            br = ("n/a (0 correct)" if not r["n_test_correct"] else
                  f"{r['br_pooled']:.3f} [{r['br_lo']:.3f}, {r['br_hi']:.3f}] ({int(r['n_test_broken'])}/"
                  f"{int(r['n_test_correct'])})")
            rows.append({"dataset": dataset, **({"block": str(key[1])} if blocks else {}), "repair": repair,
                         "budget": str(budget), "FL method": m,
                         "RR held out [95% CI] (fixed/targets)": rr, "BR held out [95% CI] (broken/correct)": br,
                         f"{metric.upper()} vs {reference} (Wilcoxon, Holm)": verdict,
                         "_rr": -1.0 if r["rr_pooled"] != r["rr_pooled"] else float(r["rr_pooled"]),
                         "_b": budget_key(budget)})
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows).sort_values(["dataset", *blocks, "repair", "_b", "_rr"],
                                         ascending=[True] * (len(blocks) + 3) + [False], kind="stable")
    return out.drop(columns=["_rr", "_b"]).reset_index(drop=True)
