"""Budgets: counts, shares of the layer ("P%"), avg and front, parsed in one place and resolved once per run."""
from __future__ import annotations

from decimal import Decimal

import pytest

from vitfl.localization.ranking import DEFAULT_BUDGETS, BudgetError, budget_size, parse_budget


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
    from vitfl.pipeline.localize import check_budgets

    assert check_budgets(["1%", 5, "avg", "1%"], 100) == ["1%", 5, "avg"]
    with pytest.raises(BudgetError, match=r"outside \[1, 100\]"):
        check_budgets([101], 100)
    with pytest.raises(BudgetError, match="must be a list"):
        check_budgets(9, 100)  # a config's `budgets: 9`


def test_a_share_and_its_count_are_one_result(tmp_path, make_classifier):
    """The FL step resolves a share once against the run's layer: "P%" and its count share one identity, so the
    second run finds every result on disk."""
    from test_repair_sweep import make_run

    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import fl_results, run_localization

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


# ---------------------------------------------------------------------------------------------- resolution
def test_a_resolved_budget_is_a_label_and_its_size():
    from vitfl.localization.ranking import ResolvedBudget

    vit_b, testbed = 4_718_592, 2 * 64 * 256
    assert [ResolvedBudget.resolve(b, vit_b) for b in DEFAULT_BUDGETS] == [
        ResolvedBudget("0.005%", 236), ResolvedBudget("0.01%", 472), ResolvedBudget("0.02%", 944)]
    assert [ResolvedBudget.resolve(b, testbed).n for b in ("0.1%", "0.5%", "1%", 7, "12")] == [33, 164, 328, 7, 12]
    assert ResolvedBudget.resolve("0.010%", testbed).label == "0.01%"  # the canonical label is the one carried
    avg = ResolvedBudget.resolve("avg", vit_b, n_avg=300)
    assert (avg.label, avg.n, avg.value) == ("avg", 300, 300)
    front = ResolvedBudget.resolve("front", vit_b, n_avg=300)
    assert (front.label, front.n, front.value) == ("front", None, "front")
    assert ResolvedBudget.resolve(6, 10).value == 6
    with pytest.raises(BudgetError, match="N_avg"):
        ResolvedBudget.resolve("avg", vit_b)
    with pytest.raises(BudgetError, match=r"outside \[1, 10\]"):
        ResolvedBudget.resolve(11, 10)
    for label, n in (("0.010%", 3), ("front", 5), ("avg", None), (6, 0), ("1%", True)):
        with pytest.raises(BudgetError):
            ResolvedBudget(label, n)
    with pytest.raises(AttributeError):  # frozen: carried, not re-derived
        avg.n = 5


def _fake_run(total, monkeypatch, n_avg=300):
    """A run context with a layer of ``total`` weights and N_avg = ``n_avg`` (counted calls)."""
    from types import SimpleNamespace

    import vitfl.pipeline.localize as loc

    calls = []
    monkeypatch.setattr(loc, "resolve_n_avg", lambda ctx, **kw: calls.append(kw) or {"n_avg": n_avg})
    return SimpleNamespace(head=SimpleNamespace(index=SimpleNamespace(total=total))), calls


def test_resolve_budgets_for_a_method_against_the_run(monkeypatch):
    from vitfl.localization.ranking import ResolvedBudget
    from vitfl.pipeline.localize import N_AVG_METHOD, resolve_budgets

    ctx, calls = _fake_run(4_718_592, monkeypatch)
    got = resolve_budgets(ctx, "random", ["0.005%", 472, "avg", "front", "0.02%"], n_avg_options={"x": 1},
                          n_avg_seed=3, batch_size=64)
    assert got == [ResolvedBudget("0.005%", 236), ResolvedBudget(472, 472), ResolvedBudget("avg", 300),
                   ResolvedBudget("0.02%", 944)]
    assert calls == [{"options": {"x": 1}, "seed": 3, "batch_size": 64, "trainer_kwargs": None}]
    # the method that defines N_avg selects its own set: "front" alone, and N_avg is not looked up for it
    assert resolve_budgets(ctx, N_AVG_METHOD, ["0.01%", "avg"]) == [ResolvedBudget("front", None)]
    assert len(calls) == 1
    assert resolve_budgets(ctx, "random", ["1%", "avg"][:1]) == [ResolvedBudget("1%", 47186)] and len(calls) == 1
    # a budget larger than the layer is an error for every method, before N_avg is computed
    for method in ("random", N_AVG_METHOD):
        with pytest.raises(BudgetError, match=r"outside \[1, 4718592\]"):
            resolve_budgets(ctx, method, ["avg", 5_000_000])
    assert len(calls) == 1


