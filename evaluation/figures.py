"""Figures of the FL evaluation and the repair sweep, in the one house style (:mod:`core.style`: TrueType
fonts, single-column sizes, one fixed colour per method). Each function returns a Figure; where there is nothing
to draw it returns :func:`core.style.nothing_to_plot` (never an empty figure). :func:`save_figure` writes
PNG and PDF atomically and closes the figure; a nothing-to-plot figure becomes a ``.nothing_to_plot.txt`` note.

Many methods are faceted (one small panel per method, or per group of at most :data:`PER_PANEL` methods) instead of
24 lines or 48 boxes in one panel.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core import style  # noqa: E402
from evaluation.ranking_metrics import fraction_label  # noqa: E402

__all__ = ["intervention_distributions", "flip_counts", "ranking_curves", "save_figure", "repair_bars",
           "in_sample_vs_held_out", "rates_by_kind", "cost_vs_quality", "fitness_curves", "PER_PANEL"]

_BASELINE = "#d9d9d9"  # random at the same count (hatched), apart from the random method's own grey

#: at most this many methods share one panel of a line plot
PER_PANEL = 4


def save_figure(fig, stem: str | Path, close: bool = True, dpi: int = 200,
                writer: Callable | None = None) -> list[Path]:
    """``{stem}.png`` and ``{stem}.pdf`` (TrueType fonts), through ``writer`` (e.g. ``store.save_figure``;
    default ``core.io.atomic_savefig``). A :func:`core.style.nothing_to_plot` figure writes
    ``{stem}.nothing_to_plot.txt`` instead and returns []."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + f".{ext}") for ext in ("png", "pdf")]
    return style.save(fig, paths, writer=writer, close=close, dpi=dpi)


_RESULT_LABEL = re.compile(r"^(?P<method>.+)_n(?P<budget>[^_]+)-(?P<key>[0-9a-f]{12})$")


def _method_of(label: str) -> tuple[str, str]:
    """(FL method, short panel title) of a series label: the FL evaluation labels its per-result series
    ``{method}_n{N}-{key}``; the method decides the colour, the title drops the key."""
    m = _RESULT_LABEL.match(str(label))
    return (m["method"], f"{m['method']} (n={m['budget']})") if m else (str(label), str(label))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


# ------------------------------------------------------------------------------------------------ interventions
def intervention_distributions(records: pd.DataFrame, title: str = "", group: str = "I_neg",
                               kind: str = "box", value: str = "abs_delta_p"):
    """One small panel per FL method: per mode, the distribution of |delta p| over the inputs of ``group`` for the
    method (its colour) and its random baseline at the same count (all draws pooled, light grey, hatched) side by side.
    ``records``: the long table of :func:`evaluation.interventions.run_interventions` (columns method,
    baseline_of, mode, group, value)."""
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    sub = records[records["group"] == group] if len(records) else records
    methods = list(dict.fromkeys(sub.loc[sub["baseline_of"] == "", "method"])) if len(sub) else []
    if not methods or sub[value].notna().sum() == 0:
        return style.nothing_to_plot(f"no |Δp| values for {group}" + (f" ({title})" if title else ""))
    modes = list(dict.fromkeys(sub["mode"]))
    base = {m: _method_of(m) for m in methods}
    by_method = style.method_colors(dict.fromkeys(b for b, _ in base.values()))
    colors = {m: by_method[base[m][0]] for m in methods}
    fig, axes = style.facet_grid(len(methods), panel_width=max(1.4, 0.55 * len(modes) + 0.6))
    for ax, m in zip(axes, methods):
        data, cols, pos = [], [], []
        for j, mode in enumerate(modes):
            own = sub[(sub["mode"] == mode) & (sub["method"] == m)][value].dropna().to_numpy()
            rnd = sub[(sub["mode"] == mode) & (sub["baseline_of"] == m)][value].dropna().to_numpy()
            for off, vals, c in ((-0.2, own, colors[m]), (0.2, rnd, _BASELINE)):
                if len(vals):
                    data.append(vals)
                    cols.append(c)
                    pos.append(j + off)
        if not data:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        elif kind == "box":
            bp = ax.boxplot(data, positions=pos, widths=0.35, patch_artist=True, showfliers=False,
                            medianprops={"color": "k", "linewidth": 0.8})
            for patch, med, c in zip(bp["boxes"], bp["medians"], cols):
                patch.set_facecolor(c)
                if c == _BASELINE:
                    patch.set_hatch("////")
                else:  # a near-flat box still shows its method's colour
                    patch.set_edgecolor(c)
                    med.set_color(c)
        else:
            ok = [(p, d, c) for p, d, c in zip(pos, data, cols) if len(d) > 1]
            if ok:
                vp = ax.violinplot([d for _, d, _ in ok], positions=[p for p, _, _ in ok], widths=0.35,
                                   showmedians=True)
                for body, (_, _, c) in zip(vp["bodies"], ok):
                    body.set_facecolor(c)
                    body.set_alpha(0.8)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(base[m][1])
    for ax in (a for a in axes if a.get_subplotspec().is_first_col()):
        ax.set_ylabel(f"|Δp| ({group})" if value == "abs_delta_p" else value)
    fig.suptitle(f"{title}: per method (colour) vs random at the same count (hatched)" if title else
                 "per method (colour) vs random at the same count (hatched)")
    fig.tight_layout()
    return fig


