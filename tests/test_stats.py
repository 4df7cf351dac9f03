import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from vitfl.evaluation.stats import (cliffs_delta, cliffs_delta_paired, holm, mann_whitney_a12, mann_whitney_holm,
                              to_markdown, wilcoxon_holm, wilcoxon_paired, write_stats_table)


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max with 0.06 = 0.06)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    # capped at 1 and monotone
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    # NaN stays NaN and does not count in m
    np.testing.assert_allclose(holm([0.01, np.nan, 0.02]), [0.02, np.nan, 0.02])
    with pytest.raises(ValueError, match="p-values"):
        holm([1.5])


def test_cliffs_delta_paired_definition():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 50).astype(float)
    y = rng.integers(0, 4, 50).astype(float)
    d = x - y
    expect = (sum(v > 0 for v in d) - sum(v < 0 for v in d)) / len(d)
    assert cliffs_delta_paired(x, y) == pytest.approx(expect)
    assert cliffs_delta_paired([1, 2, 3], [0, 0, 0]) == 1.0
    assert np.isnan(cliffs_delta_paired([], []))
    with pytest.raises(ValueError, match="equal lengths"):
        cliffs_delta_paired([1, 2], [1])


def _brute_pairs(x, y):
    gt = sum(xi > yj for xi in x for yj in y)
    lt = sum(xi < yj for xi in x for yj in y)
    eq = sum(xi == yj for xi in x for yj in y)
    return gt, lt, eq


def test_unpaired_effect_sizes_vs_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 6, rng.integers(3, 20)).astype(float)  # ties on purpose
        y = rng.integers(0, 6, rng.integers(3, 20)).astype(float)
        gt, lt, eq = _brute_pairs(x, y)
        n = len(x) * len(y)
        r = mann_whitney_a12(x, y)
        assert r.a12 == pytest.approx((gt + 0.5 * eq) / n)
        assert cliffs_delta(x, y) == pytest.approx((gt - lt) / n)
        assert cliffs_delta(x, y) == pytest.approx(2 * r.a12 - 1)
        assert r.p == pytest.approx(sps.mannwhitneyu(x, y).pvalue)


def test_a12_is_u1_not_rank_sum():
    x, y = [3.0, 4.0, 5.0], [1.0, 2.0]
    r = mann_whitney_a12(x, y)
    ranks = sps.rankdata(x + y)
    w1 = ranks[:3].sum()  # rank sum of x = 3+4+5 = 12
    assert w1 == 12
    assert r.u1 == 6.0  # every x beats every y
    assert r.a12 == 1.0
    assert w1 / 6 != pytest.approx(r.a12)  # W/(n1 n2) = 2 would be wrong


def test_wilcoxon_matches_scipy_and_holm():
    rng = np.random.default_rng(2)
    a = rng.normal(size=15)
    vals = {"a": a, "b": a + rng.normal(0.8, 1, 15), "c": a + rng.normal(0.0, 1, 15)}
    df = wilcoxon_holm(vals, question="RQ1")
    assert list(df[["method_a", "method_b"]].itertuples(index=False, name=None)) == [("a", "b"), ("a", "c"),
                                                                                     ("b", "c")]
    for row in df.itertuples():
        ref = sps.wilcoxon(vals[row.method_a], vals[row.method_b], zero_method="wilcox")
        assert row.p == pytest.approx(ref.pvalue)
        assert row.statistic == pytest.approx(ref.statistic)
        assert row.cliffs_delta == pytest.approx(cliffs_delta_paired(vals[row.method_a], vals[row.method_b]))
    np.testing.assert_allclose(df["p_holm"], holm(df["p"]))
    # explicit pairs
    df2 = wilcoxon_holm(vals, pairs=[("b", "a")])
    assert len(df2) == 1 and df2.p_holm.iloc[0] == pytest.approx(df2.p.iloc[0])
    with pytest.raises(KeyError, match="no values"):
        wilcoxon_holm(vals, pairs=[("a", "zzz")])


