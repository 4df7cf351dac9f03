"""The house style: no Type 3 font in any PDF, one colour per method, faceting instead of crowded panels, no empty
figure (a nothing-to-plot note instead)."""
from __future__ import annotations

import re
import zlib

import numpy as np
import pandas as pd

from vitfl.evaluation import figures as figs
from vitfl.core import style


def pdf_font_subtypes(data: bytes) -> list[str]:
    """Every ``/Subtype`` of every font object of a PDF (object streams inflated), read from the bytes."""
    chunks = [data]
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            chunks.append(zlib.decompress(m.group(1)))
        except zlib.error:
            pass
    out = []
    for c in chunks:
        for obj in re.finditer(rb"<<(.*?)>>", c, re.S):
            d = obj.group(1)
            if b"/Type /Font" in d or b"/Type/Font" in d:
                out += [s.decode() for s in re.findall(rb"/Subtype\s*/(\w+)", d)]
    return out


def _ranking_rows(methods, settings=4, seed=0):
    rng = np.random.default_rng(seed)
    fr = (0.001, 0.01, 0.05)
    rows = []
    for m in methods:
        for s in range(settings):
            r = {"method": m, "setting": f"s{s}"}
            for f, lab in zip(fr, ("0.1%", "1%", "5%")):
                r[f"P@{lab}"] = float(rng.uniform(0, 0.5))
                r[f"rand_P@{lab}"] = 0.01
            rows.append(r)
    return pd.DataFrame(rows), fr


def test_pdfs_embed_truetype_never_type3(tmp_path):
    import matplotlib.pyplot as plt

    df, fr = _ranking_rows(["ours", "random"])
    made = figs.save_figure(figs.ranking_curves(df, fr, "P", "t"), tmp_path / "curves")
    pdf = [p for p in made if p.suffix == ".pdf"][0]
    kinds = pdf_font_subtypes(pdf.read_bytes())
    assert kinds and "Type3" not in kinds and ("TrueType" in kinds or "Type0" in kinds)
    assert b"/Subtype /Type3" not in pdf.read_bytes()
    # the detector itself finds a Type 3 font when matplotlib writes one
    with plt.rc_context({"pdf.fonttype": 3}):
        fig, ax = plt.subplots()
        ax.set_title("type three")
        fig.savefig(tmp_path / "t3.pdf")
        plt.close(fig)
    assert "Type3" in pdf_font_subtypes((tmp_path / "t3.pdf").read_bytes())
    # style.save applies TrueType even when the global setting says Type 3
    with plt.rc_context({"pdf.fonttype": 3}):
        fig, ax = plt.subplots()
        ax.set_title("saved through the style")
        style.save(fig, [tmp_path / "s.pdf"])
    assert "Type3" not in pdf_font_subtypes((tmp_path / "s.pdf").read_bytes())


def test_every_pdf_of_a_report_run_has_no_type3(tmp_path):
    from test_report import fake_run

    from vitfl.pipeline.repair import aggregate
    from vitfl.pipeline.report import write_report

    store, _ = fake_run(tmp_path / "digits", reps=1, tb=False)
    aggregate({"digits": store.root})
    write_report(store)
    pdfs = sorted(store.root.rglob("*.pdf"))
    assert len(pdfs) >= 5
    for p in pdfs:
        kinds = pdf_font_subtypes(p.read_bytes())
        assert kinds and "Type3" not in kinds, (p, kinds)


def test_method_colours_are_fixed_and_unique():
    from vitfl.localization.base import registered_localizers

    methods = registered_localizers()
    c = style.method_colors(methods)
    assert len(set(c.values())) == len(methods), "two registered FL methods share a colour"
    # the same method gets the same colour in every figure, whatever else is drawn
    assert style.method_colors(["ours", "random"])["ours"] == c["ours"] == style.method_color("ours")
    assert c["random"] == style.RANDOM_COLOR
    # unknown (plugin) methods get colours no fixed entry uses, distinct from each other
    extra = [f"plugin_{i}" for i in range(12)]
    c2 = style.method_colors(methods + extra)
    assert len(set(c2.values())) == len(c2)
    many = style.method_colors([f"m{i}" for i in range(80)])
    assert len(set(many.values())) == 80
    assert len(set(style.PALETTE)) == len(style.PALETTE)


