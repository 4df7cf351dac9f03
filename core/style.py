"""The one plotting style of the toolkit: every figure (FL evaluation, repair, misclassification, adequacy, report)
is drawn and saved through this module.

* **Fonts**: PDFs and PS files embed TrueType (Type 42) fonts, never Type 3 (``pdf.fonttype = 42``,
  ``ps.fonttype = 42``), which ACM / IEEE checkers reject. :func:`save` applies the style at save time, so a
  figure saved through it is right even if other code changed matplotlib's global settings.
* **Size**: figures are sized for a single column (:data:`COLUMN_WIDTH` = 3.4 in) or two columns
  (:data:`DOUBLE_WIDTH` = 7.0 in) with 7-8 pt text, so they stay readable when a paper shrinks them to that width.
* **Colours**: one fixed colour per method across every figure (:func:`method_color`, :func:`method_colors`).
  Every registered FL method has its own entry in :data:`METHOD_COLORS`; ``random`` is always grey; a method not in
  the table gets the first colour of :data:`PALETTE` not used by the table or by the other methods of the same
  call, so no two methods of one figure share a colour.
* Importing this module applies :data:`RC` globally (:func:`apply`), so a figure drawn with it and saved by
  code that does not go through :func:`save` still gets TrueType fonts.
* **No empty figure**: :func:`nothing_to_plot` makes a figure that says why there is nothing to plot and marks it;
  :func:`save` then writes a ``{stem}.nothing_to_plot.txt`` note instead of an image, and the report says
  "nothing to plot".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["RC", "COLUMN_WIDTH", "DOUBLE_WIDTH", "PALETTE", "METHOD_COLORS", "RANDOM_COLOR", "apply", "rc",
           "method_color", "method_colors", "figure", "facet_grid", "nothing_to_plot", "is_nothing_to_plot",
           "save", "NOTHING_SUFFIX"]

COLUMN_WIDTH = 3.4   #: inches, one column of a two-column paper
DOUBLE_WIDTH = 7.0   #: inches, the full text width

#: matplotlib settings of every figure
RC: dict[str, object] = {
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 9, "figure.dpi": 150,
    "savefig.dpi": 200, "lines.linewidth": 1.2, "lines.markersize": 4, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "errorbar.capsize": 2, "image.cmap": "viridis",
}

RANDOM_COLOR = "#7f7f7f"

#: colours for methods not in :data:`METHOD_COLORS` (all distinct; grey is reserved for random)
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39", "#ad494a",
    "#a55194", "#6b6ecf", "#b5cf6b", "#e7ba52", "#d6616b", "#ce6dbd", "#1b9e77", "#d95f02", "#7570b3",
    "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#000000", "#4d4d4d", "#005f73", "#9b2226", "#ee9b00",
)

#: fixed colours of the registered FL methods (a family shares a hue family: base dark, variants lighter) and of
#: the repair methods
METHOD_COLORS: dict[str, str] = {
    "ours": "#d62728", "ours_reptran": "#ff9896", "ours_fl5": "#ad494a",
    "arachne_w": "#1f77b4", "arachne_w_reptran": "#aec7e8",
    "bl": "#2ca02c", "bl_reptran": "#98df8a", "bl_fl5": "#637939",
    "random": RANDOM_COLOR, "random_neuron": "#c7c7c7",
    "grad_loss": "#ff7f0e", "grad_loss_2s": "#ffbb78", "grad_loss_reptran": "#8c6d31",
    "forward_impact": "#9467bd", "forward_impact_2s": "#c5b0d5", "forward_impact_reptran": "#5254a3",
    "ig": "#8c564b", "gradient_only": "#c49c94",
    "vdiff": "#e377c2", "mean_act": "#f7b6d2", "vdiff_x_mean_act": "#7b4173",
    "magnitude": "#bcbd22", "dstar": "#17becf", "ochiai": "#9edae5", "tarantula": "#393b79",
    # repair methods (own figures only; never drawn beside FL methods with the same name)
    "de": "#1b9e77", "finetune": "#d95f02", "prune": "#7570b3", "reinit": "#e7298a",
}


def apply() -> None:
    """Set :data:`RC` globally (figures drawn after this use it)."""
    matplotlib.rcParams.update(RC)


def rc():
    """A context manager with :data:`RC` applied (``with style.rc(): ...``)."""
    return matplotlib.rc_context(RC)


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """Method -> colour for the methods of one figure: the fixed :data:`METHOD_COLORS` entry where there is one,
    else the first :data:`PALETTE` colour no fixed entry and no other method of ``methods`` uses (unknown methods
    in sorted order, so the same set always gets the same colours). Never two methods with one colour."""
    methods = list(dict.fromkeys(str(m) for m in methods))
    out = {m: METHOD_COLORS[m] for m in methods if m in METHOD_COLORS}
    used = set(METHOD_COLORS.values())
    free = [c for c in PALETTE if c not in used]
    unknown = sorted(m for m in methods if m not in out)
    if len(unknown) > len(free):
        # more unknown methods than spare colours: spread them over the HSV circle instead (still distinct)
        free = [matplotlib.colors.to_hex(matplotlib.colors.hsv_to_rgb((i / len(unknown), 0.75, 0.8)))
                for i in range(len(unknown))]
    for m, c in zip(unknown, free):
        out[m] = c
    return {m: out[m] for m in methods}


def method_color(method: str) -> str:
    """The colour of one method (its fixed entry, or the first spare palette colour)."""
    return method_colors([method])[method]


def figure(width: float = COLUMN_WIDTH, height: float | None = None, nrows: int = 1, ncols: int = 1, **kw):
    """``plt.subplots`` in the house style; height default: 0.75 x width per row."""
    with rc():
        return plt.subplots(nrows, ncols, figsize=(width, height or 0.75 * width * nrows), squeeze=False, **kw)


def facet_grid(n: int, ncols: int | None = None, panel_width: float = 1.7, panel_height: float = 1.45,
               sharex: bool = True, sharey: bool = True):
    """A grid of ``n`` small panels (at most :data:`DOUBLE_WIDTH` wide), unused cells switched off. Returns
    (fig, list of n axes)."""
    if n < 1:
        raise ValueError(f"facet_grid needs at least one panel, got n={n}")
    ncols = ncols or max(1, min(n, int(DOUBLE_WIDTH // panel_width)))
    nrows = math.ceil(n / ncols)
    with rc():
        fig, axes = plt.subplots(nrows, ncols, figsize=(min(DOUBLE_WIDTH, panel_width * ncols + 0.4),
                                                        panel_height * nrows + 0.5),
                                 squeeze=False, sharex=sharex, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def nothing_to_plot(reason: str, width: float = COLUMN_WIDTH):
    """A figure that only says there is nothing to plot and why; :func:`save` writes a note instead of it."""
    fig, ax = figure(width, 0.4 * width)
    ax = ax[0, 0]
    ax.axis("off")
    ax.text(0.5, 0.5, f"nothing to plot: {reason}", ha="center", va="center", wrap=True, transform=ax.transAxes)
    fig._nothing_to_plot = reason  # noqa: SLF001 - read by save() and is_nothing_to_plot()
    return fig


def is_nothing_to_plot(fig) -> str | None:
    """The reason if ``fig`` came from :func:`nothing_to_plot`, else None."""
    return getattr(fig, "_nothing_to_plot", None)


NOTHING_SUFFIX = ".nothing_to_plot.txt"


def save(fig, paths: Sequence[str | Path], writer=None, close: bool = True, **kw) -> list[Path]:
    """Save ``fig`` to each path (format from the suffix) with :data:`RC` in force (TrueType fonts in PDFs), through
    ``writer(fig, path, **kw)`` (e.g. ``store.save_figure``; default ``core.io.atomic_savefig``). A figure from
    :func:`nothing_to_plot` is not saved: a ``{stem}.nothing_to_plot.txt`` note with the reason is written beside
    the first path instead (through the writer's store when it has one) and [] is returned."""
    from core.io import atomic_savefig, atomic_write_text

    reason = is_nothing_to_plot(fig)
    out: list[Path] = []
    try:
        if reason is not None:
            if paths:
                p = Path(paths[0])
                note = p.with_name(p.stem + NOTHING_SUFFIX)
                store = getattr(writer, "__self__", None)
                (store.write_text if hasattr(store, "write_text") else atomic_write_text)(note, reason + "\n")
            return []
        kw.setdefault("bbox_inches", "tight")
        with rc():
            for p in paths:
                p = Path(p)
                (writer or atomic_savefig)(fig, p, **kw)
                out.append(p)
        return out
    finally:
        if close:
            plt.close(fig)


def legend_below(fig, handles, labels, ncol: int | None = None) -> None:
    """One legend for the whole figure, under the panels."""
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol or min(4, len(labels)),
                   bbox_to_anchor=(0.5, -0.02), frameon=False)


def colors_for(names: Iterable[str], fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`method_colors` with some entries overridden (e.g. a group of non-method series)."""
    out = method_colors(names)
    out.update(dict(fixed or {}))
    return out


apply()
