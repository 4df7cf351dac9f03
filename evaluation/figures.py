"""Figures of the FL evaluation (matplotlib, Agg). Each function returns a Figure; :func:`save_figure` writes it
as PNG and PDF atomically (``core.io.atomic_savefig``) and closes it unless told otherwise."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evaluation.ranking_metrics import fraction_label  # noqa: E402
from core.io import atomic_savefig  # noqa: E402

__all__ = ["intervention_distributions", "flip_counts", "ranking_curves", "save_figure"]

_METHOD_COLOR = "#1f77b4"
_RANDOM_COLOR = "#bbbbbb"


def save_figure(fig, stem: str | Path, close: bool = True, dpi: int = 150) -> list[Path]:
    """``{stem}.png`` and ``{stem}.pdf``."""
    stem = Path(stem)
    out = [atomic_savefig(fig, stem.with_name(stem.name + f".{ext}"), dpi=dpi, bbox_inches="tight")
           for ext in ("png", "pdf")]
    if close:
        plt.close(fig)
    return out


def intervention_distributions(records: pd.DataFrame, title: str = "", group: str = "I_neg",
                               kind: str = "box", value: str = "abs_delta_p"):
    """Per mode (one panel each), the distribution of |delta p| over the inputs of ``group`` for every method,
    each with its random baseline (all draws pooled) beside it in grey. ``records``: the long table of
    :func:`evaluation.interventions.run_interventions` (columns method, baseline_of, mode, group, value)."""
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    sub = records[records["group"] == group]
    modes = list(dict.fromkeys(sub["mode"])) or ["zero"]
    methods = list(dict.fromkeys(sub.loc[sub["baseline_of"] == "", "method"]))
    width = max(5.0, 0.55 * 2 * len(methods) + 1.5)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        data, colors, ticks, labels = [], [], [], []
        for i, m in enumerate(methods):
            own = sub[(sub["mode"] == mode) & (sub["method"] == m)][value].to_numpy()
            rnd = sub[(sub["mode"] == mode) & (sub["baseline_of"] == m)][value].to_numpy()
            for vals, c in ((own, _METHOD_COLOR), (rnd, _RANDOM_COLOR)):
                data.append(vals if len(vals) else np.array([np.nan]))
                colors.append(c)
            ticks.append(2 * i + 0.5)
            labels.append(m)
        pos = np.arange(len(data), dtype=float)
        if not data:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        elif kind == "box":
            bp = ax.boxplot([d[~np.isnan(d)] for d in data], positions=pos, widths=0.7, patch_artist=True,
                            showfliers=False)
            for patch, c in zip(bp["boxes"], colors):
                patch.set_facecolor(c)
        else:
            ok = [(p, d[~np.isnan(d)], c) for p, d, c in zip(pos, data, colors) if np.isfinite(d).sum() > 1]
            if ok:
                vp = ax.violinplot([d for _, d, _ in ok], positions=[p for p, _, _ in ok], widths=0.8,
                                   showmedians=True)
                for body, (_, _, c) in zip(vp["bodies"], ok):
                    body.set_facecolor(c)
                    body.set_alpha(0.8)
        ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(f"|Δp| ({group})" if value == "abs_delta_p" else value)
        ax.set_title(f"{title} mode={mode} (grey: random, same count)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def flip_counts(summary: pd.DataFrame, title: str = "", groups: Sequence[str] = ("I_neg", "I_pos", "rest")):
    """Bars of prediction flips per method and group (random: mean over draws), one panel per mode.
    ``summary``: :func:`evaluation.interventions.summarize_interventions`."""
    modes = list(dict.fromkeys(summary["mode"])) or ["zero"]
    methods = list(dict.fromkeys(summary.loc[summary["baseline_of"] == "", "method"]))
    width = max(5.0, 0.5 * 2 * len(methods) + 1.5)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.0 * len(modes)), squeeze=False)
    groups = [g for g in groups if g in set(summary["group"])]
    bw = 0.8 / max(1, len(groups))
    for ax, mode in zip(axes[:, 0], modes):
        s = summary[summary["mode"] == mode]
        for gi, g in enumerate(groups):
            own = [float(s[(s["method"] == m) & (s["group"] == g)]["flips"].sum()) for m in methods]
            rnd = [float(s[(s["baseline_of"] == m) & (s["group"] == g)]["flips"].sum()) for m in methods]
            x = np.arange(len(methods)) * 2 + gi * bw
            ax.bar(x, own, bw, label=f"{g}", color=plt.cm.tab10(gi))
            ax.bar(x + 1, rnd, bw, color=plt.cm.tab10(gi), alpha=0.35)
        ax.set_xticks(np.arange(len(methods)) * 2 + 0.5, methods, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("flips")
        ax.set_title(f"{title} mode={mode} (faded: random, same count)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def ranking_curves(df: pd.DataFrame, fractions: Sequence[float], metric: str = "P", title: str = "",
                   group_col: str = "method"):
    """``metric``@K against K (log x) per method (mean over the rows of each method: settings or seeds), with
    random's exact expectation dashed. ``df``: rows of :func:`evaluation.ranking_metrics.evaluate_ranking`."""
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    xs = [100 * f for f in fractions]
    cols = [f"{metric}@{fraction_label(f)}" for f in fractions]
    rcols = [f"rand_{metric}@{fraction_label(f)}" for f in fractions]
    ok = df[[c for c in cols if c in df.columns]].notna().all(axis=1) if len(df) else []
    d = df[ok] if len(df) else df
    for i, (name, sub) in enumerate(d.groupby(group_col, sort=False)):
        # 10 colours x 3 line styles / markers keep up to 30 methods apart
        ax.plot(xs, [sub[c].mean() for c in cols], color=plt.cm.tab10(i % 10), linestyle=("-", "-.", ":")[i // 10 % 3],
                marker=("o", "s", "^")[i // 10 % 3], label=str(name))
    if len(d) and all(c in d.columns for c in rcols):
        ax.plot(xs, [d[c].mean() for c in rcols], "k--", label="random (exact E)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [fraction_label(f) for f in fractions])
    ax.set_xlabel("K (% of the weights)")
    ax.set_ylabel(f"{metric}@K")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + len(ax.get_lines()) // 16, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