def test_many_methods_are_faceted_not_crowded(tmp_path):
    methods = [f"m{i:02d}" for i in range(24)]
    df, fr = _ranking_rows(methods)
    fig = figs.ranking_curves(df, fr, "P", "24 methods")
    axes = [a for a in fig.axes if a.get_visible() and a.lines]
    assert len(axes) == int(np.ceil(24 / figs.PER_PANEL))
    assert max(sum(1 for l in a.lines if not l.get_linestyle() == "--") for a in axes) <= figs.PER_PANEL
    w, h = fig.get_size_inches()
    assert w <= style.DOUBLE_WIDTH + 1e-9
    figs.save_figure(fig, tmp_path / "pk")
    # interventions: one panel per method, at most 2 boxes per mode in each
    recs = []
    rng = np.random.default_rng(1)
    for m in methods[:12]:
        for mode in ("zero", "double"):
            for v in rng.uniform(0, 1, 5):
                recs.append({"method": m, "baseline_of": "", "mode": mode, "group": "I_neg", "abs_delta_p": v})
                recs.append({"method": "random", "baseline_of": m, "mode": mode, "group": "I_neg",
                             "abs_delta_p": v / 2})
    fig = figs.intervention_distributions(pd.DataFrame(recs), "12 methods")
    panels = [a for a in fig.axes if a.axison]
    assert len(panels) == 12 and all(len(a.patches) <= 4 for a in panels)
    assert fig.get_size_inches()[0] <= style.DOUBLE_WIDTH + 1e-9
    figs.save_figure(fig, tmp_path / "interventions")


def test_nothing_to_plot_writes_a_note_not_an_empty_figure(tmp_path):
    summary = pd.DataFrame({"method": ["ours", "random"], "baseline_of": ["", "ours"], "mode": ["zero", "zero"],
                            "group": ["I_neg", "I_neg"], "flips": [0, 0]})
    fig = figs.flip_counts(summary, "all n=33")
    assert style.is_nothing_to_plot(fig)
    assert figs.save_figure(fig, tmp_path / "flips") == []
    assert not (tmp_path / "flips.png").exists()
    assert "no prediction flipped" in (tmp_path / "flips.nothing_to_plot.txt").read_text()
    summary.loc[0, "flips"] = 3
    fig = figs.flip_counts(summary, "all n=33")
    assert not style.is_nothing_to_plot(fig)
    assert len(figs.save_figure(fig, tmp_path / "flips2")) == 2
    assert style.is_nothing_to_plot(figs.ranking_curves(pd.DataFrame(), (0.01,), "P"))
    assert style.is_nothing_to_plot(figs.fitness_curves(pd.DataFrame()))


def test_coverage_table_states_split_and_n(tmp_path):
    from vitfl.adequacy.experiments import report_coverage_table

    df = pd.DataFrame({"criterion": ["NC"], "params": ["t=0.75"], "clean": [0.5], "adversarial": [0.6],
                       "delta": [0.1], "kind": ["ratio"], "fit_s": [0.0], "eval_s": [0.1]})
    report_coverage_table(tmp_path, df, {"n_clean": 100, "n_train": 300, "attack": "fgsm"})
    md = (tmp_path / "coverage" / "coverage_table.md").read_text()
    assert "eval split" in md and "n = 100" in md and "clean (eval split, n = 100)" in md


# ================================================================================================ figure geometry
# Every figure function is drawn on inputs shaped like the real ones (the columns of fl_eval/interventions_summary.csv,
# the per-input intervention records, fl_eval/checkpoint_benchmark.csv, fl_eval/injected_benchmark.csv,
# repair/summary/summary.csv, summary_by_kind.csv, runs.csv and fitness_curves.csv), with the 25 registered FL methods
# where a figure can get them, and its drawn geometry is checked with matplotlib's renderer:
#   * no text artist (suptitle, titles, axis labels, drawn tick labels, annotations, legend texts) overlaps another;
#   * every text and every legend lies inside the figure;
#   * every legend covers no data artist (lines and their markers, bars, boxes, bands, error bars) of any axes, or
#     lies outside every axes' data area, and is not taller than the plot it belongs to;
#   * every panel with data shows x tick labels of its own.
import hashlib  # noqa: E402

import pytest  # noqa: E402

from vitfl.evaluation.ranking_metrics import fraction_label  # noqa: E402

