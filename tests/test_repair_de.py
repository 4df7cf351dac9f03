"""DE search (lightning_modules/repair/de.py): agrees with scipy's DE on analytic problems; bounds, clipping,
greedy ties, early stop; DERepair: deterministic per seed, only located weights change, resume from a checkpoint,
loop and sparse evaluators agree, bad input raises."""
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from scipy.optimize import differential_evolution
from torch import nn

from vitfl.lightning_modules.repair import UnknownRepairError, get_repair, registered_repairs
from vitfl.lightning_modules.repair.base import fit_repair
from vitfl.lightning_modules.repair.de import (DERepair, DifferentialEvolution, default_patience, donors, greedy_select,
                                         make_trials, matrix_bounds)
from vitfl.lightning_modules.repair.fitness import NonFiniteFitnessError
from vitfl.lightning_modules.repair.patch import RepairInputError
from vitfl.localization.ffn import FFNHead

D, C = 8, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def head(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = FFNHead(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D), None,
                nn.Sequential(nn.LayerNorm(D), nn.Linear(D, C)), "hf")
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return h.to(dtype).eval()


WEIGHTS = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 5, 0], [1, 2, 1], [1, 2, 5], [1, 3, 1], [1, 0, 7]])


def states(h, n=40, n_neg=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=h.fc_bef.weight.dtype)
    with torch.no_grad():
        y = h(x).argmax(1)
    y[:n_neg] = (y[:n_neg] + 1) % C  # misclassified: I_neg
    return x[:n_neg], y[:n_neg], x[n_neg:], y[n_neg:]


def sphere_max(c):
    return lambda v: -((v - c) ** 2).sum(-1)


# ----------------------------------------------------------------------------------------------- the plain search
@pytest.mark.parametrize("update", ["deferred", "immediate"])
def test_de_finds_the_same_optimum_as_scipy(update):
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rosen = lambda v: -(100 * (v[..., 1] - v[..., 0] ** 2) ** 2 + (1 - v[..., 0]) ** 2)  # noqa: E731
    for f, bounds, opt in ((sphere_max(c), (-5.0, 5.0), c.numpy()), (rosen, (-2.0, 2.0), np.array([1.0, 1.0]))):
        K = len(opt)
        de = DifferentialEvolution(f, bounds[0], bounds[1], 0.0, 1.0, pop_size=30, generations=300, patience=300,
                                   update=update, seed=0, dtype=torch.float64, num_vars=K)
        ours = de.run().numpy()
        ref = differential_evolution(lambda v: -float(f(torch.tensor(v))), [bounds] * K, strategy="rand1bin",
                                     mutation=(0.5, 1.0), recombination=0.7, popsize=30 // K, maxiter=300, tol=0,
                                     polish=False, seed=0, updating=update)
        np.testing.assert_allclose(ours, opt, atol=2e-3)
        np.testing.assert_allclose(ref.x, opt, atol=2e-3)
        assert float(f(torch.tensor(ours))) == pytest.approx(-ref.fun, abs=1e-5)


def test_donors_are_distinct_and_not_the_target():
    r = donors(10, torch.Generator().manual_seed(0))
    assert r.shape == (10, 3)
    for i, row in enumerate(r.tolist()):
        assert len(set(row)) == 3 and i not in row


def test_trials_clip_mutants_and_keep_parent_components():
    g = torch.Generator().manual_seed(0)
    P, K = 20, 6
    pop = torch.randn(P, K, generator=g, dtype=torch.float64) * 10  # many members outside the bounds
    lo, hi = torch.full((K,), -1.0, dtype=torch.float64), torch.full((K,), 2.0, dtype=torch.float64)
    r, cross, jr = donors(P, g), torch.rand(P, K, generator=g, dtype=torch.float64), torch.randint(K, (P,), generator=g)
    trials = make_trials(pop, 0.8, 0.7, lo, hi, r, cross, jr)
    mask = cross < 0.7
    mask[torch.arange(P), jr] = True
    mutant = (pop[r[:, 0]] + 0.8 * (pop[r[:, 1]] - pop[r[:, 2]]))
    assert torch.equal(trials[~mask], pop[~mask])  # inherited: untouched, even out of bounds
    assert bool((trials[mask] >= -1).all() and (trials[mask] <= 2).all())
    torch.testing.assert_close(trials[mask], mutant.clamp(lo, hi)[mask])
    assert bool((pop.abs() > 2).any())  # the check above was not vacuous
    assert bool(mask.sum(1).ge(1).all())  # j_rand forces a component