def test_degenerate_inputs_give_nan_and_note():
    r = wilcoxon_paired([1, 2, 3], [1, 2, 3])
    assert np.isnan(r.p) and "zero" in r.note
    r = wilcoxon_paired([1], [2])
    assert np.isnan(r.p) and "< 2" in r.note
    df = wilcoxon_holm({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "c": [2.0, 3.0, 5.0]})
    assert np.isnan(df.loc[0, "p"]) and np.isnan(df.loc[0, "p_holm"]) and df.loc[0, "note"]
    assert np.isfinite(df.loc[1, "p"])
    m = mann_whitney_a12([1, 1], [1, 1])
    assert np.isnan(m.p) and m.a12 == 0.5 and m.note
    assert np.isnan(mann_whitney_a12([], [1]).a12)
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_paired([np.nan, 1], [1, 2])


def test_write_stats_table(tmp_path):
    df = mann_whitney_holm({"x": [1.0, 2, 3, 4], "y": [2.0, 3, 4, 9], "z": [0.1, 0.2, 0.3, 0.5]}, question="RQ2")
    paths = write_stats_table(df, tmp_path / "rq2_table", caption="RQ2")
    assert {p.suffix for p in paths.values()} == {".csv", ".md", ".tex"}
    back = pd.read_csv(paths["csv"])
    np.testing.assert_allclose(back["p_holm"], df["p_holm"])
    np.testing.assert_allclose(back["a12"], df["a12"])
    md = paths["md"].read_text()
    assert sum(l.startswith("|") for l in md.splitlines()) == len(df) + 2 and "p_holm" in md and "a12" in md
    assert "\\begin{tabular}" in paths["tex"].read_text() and "p\\_holm" in paths["tex"].read_text()
    assert to_markdown(pd.DataFrame({"a": ["x|y"]})).splitlines()[2] == "| x\\|y |"


def test_holm_matches_statsmodels_on_random_pvalues():
    import gc

    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(11)
    for _ in range(100):
        m = int(rng.integers(1, 25))
        p = rng.uniform(0, 1, m) ** rng.uniform(0.5, 4)
        if m > 3:
            p[rng.integers(0, m)] = p[0]  # ties
        gc.freeze()  # statsmodels' Holm calls gc.collect() (0.5 s each in this process): freeze as holm() does
        try:
            ref = multipletests(p, method="holm")[1]
        finally:
            gc.unfreeze()
        np.testing.assert_allclose(holm(p), ref, rtol=0, atol=1e-12)
        # and the formula itself, brute force: adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))
        order = np.argsort(p, kind="stable")
        brute = np.empty(m)
        for i in range(m):
            brute[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
        np.testing.assert_allclose(holm(p), brute, rtol=0, atol=1e-12)
    # NaN entries do not count towards m: same as statsmodels on the finite ones
    p = np.array([0.01, np.nan, 0.04, 0.03])
    out = holm(p)
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])


def test_to_markdown_is_pandas_to_markdown_without_padding():
    from vitfl.evaluation.stats import to_markdown

    df = pd.DataFrame({"method": ["ours", "a_very_long_method_name", "x|y"], "p": [0.012345, np.nan, 1.0],
                       "n": [3, 120, 7]})
    md = to_markdown(df)
    lines = md.splitlines()
    assert lines[0] == "| method | p | n |" and lines[1] == "|:---|---:|---:|"
    assert "| ours | 0.01235 | 3 |" in lines and "| x\\|y | 1 | 7 |" in lines
    assert "| a_very_long_method_name | NaN | 120 |" in lines
    # same cells as pandas' own to_markdown (tabulate), whitespace aside
    ref = df.assign(p=df["p"].map(lambda v: "NaN" if v != v else f"{v:.4g}"), method=df["method"].str.replace(
        "|", "\\|")).astype(str).to_markdown(index=False, tablefmt="pipe", disable_numparse=True)
    norm = lambda t: [[c.strip() for c in __import__("re").split(r"(?<!\\)\|", l.strip()[1:-1])]  # noqa: E731
                      for l in t.splitlines()[2:]]
    assert norm(md) == norm(ref)
