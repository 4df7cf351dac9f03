"""Budgets: counts, shares of the layer ("P%"), avg and front, parsed in one place and resolved once per run."""
from __future__ import annotations

from decimal import Decimal

import pytest

from localization.ranking import DEFAULT_BUDGETS, BudgetError, budget_size, parse_budget


def test_shares_resolve_to_the_published_counts_on_vit_b_and_scale_down():
    assert [budget_size(b, 4_718_592) for b in DEFAULT_BUDGETS] == [236, 472, 944]
    assert [budget_size(b, 2 * 64 * 256) for b in ("0.1%", "0.5%", "1%")] == [33, 164, 328]
    assert budget_size("0.0001%", 10) == 1  # at least one weight
    assert budget_size("100%", 10) == 10 and budget_size(7, 10) == 7


def test_budget_size_matches_the_formula_on_random_shares():
    import random

    rng = random.Random(3)
    for _ in range(500):
        total = rng.randint(1, 5_000_000)
        p = round(rng.uniform(1e-4, 100), rng.randint(0, 5)) or 1.0
        spec = parse_budget(f"{p}%")
        # the formula in exact decimal arithmetic: max(1, round half to even of P / 100 * total)
        exact = Decimal(repr(p)) / 100 * total
        want = max(1, int(exact.to_integral_value(rounding="ROUND_HALF_EVEN")))
        got = budget_size(spec, total)
        assert abs(got - want) <= (1 if abs(exact - int(exact) - Decimal("0.5")) < Decimal("1e-9") else 0), \
            (p, total, got, want)


@pytest.mark.parametrize("given, canonical", [(236, 236), ("472", 472), (" 944 ", 944), ("0.010%", "0.01%"),
                                              ("1%", "1%"), ("100.0%", "100%"), ("0.00005%", "0.00005%"),
                                              ("avg", "avg"), ("front", "front")])
def test_one_canonical_form(given, canonical):
    assert parse_budget(given) == canonical


@pytest.mark.parametrize("bad", [0, -3, "0", "-3", True, 2.5, "0%", "101%", "abc%", "nan%", "1e-3", "many", None])
def test_bad_budgets_are_refused_with_the_accepted_forms(bad):
    with pytest.raises(BudgetError, match=r"budget|positive"):
        parse_budget(bad)


def test_check_budgets_names_the_layer_and_refuses_a_single_value():
    from pipeline.localize import check_budgets

    assert check_budgets(["1%", 5, "avg", "1%"], 100) == ["1%", 5, "avg"]
    with pytest.raises(BudgetError, match=r"outside \[1, 100\]"):
        check_budgets([101], 100)
    with pytest.raises(BudgetError, match="must be a list"):
        check_budgets(9, 100)  # a config's `budgets: 9`


def test_a_share_and_its_count_are_one_result(tmp_path, make_classifier):
    """The FL step resolves a share once against the run's layer: "P%" and its count share one identity, so the
    second run finds every result on disk."""
    from test_repair_sweep import make_run

    from pipeline.context import RunContext
    from pipeline.localize import fl_results, run_localization

    run = make_run(tmp_path / "run", make_classifier)[0]
    total = RunContext(run).head.index.total
    share = "0.05%" if budget_size("0.05%", total) > 1 else "1%"
    n = budget_size(share, total)
    first = run_localization(run, ["grad_loss"], settings=["all"], budgets=[share], progress=False)
    assert first[0]["status"] == "done" and first[0]["budgets"] == str(n)
    again = run_localization(run, ["grad_loss"], settings=["all"], budgets=[n], progress=False)
    assert again[0]["status"] == "exists"
    (rec,) = fl_results(run, ["grad_loss"], ["all"])
    assert rec["budget"] == n and rec["n_located"] == n
