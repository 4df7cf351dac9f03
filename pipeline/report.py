"""The report step: one page per run that links every headline table and figure the run has.

:func:`write_report` writes ``report/report.md`` and ``report/report.html`` (rendered by Python-Markdown; tables
inline, figures as files linked relative to the run, all but the overview figures folded into ``<details>``
sections: the page stays far below 1 MB and loads nothing from the network) through the run store, and returns the
.md path. Open it from the run directory (or copy the whole run: the figures are its files).
For every table and figure it states the split, n and the experiment config; a figure with nothing to plot is
listed as "nothing to plot" (with the reason), never drawn empty. Sections (each only when the run has it):

0. the headline: what the checkpoint benchmark's ground truth follows under each optimizer, each FL benchmark's
   methods sorted by score with intervals, exact tests against random and a sentence saying whether it separates
   any method from random (``fl_eval/headline.md``, :mod:`vitfl.evaluation.headline`), and repairability@N
   (``repair/summary/repairability.md``);
1. the experiment config (the ``config`` passed in, else the run's ``run_config.yaml``), the model, the splits;
2. FL: links to the statistics, the FL evaluation figures, cost vs quality (FL time per method from
   ``fl/timing.csv`` vs P@1 % of the checkpoint benchmark);
3. repair: the headline table of ``repair/summary`` (pooled RR / BR with Wilson 95 % intervals, Δ acc with
   bootstrap intervals, the count of runs without a test target), the per-kind table, the statistics and every
   repair figure;
3b. a layer study (an experiment with ``blocks``): RR / BR and repairability@N per transformer block and FL method
   (``repair/summary/<experiment>/by_block.md``) and its figure (``rr_by_block.png``: RR per block with Wilson 95 %
   intervals);
4. the test fold's confusion matrix (torchmetrics ``MulticlassConfusionMatrix`` on the cached test states) beside
   the repair split's;
5. test adequacy: the coverage table and the RQ tables / figures;
6. the cases recorded as not applicable.

Made here (under ``report/``): ``fl_cost_vs_quality.png|pdf``, ``confusion_test.png|pdf``, ``layer_curve.png|pdf``.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from vitfl.core.io import FileFormatError, read_json
from vitfl.core.runstore import RunStore, require_store

__all__ = ["write_report", "report_links", "check_report", "markdown_to_html"]


# ---------------------------------------------------------------------------------------------------- helpers
class _Page:
    def __init__(self, store: RunStore):
        self.store = store
        self.lines: list[str] = []
        self.links: list[Path] = []

    def rel(self, path: Path) -> str:
        """``path`` relative to the report folder (``../repair/summary/x.png``)."""
        return Path(os.path.relpath(Path(path).resolve(), self.store.report_dir.resolve())).as_posix()

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table_file(self, path: Path, title: str, split: str, n: str, embed: bool = True, note: str = "") -> None:
        if not path.is_file():
            return
        self.links.append(path)
        self.add(f"**{title}** — split: {split}; n: {n}. [{path.name}]({self.rel(path)})", "")
        if note:
            self.add(note, "")
        if embed:
            text = path.read_text()
            body = [line for line in text.splitlines() if line.startswith("|")]
            if body:
                self.add(*body, "")

    def figure(self, png: Path, title: str, split: str, n: str, nothing: str | None = None,
               fold: bool = True) -> None:
        """A figure as a file link (never inlined); ``fold``: inside a collapsed ``<details>`` whose summary
        states title, split and n (the page lists every figure without showing 30 at once)."""
        if nothing:
            self.add(f"- **{title}** ({split}; {n}): nothing to plot — {nothing}")
            return
        if not png.is_file():
            return
        self.links.append(png)
        pdf = png.with_suffix(".pdf")
        extra = f" ([PDF]({self.rel(pdf)}))" if pdf.is_file() else ""
        if pdf.is_file():
            self.links.append(pdf)
        image = f"![{title}]({self.rel(png)})"
        if fold:
            summary = html.escape(f"{title} — split: {split}; n: {n}", quote=False)
            self.add('<details markdown="1">', f"<summary>{summary}</summary>", "", image + extra, "", "</details>",
                     "")
        else:
            self.add(f"**{title}** — split: {split}; n: {n}{extra}", "", image, "")


def _files(folder: Path, suffix: str) -> list[Path]:
    """Files of one store folder with a suffix, sorted (the folders are the store's; names are not parsed)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix)) if folder.is_dir() else []


def _read_json(path: Path):
    try:
        return read_json(path) if path.is_file() else None
    except FileFormatError:
        return None


def _config_block(store: RunStore, config: Mapping[str, Any] | None) -> list[str]:
    if config:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        return ["Experiment config (as run):", "", "```json", *text.splitlines(), "```", ""]
    if store.run_config.is_file():
        return [f"Experiment config: [run_config.yaml](../{store.rel(store.run_config)}) (the fit config; the "
                "later steps ran with their defaults unless the config above says otherwise)", ""]
    return ["Experiment config: not recorded (no config passed and no run_config.yaml).", ""]


# ------------------------------------------------------------------------------------------------------- FL
def _embed_markdown(page: _Page, path: Path) -> bool:
    """Copy a Markdown file's body (everything after its first heading) into the page; False if absent."""
    if not path.is_file():
        return False
    page.links.append(path)
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    page.add(*lines, f"(from [{path.name}]({page.rel(path)}))", "")
    return True


def _headline(page: _Page) -> None:
    """What the run says, first: each FL benchmark's verdict against random (methods sorted, intervals, exact tests)
    and the repairability of each FL method's weights."""
    store = page.store
    fl = store.path("fl_headline", ext="md")
    rep = store.path("repairability", ext="md")
    if not fl.is_file() and not rep.is_file() and not _summary_dirs(store):
        return
    page.add("## Headline", "")
    meta = _read_json(store.fl_eval("checkpoint_benchmark_meta.json")) or {}
    replay = meta.get("replay") or {}
    if replay.get("summary"):
        page.add("What the checkpoint benchmark's ground truth follows (Spearman of |dW| with each quantity over "
                 "every last-FFN weight):", "", "```", *replay["summary"].splitlines(), "```", "")
    elif replay.get("error"):
        page.add(f"No SGD ground truth: {replay['error']}", "")
    if _embed_markdown(page, fl):
        rows = [p for p in (store.fl_eval("checkpoint_benchmark.csv"), store.fl_eval("injected_benchmark.csv"))
                if p.is_file()]
        page.links.extend(rows)
        page.add("Per-setting / per-seed rows: " + ", ".join(f"[{p.name}]({page.rel(p)})" for p in rows) + ". The "
                 "published positional comparison scores only how the top K splits between W_bef and W_aft, so its "
                 "numbers cannot be reached by a correct comparison (the worst possible ranking is its control "
                 "row).", "")
    _embed_markdown(page, rep)
    for d in _summary_dirs(store):
        _repair_headline(page, d)


def _summary_dirs(store: RunStore) -> list[Path]:
    """The run's repair summaries that have a table: ``repair/summary`` and one per experiment that tabulated its
    own results (``repair/summary/<experiment>_<variant>/``)."""
    top = store.repair_summary_dir
    dirs = [top] + (sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else [])
    return [d for d in dirs if store.summary_file("summary", d, ext="csv").is_file()]


def _repair_headline(page: _Page, folder: Path) -> None:
    """Repair in one table: per repair method and budget, the FL methods sorted by held-out RR with intervals,
    BR, and the paired verdict against random (from one repair summary and its Wilcoxon / Holm table)."""
    import pandas as pd

    from vitfl.evaluation.headline import repair_verdicts
    from vitfl.evaluation.stats import to_markdown

    store = page.store
    table_csv = store.summary_file("summary", folder, ext="csv")
    stats_csv = store.summary_file("stats_paired", folder).with_suffix(".csv")
    try:
        table = pd.read_csv(table_csv)
        paired = pd.read_csv(stats_csv) if stats_csv.is_file() else pd.DataFrame()
        verdicts = repair_verdicts(table, paired)
    except (ValueError, KeyError) as e:  # an older summary without these columns: the repair section has it
        page.add(f"(repair headline left out: {table_csv.name} lacks what it needs: {e})", "")
        return
    if verdicts.empty:
        return
    page.links.append(table_csv)
    n_runs = int(table["n_runs"].sum()) if "n_runs" in table.columns else "?"
    which = "" if folder == store.repair_summary_dir else f" ({folder.name})"
    page.add(f"**Repair{which}: which FL method's weights repair best** — split: test fold (held out); n: "
             f"{n_runs} runs, targets and correct inputs per row in the table; sorted by RR within each repair "
             "method and budget; verdicts by Wilcoxon signed-rank over runs matched by (setting, repetition), "
             f"Holm-adjusted per cell. [{table_csv.name}]({page.rel(table_csv)})", "")
    page.add(*to_markdown(verdicts).splitlines(), "")


def _fl_headline(page: _Page) -> None:
    """The FL section's links: the per-benchmark statistics (the headline itself opens the report)."""
    store = page.store
    page.add("## Fault localization", "")
    stats = _files(store.fl_eval("stats"), ".md")
    if stats:
        page.add("Statistics against random (Wilcoxon signed-rank, Holm): "
                 + ", ".join(f"[{p.stem}]({page.rel(p)})" for p in stats), "")
        page.links.extend(stats)


def _fl_cost_vs_quality(page: _Page) -> None:
    from vitfl.evaluation import figures as figs

    store = page.store
    timing, bench = store.fl_timing, store.fl_eval("checkpoint_benchmark.csv")
    if not (timing.is_file() and bench.is_file()):
        return
    from vitfl.pipeline.localize import read_fl_timing

    t, problems = read_fl_timing(store)  # damaged lines of the append-only log are left out and reported
    if "block" in t.columns and t["block"].notna().any():  # the benchmark is the last FFN's: its block's FL time
        last = t["block"].max()  # rows without a block: written before the column, on the last block
        t = t[t["block"].isna() | (t["block"] == last)]
    if problems:
        page.add(f"Note: {len(problems)} damaged line(s) of {store.rel(timing)} left out of the FL cost: "
                 + "; ".join(p.split(": ", 1)[-1] for p in problems[:5]) + (" ..." if len(problems) > 5 else ""), "")
    store.verify(bench)  # a corrupt benchmark table is an error naming it, never plotted
    b = pd.read_csv(bench)
    if "error" in b.columns:
        b = b[b["error"].fillna("") == ""]
    if "control" in b.columns:
        b = b[~b["control"].fillna(False).astype(bool)]
    meta = _read_json(store.fl_eval("checkpoint_benchmark_meta.json")) or {}
    if "comparison" in b.columns:  # the recorded optimizer's ground truth, corrected comparison
        b = b[(b["comparison"] == "corrected") & (b["optimizer"] == meta.get("recorded_optimizer", b["optimizer"].iloc[0]))]
    col = "P@1%"
    if col not in b.columns or "wall_s" not in t.columns:
        return
    cost = t.groupby("method")["wall_s"].median().rename("fl_s")
    q = b.groupby("method")[col].agg(["mean", "min", "max", "size"])
    d = pd.concat([cost, q], axis=1, join="inner").reset_index().rename(columns={"index": "method"})
    fig = figs.cost_vs_quality(d, "fl_s", "mean", "FL time per run (s, median)",
                               "P@1% (checkpoint bench., mean)", "FL cost vs quality",
                               y_lo="min", y_hi="max")
    stem = store.path("report", name="fl_cost_vs_quality")
    made = figs.save_figure(fig, stem, writer=store.save_figure)
    from vitfl.core.style import is_nothing_to_plot

    page.figure(stem.with_suffix(".png"), "FL cost vs quality (bars: min-max over settings)",
                "FL time on the repair split's settings; P@1% on the checkpoint benchmark",
                f"{len(d)} methods, {int(q['size'].max()) if len(q) else 0} settings",
                None if made else (is_nothing_to_plot(fig) or "no method has both a timing and a benchmark row"),
                fold=False)


def _fl_figures(page: _Page) -> None:
    store = page.store
    folder = store.fl_eval("figures")
    pngs = _files(folder, ".png")
    notes = _files(folder, ".nothing_to_plot.txt")
    if not pngs and not notes:
        return
    page.add("### FL evaluation figures", "")
    meta = _read_json(store.fl_eval("checkpoint_benchmark_meta.json")) or {}
    for p in pngs:
        name = p.stem
        if name.startswith("checkpoint_"):
            split = f"checkpoint benchmark, {meta.get('fl_inputs', {}).get('split', 'repair')} split"
            n = f"{len(meta.get('fl_inputs', {}).get('settings', []))} settings"
        elif name.startswith("injected_"):
            split, n = "repair split, injected faults", "one row per seed"
        else:
            split, n = "repair split (interventions)", "the setting's I_neg inputs"
        page.figure(p, name.replace("_", " "), split, n)
    for p in notes:
        page.figure(p, p.name[: -len(".nothing_to_plot.txt")].replace("_", " "), "repair split", "-",
                    nothing=p.read_text().strip() or "nothing to plot")


# ------------------------------------------------------------------------------------------------------- repair
def _repair(page: _Page) -> None:
    store = page.store
    top = store.repair_summary_dir
    # the run's summary, and one per experiment that tabulated its own results (repair/summary/<name>/)
    dirs = [top] + (sorted(p for p in top.iterdir() if p.is_dir() and store.summary_file("manifest", p).is_file())
                    if top.is_dir() else [])
    for d in dirs:
        man = _read_json(store.summary_file("manifest", d))
        title = "## Repair" + ("" if d == top else f": {d.name}")
        if man is None:
            old = store.summary_file("summary", d, ext="md")
            if old.is_file():  # an older summary without its manifest
                page.add(title, "")
                page.table_file(old, "Repair summary", "test fold", "see the table")
            continue
        page.add(title, "", man.get("note", ""), "")
        for t in man.get("tables", []):
            page.table_file(d / t["file"], t["title"], t["split"], t["n"], embed=t["file"] == store.summary_file("summary", d, ext="md").name)
        page.add("### Repair figures" + ("" if d == top else f": {d.name}"), "")
        for f in man.get("figures", []):
            page.figure(d / f["file"], f["title"], f["split"], f["n"], f.get("nothing_to_plot"),
                        fold=not f["file"].startswith("bar_"))  # the overview bars open, the rest folded


def _by_block(page: _Page) -> None:
    """The layer study's per-block tables and figure (one per experiment summary folder that has them)."""
    store = page.store
    top = store.repair_summary_dir
    dirs = [top] + (sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else [])
    found = [d for d in dirs if store.summary_file("by_block", d, "md").is_file()]
    for d in found:
        md, csv = store.summary_file("by_block", d, "md"), store.summary_file("by_block", d, "csv")
        page.add("## Repair per transformer block" + ("" if d == top else f": {d.name}"), "")
        page.add("RR / BR of the repair sweeps and repairability@N of the cross-validated repair per data set, block "
                 "and FL method; a cell with no target is n/a, not 0, and its runs are counted.", "")
        _embed_markdown(page, md)
        if csv.is_file():
            page.links.append(csv)
        stem = store.summary_file("by_block_figure", d)
        png = stem.with_name(stem.name + ".png")
        note = stem.with_name(stem.name + ".nothing_to_plot.txt")
        n = "see the tables"
        try:
            t = pd.read_csv(csv) if csv.is_file() else None
            if t is not None and len(t):
                n = f"{int(t['runs'].sum())} runs, {t['block'].nunique()} blocks"
        except (ValueError, KeyError):
            pass
        page.figure(png, "RR per block and FL method (pooled, Wilson 95% CI)",
                    "test fold (repair sweeps) / held-out folds (cross-validated)", n,
                    note.read_text().strip() if note.is_file() and not png.is_file() else None, fold=False)


def _crossval(page: _Page) -> None:
    store = page.store
    table, runs = store.path("crossval_table", ext="md"), store.path("crossval_runs")
    if table.is_file():
        page.add("## Cross-validated repair", "")
        page.table_file(table, "Held-out RR / BR pooled over the k folds (each evaluation input tested "
                        "once; 95% Wilson intervals)", "test folds (k-fold cross-validation of the evaluation split)",
                        "targets and correct inputs per cell, in the table")
        if runs.is_file():
            page.links.append(runs)
            page.add(f"Per run: [{runs.name}]({page.rel(runs)})", "")


def _testbed(page: _Page) -> None:
    """Which block's FFN the model needs (the last block's numbers on the cached states; the per-block curve of
    :func:`vitfl.evaluation.testbed.layer_curve`, drawn as ``report/layer_curve.png|pdf``), and what the checkpoint
    benchmark's ground truth follows."""
    info = _read_json(page.store.path("testbed"))
    if not info:
        return
    page.add("## The testbed: which FFN matters, what does the checkpoint benchmark measure", "")
    lm = info.get("layer_matters") or {}
    if lm:
        page.add("**Layer matters: top-1 of the FFN head on the cached states, as is and with the last FFN's "
                 f"activations zeroed** — split: {', '.join(lm)}; n: per row.", "")
        page.add("| split | n | top-1 | last-FFN activations zeroed | drop (points) | ‖FFN out‖ / ‖x‖ |",
                 "|:---|---:|---:|---:|---:|---:|")
        for split, r in lm.items():
            page.add(f"| {split} | {r['n']} | {r['acc']:.4f} | {r['acc_zeroed']:.4f} | {100 * r['drop']:.1f} | "
                     f"{r['ffn_ratio']:.2f} |")
        page.add("")
    curve = info.get("layer_curve") or {}
    if curve.get("blocks"):
        _layer_curve(page, curve)
    cd = info.get("checkpoint_diagnostics")
    if cd:
        page.add(f"Checkpoint benchmark ground truth |W({cd['epoch']}) - W({cd['epoch'] - 1})| over "
                 f"{cd['n_weights']:,} last-FFN weights: Spearman's rho with |W({cd['epoch'] - 1})| = "
                 f"{cd['spearman_magnitude']:.3f}, with |dL/dW| at W({cd['epoch'] - 1}) on the {cd['n_train']} "
                 "training inputs (split: train) = "
                 f"{cd['spearman_gradient']:.3f}. FL inputs: the repair split's I_neg / I_pos of the epoch "
                 f"{cd['epoch'] - 1} model (disjoint from training).", "")


def _layer_curve(page: _Page, curve: Mapping[str, Any]) -> None:
    """The per-block layer study: a table (one row per block) and its figure, each stating split and n."""
    from vitfl.evaluation import figures as figs

    store = page.store
    name = str(curve.get("split", "test"))
    split = f"{name} fold" if name in ("test", "repair") else f"{name} split"
    n = f"{curve['n']} inputs, {curve.get('num_blocks', len(curve['blocks']))} blocks"
    page.add(f"**Layer study: top-1 with each block's FFN output removed from the residual stream (o = 0), with its "
             f"activations zeroed (the FFN adds only its bias), and the FFN output's share of the residual stream "
             f"(mean ‖o‖ / ‖x + o‖ on the token the classifier reads, {curve.get('pooling', 'token')} pooling)** "
             f"— split: {split}; n: {n}; unmodified top-1 {curve['acc']:.4f}.", "")
    page.add("| block | top-1, FFN output removed | drop (points) | top-1, activations zeroed | residual share |",
             "|---:|---:|---:|---:|---:|")
    for r in curve["blocks"]:
        page.add(f"| {r['block']} | {r['acc_ffn_removed']:.4f} | {100 * r['drop_ffn_removed']:.1f} | "
                 f"{r['acc_zeroed']:.4f} | {r['residual_share']:.3f} |")
    page.add("")
    stem = store.path("report", name="layer_curve")
    fig = figs.layer_curve(pd.DataFrame(curve["blocks"]), float(curve["acc"]), f"{split}, n={curve['n']}")
    made = figs.save_figure(fig, stem, writer=store.save_figure)
    from vitfl.core.style import is_nothing_to_plot

    page.figure(stem.with_suffix(".png"), "Layer study: top-1 with each block's FFN removed, and the FFN output's "
                "share of the residual stream, per block", split, n,
                None if made else (is_nothing_to_plot(fig) or "no per-block numbers"), fold=False)


# --------------------------------------------------------------------------------------------------- confusion
def confusion_of_split(store: RunStore, split: str = "test") -> dict[str, Any] | None:
    """The confusion matrix of the cached ``split`` states (torchmetrics ``MulticlassConfusionMatrix``, rows =
    true class) as ``{"confusion", "split", "n", "accuracy"}``; None without a cache."""
    from vitfl.core.states import CacheError, load_states
    from torchmetrics.classification import MulticlassConfusionMatrix

    path = store.states(split)
    if not path.is_file():
        return None
    try:
        s = load_states(path)
    except CacheError:
        return None
    k = int(s.logits.shape[1])
    cm = MulticlassConfusionMatrix(num_classes=k)(s.pred, s.label).long()
    n = int(cm.sum())
    return {"confusion": cm.tolist(), "split": f"{split} fold", "n": n,
            "accuracy": float(cm.diagonal().sum()) / n if n else float("nan")}


def _confusion(page: _Page) -> None:
    from vitfl.evaluation import figures as figs
    from vitfl.pipeline.misclf import plot_confusion

    store = page.store
    info = confusion_of_split(store)
    rep = store.path("misclf_figure", ext="png")
    if info is None and not rep.is_file():
        return
    page.add("## Confusion matrices", "")
    if info is not None:
        stem = store.path("report", name="confusion_test")
        figs.save_figure(plot_confusion(info), stem, writer=store.save_figure)
        page.figure(stem.with_suffix(".png"), "Confusion matrix, test fold (torchmetrics)", "test fold (held out)",
                    f"{info['n']} inputs, accuracy {info['accuracy']:.4f}")
    misclf = _read_json(store.misclf_info) or {}
    page.figure(rep, "Confusion matrix, repair split (the misclassification settings come from it)",
                f"{misclf.get('split', 'repair')} split", f"{misclf.get('n', '?')} inputs")


# ----------------------------------------------------------------------------------------------------- adequacy
def _adequacy(page: _Page) -> None:
    from vitfl.adequacy.experiments import ARTIFACTS

    store = page.store
    # the run's own adequacy folder (scripts, the coverage step) and one per experiment (adequacy/<name>_<variant>/)
    top = store.adequacy_dir
    own = {folder for folder, _ in ARTIFACTS.values()}
    subs = sorted(p.name for p in top.iterdir() if p.is_dir() and p.name not in own and list(p.glob("*.done.json"))
                  ) if top.is_dir() else []
    found = []
    for sub in ["", *subs]:
        pre = f"{sub}/" if sub else ""
        for rq, (folder, stems) in ARTIFACTS.items():
            for stem in stems:
                md = store.path("adequacy", name=f"{pre}{folder}/{stem}.md")
                png = store.path("adequacy", name=f"{pre}{folder}/{stem}.png")
                if md.is_file() or png.is_file():
                    found.append((sub, rq, f"{pre}{folder}", stem, md, png))
    if not found:
        return
    page.add("## Test adequacy", "")
    for sub, rq, folder, stem, md, png in found:
        meta = _read_json(store.path("adequacy", name=f"{folder}/{rq}_meta.json")) or \
            _read_json(store.path("adequacy", name=f"{folder}/{stem}_meta.json")) or {}
        cfg = meta.get("config", {})
        n = ", ".join(f"{k} = {v}" for k, v in cfg.items() if k.startswith("n_")) or "see the table"
        split = cfg.get("split", "eval")
        title = md.read_text().splitlines()[0].lstrip("# ").strip() if md.is_file() else stem
        which = f" ({sub})" if sub else ""
        page.table_file(md, (title or stem) + which, f"{split} split", n, embed=stem == "coverage_table")
        page.figure(png, f"{rq}: {stem}{which}", f"{split} split", n)


# --------------------------------------------------------------------------------------------------------- html
def markdown_to_html(md: str, base: Path | None = None, title: str = "report") -> str:
    """The report's Markdown as one HTML page, rendered by Python-Markdown (tables, fenced code, Markdown inside
    ``<details>``). Figures stay files: images and links keep their paths relative to the report folder (``base``,
    kept for the signature), so the page stays small and opens from the run directory."""
    import markdown

    body = markdown.markdown(md, extensions=["tables", "fenced_code", "md_in_html", "sane_lists"],
                             output_format="html")
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;font-size:14px}"
           "table{border-collapse:collapse;margin:0.5em 0;font-size:12px}td,th{border:1px solid #ccc;"
           "padding:2px 6px}th{background:#f3f3f3}pre{background:#f6f6f6;padding:0.5em;overflow:auto}"
           "img{max-width:100%}details{margin:0.3em 0}summary{cursor:pointer}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------------------------------------- main