def flip_counts(summary: pd.DataFrame, title: str = "", groups: Sequence[str] = ("I_neg", "I_pos", "rest")):
    """One small panel per FL method: prediction flips per input group and mode, the method (solid) beside random
    (mean over draws, faded). ``summary``: :func:`evaluation.interventions.summarize_interventions`. Nothing to
    plot when no method and no random draw flipped any prediction."""
    if not len(summary):
        return style.nothing_to_plot(f"no intervention summary{' (' + title + ')' if title else ''}")
    groups = [g for g in groups if g in set(summary["group"])]
    methods = list(dict.fromkeys(summary.loc[summary["baseline_of"] == "", "method"]))
    if not methods or not groups or float(summary["flips"].fillna(0).abs().sum()) == 0:
        return style.nothing_to_plot("no prediction flipped under any intervention"
                                     + (f" ({title})" if title else ""))
    modes = list(dict.fromkeys(summary["mode"]))
    base = {m: _method_of(m) for m in methods}
    by_method = style.method_colors(dict.fromkeys(b for b, _ in base.values()))
    colors = {m: by_method[base[m][0]] for m in methods}
    fig, axes = style.facet_grid(len(methods), panel_width=max(1.4, 0.45 * len(groups) * len(modes) + 0.6))
    bw = 0.8 / (2 * len(modes))
    for ax, m in zip(axes, methods):
        for j, mode in enumerate(modes):
            s = summary[summary["mode"] == mode]
            own = [float(s[(s["method"] == m) & (s["group"] == g)]["flips"].sum()) for g in groups]
            rnd = [float(s[(s["baseline_of"] == m) & (s["group"] == g)]["flips"].sum()) for g in groups]
            x = np.arange(len(groups)) + (2 * j - len(modes)) * bw + bw / 2
            ax.bar(x, own, bw, color=colors[m], hatch="" if j == 0 else "//", edgecolor="k", linewidth=0.3,
                   label=f"{mode}")
            ax.bar(x + bw, rnd, bw, color=_BASELINE, hatch="...." if j == 0 else "//..",
                   edgecolor="k", linewidth=0.3)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(base[m][1])
    axes[0].set_ylabel("flips")
    if len(modes) > 1:
        axes[0].legend(title="mode (hatch)", loc="upper left")
    fig.suptitle(f"{title}: prediction flips, method (colour) vs random (dotted)" if title else
                 "prediction flips, method (colour) vs random (dotted)")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------------------- P@K curves
