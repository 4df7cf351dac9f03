"""Figures of the FL evaluation and the repair sweep, in the one house style (:mod:`vitfl.core.style`: TrueType
fonts, single-column sizes, one fixed colour per method). Each function returns a Figure; where there is nothing
to draw it returns :func:`vitfl.core.style.nothing_to_plot` (never an empty figure). :func:`save_figure` (the one saver,
:func:`vitfl.core.style.save_figure`) writes PNG and PDF atomically and closes the figure; a nothing-to-plot figure
becomes a ``.nothing_to_plot.txt`` note.

Many methods are faceted (one small panel per method, or per group of at most :data:`PER_PANEL` methods, a method
family kept in one panel where it fits) instead of 24 lines or 48 boxes in one panel. Each method has one colour +
marker + line style (:func:`vitfl.core.style.method_styles`: a family shares a hue and a marker, its variants differ in
line style, marker fill and bar hatch). Legends never cover data: one figure legend under the panels
(:func:`vitfl.core.style.legend_outside`) or one legend above a panel (:func:`vitfl.core.style.legend_above`), with the
constrained layout keeping titles, tick labels and legends apart; every panel shows its own x tick labels; budgets
are in numeric order, ``avg`` / ``front`` last (:func:`vitfl.core.style.sort_budgets`).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vitfl.core import style  # noqa: E402
from vitfl.evaluation.ranking_metrics import fraction_label  # noqa: E402

__all__ = ["intervention_distributions", "flip_counts", "ranking_curves", "save_figure", "repair_bars",
           "in_sample_vs_held_out", "rates_by_kind", "cost_vs_quality", "fitness_curves", "layer_curve",
           "PER_PANEL"]

_BASELINE = "#d9d9d9"  # random at the same count (hatched), apart from the random method's own grey

#: at most this many methods share one panel of a line plot
PER_PANEL = 4


#: ``{stem}.png`` + ``{stem}.pdf``: the toolkit's one figure saver, :func:`vitfl.core.style.save_figure` (re-exported)
save_figure = style.save_figure


_RESULT_LABEL = re.compile(r"^(?P<method>.+)_n(?P<budget>[^_]+)-(?P<key>[0-9a-f]{12})$")


def _method_of(label: str) -> tuple[str, str]:
    """(FL method, short panel title) of a series label: the FL evaluation labels its per-result series
    ``{method}_n{N}-{key}``; the method decides the colour, the title drops the key."""
    m = _RESULT_LABEL.match(str(label))
    return (m["method"], f"{m['method']} (n={m['budget']})") if m else (str(label), str(label))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def _family_chunks(items: list, size: int) -> list[list]:
    """``items`` in panels of at most ``size``, in order, a method family (``bl``, ``bl_reptran``, ``bl_fl5``) kept
    in one panel where it fits (a family larger than ``size`` is split)."""
    fams: dict[str, list] = {}
    for m in items:
        fams.setdefault(style.method_family(m)[0], []).append(m)
    out: list[list] = []
    for members in fams.values():
        for part in _chunks(members, size):
            if out and len(out[-1]) + len(part) <= size:
                out[-1].extend(part)
            else:
                out.append(list(part))
    return out or [[]]


def _panel_titles(labels: list[str]) -> dict[str, tuple[str, str]]:
    """label -> (FL method, panel title); the budget is left out of the titles when every panel has the same one
    (the suptitle states it)."""
    parsed = {m: _method_of(m) for m in labels}
    budgets = {t.rsplit("(n=", 1)[-1] for _, t in parsed.values() if "(n=" in t}
    if len(budgets) <= 1:
        return {m: (b, b) for m, (b, _) in parsed.items()}
    return parsed


def _last_in_column(i: int, n: int, ncols: int) -> bool:
    """Whether panel ``i`` of ``n`` (row-major, ``ncols`` columns) has no panel under it."""
    return i + ncols >= n


def _ncols(axes) -> int:
    return axes[0].get_subplotspec().get_gridspec().ncols if axes else 1


#: hatch of each intervention mode's bars (the first mode plain)
_MODE_HATCH = ("", "//", "\\\\", "xx", "++")


# ------------------------------------------------------------------------------------------------ interventions
def intervention_distributions(records: pd.DataFrame, title: str = "", group: str = "I_neg",
                               kind: str = "box", value: str = "abs_delta_p"):
    """One small panel per FL method: per mode, the distribution of |delta p| over the inputs of ``group`` for the
    method (its colour) and its random baseline at the same count (all draws pooled, light grey, hatched) side by side.
    ``records``: the long table of :func:`vitfl.evaluation.interventions.run_interventions` (columns method,
    baseline_of, mode, group, value)."""
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    sub = records[records["group"] == group] if len(records) else records
    methods = list(dict.fromkeys(sub.loc[sub["baseline_of"] == "", "method"])) if len(sub) else []
    if not methods or sub[value].notna().sum() == 0:
        return style.nothing_to_plot(f"no |Δp| values for {group}" + (f" ({title})" if title else ""))
    modes = list(dict.fromkeys(sub["mode"]))
    base = _panel_titles(methods)
    by_method = style.method_colors(dict.fromkeys(b for b, _ in base.values()))
    colors = {m: by_method[base[m][0]] for m in methods}
    fig, axes = style.facet_grid(len(methods), panel_width=max(1.4, 0.55 * len(modes) + 0.6))
    ncols = _ncols(axes)
    for i, (ax, m) in enumerate(zip(axes, methods)):
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
        ax.set_xlim(-0.6, len(modes) - 0.4)
        ax.set_title(base[m][1])
        if _last_in_column(i, len(axes), ncols):
            ax.set_xlabel("mode")
    for ax in (a for a in axes if a.get_subplotspec().is_first_col()):
        ax.set_ylabel(f"|Δp| ({group})" if value == "abs_delta_p" else value)
    from matplotlib.patches import Patch

    style.legend_outside(fig, [Patch(facecolor="#9e9e9e", edgecolor="#9e9e9e"),
                               Patch(facecolor=_BASELINE, edgecolor="k", hatch="////", linewidth=0.5)],
                         ["FL method (the panel's; its colour)", "random at the same count (all draws pooled)"])
    what = f"|Δp| on {group} per FL method vs random at the same count"
    style.suptitle(fig, f"{title}: {what}" if title else what)
    return fig


def flip_counts(summary: pd.DataFrame, title: str = "", groups: Sequence[str] = ("I_neg", "I_pos", "rest")):
    """One small panel per FL method: prediction flips per input group and mode, the method (its colour) beside
    random at the same count (mean over draws, grey, dotted); the mode is the hatch. ``summary``:
    :func:`vitfl.evaluation.interventions.summarize_interventions`. Nothing to plot when no method and no random draw
    flipped any prediction."""
    if not len(summary):
        return style.nothing_to_plot(f"no intervention summary{' (' + title + ')' if title else ''}")
    groups = [g for g in groups if g in set(summary["group"])]
    methods = list(dict.fromkeys(summary.loc[summary["baseline_of"] == "", "method"]))
    if not methods or not groups or float(summary["flips"].fillna(0).abs().sum()) == 0:
        return style.nothing_to_plot("no prediction flipped under any intervention"
                                     + (f" ({title})" if title else ""))
    modes = list(dict.fromkeys(summary["mode"]))
    base = _panel_titles(methods)
    by_method = style.method_colors(dict.fromkeys(b for b, _ in base.values()))
    colors = {m: by_method[base[m][0]] for m in methods}
    hatch = {mode: _MODE_HATCH[j % len(_MODE_HATCH)] for j, mode in enumerate(modes)}
    fig, axes = style.facet_grid(len(methods), panel_width=max(1.4, 0.3 * len(groups) * len(modes) + 0.5))
    ncols = _ncols(axes)
    bw = 0.8 / (2 * len(modes))
    for i, (ax, m) in enumerate(zip(axes, methods)):
        for j, mode in enumerate(modes):
            s = summary[summary["mode"] == mode]
            own = [float(s[(s["method"] == m) & (s["group"] == g)]["flips"].sum()) for g in groups]
            rnd = [float(s[(s["baseline_of"] == m) & (s["group"] == g)]["flips"].sum()) for g in groups]
            x = np.arange(len(groups)) + (2 * j - len(modes)) * bw + bw / 2
            ax.bar(x, own, bw, color=colors[m], hatch=hatch[mode] or None, edgecolor="k", linewidth=0.3)
            ax.bar(x + bw, rnd, bw, color=_BASELINE, hatch=hatch[mode] + "....", edgecolor="k", linewidth=0.3)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(base[m][1])
        if _last_in_column(i, len(axes), ncols):
            ax.set_xlabel("input group")
    for ax in (a for a in axes if a.get_subplotspec().is_first_col()):
        ax.set_ylabel("flips")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#9e9e9e", edgecolor="k", linewidth=0.3),
               Patch(facecolor=_BASELINE, edgecolor="k", hatch="....", linewidth=0.3)]
    labels = ["FL method (the panel's; its colour)", "random at the same count (mean over draws; dotted)"]
    if len(modes) > 1:
        handles += [Patch(facecolor="white", edgecolor="k", hatch=hatch[mode] or None, linewidth=0.5)
                    for mode in modes]
        labels += [f"mode {mode}" + (" (plain)" if not hatch[mode] else f" (hatch {hatch[mode]})") for mode in modes]
    style.legend_outside(fig, handles, labels)
    what = "prediction flips per input group, FL method vs random at the same count"
    style.suptitle(fig, f"{title}: {what}" if title else what)
    return fig


# -------------------------------------------------------------------------------------------------- P@K curves
def ranking_curves(df: pd.DataFrame, fractions: Sequence[float], metric: str = "P", title: str = "",
                   group_col: str = "method", band: str = "iqr"):
    """``metric``@K against K (log x), one line per method: the mean over its rows (settings or seeds) with a band
    over them (``band``: "range" = min-max, "iqr" = 25-75 %, "none"), random's exact expectation dashed black; at
    most :data:`PER_PANEL` methods per panel (a method family kept together where it fits; panels share both
    axes; each panel has its legend above it). ``df``: rows of
    :func:`vitfl.evaluation.ranking_metrics.evaluate_ranking`."""
    if band not in ("range", "iqr", "none"):
        raise ValueError(f"band must be 'range', 'iqr' or 'none', got {band!r}")
    cols = [f"{metric}@{fraction_label(f)}" for f in fractions]
    rcols = [f"rand_{metric}@{fraction_label(f)}" for f in fractions]
    have = [c for c in cols if c in df.columns] if len(df) else []
    d = df[df[have].notna().all(axis=1)] if have else df.iloc[0:0]
    if not have or not len(d):
        return style.nothing_to_plot(f"no {metric}@K values" + (f" ({title})" if title else ""))
    methods = list(dict.fromkeys(d[group_col].astype(str)))
    styles = style.method_styles(methods)
    groups = _family_chunks(methods, PER_PANEL)
    xs = np.array([100 * f for f in fractions])
    fig, axes = style.facet_grid(len(groups), ncols=min(2, len(groups)),
                                 panel_width=style.COLUMN_WIDTH if len(groups) > 1 else style.COLUMN_WIDTH + 1.0,
                                 panel_height=2.6)
    ncols = _ncols(axes)
    rand = [d[c].mean() for c in rcols] if all(c in d.columns for c in rcols) else None
    for i, (ax, ms) in enumerate(zip(axes, groups)):
        for m in ms:
            sub = d[d[group_col].astype(str) == m][cols].to_numpy(dtype=float)
            mean = sub.mean(axis=0)
            ax.plot(xs, mean, label=f"{m} (n={len(sub)})", **styles[m].line(markersize=3))
            if band != "none" and len(sub) > 1:
                lo, hi = (sub.min(0), sub.max(0)) if band == "range" else np.percentile(sub, [25, 75], axis=0)
                ax.fill_between(xs, lo, hi, color=styles[m].color, alpha=0.15, linewidth=0)
        if rand is not None:
            ax.plot(xs, rand, color="k", ls="--", linewidth=0.9, label="random (exact E)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [fraction_label(f) for f in fractions])
        ax.minorticks_off()
        if _last_in_column(i, len(axes), ncols):
            ax.set_xlabel("K (% of the weights)")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(f"{metric}@K")
        style.legend_above(ax)
    what = {"range": "band: min-max over rows", "iqr": "band: IQR over rows", "none": ""}[band]
    style.suptitle(fig, f"{title} ({what})" if title and what else title or what)
    return fig


# --------------------------------------------------------------------------------------------------- repair
def _err(mid, lo, hi):
    mid, lo, hi = (np.asarray(v, dtype=float) for v in (mid, lo, hi))
    return np.vstack([np.where(np.isnan(lo), 0, mid - lo), np.where(np.isnan(hi), 0, hi - mid)])


_REPAIR_METRICS = (("rr", "RR (test fold)"), ("br", "BR (test fold)"), ("delta_acc", "Δ acc (test fold)"))


def _runs_per_bar(table: pd.DataFrame) -> str:
    """"8 runs per bar" (or "6-8 runs per bar") from the summary table's ``n_runs``; "" without the column."""
    if "n_runs" not in table.columns or not table["n_runs"].notna().any():
        return ""
    n = table["n_runs"].dropna().astype(int)
    lo, hi = int(n.min()), int(n.max())
    return f"{lo} runs per bar" if lo == hi else f"{lo}-{hi} runs per bar"