def write_report(store: RunStore, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``report/report.md`` and ``report/report.html`` of the run (see the module docstring) and return the
    .md path. ``config``: the experiment config the run was made with (shown verbatim)."""
    if not require_store(store, "write_report").root.is_dir():
        raise FileNotFoundError(f"no run directory at {store.root}")
    page = _Page(store)
    page.add(f"# Run report: {store.root.name}", "")
    _headline(page)
    page.add("## The run", "")
    page.add(*_config_block(store, config))
    if store.run_config.is_file():
        page.links.append(store.run_config)
    n_before = len(page.lines)
    _fl_headline(page)
    _fl_cost_vs_quality(page)
    _fl_figures(page)
    if len(page.lines) == n_before + 2:
        page.add("No FL evaluation in this run (run the evaluate step).", "")
    n_before = len(page.lines)
    _repair(page)
    if len(page.lines) == n_before:
        page.add("## Repair", "", "No repair results in this run (run the repair step).", "")
    _by_block(page)
    _crossval(page)
    _testbed(page)
    _confusion(page)
    _adequacy(page)
    na = store.not_applicable()
    if na:
        page.add("## Not applicable", "", f"{len(na)} cases cannot run and were recorded once (not retried):", "")
        page.add(*[f"- `{k}`: {v}" for k, v in sorted(na.items())], "")
    md = "\n".join(page.lines).rstrip() + "\n"
    out = store.path("report", name="report.md")
    store.write_text(out, md)
    store.write_text(store.path("report", name="report.html"),
                     markdown_to_html(md, store.report_dir, f"Run report: {store.root.name}"))
    return out


def report_links(md_path: str | Path) -> list[str]:
    """Every link and image target of a report (relative to its folder)."""
    text = Path(md_path).read_text()
    return re.findall(r"\]\(([^)]+)\)", text)


def check_report(md_path: str | Path) -> list[str]:
    """Problems of a written report: links that do not resolve (or leave the run directory) and tables whose
    header states no split or n. Empty when the report is sound."""
    md_path = Path(md_path)
    base = md_path.parent
    run_root = base.parent.resolve()
    problems = []
    for link in report_links(md_path):
        if re.match(r"[a-z]+://", link) or Path(link).is_absolute():
            problems.append(f"absolute or remote link {link!r}")
            continue
        p = (base / link).resolve()
        if not p.is_file():
            problems.append(f"link {link!r} does not resolve")
        elif run_root not in p.parents:
            problems.append(f"link {link!r} leaves the run directory")
    lines = md_path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            intro = lines[i - 2] if i >= 2 else ""
            if not (("split" in intro and "n:" in intro) or ("n =" in line and ("fold" in line or "split" in line))):
                problems.append(f"table at line {i + 1} states no split and n: {line[:80]}")
    return problems