#: the FL methods of the testbed's run (registered_localizers() at the time), in the order its CSVs list them
FL25 = ["arachne_w", "arachne_w_reptran", "bl_fl5", "bl", "bl_reptran", "dstar", "forward_impact_2s", "forward_impact",
        "forward_impact_reptran", "grad_loss_2s", "grad_loss", "grad_loss_reptran", "gradient_only", "ig", "magnitude",
        "mean_act", "ochiai", "ours_fl5", "ours", "ours_reptran", "random", "random_neuron", "tarantula", "vdiff",
        "vdiff_x_mean_act"]
REPAIR3 = ["ours", "arachne_w", "random"]
FRACTIONS = (0.001, 0.005, 0.01, 0.02, 0.05)
TOL = 0.5  # px: boxes that only touch do not overlap


def _key(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:12]


def _interventions(methods, budget="328", modes=("zero", "double"), n_neg=30, reps=2, seed=0):
    """(per-input I_neg records as pipeline.evaluate_fl hands them to intervention_distributions, the
    interventions_summary rows of one (setting, budget) as it hands them to flip_counts)."""
    rng = np.random.default_rng(seed)
    recs, summ = [], []
    for m in methods:
        label = f"{m}_n{budget}-{_key(m, budget)}"
        for mode in modes:
            scale = rng.uniform(0.002, 0.05)
            for v in np.abs(rng.normal(0, scale, n_neg)):
                recs.append({"setting": "all", "budget": budget, "method": label, "baseline_of": "", "mode": mode,
                             "group": "I_neg", "abs_delta_p": v})
            for v in np.abs(rng.normal(0, 0.003, n_neg * reps)):
                recs.append({"setting": "all", "budget": budget, "method": f"random@{label}", "baseline_of": label,
                             "mode": mode, "group": "I_neg", "abs_delta_p": v})
            for group, n in (("I_pos", 1345), ("I_neg", 255)):
                for who, base, nrep, flips in ((label, "", 1, float(rng.integers(0, 30))),
                                               (f"random@{label}", label, reps, float(rng.integers(0, 8)) / 2)):
                    summ.append({"setting": "all", "result": label, "fl_method": m, "budget": budget, "method": who,
                                 "baseline_of": base, "level": "weight", "count": budget, "mode": mode,
                                 "group": group, "n": n, "reps": nrep, "mean_abs_delta_p": 0.01,
                                 "median_abs_delta_p": 0.005, "mean_delta_p": -0.001, "flips": flips,
                                 "fixed": flips / 2, "broken": flips / 2, "flip_rate": flips / n})
    return pd.DataFrame(recs), pd.DataFrame(summ)


def _benchmark(methods, n_rows=10, by="setting", seed=0):
    """checkpoint_benchmark.csv / injected_benchmark.csv rows: metric@K and random's expectation per method and
    setting (or seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in methods:
        level = rng.uniform(0.0, 0.06)
        for i in range(n_rows):
            r = {"method": m, "level": "weight", by: f"s{i}" if by == "setting" else i, "error": "",
                 "control": False, "comparison": "corrected", "optimizer": "adamw"}
            for f in FRACTIONS:
                lab = fraction_label(f)
                r[f"P@{lab}"] = float(np.clip(rng.normal(level, 0.01), 0, 1))
                r[f"R@{lab}"] = float(np.clip(rng.normal(level * 10 * f / 0.05, 0.02), 0, 1))
                r[f"overlap@{lab}"] = float(np.clip(rng.normal(f, 0.005), 0, 1))
                r[f"rand_P@{lab}"] = 0.01
                r[f"rand_R@{lab}"] = f
                r[f"rand_overlap@{lab}"] = f
            rows.append(r)
    return pd.DataFrame(rows)


BUDGETS_RUN_ORDER = ["328", "655", "66", "avg"]  # the order runs.csv and fitness_curves.csv list them


def _repair_summary(methods, kinds=None, seed=0):
    """summary.csv (or summary_by_kind.csv with ``kinds``) rows of one (dataset, repair)."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds or [None]:
        for m in methods:
            for b in ["66", "328", "655", "avg"]:
                rr, br, rri = rng.uniform(0.05, 0.95), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.95)
                r = {"dataset": "mnist", "repair": "de", "fl_method": m, "budget": b, "n_runs": 8,
                     "rr_pooled": rr, "rr_lo": max(0, rr - 0.07), "rr_hi": min(1, rr + 0.07),
                     "br_pooled": br, "br_lo": max(0, br - 0.02), "br_hi": min(1, br + 0.02),
                     "rr_repair_pooled": rri, "rr_repair_lo": max(0, rri - 0.03), "rr_repair_hi": min(1, rri + 0.03),
                     "delta_acc_mean": -br / 2, "delta_acc_lo": -br / 2 - 0.05, "delta_acc_hi": -br / 2 + 0.03}
                if kind is not None:
                    r["kind"] = kind
                rows.append(r)
    return pd.DataFrame(rows)