def _count(monkeypatch, module, name):
    calls = []
    orig = getattr(module, name)

    def counted(*a, **kw):
        calls.append(a)
        return orig(*a, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_sweep_resolves_each_budget_once_per_run_and_method(tmp_path, make_classifier, monkeypatch, one_thread):
    """2 settings x 2 reps x 2 methods x 3 labels: the budgets are resolved once per (run, method), every task
    carries its resolved value into its identity, and the localize step resolves once per method too."""
    from test_repair_sweep import make_run

    import vitfl.localization.ranking as ranking
    import vitfl.pipeline.localize as loc
    import vitfl.pipeline.repair as rep

    from vitfl.pipeline.context import RunContext

    store = make_run(tmp_path / "run", make_classifier)[0]
    total = RunContext(store).head.index.total
    resolver = _count(monkeypatch, rep, "resolve_budgets")
    sizes = _count(monkeypatch, ranking, "budget_size")
    monkeypatch.setattr(loc, "budget_size", ranking.budget_size)  # the other name of the same function: counted too
    n_avg = []
    monkeypatch.setattr(loc, "resolve_n_avg", lambda ctx, **kw: n_avg.append(kw) or {"n_avg": 5})
    seen = []

    def fake_task(task, ctx, identity, path, **kw):  # the repair itself is not what is counted here
        seen.append((task, identity))
        return {"metrics": {"test": {"rr": 0.0, "br": 0.0, "delta_acc": 0.0}}, "n_weights": task.budget.n or 1,
                "fitness": {}, "timings": {"total_s": 0.0}}

    monkeypatch.setattr(rep, "run_task", fake_task)
    rows = rep.run_sweep([store.root], ["random", "arachne_w"], ["all", "src_tgt_r1"], ["1%", 6, "avg"], 2,
                         fl_options={"bl": {}}, fl_batch_size=64, progress=False, on_error="raise")
    assert len(rows) == 2 * 2 * 2 * 3 and {r["status"] for r in rows} == {"done"}
    assert [c[1] for c in resolver] == ["random", "arachne_w"]  # once per (run, method), not per task
    assert len(sizes) == 2 * 2  # "1%" and 6, once per method
    assert n_avg == [{"options": {}, "seed": 0, "batch_size": 64, "trainer_kwargs": None}] * 2  # N_AVG_METHOD's options
    want = {"1%": budget_size("1%", total), 6: 6, "avg": 5}
    for task, identity in seen:
        assert identity["fl"]["budget"] == task.budget.n == want[task.budget.label]
    assert {(r["budget"], r["budget_n"]) for r in rows} == set(want.items())

    resolver = _count(monkeypatch, loc, "resolve_budgets")
    loc.run_localization(store, ["grad_loss", "random"], settings=["all", "src_tgt_r1"], budgets=["1%", "avg"],
                         progress=False)
    assert [c[1] for c in resolver] == ["grad_loss", "random"]


def test_resolved_budgets_keep_the_identities_of_labels(tmp_path, make_classifier, monkeypatch, one_thread):
    """A sweep's result keys and paths are the ones the identity built from the label's count (a share: its
    budget_size; avg: N_avg; front: "front") gives, as before budgets were resolved into (label, n): existing
    results are found."""
    from test_repair_sweep import DE, make_run

    from vitfl.core.runstore import identity_key
    from vitfl.pipeline.context import RunContext
    from vitfl.pipeline.localize import fl_identity, resolve_n_avg
    from vitfl.pipeline.repair import resolved_repair_options, run_sweep

    store = make_run(tmp_path / "run", make_classifier)[0]
    ctx = RunContext(store)
    total = ctx.head.index.total
    rows = run_sweep([store.root], ["random", "bl"], ["all"], ["1%", "avg"], 1, repair_options=DE, seed=4,
                     progress=False, on_error="raise")
    n_avg = resolve_n_avg(ctx)["n_avg"]
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 3
    for r in rows:
        n = {"1%": budget_size("1%", total), "avg": n_avg, "front": "front"}[r["budget"]]
        old = {"kind": "repair", "repair": "de", "repair_options": resolved_repair_options("de", DE), "rep": 0,
               "seed": 4, "inputs": {"test_states": ctx.states_hash("test")},
               "fl": {"kind": "fl_result", "scores": fl_identity(ctx, r["method"], "all", None, 0), "budget": n}}
        assert r["key"] == identity_key(old) and r["budget_n"] == n
        assert r["path"] == store.rel(store.repair_result_path(old, setting="all", label=r["method"], budget=n,
                                                               rep=0))
        assert store.find_fl_result(old["fl"]) is not None
    again = run_sweep([store.root], ["random", "bl"], ["all"], ["1%", "avg"], 1, repair_options=DE, seed=4,
                      progress=False, on_error="raise")
    assert [r["status"] for r in again] == ["exists"] * 3