def ranking_curves(df: pd.DataFrame, fractions: Sequence[float], metric: str = "P", title: str = "",
                   group_col: str = "method", band: str = "iqr"):
    """``metric``@K against K (log x), one line per method: the mean over its rows (settings or seeds) with a band
    over them (``band``: "range" = min-max, "iqr" = 25-75 %, "none"), random's exact expectation dashed; at most
    :data:`PER_PANEL` methods per panel (panels share both axes). ``df``: rows of
    :func:`evaluation.ranking_metrics.evaluate_ranking`."""
    if band not in ("range", "iqr", "none"):
        raise ValueError(f"band must be 'range', 'iqr' or 'none', got {band!r}")
    cols = [f"{metric}@{fraction_label(f)}" for f in fractions]
    rcols = [f"rand_{metric}@{fraction_label(f)}" for f in fractions]
    have = [c for c in cols if c in df.columns] if len(df) else []
    d = df[df[have].notna().all(axis=1)] if have else df.iloc[0:0]
    if not have or not len(d):
        return style.nothing_to_plot(f"no {metric}@K values" + (f" ({title})" if title else ""))
    methods = list(dict.fromkeys(d[group_col].astype(str)))
    colors = style.method_colors(methods)
    groups = _chunks(methods, PER_PANEL)
    xs = np.array([100 * f for f in fractions])
    fig, axes = style.facet_grid(len(groups), ncols=min(2, len(groups)),
                                 panel_width=style.COLUMN_WIDTH if len(groups) > 1 else style.COLUMN_WIDTH + 1.0,
                                 panel_height=2.3)
    rand = [d[c].mean() for c in rcols] if all(c in d.columns for c in rcols) else None
    for ax, ms in zip(axes, groups):
        for m in ms:
            sub = d[d[group_col].astype(str) == m][cols].to_numpy(dtype=float)
            mean = sub.mean(axis=0)
            ax.plot(xs, mean, color=colors[m], marker="o", markersize=2.5, label=f"{m} (n={len(sub)})")
            if band != "none" and len(sub) > 1:
                lo, hi = (sub.min(0), sub.max(0)) if band == "range" else np.percentile(sub, [25, 75], axis=0)
                ax.fill_between(xs, lo, hi, color=colors[m], alpha=0.15, linewidth=0)
        if rand is not None:
            ax.plot(xs, rand, "k--", linewidth=0.9, label="random (exact E)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [fraction_label(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("K (% of the weights)")
        ax.set_ylabel(f"{metric}@K")
        ax.legend(loc="best", fontsize=6)
    what = {"range": "band: min-max over rows", "iqr": "band: IQR over rows", "none": ""}[band]
    fig.suptitle(f"{title} ({what})" if title and what else title or what)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------- repair
def _err(mid, lo, hi):
    mid, lo, hi = (np.asarray(v, dtype=float) for v in (mid, lo, hi))
    return np.vstack([np.where(np.isnan(lo), 0, mid - lo), np.where(np.isnan(hi), 0, hi - mid)])


_REPAIR_METRICS = (("rr", "RR (test fold)"), ("br", "BR (test fold)"), ("delta_acc", "Δ acc (test fold)"))


def repair_bars(table: pd.DataFrame, title: str = "", methods: Sequence[str] | None = None,
                budgets: Sequence[str] | None = None):
    """Pooled RR and BR (Wilson 95 % intervals, inside [0, 1]) and mean delta accuracy (bootstrap 95 %) per
    budget and FL method, from :func:`pipeline.repair.summary_table` rows of one (dataset, repair). A cell with no
    denominator (RR without targets) has no bar and is marked "n/a"."""
    if not len(table):
        return style.nothing_to_plot(f"no repair results{' (' + title + ')' if title else ''}")
    methods = list(methods or dict.fromkeys(table["fl_method"]))
    budgets = list(budgets or dict.fromkeys(table["budget"]))
    colors = style.method_colors(methods)
    fig, axes = style.figure(style.DOUBLE_WIDTH, 2.2, ncols=3)
    width = 0.8 / max(1, len(methods))
    for ax, (metric, name) in zip(axes[0], _REPAIR_METRICS):
        mid_col, lo_col, hi_col = ((f"{metric}_pooled", f"{metric}_lo", f"{metric}_hi") if metric != "delta_acc"
                                   else ("delta_acc_mean", "delta_acc_lo", "delta_acc_hi"))
        for i, m in enumerate(methods):
            sub = table[table["fl_method"] == m].set_index("budget")
            mid = np.array([sub[mid_col].get(b, np.nan) for b in budgets], dtype=float)
            lo = np.array([sub[lo_col].get(b, np.nan) for b in budgets], dtype=float)
            hi = np.array([sub[hi_col].get(b, np.nan) for b in budgets], dtype=float)
            x = np.arange(len(budgets)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, np.nan_to_num(mid), width, color=colors[m], label=m, yerr=_err(mid, lo, hi),
                   error_kw={"elinewidth": 0.7, "capsize": 1.5})
            for xi, v in zip(x, mid):
                if np.isnan(v):
                    ax.text(xi, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=5)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlabel("budget (weights)")
        ax.set_title(name)
        if metric != "delta_acc":
            ax.set_ylim(0, 1)
        ax.axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(loc="upper left")
    fig.suptitle(f"{title}: pooled rates with Wilson 95 % CI; Δ acc mean with bootstrap 95 % CI" if title else
                 "pooled rates with Wilson 95 % CI; Δ acc mean with bootstrap 95 % CI")
    fig.tight_layout()
    return fig


def in_sample_vs_held_out(table: pd.DataFrame, title: str = ""):
    """Pooled RR on the repair split (in-sample: the inputs the search saw) against RR on the held-out test fold,
    one point per (FL method, budget), Wilson 95 % intervals both ways; the diagonal marks equal RR."""
    t = table.dropna(subset=["rr_pooled", "rr_repair_pooled"]) if len(table) else table
    if not len(t):
        return style.nothing_to_plot("no cell has both an in-sample and a held-out RR")
    methods = list(dict.fromkeys(t["fl_method"]))
    colors = style.method_colors(methods)
    markers = dict(zip(dict.fromkeys(t["budget"]), "osD^v<>PX*"))
    fig, ax = style.figure(style.COLUMN_WIDTH, style.COLUMN_WIDTH)
    ax = ax[0, 0]
    ax.plot([0, 1], [0, 1], color="k", lw=0.5, ls=":")
    for r in t.itertuples(index=False):
        ax.errorbar(r.rr_repair_pooled, r.rr_pooled,
                    xerr=_err([r.rr_repair_pooled], [r.rr_repair_lo], [r.rr_repair_hi]),
                    yerr=_err([r.rr_pooled], [r.rr_lo], [r.rr_hi]), fmt=markers.get(r.budget, "o"),
                    color=colors[r.fl_method], elinewidth=0.6, markersize=3.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [Line2D([], [], color="k", marker=mk, ls="", label=f"n={b}") for b, mk in markers.items()]
    ax.legend(handles=handles, loc="upper left", fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("RR, repair split (in-sample)")
    ax.set_ylabel("RR, test fold (held out)")
    ax.set_title(title or "in-sample vs held-out RR")
    fig.tight_layout()
    return fig


def rates_by_kind(table: pd.DataFrame, title: str = ""):
    """RR and BR (pooled, Wilson 95 %) per setting kind (columns) and FL method, at each budget; rows of
    :func:`pipeline.repair.summary_table` with ``by=("kind",)``."""
    if not len(table) or "kind" not in table.columns:
        return style.nothing_to_plot("no per-kind repair table")
    kinds = list(dict.fromkeys(table["kind"]))
    methods = list(dict.fromkeys(table["fl_method"]))
    budgets = list(dict.fromkeys(table["budget"]))
    colors = style.method_colors(methods)
    fig, axes = style.figure(min(style.DOUBLE_WIDTH, 1.9 * len(kinds) + 0.5), 3.6, nrows=2, ncols=len(kinds),
                             sharey="row")
    width = 0.8 / max(1, len(methods))
    for j, kind in enumerate(kinds):
        for i_row, metric in enumerate(("rr", "br")):
            ax = axes[i_row, j]
            for i, m in enumerate(methods):
                sub = table[(table["kind"] == kind) & (table["fl_method"] == m)].set_index("budget")
                mid = np.array([sub[f"{metric}_pooled"].get(b, np.nan) for b in budgets], dtype=float)
                lo = np.array([sub[f"{metric}_lo"].get(b, np.nan) for b in budgets], dtype=float)
                hi = np.array([sub[f"{metric}_hi"].get(b, np.nan) for b in budgets], dtype=float)
                x = np.arange(len(budgets)) + (i - (len(methods) - 1) / 2) * width
                ax.bar(x, np.nan_to_num(mid), width, color=colors[m], label=m, yerr=_err(mid, lo, hi),
                       error_kw={"elinewidth": 0.6, "capsize": 1})
                for xi, v in zip(x, mid):
                    if np.isnan(v):
                        ax.text(xi, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=5)
            ax.set_xticks(range(len(budgets)), budgets)
            ax.set_ylim(0, 1)
            if i_row == 0:
                ax.set_title(kind)
            else:
                ax.set_xlabel("budget")
            if j == 0:
                ax.set_ylabel(f"{metric.upper()} (test fold)")
    axes[0, 0].legend(loc="upper left", fontsize=6)
    fig.suptitle(title or "RR / BR per setting kind (pooled, Wilson 95 % CI)")
    fig.tight_layout()
    return fig


def cost_vs_quality(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str = "",
                    label_col: str = "method", y_lo: str | None = None, y_hi: str | None = None,
                    logx: bool = True, marker_col: str | None = None):
    """A scatter of cost (``x``, e.g. FL or repair seconds) against quality (``y``, e.g. P@1% or RR), one point per
    row, coloured by ``label_col`` (a method), optional y intervals and marker per ``marker_col`` (e.g. budget)."""
    d = df.dropna(subset=[x, y]) if len(df) else df
    d = d[d[x] > 0] if logx and len(d) else d
    if not len(d):
        return style.nothing_to_plot(f"no rows with both {x} and {y}")
    methods = list(dict.fromkeys(d[label_col].astype(str)))
    colors = style.method_colors(methods)
    mk = dict(zip(dict.fromkeys(d[marker_col]), "osD^v<>PX*")) if marker_col else {}
    fig, ax = style.figure(style.COLUMN_WIDTH + 0.9, style.COLUMN_WIDTH * 0.8)
    ax = ax[0, 0]
    for r in d.itertuples(index=False):
        r = r._asdict()
        yerr = _err([r[y]], [r[y_lo]], [r[y_hi]]) if y_lo and y_hi else None
        ax.errorbar(r[x], r[y], yerr=yerr, fmt=mk.get(r[marker_col], "o") if marker_col else "o",
                    color=colors[str(r[label_col])], elinewidth=0.6, markersize=3.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in methods]
    handles += [Line2D([], [], color="k", marker=v, ls="", label=f"{marker_col}={k}") for k, v in mk.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6)
    if logx and d[x].max() / d[x].min() > 20:  # log only where the costs span decades
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def fitness_curves(curves: pd.DataFrame, title: str = ""):
    """DE fitness over generations aggregated across runs: per FL method (colour) the median over runs of the best
    and of the mean population fitness (dashed), each relative to the run's unpatched fitness (1 = no better
    than the original weights), with the 25-75 % band of the best. ``curves``: columns fl_method, run, step,
    best, mean (relative values); one panel per budget."""
    if not len(curves):
        return style.nothing_to_plot("no per-generation fitness values (TensorBoard logging was off)")
    budgets = (sorted(dict.fromkeys(curves["budget"]), key=lambda b: (0, int(b)) if str(b).isdigit() else (1, str(b)))
               if "budget" in curves.columns else [None])  # numeric budgets in order, then avg / front
    methods = list(dict.fromkeys(curves["fl_method"]))
    colors = style.method_colors(methods)
    fig, axes = style.facet_grid(len(budgets), ncols=min(3, len(budgets)), panel_width=2.3, panel_height=1.9,
                                 sharey=False)
    for ax, b in zip(axes, budgets):
        cb = curves if b is None else curves[curves["budget"] == b]
        for m in methods:
            cm = cb[cb["fl_method"] == m]
            if not len(cm):
                continue
            best = cm.pivot_table(index="step", columns="run", values="best").sort_index().ffill()
            mean = cm.pivot_table(index="step", columns="run", values="mean").sort_index().ffill()
            q = best.quantile([0.25, 0.5, 0.75], axis=1).T
            ax.plot(best.index, q[0.5], color=colors[m], label=f"{m} (runs={best.shape[1]})")
            ax.fill_between(best.index, q[0.25], q[0.75], color=colors[m], alpha=0.18, linewidth=0)
            ax.plot(mean.index, mean.median(axis=1), color=colors[m], ls="--", lw=0.8)
        ax.set_title(f"budget {b}" if b is not None else "")
        ax.set_xlabel("generation")
        ax.set_ylabel("fitness / unpatched fitness")
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(title or "DE fitness: median best (solid, IQR band) and mean (dashed) over runs")
    fig.tight_layout()
    return fig