def _repair_cost(methods, seed=0):
    """The frame pipeline.repair._plots hands cost_vs_quality: median repair_s per (fl_method, budget) in the
    order runs.csv lists them (budgets 328, 655, 66, avg), merged with the summary's RR."""
    rng = np.random.default_rng(seed)
    t = _repair_summary(methods, seed=seed)
    cost = pd.DataFrame([{"fl_method": m, "budget": b, "repair_s": rng.uniform(0.2, 1.3)}
                         for m in methods for b in BUDGETS_RUN_ORDER])
    return cost.merge(t[["fl_method", "budget", "rr_pooled", "rr_lo", "rr_hi"]], on=["fl_method", "budget"])


def _fitness(methods, runs=8, steps=50, seed=0):
    """fitness_curves.csv rows: per method, budget and run the best and mean fitness relative to the unpatched
    one, rising from 1 to a plateau (the curves fill the panel where a legend would go)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in BUDGETS_RUN_ORDER:
        for m in methods:
            top = rng.uniform(1.05, 1.9)
            for r in range(runs):
                run, t = _key(m, b, r), np.arange(1, steps + 1)
                best = 1 + (top - 1 + rng.normal(0, 0.05)) * (1 - np.exp(-t / rng.uniform(3, 12)))
                for s, v in zip(t, best):
                    rows.append({"dataset": "mnist", "repair": "de", "fl_method": m, "budget": b, "run": run,
                                 "step": int(s), "best": float(v), "mean": float(1 + (v - 1) * 0.9)})
    return pd.DataFrame(rows)


def _fl_cost(methods, seed=0):
    """The frame pipeline.report hands cost_vs_quality: median FL seconds and P@1% mean / min / max per method."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0, 0.05, len(methods))
    return pd.DataFrame({"method": methods, "fl_s": rng.uniform(0.008, 0.035, len(methods)), "mean": mean,
                         "min": mean * 0.3, "max": mean * 1.8 + 0.01, "size": 10})


def _figure_cases():
    """name -> a function drawing the figure as its caller does."""
    neg, summ = _interventions(FL25)
    neg_front, summ_front = _interventions(["bl", "bl_reptran"], budget="front")
    ckpt, inj = _benchmark(FL25), _benchmark(FL25, by="seed")
    cases = {
        "intervention_distributions": lambda: figs.intervention_distributions(neg, "all n=328"),
        "intervention_distributions_2": lambda: figs.intervention_distributions(neg_front, "all n=front"),
        "flip_counts": lambda: figs.flip_counts(summ, "all n=328"),
        "flip_counts_2": lambda: figs.flip_counts(summ_front, "all n=front"),
        "ranking_curves_P": lambda: figs.ranking_curves(ckpt, FRACTIONS, "P", "checkpoint benchmark 1->2, adamw "
                                                        "ground truth: P@K (mean over settings)"),
        "ranking_curves_R_injected": lambda: figs.ranking_curves(inj, FRACTIONS, "R", "injected faults, strength 30: "
                                                                 "R@K (mean over seeds)"),
        "fl_cost_vs_quality": lambda: figs.cost_vs_quality(_fl_cost(FL25), "fl_s", "mean",
                                                           "FL time per run (s, median)",
                                                           "P@1% (checkpoint bench., mean)", "FL cost vs quality",
                                                           y_lo="min", y_hi="max"),
    }
    what = "mnist, de: 96 de runs"
    for tag, methods in (("3", REPAIR3), ("25", FL25)):
        t, k = _repair_summary(methods), _repair_summary(methods, kinds=["all", "src_tgt", "tgt_fn", "tgt_fp"])
        cases.update({
            f"repair_bars_{tag}": lambda t=t: figs.repair_bars(t, what, list(dict.fromkeys(t["fl_method"])),
                                                               ["66", "328", "655", "avg"]),
            f"in_sample_vs_held_out_{tag}": lambda t=t: figs.in_sample_vs_held_out(t, f"{what}: RR in-sample vs "
                                                                                   "held out"),
            f"rates_by_kind_{tag}": lambda k=k: figs.rates_by_kind(k, f"{what}: RR / BR per setting kind (pooled, "
                                                                   "Wilson 95% CI)"),
            f"time_vs_rr_{tag}": lambda m=methods: figs.cost_vs_quality(
                _repair_cost(m), "repair_s", "rr_pooled", "repair time per run (s, median)", "RR (test fold, pooled)",
                f"{what}: repair time vs RR", label_col="fl_method", y_lo="rr_lo", y_hi="rr_hi", marker_col="budget"),
            f"fitness_curves_{tag}": lambda m=methods: figs.fitness_curves(
                _fitness(m, runs=3 if len(m) > 3 else 8), f"{what}: DE fitness / unpatched fitness, median over runs"),
        })
    return cases


