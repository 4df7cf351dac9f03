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
* **Colour + marker + line style**: :func:`method_styles` adds to the colour a marker per method family (the name
  without a variant suffix: ``bl`` for ``bl_reptran``) and a line style, marker fill and bar hatch per variant
  (:data:`VARIANTS`: ``_reptran`` dashed / hollow / ``////``, ``_fl5`` dotted / ``....``, ``_2s`` dash-dot /
  hollow / ``xxxx``), so a family shares a hue and its published variants differ in more than a lighter shade.
  The same method gets the same combination in every figure.
* **Layout**: figures use matplotlib's constrained layout (``layout="constrained"``: the default of
  :func:`facet_grid`, asked of :func:`figure` by every figure of :mod:`vitfl.evaluation.figures`), which keeps the
  suptitle, panel titles, tick labels and legends apart (:func:`suptitle` wraps a long title to the figure's
  width). Legends go outside the data area: one figure legend under the panels (:func:`legend_outside`, which
  grows the figure so the panels keep their size and is never taller than them) or one legend above a panel
  (:func:`legend_above`). Every panel of a :func:`facet_grid` shows its own x tick labels, even where the panels
  share the x axis. Budgets are ordered numerically, ``avg`` / ``front`` last (:func:`sort_budgets`).
* Importing this module applies :data:`RC` globally (:func:`apply`), so a figure drawn with it and saved by
  code that does not go through :func:`save` still gets TrueType fonts.
* **No empty figure**: :func:`nothing_to_plot` makes a figure that says why there is nothing to plot and marks it;
  :func:`save` then writes a ``{stem}.nothing_to_plot.txt`` note instead of an image, and the report says
  "nothing to plot".
* **One saver**: :func:`save_figure` writes ``{stem}.png`` and ``{stem}.pdf`` through :func:`save` (every figure of
  :mod:`vitfl.evaluation.figures` and of :mod:`vitfl.adequacy.experiments`).
* **One Markdown table writer**: :func:`markdown_table` (every table the toolkit writes as Markdown: floats with 4
  significant digits, NaN as "NaN", ``|`` escaped, numbers right-aligned).
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
           "save", "NOTHING_SUFFIX", "MethodStyle", "method_style", "method_styles", "method_family", "VARIANTS",
           "FAMILY_MARKERS", "legend_outside", "legend_above", "suptitle", "legend_below", "colors_for", "budget_key",
           "sort_budgets", "save_figure", "markdown_table", "format_cell"]

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


def figure(width: float = COLUMN_WIDTH, height: float | None = None, nrows: int = 1, ncols: int = 1,
           layout: str | None = None, **kw):
    """``plt.subplots`` in the house style; height default: 0.75 x width per row. ``layout="constrained"`` (what
    :mod:`vitfl.evaluation.figures` uses, and what :func:`legend_outside` needs) keeps titles, labels and legends apart;
    the default (None) leaves the layout to the caller (e.g. ``fig.tight_layout()``, which a constrained figure with
    a colorbar refuses)."""
    with rc():
        return plt.subplots(nrows, ncols, figsize=(width, height or 0.75 * width * nrows), squeeze=False,
                            layout=layout, **kw)


