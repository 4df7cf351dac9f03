"""The house style: no Type 3 font in any PDF, one colour per method, faceting instead of crowded panels, no empty
figure (a nothing-to-plot note instead)."""
from __future__ import annotations

import re
import zlib

import numpy as np
import pandas as pd

from evaluation import figures as figs
from core import style


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

    from pipeline.repair import aggregate
    from pipeline.report import write_report

    store, _ = fake_run(tmp_path / "digits", reps=1, tb=False)
    aggregate({"digits": store.root})
    write_report(store)
    pdfs = sorted(store.root.rglob("*.pdf"))
    assert len(pdfs) >= 5
    for p in pdfs:
        kinds = pdf_font_subtypes(p.read_bytes())
        assert kinds and "Type3" not in kinds, (p, kinds)


def test_method_colours_are_fixed_and_unique():
    from localization.base import registered_localizers

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
    from adequacy.experiments import report_coverage_table

    df = pd.DataFrame({"criterion": ["NC"], "params": ["t=0.75"], "clean": [0.5], "adversarial": [0.6],
                       "delta": [0.1], "kind": ["ratio"], "fit_s": [0.0], "eval_s": [0.1]})
    report_coverage_table(tmp_path, df, {"n_clean": 100, "n_train": 300, "attack": "fgsm"})
    md = (tmp_path / "coverage" / "coverage_table.md").read_text()
    assert "eval split" in md and "n = 100" in md and "clean (eval split, n = 100)" in md


def test_adequacy_figures_embed_truetype(tmp_path):
    import matplotlib.pyplot as plt

    from adequacy.experiments import _grid, save_figure

    fig, axes = _grid(3)
    for ax in axes:
        ax.plot([0, 1], [1, 0])
        ax.set_title("NC")
    with plt.rc_context({"pdf.fonttype": 3}):
        paths = save_figure(fig, tmp_path, "rq3_sensitivity")
    pdf = [p for p in paths if p.suffix == ".pdf"][0]
    kinds = pdf_font_subtypes(pdf.read_bytes())
    assert kinds and "Type3" not in kinds