# ----------------------------------------------------------------------------------------------- the checker
def _drawn_ticks(axis):
    try:
        return axis._update_ticks()  # noqa: SLF001 - the ticks matplotlib draws (inside the view interval)
    except Exception:  # noqa: BLE001 - an older / newer matplotlib: every major tick
        return axis.get_major_ticks()


def _tick_labels(ax, which="x"):
    axis = ax.xaxis if which == "x" else ax.yaxis
    if not (ax.get_visible() and ax.axison and axis.get_visible()):
        return []
    out = []
    for tick in _drawn_ticks(axis):
        for lab in (tick.label1, tick.label2):
            if lab.get_visible() and lab.get_text().strip():
                out.append(lab)
    return out


def _texts(fig):
    """(owner, Text) of every visible, non-empty text the figure draws; owner is the legend's id for legend texts."""
    out, seen = [], set()

    def add(owner, t):
        if t is not None and id(t) not in seen and t.get_visible() and t.get_text().strip():
            seen.add(id(t))
            out.append((owner, t))

    for t in fig.texts:
        add(None, t)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for t in (ax.title, ax._left_title, ax._right_title):  # noqa: SLF001
            add(None, t)
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_visible():
                    add(None, axis.label)
                    add(None, axis.get_offset_text())
            for t in _tick_labels(ax, "x") + _tick_labels(ax, "y"):
                add(None, t)
        for t in ax.texts:
            add(None, t)
    for leg in _legends(fig):
        add(id(leg), leg.get_title())
        for t in leg.get_texts():
            add(id(leg), t)
    return out


def _legends(fig):
    legs = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_visible() and ax.get_legend()]
    return [lg for lg in legs if lg.get_visible()]


def _overlap(a, b, tol=TOL) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0)) > tol and (min(a.y1, b.y1) - max(a.y0, b.y0)) > tol


def _inside(inner, outer, tol=1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol and inner.x1 <= outer.x1 + tol
            and inner.y1 <= outer.y1 + tol)


def _is_data_axes(ax) -> bool:
    return ax.get_visible() and ax.axison and bool(ax.lines or ax.patches or ax.collections)


