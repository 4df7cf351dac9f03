"""Interval code against scipy / statsmodels on known and random cases."""
import numpy as np
import pytest
from scipy import stats as sps

from vitfl.evaluation.intervals import bootstrap_mean, fmt_rate, pooled_rate, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 19), (19, 19), (8, 19), (1, 412), (411, 412), (50, 100)])
def test_wilson_matches_scipy_binomtest(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_matches_statsmodels_on_random_counts():
    from statsmodels.stats.proportion import proportion_confint

    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 2000))
        k = int(rng.integers(0, n + 1))
        conf = float(rng.choice([0.8, 0.9, 0.95, 0.99]))
        lo, hi = wilson_interval(k, n, conf)
        rlo, rhi = proportion_confint(k, n, alpha=1 - conf, method="wilson")
        assert lo == pytest.approx(rlo, abs=1e-10) and hi == pytest.approx(rhi, abs=1e-10)
        assert 0.0 <= lo <= hi <= 1.0


def test_pooled_rate_sums_counts_and_has_no_rate_without_denominator():
    r = pooled_rate([1, 0, 3], [2, 0, 5])
    assert (r.k, r.n) == (4, 7) and r.rate == pytest.approx(4 / 7)
    ref = sps.binomtest(4, 7).proportion_ci(method="wilson")
    assert (r.lo, r.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    none = pooled_rate([0, 0], [0, 0])
    assert none.rate is None and none.lo is None and none.n == 0
    assert fmt_rate(none, what="targets").startswith("n/a") and "0.000" not in fmt_rate(none)


@pytest.mark.parametrize("bad", [dict(k=3, n=2), dict(k=-1, n=2), dict(k=1.5, n=3)])
def test_bad_counts_are_named(bad):
    with pytest.raises(ValueError, match="k"):
        wilson_interval(**bad)


def test_pooled_rate_rejects_nan_and_k_above_n():
    with pytest.raises(ValueError, match="NaN"):
        pooled_rate([1, np.nan], [2, 3])
    with pytest.raises(ValueError, match="more successes"):
        pooled_rate([3, 1], [2, 3])


def test_bootstrap_mean_matches_scipy_and_covers_the_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(0.01, 0.02, size=15)
    m = bootstrap_mean(v, seed=7, n_resamples=2000)
    ref = sps.bootstrap((v,), np.mean, n_resamples=2000, method="BCa", random_state=np.random.default_rng(7))
    assert m.mean == pytest.approx(float(np.mean(v)))
    assert m.lo == pytest.approx(ref.confidence_interval.low) and m.hi == pytest.approx(ref.confidence_interval.high)
    assert m.lo < m.mean < m.hi


def test_bootstrap_degenerate_cases():
    assert bootstrap_mean([]).mean is None
    one = bootstrap_mean([0.3])
    assert one.mean == 0.3 and one.lo is None
    same = bootstrap_mean([0.2, 0.2, 0.2])
    assert same.lo == same.hi == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([0.1, np.nan])
