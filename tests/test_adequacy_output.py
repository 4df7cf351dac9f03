"""The adequacy tables and figures go through the toolkit's one Markdown writer and one figure saver
(vitfl.core.style.markdown_table, core.style.save_figure), under the file names adequacy.experiments.ARTIFACTS gives."""
from __future__ import annotations

import ast
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from vitfl.adequacy import experiments as ex
from vitfl.core import style

REPO = Path(__file__).resolve().parents[1]

SMALL = pd.DataFrame({"criterion": ["NC", "IDC|m=6"], "n": [6, 8], "coverage": [0.5, np.nan],
                      "seconds": [0.0001234, 2.5], "higher": [True, False]})
#: SMALL as the one writer writes it: 4 significant digits, NaN, tiny numbers in e-notation, | escaped, numbers right
SMALL_MD = ("| criterion | n | coverage | seconds | higher |\n"
            "|:---|---:|---:|---:|---:|\n"
            "| NC | 6 | 0.5 | 1.234e-04 | True |\n"
            "| IDC\\|m=6 | 8 | NaN | 2.5 | False |\n")


def test_the_one_writer_writes_a_small_table_as_expected():
    assert style.markdown_table(SMALL) == SMALL_MD
    assert style.markdown_table(SMALL.iloc[:0]) == "".join(SMALL_MD.splitlines(True)[:2])


def test_adequacy_tables_are_the_one_writers_text(tmp_path):
    paths = ex.write_table(SMALL, tmp_path, "t", "a title")
    assert [p.name for p in paths] == ["t.csv", "t.md"]
    assert (tmp_path / "t.md").read_text() == "# a title\n\n" + SMALL_MD
    assert (tmp_path / "t.md").read_text() == "# a title\n\n" + style.markdown_table(SMALL)
    ex.write_table(SMALL, tmp_path, "u")
    assert (tmp_path / "u.md").read_text() == SMALL_MD


def test_adequacy_writes_markdown_only_through_the_writer(tmp_path, monkeypatch):
    """Every Markdown table of adequacy.experiments (write_table and the coverage table) is the writer's output; the
    module has no table formatting of its own."""
    monkeypatch.setattr(style, "markdown_table", lambda df: f"<{len(df)} rows through the writer>\n")
    ex.write_table(SMALL, tmp_path, "t", "x")
    assert (tmp_path / "t.md").read_text() == "# x\n\n<2 rows through the writer>\n"
    cov = pd.DataFrame({"criterion": ["NC"], "params": ["t=0.75"], "clean": [0.5], "adversarial": [0.6],
                        "delta": [0.1], "kind": ["ratio"], "fit_s": [0.0], "eval_s": [0.1]})
    ex.report_coverage_table(tmp_path, cov, {"n_clean": 100})
    assert (tmp_path / "coverage" / "coverage_table.md").read_text().endswith("\n\n<1 rows through the writer>\n")
    tree = ast.parse((REPO / "adequacy" / "experiments.py").read_text())
    own = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
           if "markdown" in n.name or n.name in ("save_figure", "save")]
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and ("|---" in n.value or n.value.strip() == "|")]
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("savefig", "atomic_savefig", "to_markdown")]
    assert not own and not literals and not calls, (own, literals, calls)


@pytest.mark.parametrize("df", [
    SMALL,
    pd.DataFrame({"method": ["lrp", "random"], "n": [6, 6], "drop_mean": [0.48, 0.0123456], "drop_std": [0.0, np.nan],
                  "big": [123456.0, -1e-6], "neurons": ["1 2 3", "a\nb"]}),
], ids=["small", "rq1-like"])
def test_the_writer_agrees_with_evaluation_stats(df):
    """vitfl.evaluation.stats.to_markdown writes the same text (until it simply is core.style.markdown_table); tables
    with rows only: without rows tabulate drops the column alignment, the writer keeps it."""
    from vitfl.evaluation.stats import to_markdown

    assert style.markdown_table(df) == to_markdown(df)


# ------------------------------------------------------------------------------------------------------ figures
def _rq4():
    crits = ["NC", "IDC"]
    sets = pd.DataFrame([{"rep": 0, "size": 10, "kind": k, "J": j, "accuracy": 0.9, **{c: j / 2 for c in crits}}
                         for k in ("clean", "cw") for j in (0.5, 0.9)])
    return {"sets": sets, "correlation": pd.DataFrame({"criterion": crits, "pearson_r": [0.1, 0.2],
                                                       "p_value": 0.5, "n_sets": 4})}


def test_adequacy_figures_go_through_the_one_saver(tmp_path, monkeypatch):
    """report_rq4's figure is saved by core.style.save_figure as rq4/rq4_correlation.{png,pdf}, a stem of
    ARTIFACTS (the report reads those names)."""
    seen = []
    real = style.save_figure
    monkeypatch.setattr(style, "save_figure", lambda fig, stem, **kw: seen.append(Path(stem)) or real(fig, stem, **kw))
    paths = ex.report_rq4(tmp_path, _rq4(), {"x": 1})
    assert seen == [tmp_path / "rq4" / "rq4_correlation"]
    folder, stems = ex.ARTIFACTS["rq4"]
    assert folder == "rq4" and "rq4_correlation" in stems
    names = {p.name for p in paths}
    assert {"rq4_correlation.png", "rq4_correlation.pdf", "rq4_correlation.md", "rq4_sets.md",
            "rq4_meta.json"} <= names
    assert all(p.is_file() for p in paths)


def test_adequacy_figures_embed_truetype(tmp_path):
    """Even when other code asked for Type 3 fonts, the saver writes TrueType (Type 42) PDFs (was
    tests/test_figures.py's test of adequacy.experiments.save_figure, which is gone)."""
    from test_figures import pdf_font_subtypes

    fig, axes = ex._grid(3)
    for ax in axes:
        ax.plot([0, 1], [1, 0])
        ax.set_title("NC")
    with plt.rc_context({"pdf.fonttype": 3}):
        paths = style.save_figure(fig, tmp_path / "rq3_sensitivity")
    assert [p.name for p in paths] == ["rq3_sensitivity.png", "rq3_sensitivity.pdf"]
    kinds = pdf_font_subtypes(paths[1].read_bytes())
    assert kinds and "Type3" not in kinds
    with plt.rc_context({"pdf.fonttype": 3}):
        (pdf,) = [p for p in ex.report_rq4(tmp_path, _rq4(), {}) if p.suffix == ".pdf"]
    kinds = pdf_font_subtypes(pdf.read_bytes())
    assert kinds and "Type3" not in kinds