def test_greedy_selection_keeps_ties():
    pop, trials = torch.zeros(4, 2), torch.ones(4, 2)
    fit = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tfit = torch.tensor([1.0, 1.5, 3.5, 4.0])
    new, nfit, rep = greedy_select(pop, fit, trials, tfit)
    assert rep.tolist() == [True, False, True, True]
    assert new[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert nfit.tolist() == [1.0, 2.0, 3.5, 4.0]


def test_constant_fitness_replaces_everything_and_stops_after_patience():
    f = lambda v: torch.zeros(len(v))  # noqa: E731
    de = DifferentialEvolution(f, -1, 1, 0, 1, pop_size=8, generations=50, seed=0, num_vars=3)
    de.initialize()
    prev = de.pop.clone()
    stats = de.step()
    assert stats["replaced"] == 8  # ties kept
    assert not torch.equal(de.pop, prev)
    de.run()
    assert de.early_stopped and de.generation == default_patience(50) + 1 == 11
    de2 = DifferentialEvolution(f, -1, 1, 0, 1, pop_size=8, generations=200, seed=0, num_vars=3)
    de2.run()
    assert de2.generation == 21  # patience max(int(200/10), 10) = 20


def test_improving_fitness_does_not_stop_early():
    de = DifferentialEvolution(sphere_max(torch.zeros(3)), -5, 5, 0, 3, pop_size=10, generations=15, seed=0,
                               patience=100, num_vars=3)
    de.run()
    assert de.generation == 15 and not de.early_stopped


def test_initial_values_drawn_from_given_normal_and_not_clipped():
    de = DifferentialEvolution(lambda v: torch.zeros(len(v)), -0.01, 0.01, 3.0, 0.5, pop_size=2000, generations=1,
                               seed=0, dtype=torch.float64, num_vars=2)
    de.initialize()
    assert abs(float(de.pop.mean()) - 3.0) < 0.05 and abs(float(de.pop.std()) - 0.5) < 0.05


def test_matrix_bounds():
    assert matrix_bounds(torch.tensor([-1.0, 3.0])) == (-2.0, 6.0)
    assert matrix_bounds(torch.tensor([1.0, 3.0])) == (0.5, 6.0)
    assert matrix_bounds(torch.tensor([-4.0, -1.0])) == (-8.0, -0.5)


def test_nan_fitness_raises():
    de = DifferentialEvolution(lambda v: torch.full((len(v),), float("nan")), -1, 1, 0, 1, pop_size=5, num_vars=2)
    with pytest.raises(NonFiniteFitnessError):
        de.initialize()


@pytest.mark.parametrize("update", ["deferred", "immediate"])
def test_nan_fitness_in_a_generation_raises_before_the_state_changes(update):
    """A NaN among a generation's trial fitnesses is refused, and the population, fitness, counters and generation
    are those before the step (deferred: checked in the step's one host transfer, after selection; immediate:
    checked per trial, here on the generation's first)."""
    calls = {"n": 0}

    def fitness(v):
        calls["n"] += 1
        f = -(v ** 2).sum(1)
        if calls["n"] > 1:  # every evaluation after the initial population's
            f[len(f) // 2] = float("nan")
        return f

    de = DifferentialEvolution(fitness, -1, 1, 0, 1, pop_size=6, num_vars=3, update=update, seed=1,
                               dtype=torch.float64)
    de.initialize()
    before = (de.pop.clone(), de.fit.clone(), de.generation, de.stall, de.best_fitness, dict(de.last))
    with pytest.raises(NonFiniteFitnessError):
        de.step()
    assert torch.equal(de.pop, before[0]) and torch.equal(de.fit, before[1])
    assert (de.generation, de.stall, de.best_fitness, de.last) == before[2:]


# ----------------------------------------------------------------------------------------------- the module
def run_de(h, seed=0, **kw):
    m = get_repair("de")(h, WEIGHTS, *states(h), seed=seed, **{"pop_size": 10, "generations": 8, **kw})
    return m, fit_repair(m, enable_progress_bar=False)


def test_registry():
    assert {"de", "finetune", "prune", "reinit"} <= set(registered_repairs())
    assert get_repair("de") is DERepair
    with pytest.raises(UnknownRepairError, match="registered: .*de.*finetune"):
        get_repair("nope")


def test_same_seed_same_patch_and_only_located_weights_change():
    h = head()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    m1, p1 = run_de(h, seed=3)
    _, p2 = run_de(h, seed=3)
    _, p3 = run_de(h, seed=4)
    assert p1 == p2 and not torch.equal(p1.new, p3.new)
    assert all(torch.equal(v, h.state_dict()[k]) for k, v in before.items())  # the caller's head is untouched
    assert all(torch.equal(v, m1.head.state_dict()[k]) for k, v in before.items())  # so is the module's
    patched = p1.apply(h.copy())
    for k, v in patched.state_dict().items():
        diff = (v != before[k]).nonzero()
        if k in ("fc_bef.weight", "fc_aft.weight"):
            m = 0 if k.startswith("fc_bef") else 1
            located = {tuple(w[1:]) for w in WEIGHTS.tolist() if w[0] == m}
            assert {tuple(d) for d in diff.tolist()} <= located and len(diff) > 0
        else:
            assert len(diff) == 0, k
    s = m1.summary()
    assert s["fitness_patched"] == pytest.approx(s["fitness_best"], rel=1e-6)
    assert s["fitness_best"] >= s["fitness_first_best"]
    assert s["update"] == "deferred" and s["fitness_evaluator"]["evaluator"] == "sparse"
    assert s["generations_run"] == 8 and not s["early_stopped"]


def test_loop_full_and_sparse_evaluators_give_the_same_search():
    h = head(dtype=torch.float64)
    m = DERepair(h, WEIGHTS, *states(h), seed=1)

    def search(evaluator, update):
        de = DifferentialEvolution(m.fitness_evaluator(evaluator), *m._bounds, *m._init, pop_size=10, generations=8,
                                   update=update, seed=1, dtype=torch.float64, num_vars=len(WEIGHTS))
        return de.run(), de

    for update in ("deferred", "immediate"):
        best, de = search("sparse", update)
        for other in ("full", "loop"):
            torch.testing.assert_close(search(other, update)[0], best, rtol=0, atol=1e-12)
        assert de.evaluations == 10 * 9
    assert not torch.equal(search("sparse", "deferred")[0], search("sparse", "immediate")[0])


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    h = head()
    _, full = run_de(h, seed=7, generations=10)
    m = DERepair(h, WEIGHTS, *states(h), seed=7, pop_size=10, generations=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    fit_repair(m, callbacks=[ckpt], max_steps=4, enable_progress_bar=False)  # "killed" after 4 generations
    assert m.search.generation == 4
    path = next(tmp_path.glob("*step=4*.ckpt"))
    m2 = DERepair(h, WEIGHTS, *states(h), seed=7, pop_size=10, generations=10)
    resumed = fit_repair(m2, ckpt_path=str(path), enable_progress_bar=False)
    assert m2.search.generation == 10
    assert resumed == full


def test_generations_are_logged_as_steps(tmp_path):
    h = head()
    m = DERepair(h, WEIGHTS, *states(h), pop_size=6, generations=5)
    fit_repair(m, logger=CSVLogger(tmp_path, name="de"), enable_progress_bar=False)
    assert m.trainer.global_step == 5
    lines = (tmp_path / "de" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for key in ("repair/best_fitness", "repair/mean_fitness", "repair/n_patched", "repair/n_broken", "step"):
        assert key in header
    steps = sorted({int(float(l.split(",")[header.index("step")])) for l in lines[1:]})
    assert steps == [0, 1, 2, 3, 4]


def test_de_module_stops_on_patience():
    h = head()
    m = DERepair(h, WEIGHTS, *states(h), pop_size=6, generations=40, patience=1)
    m.on_fit_start = lambda: None  # replaced below: a constant fitness
    m.search = DifferentialEvolution(lambda v: torch.zeros(len(v)), -1, 1, 0, 1, pop_size=6, generations=40,
                                     patience=1, num_vars=len(WEIGHTS))
    m.search.initialize()
    fit_repair(m, enable_progress_bar=False)
    assert m.search.generation == 2 and m.search.early_stopped
    assert m.trainer.global_step == 2


def test_bad_module_input():
    h = head()
    x_neg, y_neg, x_pos, y_pos = states(h)
    with pytest.raises(RepairInputError, match="I_neg is empty"):
        DERepair(h, WEIGHTS, x_neg[:0], y_neg[:0], x_pos, y_pos)
    with pytest.raises(RepairInputError, match="budget 0"):
        DERepair(h, WEIGHTS[:0], x_neg, y_neg, x_pos, y_pos)
    with pytest.raises(RepairInputError, match="unknown DE update"):
        DERepair(h, WEIGHTS, x_neg, y_neg, x_pos, y_pos, update="sometimes")
    with pytest.raises(RepairInputError, match="at least 4"):
        DifferentialEvolution(lambda v: v.sum(1), -1, 1, 0, 1, pop_size=3, num_vars=2)
    bad = x_neg.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(RepairInputError, match="NaN or inf"):
        DERepair(h, WEIGHTS, bad, y_neg, x_pos, y_pos)
    hb = h.copy()
    with torch.no_grad():
        hb.post[0].weight[0] = float("nan")
    m = DERepair(hb, WEIGHTS, x_neg, y_neg, x_pos, y_pos, pop_size=5, generations=2)
    with pytest.raises(NonFiniteFitnessError):
        fit_repair(m, enable_progress_bar=False)


# ----------------------------------------------------------------------------------------------- early stop
def published_generations(best_after_gen, max_gen):
    """Re-derivation of the published searchers' loop (Arachne ``de_vk.py`` / RepTran ``src/utils/de.py``):
    after each generation ``is_the_performance_unchanged(best)`` sets the baseline on its first call, then counts a
    stall when the float32 values are equal, resets (and raises the baseline) otherwise, and the search breaks
    once the count exceeds max(int(max_gen / 10), 10). Returns the number of generations run."""
    limit = max(int(max_gen / 10), 10)
    baseline, unchanged = None, 0
    for it in range(max_gen):
        cur = best_after_gen[it]
        if baseline is None:
            baseline = cur
            continue
        if np.float32(cur) == np.float32(baseline):
            unchanged += 1
        else:
            unchanged = 0
            if cur > baseline:
                baseline = cur
        if limit < unchanged:
            return it + 1
    return max_gen


def scripted_fitness(schedule, pop_size):
    """Every candidate of evaluation round g scores schedule[g] (round 0: the initial population), so with ties
    kept the population's best after generation g is schedule[g] for a non-decreasing schedule."""
    calls = {"n": 0}

    def f(v):
        g = calls["n"] // pop_size
        calls["n"] += len(v)
        return torch.full((len(v),), schedule[g], dtype=torch.float64)
    return f


@pytest.mark.parametrize("generations", [50, 100, 200])
def test_published_early_stop_runs_one_generation_more_on_a_flat_fitness(generations):
    f = lambda v: torch.zeros(len(v))  # noqa: E731
    runs = {}
    for early_stop in ("default", "published"):
        de = DifferentialEvolution(f, -1, 1, 0, 1, pop_size=6, generations=generations, seed=0, num_vars=2,
                                   early_stop=early_stop)
        de.run()
        assert de.early_stopped and de.summary()["early_stop"] == early_stop
        runs[early_stop] = de.generation
    expected = published_generations([0.0] * generations, generations)
    assert runs["published"] == expected
    assert runs["default"] == expected - 1
    if generations == 50:
        assert (runs["published"], runs["default"]) == (12, 11)


@pytest.mark.parametrize("case", ["gen1_improves", "sub_float32_steps", "late_improvement", "steady"])
def test_published_early_stop_matches_the_upstream_loop_on_scripted_fitness(case):
    G, P = 50, 5
    base = 100.0
    if case == "gen1_improves":  # generation 1 improves, then flat: both counters agree
        sched = [base] + [base + 1.0] * G
    elif case == "sub_float32_steps":  # steps below float32 resolution at 100: upstream sees no change
        sched = [base + 1e-9 * g for g in range(G + 1)]
    elif case == "late_improvement":  # a float32-visible improvement at generation 8 resets the counter
        sched = [base] * 8 + [base + 0.5] * (G - 7)
    else:  # float32-visible improvement every generation: never stops
        sched = [base + 0.01 * g for g in range(G + 1)]
    de = DifferentialEvolution(scripted_fitness(sched, P), -1, 1, 0, 1, pop_size=P, generations=G, seed=0,
                               num_vars=2, early_stop="published")
    de.run()
    assert de.generation == published_generations(sched[1:], G)
    default = DifferentialEvolution(scripted_fitness(sched, P), -1, 1, 0, 1, pop_size=P, generations=G, seed=0,
                                    num_vars=2)
    default.run()
    if case == "gen1_improves":
        assert de.generation == default.generation == 12
    if case == "sub_float32_steps":
        assert default.generation == G and de.generation == 12  # float64 sees every step
    if case == "steady":
        assert de.generation == default.generation == G


def test_early_stop_option_reaches_the_module_and_bad_value_raises():
    h = head()
    m = DERepair(h, WEIGHTS, *states(h), pop_size=6, generations=3, early_stop="published")
    assert m.options()["early_stop"] == "published"
    fit_repair(m, enable_progress_bar=False)
    assert m.search.early_stop == "published" and m.summary()["early_stop"] == "published"
    with pytest.raises(RepairInputError, match="early_stop"):
        DERepair(h, WEIGHTS, *states(h), early_stop="sometimes")
    with pytest.raises(RepairInputError, match="early_stop"):
        DifferentialEvolution(lambda v: v.sum(1), -1, 1, 0, 1, pop_size=5, num_vars=2, early_stop="nope")


def test_epilogue_option_reaches_the_fitness_and_gives_the_same_patch():
    """epilogue="compiled" reaches the sparse evaluator (its info in the summary) and, in float64, finds the same
    patch as the eager default; an unknown epilogue is refused when the module is built."""
    h = head(dtype=torch.float64)
    m_e, p_e = run_de(h, seed=2)
    m_c, p_c = run_de(h, seed=2, epilogue="compiled")
    assert m_e.summary()["fitness_evaluator"]["epilogue"] == "eager"
    assert m_c.summary()["fitness_evaluator"]["epilogue"] == "compiled" and m_c.options()["epilogue"] == "compiled"
    torch.testing.assert_close(p_c.new, p_e.new, rtol=0, atol=1e-12)
    with pytest.raises(RepairInputError, match="epilogue 'fused'"):
        DERepair(h, WEIGHTS, *states(h), epilogue="fused")


# ------------------------------------------------------------------------------------ best="first" (HallOfFame)
def hall_of_fame(populations):
    """deap's ``HallOfFame(1).update(pop)`` re-derived (``tools.support``): an empty hall takes ``pop[0]``; then any
    member whose fitness is strictly greater than the kept one replaces it; updated with every population."""
    kept, kept_fit = None, None
    for pop, fit in populations:
        for i in range(len(pop)):
            if kept is None:
                kept, kept_fit = pop[0].clone(), float(fit[0])
                continue
            if float(fit[i]) > kept_fit:
                kept, kept_fit = pop[i].clone(), float(fit[i])
    return kept, kept_fit


def plateau(v):
    # a capped, coarsely quantised fitness: many individuals tie at the best value
    return torch.clamp(torch.floor(v.double().sum(-1) * 2), max=3.0)


@pytest.mark.parametrize("update", ["deferred", "immediate"])
def test_best_first_returns_the_first_individual_that_reached_the_best_fitness(update):
    runs = {}
    for best in ("population", "first"):
        de = DifferentialEvolution(plateau, -2, 2, 0, 1, pop_size=8, generations=12, seed=3, num_vars=3,
                                   update=update, best=best)
        de.initialize()
        pops = [(de.pop.clone(), de.fit.clone())]
        while not de.done:
            de.step()
            pops.append((de.pop.clone(), de.fit.clone()))
        runs[best] = (de.best.clone(), float(plateau(de.best[None])[0]), pops, de.summary())
    (first, f_first, pops, summ), (popbest, f_pop, pops2, _) = runs["first"], runs["population"]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pops, pops2))  # the rule does not change the search
    ref, ref_fit = hall_of_fame(pops)
    assert torch.equal(first, ref)
    assert f_first == f_pop == ref_fit == 3.0  # same fitness ...
    assert not torch.equal(first, popbest)  # ... another patch (so this test can tell the two rules apart)
    assert summ["best"] == "first" and summ["fitness_returned"] == ref_fit


def test_best_option_reaches_the_module_survives_resume_and_bad_value_raises(tmp_path):
    h = head()
    m = DERepair(h, WEIGHTS, *states(h), pop_size=6, generations=3, best="first")
    assert m.options()["best"] == "first"
    fit_repair(m, enable_progress_bar=False)
    assert m.search.best_rule == "first" and m.summary()["best"] == "first"
    state = m.search.state_dict()
    other = DifferentialEvolution(plateau, -1, 1, 0, 1, pop_size=6, num_vars=len(WEIGHTS), best="population")
    with pytest.raises(RepairInputError, match="best"):
        other.load_state_dict(state)
    same = DifferentialEvolution(plateau, -1, 1, 0, 1, pop_size=6, num_vars=len(WEIGHTS), best="first")
    same.load_state_dict(state)
    assert torch.equal(same.best, m.search.best)
    with pytest.raises(RepairInputError, match="best"):
        DERepair(h, WEIGHTS, *states(h), best="last")