def _log_axis(axis, span: float) -> None:
    """A log scale labelled with plain numbers (0.02, 0.1, 0.5) at 1, 2 and 5 x each decade where it spans at most
    three decades, at the decades only beyond: no crowded 2x10^-2 / 3x10^-2 minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_minor_formatter(plain if span <= 1e3 else NullFormatter())
    # labelled minor ticks as long as the major ones, so every label sits on one line
    axis.axes.tick_params(axis="x" if axis is axis.axes.xaxis else "y", which="minor",
                          length=matplotlib.rcParams["xtick.major.size"])


def _bar_handles(methods, styles):
    return [styles[m].handle("bar") for m in methods], list(methods)


def repair_bars(table: pd.DataFrame, title: str = "", methods: Sequence[str] | None = None,
                budgets: Sequence[str] | None = None):
    """Pooled RR and BR (Wilson 95 % intervals, inside [0, 1]) and mean delta accuracy (bootstrap 95 %) per
    budget and FL method, from :func:`vitfl.pipeline.repair.summary_table` rows of one (dataset, repair). A cell with no
    denominator (RR without targets) has no bar and is marked "n/a". The title adds how many runs each bar pools
    (the table's ``n_runs``: the settings x repetitions of one FL method and budget) to the caller's ``title``."""
    if not len(table):
        return style.nothing_to_plot(f"no repair results{' (' + title + ')' if title else ''}")
    methods = list(methods or dict.fromkeys(table["fl_method"]))
    budgets = list(budgets or style.sort_budgets(table["budget"]))
    styles = style.method_styles(methods)
    fig, axes = style.figure(style.DOUBLE_WIDTH, 2.2, ncols=3, layout="constrained")
    width = 0.8 / max(1, len(methods))
    shown = table[table["fl_method"].isin(methods) & table["budget"].isin(budgets)]
    for ax, (metric, name) in zip(axes[0], _REPAIR_METRICS):
        mid_col, lo_col, hi_col = ((f"{metric}_pooled", f"{metric}_lo", f"{metric}_hi") if metric != "delta_acc"
                                   else ("delta_acc_mean", "delta_acc_lo", "delta_acc_hi"))
        for i, m in enumerate(methods):
            sub = table[table["fl_method"] == m].set_index("budget")
            mid = np.array([sub[mid_col].get(b, np.nan) for b in budgets], dtype=float)
            lo = np.array([sub[lo_col].get(b, np.nan) for b in budgets], dtype=float)
            hi = np.array([sub[hi_col].get(b, np.nan) for b in budgets], dtype=float)
            x = np.arange(len(budgets)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, np.nan_to_num(mid), width, label=m, yerr=_err(mid, lo, hi),
                   error_kw={"elinewidth": 0.7, "capsize": 1.5 if len(methods) <= 8 else 0}, **styles[m].bar())
            for xi, v in zip(x, mid):
                if np.isnan(v):
                    ax.text(xi, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=5)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlabel("budget (weights)")
        ax.set_title(name)
        if metric != "delta_acc":
            ax.set_ylim(0, 1)
        ax.axhline(0, color="k", lw=0.5)
    style.legend_outside(fig, *_bar_handles(methods, styles))
    per_bar = _runs_per_bar(shown)
    what = "pooled rates with Wilson 95 % CI; Δ acc mean with bootstrap 95 % CI"
    head = f"{title} ({per_bar})" if title and per_bar else title or per_bar
    style.suptitle(fig, f"{head}: {what}" if head else what)
    return fig


def in_sample_vs_held_out(table: pd.DataFrame, title: str = ""):
    """Pooled RR on the repair split (in-sample: the inputs the search saw) against RR on the held-out test fold,
    one point per (FL method, budget), Wilson 95 % intervals both ways; the diagonal marks equal RR."""
    t = table.dropna(subset=["rr_pooled", "rr_repair_pooled"]) if len(table) else table
    if not len(t):
        return style.nothing_to_plot("no cell has both an in-sample and a held-out RR")
    methods = list(dict.fromkeys(t["fl_method"]))
    styles = style.method_styles(methods)
    markers = dict(zip(style.sort_budgets(t["budget"]), "osD^v<>PX*"))
    fig, ax = style.figure(style.COLUMN_WIDTH, style.COLUMN_WIDTH, layout="constrained")
    ax = ax[0, 0]
    ax.plot([0, 1], [0, 1], color="k", lw=0.5, ls=":")
    for r in t.itertuples(index=False):
        st = styles[r.fl_method]
        ax.errorbar(r.rr_repair_pooled, r.rr_pooled,
                    xerr=_err([r.rr_repair_pooled], [r.rr_repair_lo], [r.rr_repair_hi]),
                    yerr=_err([r.rr_pooled], [r.rr_lo], [r.rr_hi]), elinewidth=0.6, markersize=3.5,
                    **st.point(marker=markers.get(r.budget, "o")))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **styles[m].point(marker="o")) for m in methods]
    handles += [Line2D([], [], color="k", marker=mk, ls="") for mk in markers.values()]
    style.legend_outside(fig, handles, methods + [f"n={b}" for b in markers])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("RR, repair split (in-sample)")
    ax.set_ylabel("RR, test fold (held out)")
    style.suptitle(fig, title or "in-sample vs held-out RR")
    return fig


def rates_by_kind(table: pd.DataFrame, title: str = ""):
    """RR and BR (pooled, Wilson 95 %) per setting kind (columns) and FL method, at each budget; rows of
    :func:`vitfl.pipeline.repair.summary_table` with ``by=("kind",)``."""
    if not len(table) or "kind" not in table.columns:
        return style.nothing_to_plot("no per-kind repair table")
    kinds = list(dict.fromkeys(table["kind"]))
    methods = list(dict.fromkeys(table["fl_method"]))
    budgets = style.sort_budgets(table["budget"])
    styles = style.method_styles(methods)
    fig, axes = style.figure(min(style.DOUBLE_WIDTH, 1.9 * len(kinds) + 0.5), 3.6, nrows=2, ncols=len(kinds),
                             sharey="row", layout="constrained")
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
                ax.bar(x, np.nan_to_num(mid), width, label=m, yerr=_err(mid, lo, hi),
                       error_kw={"elinewidth": 0.6, "capsize": 1 if len(methods) <= 8 else 0}, **styles[m].bar())
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
    style.legend_outside(fig, *_bar_handles(methods, styles))
    style.suptitle(fig, title or "RR / BR per setting kind (pooled, Wilson 95 % CI)")
    return fig


def cost_vs_quality(df: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str = "",
                    label_col: str = "method", y_lo: str | None = None, y_hi: str | None = None,
                    logx: bool = True, marker_col: str | None = None):
    """A scatter of cost (``x``, e.g. FL or repair seconds) against quality (``y``, e.g. P@1% or RR), one point per
    row, in the style of its ``label_col`` (a method: colour, marker, fill), optional y intervals; with
    ``marker_col`` (e.g. budget) the marker shows that column instead (its values in numeric order, ``avg`` /
    ``front`` last). The legend is under the plot."""
    d = df.dropna(subset=[x, y]) if len(df) else df
    d = d[d[x] > 0] if logx and len(d) else d
    if not len(d):
        return style.nothing_to_plot(f"no rows with both {x} and {y}")
    methods = list(dict.fromkeys(d[label_col].astype(str)))
    styles = style.method_styles(methods)
    mk = dict(zip(style.sort_budgets(d[marker_col]), "osD^v<>PX*")) if marker_col else {}
    fig, ax = style.figure(style.COLUMN_WIDTH + 0.9, style.COLUMN_WIDTH * 0.8, layout="constrained")
    ax = ax[0, 0]
    for r in d.itertuples(index=False):
        r = r._asdict()
        yerr = _err([r[y]], [r[y_lo]], [r[y_hi]]) if y_lo and y_hi else None
        st = styles[str(r[label_col])]
        kw = st.point(marker=mk.get(r[marker_col], "o")) if marker_col else st.point()
        ax.errorbar(r[x], r[y], yerr=yerr, elinewidth=0.6, markersize=4, **kw)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **(styles[m].point(marker="o") if marker_col else styles[m].point())) for m in methods]
    labels = list(methods)
    handles += [Line2D([], [], color="k", marker=v, ls="") for v in mk.values()]
    labels += [f"{marker_col}={k}" for k in mk]
    if logx and d[x].max() / d[x].min() > 20:  # log only where the costs span decades
        _log_axis(ax.xaxis, d[x].max() / d[x].min())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    style.legend_outside(fig, handles, labels)
    style.suptitle(fig, title)
    return fig


def fitness_curves(curves: pd.DataFrame, title: str = ""):
    """DE fitness over generations aggregated across runs: per FL method (its colour, marker and line style) the
    median over runs of the best (thick, with the 25-75 % band) and of the mean population fitness (thin), each
    relative to the run's unpatched fitness (1 = no better than the original weights). ``curves``: columns
    fl_method, run, step, best, mean (relative values); one panel per budget (numeric order, then avg / front),
    its title saying how many runs each curve pools; one legend under the panels."""
    if not len(curves):
        return style.nothing_to_plot("no per-generation fitness values (TensorBoard logging was off)")
    budgets = style.sort_budgets(curves["budget"]) if "budget" in curves.columns else [None]
    methods = list(dict.fromkeys(curves["fl_method"]))
    styles = style.method_styles(methods)
    fig, axes = style.facet_grid(len(budgets), ncols=2 if len(budgets) == 4 else min(3, len(budgets)),
                                 panel_width=2.3, panel_height=1.9, sharey=False)
    ncols = _ncols(axes)
    for i, (ax, b) in enumerate(zip(axes, budgets)):
        cb = curves if b is None else curves[curves["budget"] == b]
        runs = []
        for m in methods:
            cm = cb[cb["fl_method"] == m]
            if not len(cm):
                continue
            best = cm.pivot_table(index="step", columns="run", values="best").sort_index().ffill()
            mean = cm.pivot_table(index="step", columns="run", values="mean").sort_index().ffill()
            runs.append(best.shape[1])
            q = best.quantile([0.25, 0.5, 0.75], axis=1).T
            ax.plot(best.index, q[0.5], **styles[m].line(lw=1.4, markersize=3,
                                                         markevery=max(1, len(best.index) // 6)))
            ax.fill_between(best.index, q[0.25], q[0.75], color=styles[m].color, alpha=0.15, linewidth=0)
            ax.plot(mean.index, mean.median(axis=1), color=styles[m].color, ls=styles[m].linestyle, lw=0.7,
                    alpha=0.8)
        n_runs = "" if not runs else (f"{runs[0]} runs per curve" if min(runs) == max(runs)
                                      else f"{min(runs)}-{max(runs)} runs per curve")
        ax.set_title(", ".join(t for t in (f"budget {b}" if b is not None else "", n_runs) if t))
        if _last_in_column(i, len(axes), ncols):
            ax.set_xlabel("generation")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("fitness / unpatched")
    from matplotlib.lines import Line2D

    handles = [styles[m].handle("line") for m in methods]
    handles += [Line2D([], [], color="k", lw=1.4), Line2D([], [], color="k", lw=0.7, alpha=0.8)]
    style.legend_outside(fig, handles, methods + ["median best (band: IQR over runs)",
                                                  "median population mean"])
    style.suptitle(fig, title or "DE fitness: median best (thick, IQR band) and mean (thin) over runs")
    return fig


# ---------------------------------------------------------------------------------------------- layer study
#: the layer study's series: FFN output removed (the curve), activations zeroed, the unmodified model, the share
_LAYER_COLORS = {"removed": "#d62728", "zeroed": "#1f77b4", "intact": "#4d4d4d", "share": "#2ca02c"}


def layer_curve(blocks: pd.DataFrame, acc: float, title: str = ""):
    """The per-block layer study (:func:`vitfl.evaluation.testbed.layer_curve`): left, top-1 with block b's FFN output
    removed from the residual stream (``acc_ffn_removed``, solid) and, where the table has it, with its activations
    zeroed (``acc_zeroed``: the FFN adds only its output bias; dashed) against the block index, the unmodified
    model's top-1 ``acc`` as a dotted grey reference line; right, the FFN output's share of the residual stream
    (``residual_share``: mean ||FFN out|| / ||x + FFN out|| on the readout token). ``blocks``: one row per block
    (columns ``block``, ``acc_ffn_removed``, ``residual_share``, optional ``acc_zeroed``). One legend under the
    panels; ``title`` (e.g. split and n) leads the suptitle."""
    need = ("block", "acc_ffn_removed", "residual_share")
    d = blocks.dropna(subset=list(need)) if len(blocks) and all(c in blocks.columns for c in need) else None
    if d is None or not len(d):
        return style.nothing_to_plot("no per-block layer numbers" + (f" ({title})" if title else ""))
    d = d.sort_values("block")
    x = d["block"].to_numpy(dtype=int)
    fig, axes = style.figure(style.DOUBLE_WIDTH, 2.1, ncols=2, layout="constrained")
    ax_acc, ax_share = axes[0]
    c = _LAYER_COLORS
    ax_acc.axhline(acc, color=c["intact"], ls=":", lw=1.0)
    # the curve wide and under the dashed one, so both show where they coincide
    ax_acc.plot(x, d["acc_ffn_removed"], color=c["removed"], marker="o", ls="-", lw=2.2, markersize=5.5, zorder=2)
    have_zeroed = "acc_zeroed" in d.columns and d["acc_zeroed"].notna().any()
    if have_zeroed:
        ax_acc.plot(x, d["acc_zeroed"], color=c["zeroed"], marker="s", markerfacecolor="white", ls="--", lw=1.0,
                    markersize=3.5, zorder=3)
    shown = [float(acc), *d["acc_ffn_removed"]] + ([*d["acc_zeroed"].dropna()] if have_zeroed else [])
    ax_acc.set_ylim(max(0.0, min(shown) - 0.05), min(1.0, max(shown) + 0.05))
    ax_acc.set_ylabel("top-1")
    ax_acc.set_title("top-1 with the block's FFN removed / zeroed")
    ax_share.plot(x, d["residual_share"], color=c["share"], marker="D", ls="-", markersize=3.5)
    ax_share.set_ylim(0, max(1.0, 1.05 * float(d["residual_share"].max())))
    ax_share.set_ylabel("residual share")
    ax_share.set_title("FFN output's share ‖o‖ / ‖x + o‖")
    for ax in (ax_acc, ax_share):
        ax.set_xticks(x, [str(b) for b in x])
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
        ax.set_xlabel("block (0 = first)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c["removed"], marker="o", ls="-", lw=2.2, markersize=5.5)]
    labels = ["FFN output removed (o = 0)"]
    if have_zeroed:
        handles.append(Line2D([], [], color=c["zeroed"], marker="s", markerfacecolor="white", ls="--", lw=1.0,
                              markersize=3.5))
        labels.append("activations zeroed (bias kept)")
    handles += [Line2D([], [], color=c["intact"], ls=":", lw=1.0),
                Line2D([], [], color=c["share"], marker="D", ls="-", markersize=3.5)]
    labels += [f"unmodified model ({acc:.3f})", "residual share (readout token, mean over inputs)"]
    style.legend_outside(fig, handles, labels)
    what = "Layer study: which block's FFN the model needs"
    style.suptitle(fig, f"{what} ({title})" if title else what)
    return fig