def _data_hits(ax, box, fig):
    """The data artists of ``ax`` drawn inside ``box`` (display coordinates): line segments and markers, bars and
    boxes, bands, error bars and scatter points, each clipped to the axes' data area."""
    from matplotlib.collections import LineCollection
    from matplotlib.path import Path
    from matplotlib.transforms import Bbox

    region = Bbox.intersection(box, ax.bbox)
    if region is None or region.width <= TOL or region.height <= TOL:
        return []
    px = fig.dpi / 72.0
    hits = []

    def pts_hit(xy, radius):
        xy = xy[np.isfinite(xy).all(axis=1)]
        return bool(len(xy)) and bool(((xy[:, 0] + radius > region.x0) & (xy[:, 0] - radius < region.x1)
                                       & (xy[:, 1] + radius > region.y0) & (xy[:, 1] - radius < region.y1)).any())

    for line in ax.lines:
        if not line.get_visible():
            continue
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
        ls, mk = str(line.get_linestyle()), line.get_marker()
        if ls not in ("None", "none", "", " "):
            ok = np.isfinite(xy).all(axis=1)
            runs = np.split(np.arange(len(xy)), np.where(~ok)[0])
            for idx in runs:
                seg = xy[[i for i in idx if ok[i]]]
                if len(seg) >= 2 and Path(seg).intersects_bbox(region, filled=False):
                    hits.append(f"line {line.get_label()!r}")
                    break
                if len(seg) == 1 and pts_hit(seg, 1):
                    hits.append(f"line {line.get_label()!r}")
                    break
        if mk not in (None, "None", "none", "", " ") and pts_hit(xy, line.get_markersize() * px / 2):
            hits.append(f"markers of {line.get_label()!r}")
    for p in ax.patches:
        if p.get_visible() and p.get_transform().transform_path(p.get_path()).intersects_bbox(region, filled=True):
            hits.append(f"{type(p).__name__} {p.get_label()!r}")
    for c in ax.collections:
        if not c.get_visible():
            continue
        offsets = np.asarray(c.get_offsets(), dtype=float)
        if len(offsets) and not (len(offsets) == 1 and np.allclose(offsets, 0)):  # scatter-like: markers at offsets
            xy = c.get_offset_transform().transform(offsets)
            sizes = c.get_sizes()
            r = (np.sqrt(sizes.max()) if len(sizes) else 6.0) * px / 2
            if pts_hit(xy, r):
                hits.append(f"points of {type(c).__name__}")
            continue
        tr = c.get_transform()
        filled = not isinstance(c, LineCollection)
        for path in c.get_paths():
            if tr.transform_path(path).intersects_bbox(region, filled=filled):
                hits.append(f"{type(c).__name__}")
                break
    return hits