def facet_grid(n: int, ncols: int | None = None, panel_width: float = 1.7, panel_height: float = 1.45,
               sharex: bool = True, sharey: bool = True, layout: str | None = "constrained"):
    """A grid of ``n`` small panels (at most :data:`DOUBLE_WIDTH` wide), unused cells switched off. Returns
    (fig, list of n axes). Every panel keeps its own x tick labels (sharing the x axis only shares the limits),
    so a panel of a middle row can be read on its own."""
    if n < 1:
        raise ValueError(f"facet_grid needs at least one panel, got n={n}")
    ncols = ncols or max(1, min(n, int(DOUBLE_WIDTH // panel_width)))
    nrows = math.ceil(n / ncols)
    with rc():
        fig, axes = plt.subplots(nrows, ncols, figsize=(min(DOUBLE_WIDTH, panel_width * ncols + 0.4),
                                                        panel_height * nrows + 0.5),
                                 squeeze=False, sharex=sharex, sharey=sharey, layout=layout)
    flat = list(axes.flat)
    for ax in flat[:n]:
        ax.tick_params(axis="x", which="both", labelbottom=True)
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
    ``writer(fig, path, **kw)`` (e.g. ``store.save_figure``; default ``vitfl.core.io.atomic_savefig``). A figure from
    :func:`nothing_to_plot` is not saved: a ``{stem}.nothing_to_plot.txt`` note with the reason is written beside
    the first path instead (through the writer's store when it has one) and [] is returned."""
    from vitfl.core.io import atomic_savefig, atomic_write_text

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


def save_figure(fig, stem: str | Path, close: bool = True, dpi: int = 200, writer=None) -> list[Path]:
    """The one figure saver: ``{stem}.png`` and ``{stem}.pdf`` (TrueType fonts) through :func:`save` and
    ``writer`` (e.g. ``store.save_figure``; default ``vitfl.core.io.atomic_savefig``). A :func:`nothing_to_plot` figure
    writes ``{stem}.nothing_to_plot.txt`` instead and returns []."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + f".{ext}") for ext in ("png", "pdf")]
    return save(fig, paths, writer=writer, close=close, dpi=dpi)


def _legend_columns(labels: Sequence[str], width_in: float, fontsize: float) -> int:
    """How many legend columns of ``labels`` fit ``width_in`` inches (an estimate: 0.6 em per character plus the
    handle); at least 1, at most one row."""
    longest = max((len(str(t)) for t in labels), default=1)
    entry = (0.6 * fontsize * longest + 3.2 * fontsize) / 72.0  # label + handle + spacing, inches
    return max(1, min(len(labels), int(width_in // max(entry, 1e-6))))


def _row_major(handles: list, labels: list, ncol: int) -> tuple[list, list]:
    """``handles`` / ``labels`` reordered so that matplotlib, which fills a legend's columns top to bottom, shows
    them in reading order (left to right, then the next row); empty cells stay at the end of the last row."""
    n = len(handles)
    if ncol <= 1 or n <= ncol:
        return handles, labels
    nrows = math.ceil(n / ncol)
    order = []
    for c in range(ncol):
        for r in range(nrows):
            i = r * ncol + c
            if i < n:
                order.append(i)
    return [handles[i] for i in order], [labels[i] for i in order]


def legend_outside(fig, handles, labels, where: str = "lower", ncol: int | None = None, title: str | None = None,
                   grow: bool = True, fontsize: float | None = None):
    """One legend for the whole figure outside the panels (``where``: "lower" = under them, "right" = beside
    them), in as many columns as fit the figure's width. Needs the constrained layout (the default of
    :func:`facet_grid`; ``style.figure(..., layout="constrained")``). With ``grow`` the figure is made taller
    (lower) or wider (right) by the legend's size, so the panels keep theirs; a "lower" legend taller than the
    panels first widens a narrow figure to :data:`DOUBLE_WIDTH` (more columns), then makes the panels taller, so
    it is never larger than the plot.
    Returns the legend (None without handles)."""
    if not handles:
        return None
    if where not in ("lower", "right"):
        raise ValueError(f"where must be 'lower' or 'right', got {where!r}")
    fontsize = fontsize or float(RC["legend.fontsize"])
    loc = "outside lower center" if where == "lower" else "outside right upper"

    def make(width):
        n = ncol or (_legend_columns(labels, width - 0.2, fontsize) if where == "lower" else 1)
        h_, l_ = _row_major(list(handles), list(labels), n)
        with rc():
            leg = fig.legend(h_, l_, loc=loc, ncol=n, title=title, fontsize=fontsize,
                             title_fontsize=fontsize, frameon=False, borderaxespad=0.2, columnspacing=1.0,
                             handlelength=2.2)
        # the legend's own size (no layout needed), inches
        bb = leg.get_window_extent(fig.canvas.get_renderer())
        return leg, bb.width / fig.dpi, bb.height / fig.dpi

    w, h = fig.get_size_inches()
    leg, lw, lh = make(w)
    if not grow:
        return leg
    if where == "right":
        fig.set_size_inches(min(w + lw + 0.05, max(w, DOUBLE_WIDTH)), h)
        return leg
    panels = [ax.get_position() for ax in fig.axes if ax.get_visible() and ax.axison]
    plot_h = ((max(p.y1 for p in panels) - min(p.y0 for p in panels)) * h) if panels else h
    if lh > 0.9 * plot_h and w < DOUBLE_WIDTH and ncol is None:  # more columns on a wider figure
        leg.remove()
        w = DOUBLE_WIDTH
        fig.set_size_inches(w, h)
        leg, lw, lh = make(w)
    extra = max(0.0, lh - 0.9 * plot_h)  # still taller than the panels: make them taller
    fig.set_size_inches(w, h + lh + 0.05 + extra)
    return leg


def legend_above(ax, handles=None, labels=None, ncol: int | None = None, fontsize: float = 6, **kw):
    """The legend of one panel above its data area (where a panel title would be), so it covers no data; the
    constrained layout makes room for it. Returns the legend (None when the panel has nothing labelled)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    if ncol is None:
        width = ax.get_position().width * ax.figure.get_size_inches()[0]
        ncol = min(2, _legend_columns(labels, width, fontsize))
    with rc():
        return ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol,
                         fontsize=fontsize, frameon=False, borderaxespad=0.2, columnspacing=1.0,
                         handlelength=2.2, **kw)


def suptitle(fig, text: str, **kw):
    """``fig.suptitle(text)`` wrapped to the figure's width (so a long title never runs past the figure's edge);
    the constrained layout keeps it clear of the panels' titles."""
    import textwrap

    size = float(kw.pop("fontsize", RC["figure.titlesize"]))
    per_line = max(20, int(fig.get_size_inches()[0] * 72 / (0.55 * size)))
    with rc():
        lines = textwrap.wrap(str(text), per_line, break_on_hyphens=False) if text else []
        return fig.suptitle("\n".join(lines), fontsize=size, **kw)


def legend_below(fig, handles, labels, ncol: int | None = None) -> None:
    """One legend for the whole figure, under the panels (:func:`legend_outside`)."""
    legend_outside(fig, handles, labels, where="lower", ncol=ncol)


# ------------------------------------------------------------------------------------------ method styles
#: (suffix, line style, hollow marker, bar hatch) of the published variants of a method; the family (the name
#: without the suffix) keeps its hue and marker
VARIANTS: tuple[tuple[str, object, bool, str], ...] = (
    ("_reptran", (0, (4.0, 1.6)), True, "////"),
    ("_fl5", (0, (1.0, 1.3)), False, "...."),
    ("_2s", (0, (5.0, 1.5, 1.0, 1.5)), True, "xxxx"),
)

#: marker of each registered method family (methods without a suffix that share a hue get different markers)
FAMILY_MARKERS: dict[str, str] = {
    "ours": "o", "arachne_w": "s", "bl": "^", "grad_loss": "v", "forward_impact": "D", "ig": "P",
    "gradient_only": "X", "vdiff": "*", "mean_act": "h", "vdiff_x_mean_act": "p", "magnitude": "<",
    "dstar": ">", "ochiai": "d", "tarantula": "H", "random": "o", "random_neuron": "8",
    "de": "o", "finetune": "s", "prune": "^", "reinit": "D",
}

#: markers for families not in :data:`FAMILY_MARKERS` (picked by a hash of the name: the same in every figure)
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "p", "<", ">", "d", "H", "8")


def method_family(method: str) -> tuple[str, str]:
    """(family, variant suffix) of a method name: ``bl_reptran`` -> (``bl``, ``_reptran``); ``ours`` ->
    (``ours``, ``""``)."""
    m = str(method)
    for suffix, *_ in VARIANTS:
        if m.endswith(suffix) and len(m) > len(suffix):
            return m[: -len(suffix)], suffix
    return m, ""


class MethodStyle:
    """The look of one method: ``color``, ``marker``, ``linestyle``, ``hollow`` (marker face white) and bar
    ``hatch``; :meth:`line`, :meth:`point` and :meth:`bar` give the keyword arguments of ``ax.plot`` /
    ``ax.errorbar`` / ``ax.bar``."""

    __slots__ = ("method", "color", "marker", "linestyle", "hollow", "hatch")

    def __init__(self, method: str, color: str, marker: str, linestyle, hollow: bool, hatch: str):
        self.method, self.color, self.marker = method, color, marker
        self.linestyle, self.hollow, self.hatch = linestyle, hollow, hatch

    def key(self) -> tuple:
        return (self.color, self.marker, str(self.linestyle), self.hollow)

    def line(self, **kw) -> dict:
        out = {"color": self.color, "marker": self.marker, "linestyle": self.linestyle,
               "markerfacecolor": "white" if self.hollow else self.color, "markeredgecolor": self.color}
        out.update(kw)
        return out

    def point(self, **kw) -> dict:
        out = {"color": self.color, "marker": self.marker, "linestyle": "none",
               "markerfacecolor": "white" if self.hollow else self.color, "markeredgecolor": self.color}
        out.update(kw)
        return out

    def bar(self, **kw) -> dict:
        out = {"facecolor": self.color, "hatch": self.hatch or None,
               "edgecolor": "#333333" if self.hatch else self.color, "linewidth": 0.3}
        out.update(kw)
        return out

    def handle(self, kind: str = "line", label: str | None = None):
        """A legend handle of this style (``kind``: "line", "point" or "bar")."""
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        label = self.method if label is None else label
        if kind == "bar":
            return Patch(label=label, **self.bar())
        return Line2D([], [], label=label, **(self.line() if kind == "line" else self.point()))

    def __repr__(self) -> str:
        return (f"MethodStyle({self.method!r}, color={self.color!r}, marker={self.marker!r}, "
                f"linestyle={self.linestyle!r}, hollow={self.hollow}, hatch={self.hatch!r})")


def method_styles(methods: Iterable[str]) -> dict[str, MethodStyle]:
    """Method -> :class:`MethodStyle` for the methods of one figure: the colour of :func:`method_colors` (unique in
    the figure), the marker of the method's family (:data:`FAMILY_MARKERS`, else one picked by a hash of the
    family name) and the line style / marker fill / hatch of its variant (:data:`VARIANTS`; solid, filled, no
    hatch for the family's base method). Stable: a method looks the same in every figure."""
    import zlib

    methods = list(dict.fromkeys(str(m) for m in methods))
    colors = method_colors(methods)
    out = {}
    for m in methods:
        fam, suffix = method_family(m)
        marker = FAMILY_MARKERS.get(fam) or _MARKERS[zlib.crc32(fam.encode()) % len(_MARKERS)]
        ls, hollow, hatch = "-", False, ""
        for sfx, v_ls, v_hollow, v_hatch in VARIANTS:
            if sfx == suffix:
                ls, hollow, hatch = v_ls, v_hollow, v_hatch
        out[m] = MethodStyle(m, colors[m], marker, ls, hollow, hatch)
    return out


def method_style(method: str) -> MethodStyle:
    """The :class:`MethodStyle` of one method."""
    return method_styles([method])[str(method)]


def budget_key(b) -> tuple:
    """Sort key of a budget: counts in numeric order first (66 before 328), then shares of the layer in numeric
    order (``0.5%`` before ``1%`` before ``10%``), then the rest (``avg``, ``front``) in text order."""
    s = str(b).strip()
    share = s.endswith("%")
    try:
        v = float(s[:-1] if share else s)
    except ValueError:
        return (2, math.inf, s)
    return (int(share), v, "") if math.isfinite(v) else (2, math.inf, s)


def sort_budgets(budgets: Iterable) -> list:
    """The distinct budgets in :func:`budget_key` order."""
    return sorted(dict.fromkeys(budgets), key=budget_key)


def colors_for(names: Iterable[str], fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`method_colors` with some entries overridden (e.g. a group of non-method series)."""
    out = method_colors(names)
    out.update(dict(fixed or {}))
    return out


# ---------------------------------------------------------------------------------------------------------- tables
def format_cell(v) -> str:
    """One table cell as text: floats with 4 significant digits (``1.000e-04`` style outside [1e-3, 1e5), 0 as
    "0"), NaN as "NaN", None as "", anything else ``str(v)``."""
    import numpy as np

    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "NaN"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def markdown_table(df) -> str:
    """The one Markdown table writer: ``df`` (a pandas DataFrame, index left out) as a GitHub-flavoured pipe table,
    one space of padding each side of a cell, cells as :func:`format_cell`, ``|`` in names and cells escaped and
    newlines replaced by spaces, numeric (and boolean) columns right-aligned (``---:``), the others left-aligned
    (``:---``). Ends with a newline."""
    import pandas as pd

    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    cols = [esc(c) for c in df.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in df.columns]
    rows = [[esc(format_cell(v)) for v in row] for row in df.itertuples(index=False, name=None)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


apply()