def figure_problems(fig) -> list[str]:
    """What is wrong with the drawn geometry of ``fig`` (empty when nothing is)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fb = fig.bbox
    problems = []
    texts = [(o, t, t.get_window_extent(r)) for o, t in _texts(fig)]
    for o, t, b in texts:
        if not _inside(b, fb, tol=2.0):
            problems.append(f"text {t.get_text()!r} outside the figure")
    for i in range(len(texts)):
        oi, ti, bi = texts[i]
        for j in range(i + 1, len(texts)):
            oj, tj, bj = texts[j]
            if _overlap(bi, bj):
                problems.append(f"text {ti.get_text()!r} overlaps text {tj.get_text()!r}")
    data_axes = [ax for ax in fig.axes if _is_data_axes(ax)]
    for leg in _legends(fig):
        lb = leg.get_window_extent(r)
        name = f"legend [{', '.join(t.get_text() for t in leg.get_texts()[:3])}...]"
        if not _inside(lb, fb):
            problems.append(f"{name} outside the figure")
        for ax in data_axes:
            for hit in _data_hits(ax, lb, fig):
                problems.append(f"{name} covers {hit} of the axes {ax.get_title()!r}")
        for o, t, b in texts:
            if o != id(leg) and _overlap(lb, b):
                problems.append(f"{name} overlaps text {t.get_text()!r}")
        owner = leg.axes if leg.axes is not None and leg in [a.get_legend() for a in fig.axes] else None
        ref = [owner.bbox] if owner is not None else [ax.bbox for ax in data_axes]
        if ref:
            from matplotlib.transforms import Bbox

            plot = Bbox.union(ref)
            if lb.height > plot.height + TOL:
                problems.append(f"{name} is taller ({lb.height:.0f} px) than its plot ({plot.height:.0f} px)")
    for ax in data_axes:
        if not _tick_labels(ax, "x"):
            problems.append(f"axes {ax.get_title()!r} has no x tick labels")
    return problems


CASES = _figure_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_geometry(name):
    import matplotlib.pyplot as plt

    fig = CASES[name]()
    try:
        assert not style.is_nothing_to_plot(fig), name
        problems = figure_problems(fig)
        assert not problems, f"{name}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:25])
    finally:
        plt.close(fig)


def test_geometry_checker_flags_known_defects():
    """The checker finds what the old flips and fitness figures did: a suptitle over the first row's titles, a
    legend over bars, a legend over curves, middle-row panels without x tick labels, a legend taller than its
    plot."""
    import matplotlib.pyplot as plt

    with style.rc():
        fig, axes = plt.subplots(3, 2, sharex=True, figsize=(3, 4))
    for ax in axes.flat:
        ax.bar([0, 1, 2], [3, 2, 3], label="bars")
        ax.set_title("panel")
    axes[0, 0].legend(loc="upper left")
    fig.tight_layout()
    fig.suptitle("a suptitle that sits on the titles")
    p = figure_problems(fig)
    assert any("covers Rectangle" in s for s in p), p
    assert any("'a suptitle that sits on the titles' overlaps text 'panel'" in s for s in p), p
    assert sum("no x tick labels" in s for s in p) == 4, p  # the two upper rows
    plt.close(fig)
    with style.rc():
        fig, ax = plt.subplots(figsize=(3, 2))
    x = np.linspace(0, 1, 50)
    for i in range(25):
        ax.plot(x, 1 - np.exp(-x * (i + 1)), label=f"method {i}")
    ax.legend(loc="lower right")
    p = figure_problems(fig)
    assert any("covers line" in s for s in p) and any("taller" in s for s in p), p
    plt.close(fig)


def test_method_styles_tell_families_apart():
    """Every method of a figure has its own colour + marker + line style; a family shares a marker, its variants
    differ from the base in line style (and fill or hatch), not only in a lighter shade."""
    st = style.method_styles(FL25)
    assert len({s.key() for s in st.values()}) == len(FL25)
    assert len({s.color for s in st.values()}) == len(FL25)
    for base, variants in (("bl", ["bl_reptran", "bl_fl5"]), ("ours", ["ours_reptran", "ours_fl5"]),
                           ("arachne_w", ["arachne_w_reptran"]), ("grad_loss", ["grad_loss_2s", "grad_loss_reptran"])):
        for v in variants:
            assert st[v].marker == st[base].marker, (v, base)
            assert str(st[v].linestyle) != str(st[base].linestyle), (v, base)
            assert st[v].hatch != st[base].hatch, (v, base)
        assert len({str(st[v].linestyle) for v in variants}) == len(variants)
    # stable: the same in every figure, whatever else is drawn
    assert style.method_styles(["bl_reptran", "random"])["bl_reptran"].key() == st["bl_reptran"].key()
    assert style.method_style("ours").key() == st["ours"].key()
    assert style.sort_budgets(["328", "655", "66", "avg", "9", "front"]) == ["9", "66", "328", "655", "avg", "front"]


def _legend_labels(fig) -> list[str]:
    """The texts of the figure's legends in reading order (row by row, left to right), as drawn."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    out = []
    for leg in _legends(fig):
        boxes = [(t.get_window_extent(r), t.get_text()) for t in leg.get_texts()]
        rows = sorted({round(b.y0 + b.height / 2) for b, _ in boxes}, reverse=True)
        row = {}  # text centres within 3 px share a row
        for y in rows:
            row[y] = next((row[k] for k in row if abs(k - y) <= 3), len(set(row.values())))
        out += [txt for b, txt in sorted(boxes, key=lambda bt: (row[round(bt[0].y0 + bt[0].height / 2)],
                                                                 bt[0].x0))]
    return out


def test_budgets_in_numeric_order():
    """time_vs_rr lists the budgets 66, 328, 655, then avg (not 328, 655, 66, avg as the runs list them); the
    fitness panels and the in-sample figure likewise."""
    import matplotlib.pyplot as plt

    fig = CASES["time_vs_rr_3"]()
    labels = [t for t in _legend_labels(fig) if "budget" in t]
    assert labels == ["budget=66", "budget=328", "budget=655", "budget=avg"], labels
    plt.close(fig)
    fig = CASES["fitness_curves_3"]()
    titles = [ax.get_title().split(",")[0] for ax in fig.axes if _is_data_axes(ax)]
    assert titles == ["budget 66", "budget 328", "budget 655", "budget avg"], titles
    plt.close(fig)
    fig = CASES["in_sample_vs_held_out_3"]()
    labels = [t for t in _legend_labels(fig) if t.startswith("n=")]
    assert labels == ["n=66", "n=328", "n=655", "n=avg"], labels
    plt.close(fig)


def test_repair_bars_state_what_they_count():
    """The bar figure's title says how many runs each bar pools (the table's n_runs), beside the caller's total."""
    import matplotlib.pyplot as plt

    t = _repair_summary(REPAIR3)
    fig = figs.repair_bars(t, "mnist, de: 96 de runs")
    title = fig._suptitle.get_text()  # noqa: SLF001
    assert "96 de runs" in title and "8 runs per bar" in title, title
    plt.close(fig)
