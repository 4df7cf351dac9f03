"""Differential-evolution repair (Arachne / RepTran; docs/methods.md, section 6).

The located weights are the K variables. DE/rand/1/bin, maximising the repair fitness (:mod:`.fitness`):

- population P = 100; initial values ~ N(mean, std) of each weight's matrix (population std, not clipped;
  ``init="around_original"`` reproduces one RepTran version's N(w_original, 1), a named quirk only);
- per generation F ~ U(0.5, 1) drawn once; for each target i three distinct donors r1, r2, r3 != i;
  mutant v = x_r1 + F (x_r2 - x_r3), clipped to the bounds of each weight's matrix
  (lo = 2 min if min < 0 else min / 2, hi = 2 max if max > 0 else max / 2);
  binomial crossover with CR = 0.7 (and one forced component j_rand);
- greedy replacement: the trial replaces its parent if F(trial) >= F(parent) (ties kept);
- stop after ``generations`` (50 RepTran, 100 Arachne) or once the best fitness has been unchanged for more than
  ``patience`` = max(int(generations / 10), 10) generations.

``early_stop`` says what "unchanged" is measured against:

- ``"default"``: the best fitness so far, starting from the initial population's; a generation that does not raise
  it (in float64) counts one stall. On a flat fitness with patience 10 the search stops after generation 11.
- ``"published"`` (Arachne's ``de_vk.py`` and RepTran's ``src/utils/de.py`` ``is_the_performance_unchanged``, for
  exact replays): the baseline is taken only after the first generation (that generation never counts as a
  stall, whatever it brings), a generation counts a stall when ``float32(best) == float32(baseline)``, and the
  baseline moves only when the float32 values differ and the best is higher. On a flat fitness it stops after
  generation 12, one more than the default; improvements below float32 resolution count as stalls.

``best`` says which individual the search returns (its fitness is the same either way; only the patch differs when
several individuals share the best fitness):

- ``"population"`` (default): the best member of the final population (the first of equal maxima). Greedy
  replacement keeps ties, so a later individual with the same fitness may have replaced the first one.
- ``"first"`` (the published searchers, for exact replays): the *first* individual that reached the best fitness, as
  deap's ``HallOfFame(1)`` keeps it (it replaces its member only on a strictly greater fitness): after the initial
  population and after each generation, the first member in population order whose fitness is strictly above the
  kept one replaces it. In ``update="immediate"`` this equals RepTran's in-loop updates (a trial enters the hall of
  fame only when strictly better than every earlier individual, and each index changes once per generation).

``update="deferred"`` (default): all P trials of a generation are built from the same population and evaluated
in one batched call, then selected. ``update="immediate"`` (the published codes): trial i is built from the
population as updated by trials 0..i-1 and evaluated alone. Random draws are the same in both modes (drawn at the
start of each generation from one seeded ``torch.Generator`` on the CPU), so a seed fixes the run.

:class:`DifferentialEvolution` is the plain search (any fitness function; ``tests`` compare it with
``scipy.optimize.differential_evolution``); :class:`DERepair` is the LightningModule: one training step = one
generation, with the population, fitnesses, counters and RNG state saved in and restored from checkpoints.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from vitfl.lightning_modules.repair import register_repair
from vitfl.lightning_modules.repair.base import RepairModule
from vitfl.lightning_modules.repair.fitness import (EPILOGUES, EVALUATORS, FitnessResult, NonFiniteFitnessError,
                                              SparseFitness)
from vitfl.lightning_modules.repair.patch import RepairInputError

__all__ = ["EARLY_STOPS", "BESTS", "matrix_bounds", "matrix_init_stats", "donors", "make_trials", "greedy_select",
           "DifferentialEvolution",
           "DERepair", "default_patience"]

UPDATES = ("deferred", "immediate")
NONFINITE = ("the fitness returned NaN/inf for some candidates; the search cannot rank them (check the cached states "
             "and the head's weights)")
EARLY_STOPS = ("default", "published")
BESTS = ("population", "first")
INITS = ("matrix", "around_original")


def default_patience(generations: int) -> int:
    """Generations without improvement tolerated: max(int(generations / 10), 10)."""
    return max(int(generations / 10), 10)


def matrix_bounds(W: Tensor) -> tuple[float, float]:
    """(lo, hi) of a weight matrix: lo = 2 min if min < 0 else min / 2; hi = 2 max if max > 0 else max / 2."""
    lo, hi = float(W.min()), float(W.max())
    return (2 * lo if lo < 0 else lo / 2), (2 * hi if hi > 0 else hi / 2)


def matrix_init_stats(W: Tensor) -> tuple[float, float]:
    """(mean, std) of a weight matrix (population std, as numpy's default)."""
    return float(W.mean()), float(W.std(unbiased=False))


def donors(pop_size: int, gen: torch.Generator) -> Tensor:
    """``[P, 3]`` donor indices: for each target i three distinct indices, none equal to i (uniform)."""
    keys = torch.rand(pop_size, pop_size, generator=gen)
    keys.fill_diagonal_(2.0)  # the target itself sorts last
    return keys.argsort(1)[:, :3]


def make_trials(pop: Tensor, F: float, cr: float, lower: Tensor, upper: Tensor, r: Tensor, cross: Tensor,
                j_rand: Tensor) -> Tensor:
    """DE/rand/1/bin trials ``[P, K]`` of population ``pop [P, K]`` (deferred: all from the same population).

    v_i = clip(x_r1 + F (x_r2 - x_r3), lower, upper); trial_ik = v_ik if cross_ik < cr or k = j_rand_i else x_ik.
    ``r [P, 3]`` donors, ``cross [P, K]`` uniforms, ``j_rand [P]``."""
    mutant = (pop[r[:, 0]] + F * (pop[r[:, 1]] - pop[r[:, 2]])).clamp(lower, upper)
    mask = cross < cr
    mask[torch.arange(len(pop)), j_rand] = True
    return torch.where(mask.to(pop.device), mutant, pop)


def greedy_select(pop: Tensor, fit: Tensor, trials: Tensor, trial_fit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each trial whose fitness is >= its parent's (ties kept). Returns (population, fitness, replaced)."""
    replaced = trial_fit >= fit
    return torch.where(replaced[:, None], trials, pop), torch.where(replaced, trial_fit, fit), replaced


class DifferentialEvolution:
    """DE/rand/1/bin maximising ``fitness(values [P, K]) -> [P]`` (a Tensor or a :class:`FitnessResult`).

    ``lower``, ``upper``, ``init_mean``, ``init_std``: ``[K]`` (or scalars). The population lives on
    ``device`` in ``dtype``; random numbers are drawn on the CPU from ``torch.Generator().manual_seed(seed)``."""

    def __init__(self, fitness: Callable[[Tensor], Tensor | FitnessResult], lower: Any, upper: Any, init_mean: Any,
                 init_std: Any, pop_size: int = 100, generations: int = 50, cr: float = 0.7,
                 f_range: tuple[float, float] = (0.5, 1.0), update: str = "deferred", patience: int | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_vars: int | None = None, early_stop: str = "default", best: str = "population"):
        if update not in UPDATES:
            raise RepairInputError(f"unknown DE update {update!r}; expected one of {UPDATES}")
        if early_stop not in EARLY_STOPS:
            raise RepairInputError(f"unknown DE early_stop {early_stop!r}; expected one of {EARLY_STOPS}")
        if best not in BESTS:
            raise RepairInputError(f"unknown DE best {best!r}; expected one of {BESTS}")
        self.early_stop = early_stop
        self.best_rule = best
        #: best="first": the hall of fame (the first individual that reached the best fitness) and its fitness
        self._hof: Tensor | None = None
        self._hof_fitness = float("-inf")
        self._baseline: float | None = None  # early_stop="published": the reference best, set after generation 1
        if pop_size < 4:
            raise RepairInputError(f"DE/rand/1 needs a population of at least 4, got {pop_size}")
        if generations < 0:
            raise RepairInputError(f"generations must be >= 0, got {generations}")
        if not 0.0 <= cr <= 1.0 or not 0.0 <= f_range[0] <= f_range[1]:
            raise RepairInputError(f"bad DE constants: cr={cr}, f_range={f_range}")
        self.fitness = fitness
        self.dtype, self.device = dtype, torch.device(device)
        as_vec = lambda v: torch.as_tensor(v, dtype=dtype).to(self.device).reshape(-1)  # noqa: E731
        self.lower, self.upper, self.init_mean, self.init_std = map(as_vec, (lower, upper, init_mean, init_std))
        self.K = num_vars or max(len(self.lower), len(self.upper), len(self.init_mean), len(self.init_std))
        self.lower, self.upper, self.init_mean, self.init_std = (
            v.expand(self.K).clone() for v in (self.lower, self.upper, self.init_mean, self.init_std))
        if bool((self.lower > self.upper).any()):
            raise RepairInputError("DE bounds have lower > upper")
        self.pop_size, self.generations, self.cr, self.f_range = pop_size, generations, cr, tuple(f_range)
        self.update = update
        self.patience = default_patience(generations) if patience is None else int(patience)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.pop: Tensor | None = None
        self.fit: Tensor | None = None
        self.aux: dict[str, Tensor] = {}
        self.generation = 0
        self.stall = 0
        self.best_fitness = float("-inf")
        self.evaluations = 0
        self.first: dict[str, float] = {}
        self.last: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, values: Tensor, check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Fitness ``[P]`` (float64) and aux counts of ``values``; ``check=False``: the caller checks finiteness
        itself (the deferred step folds it into its one host transfer per generation)."""
        res = self.fitness(values)
        self.evaluations += len(values)
        if isinstance(res, FitnessResult):
            fit, aux = res.fitness, {"n_patched": res.n_patched, "n_broken": res.n_broken}
        else:
            fit, aux = torch.as_tensor(res), {}
        fit = fit.to(self.device, torch.float64).reshape(-1)  # ranked in float64 whatever the population's dtype
        if fit.shape[0] != len(values):
            raise RepairInputError(f"fitness returned {fit.shape[0]} values for {len(values)} candidates")
        if check and not bool(torch.isfinite(fit).all()):
            raise NonFiniteFitnessError(NONFINITE)
        return fit, {k: v.to(self.device) for k, v in aux.items()}

    def _host(self, fit: Tensor, aux: dict[str, Tensor], *extra: Tensor) -> tuple[dict[str, Any], list[float]]:
        """The statistics of population fitness ``fit`` and ``aux`` (best, mean, the best member's aux counts) and
        the values of the scalar tensors ``extra``, in one device-to-host transfer."""
        b = fit.argmax()  # the first of equal maxima (indexed on the device)
        parts = [fit[b], fit.mean(), *(aux[k][b].to(torch.float64) for k in aux),
                 *(e.to(torch.float64) for e in extra)]
        vals = torch.stack(parts).tolist()
        n = 2 + len(aux)
        stats = {"best_fitness": vals[0], "mean_fitness": vals[1], **{k: int(v) for k, v in zip(aux, vals[2:n])}}
        return stats, vals[n:]

    def initialize(self, population: Tensor | None = None) -> dict[str, float]:
        """Draw (or take) the initial population ``[P, K]`` and evaluate it."""
        if population is None:
            noise = torch.randn(self.pop_size, self.K, generator=self.gen, dtype=torch.float64)
            population = self.init_mean + self.init_std * noise.to(self.device, self.dtype)
        self.pop = torch.as_tensor(population, dtype=self.dtype).to(self.device).clone()
        if self.pop.shape != (self.pop_size, self.K):
            raise RepairInputError(f"initial population must be [{self.pop_size}, {self.K}], got "
                                   f"{tuple(self.pop.shape)}")
        self.fit, self.aux = self._evaluate(self.pop)
        host, _ = self._host(self.fit, self.aux)
        self.best_fitness = host["best_fitness"]
        self.generation, self.stall = 0, 0
        self._baseline = None
        self.first = {"best": self.best_fitness, "mean": host["mean_fitness"]}
        self._hof, self._hof_fitness = None, float("-inf")
        self._update_hof(host["best_fitness"])
        self.last = self._stats(0, float("nan"), host)
        return self.last

    @property
    def initialized(self) -> bool:
        return self.pop is not None

    @property
    def early_stopped(self) -> bool:
        return self.stall > self.patience

    @property
    def done(self) -> bool:
        return self.generation >= self.generations or self.early_stopped

    @property
    def best_index(self) -> int:
        return int(self.fit.argmax())  # first of equal maxima

    @property
    def best(self) -> Tensor:
        """``[K]`` values the search returns: the best member of the population (``best="population"``) or the first
        individual that reached the best fitness (``best="first"``)."""
        if self.best_rule == "first" and self._hof is not None:
            return self._hof
        return self.pop[self.best_index]

    def _update_hof(self, best_fitness: float) -> None:
        """deap's ``HallOfFame(1).update(population)``: the first member (population order) whose fitness is strictly
        above the kept one replaces it (``best_fitness`` = the population's maximum, already on the host)."""
        if self.best_rule != "first" or not best_fitness > self._hof_fitness:
            return
        self._hof = self.pop[self.best_index].clone()  # argmax: the first of equal maxima
        self._hof_fitness = best_fitness

    # ------------------------------------------------------------------------------------------- one generation
    def _draws(self) -> tuple[float, Tensor, Tensor, Tensor]:
        lo, hi = self.f_range
        F = lo + (hi - lo) * float(torch.rand((), generator=self.gen, dtype=torch.float64))
        r = donors(self.pop_size, self.gen)
        cross = torch.rand(self.pop_size, self.K, generator=self.gen, dtype=torch.float64)
        j_rand = torch.randint(self.K, (self.pop_size,), generator=self.gen)
        return F, r, cross, j_rand

    def step(self) -> dict[str, Any]:
        """One generation; returns its statistics."""
        if not self.initialized:
            raise RuntimeError("call initialize() before step()")
        if self.done:
            return self.last
        F, r, cross, j_rand = self._draws()
        r_d, cross_d, j_d = r.to(self.device), cross.to(self.device), j_rand.to(self.device)
        if self.update == "deferred":
            # the whole population at once, and one device-to-host transfer for the generation (its statistics,
            # the finiteness check and the replaced count): no host synchronisation per candidate or chunk
            trials = make_trials(self.pop, F, self.cr, self.lower, self.upper, r_d, cross_d, j_d)
            tfit, taux = self._evaluate(trials, check=False)
            pop, fit, replaced = greedy_select(self.pop, self.fit, trials, tfit)
            aux = {k: torch.where(replaced, taux[k], self.aux[k]) for k in self.aux}
            host, (finite, n_rep) = self._host(fit, aux, torch.isfinite(tfit).all(), replaced.sum())
            if not finite:  # refused before the state changes
                raise NonFiniteFitnessError(NONFINITE)
            self.pop, self.fit, self.aux = pop, fit, aux
            n_replaced = int(n_rep)
        else:
            n_replaced = 0
            for i in range(self.pop_size):
                trial = self._trial_immediate(i, F, r_d[i], cross_d[i], j_d[i])
                tfit, taux = self._evaluate(trial[None])
                if bool(tfit[0] >= self.fit[i]):
                    self.pop[i], self.fit[i] = trial, tfit[0]
                    for k in self.aux:
                        self.aux[k][i] = taux[k][0]
                    n_replaced += 1
            host, _ = self._host(self.fit, self.aux)
        self.generation += 1
        best = host["best_fitness"]
        self._update_hof(best)
        if self.early_stop == "published":
            self._published_stall(best)
            self.best_fitness = max(self.best_fitness, best)
        elif best > self.best_fitness:
            self.best_fitness, self.stall = best, 0
        else:
            self.stall += 1
        self.last = self._stats(n_replaced, F, host)
        return self.last

    def _published_stall(self, best: float) -> None:
        """The published stall counter: baseline set after the first generation, compared in float32."""
        if self._baseline is None:
            self._baseline = best
            return
        if np.float32(best) == np.float32(self._baseline):
            self.stall += 1
        else:
            self.stall = 0
            if best > self._baseline:
                self._baseline = best

    def _trial_immediate(self, i: int, F: float, r: Tensor, cross: Tensor, j_rand: Tensor) -> Tensor:
        v = (self.pop[r[0]] + F * (self.pop[r[1]] - self.pop[r[2]])).clamp(self.lower, self.upper)
        mask = cross < self.cr
        mask[j_rand] = True
        return torch.where(mask, v, self.pop[i])

    def _stats(self, n_replaced: int, F: float, host: dict[str, Any]) -> dict[str, Any]:
        out = {"generation": self.generation, "best_fitness": host["best_fitness"],
               "mean_fitness": host["mean_fitness"], "replaced": n_replaced, "F": F, "stall": self.stall}
        out.update({k: host[k] for k in self.aux})
        return out

    def run(self) -> Tensor:
        """Initialise (if needed) and step until done; returns the best values ``[K]``."""
        if not self.initialized:
            self.initialize()
        while not self.done:
            self.step()
        return self.best

    def summary(self) -> dict[str, Any]:
        return {"fitness_first_best": self.first.get("best"), "fitness_first_mean": self.first.get("mean"),
                "fitness_last_best": float(self.fit.max()), "fitness_last_mean": float(self.fit.mean()),
                "fitness_best": self.best_fitness, "generations_run": self.generation,
                "max_generations": self.generations, "early_stopped": self.early_stopped, "patience": self.patience,
                "evaluations": self.evaluations, "update": self.update, "pop_size": self.pop_size, "cr": self.cr,
                "f_range": list(self.f_range), "early_stop": self.early_stop, "best": self.best_rule,
                "fitness_returned": (self._hof_fitness if self.best_rule == "first" and self._hof is not None
                                     else float(self.fit.max()))}

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"pop": self.pop.cpu(), "fit": self.fit.cpu(), "aux": {k: v.cpu() for k, v in self.aux.items()},
                "generation": self.generation, "stall": self.stall, "best_fitness": self.best_fitness,
                "evaluations": self.evaluations, "first": dict(self.first), "last": dict(self.last),
                "rng": self.gen.get_state(), "K": self.K, "pop_size": self.pop_size, "update": self.update,
                "early_stop": self.early_stop, "baseline": self._baseline, "best": self.best_rule,
                "hof": None if self._hof is None else self._hof.cpu(), "hof_fitness": self._hof_fitness}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["K"] != self.K or state["pop_size"] != self.pop_size:
            raise RepairInputError(f"checkpoint holds a DE of {state['pop_size']} x {state['K']}, this one is "
                                   f"{self.pop_size} x {self.K}")
        self.pop = state["pop"].to(self.device, self.dtype)
        self.fit = state["fit"].to(self.device, torch.float64)
        self.aux = {k: v.to(self.device) for k, v in state["aux"].items()}
        self.generation, self.stall = state["generation"], state["stall"]
        self.best_fitness, self.evaluations = state["best_fitness"], state["evaluations"]
        self.first, self.last = dict(state["first"]), dict(state["last"])
        if state.get("early_stop", "default") != self.early_stop:
            raise RepairInputError(f"checkpoint's DE used early_stop={state.get('early_stop', 'default')!r}, this one "
                                   f"{self.early_stop!r}")
        self._baseline = state.get("baseline")
        if state.get("best", "population") != self.best_rule:
            raise RepairInputError(f"checkpoint's DE used best={state.get('best', 'population')!r}, this one "
                                   f"{self.best_rule!r}")
        hof = state.get("hof")
        self._hof = None if hof is None else hof.to(self.device, self.dtype)
        self._hof_fitness = state.get("hof_fitness", float("-inf"))
        self.gen.set_state(state["rng"])


@register_repair("de")
class DERepair(RepairModule):
    """DE search over the located weights (see the module docstring). One training step = one generation; logs
    ``repair/best_fitness``, ``repair/mean_fitness``, ``repair/n_patched``, ``repair/n_broken`` (of the best
    member), ``repair/replaced``; ``Trainer.should_stop`` on early stop.

    Options: ``pop_size`` (100), ``generations`` (50; Arachne 100), ``cr`` (0.7), ``f_range`` ((0.5, 1)),
    ``update`` ("deferred" | "immediate"), ``patience`` (None: max(int(generations/10), 10)), ``init``
    ("matrix" | "around_original"), ``evaluator`` ("sparse" | "full" | "loop"), ``kernel``, ``chunk_size`` and
    ``epilogue`` ("eager" | "compiled"; sparse evaluator), ``early_stop`` ("default" | "published": the
    published searchers' stall counter, see the module docstring)."""

    option_ranges = {"pop_size": (4, None), "generations": (1, None), "cr": (0, 1), "f_range": (0, None),
                     "patience": (0, None), "chunk_size": (1, None)}
    option_choices = {"update": UPDATES, "init": INITS, "evaluator": tuple(sorted(EVALUATORS)),
                      "kernel": SparseFitness.KERNELS, "epilogue": EPILOGUES, "early_stop": EARLY_STOPS, "best": BESTS}

    def __init__(self, head, weights, x_neg, label_neg, x_pos, label_pos, seed: int = 0, alpha: float = 10.0,
                 fitness: str = "arachne", loss: str = "logits", pop_size: int = 100, generations: int = 50,
                 cr: float = 0.7, f_range: tuple[float, float] = (0.5, 1.0), update: str = "deferred",
                 patience: int | None = None, init: str = "matrix", evaluator: str = "sparse", kernel: str = "auto",
                 chunk_size: int | None = None, epilogue: str = "eager", early_stop: str = "default",
                 best: str = "population"):
        super().__init__(head, weights, x_neg, label_neg, x_pos, label_pos, seed, alpha, fitness, loss)
        self.automatic_optimization = False
        if update not in UPDATES:
            raise RepairInputError(f"unknown DE update {update!r}; expected one of {UPDATES}")
        if init not in INITS:
            raise RepairInputError(f"unknown DE init {init!r}; expected one of {INITS}")
        if early_stop not in EARLY_STOPS:
            raise RepairInputError(f"unknown DE early_stop {early_stop!r}; expected one of {EARLY_STOPS}")
        if best not in BESTS:
            raise RepairInputError(f"unknown DE best {best!r}; expected one of {BESTS}")
        if evaluator not in EVALUATORS:
            raise RepairInputError(f"unknown fitness evaluator {evaluator!r}; expected one of {sorted(EVALUATORS)}")
        if epilogue not in EPILOGUES:
            raise RepairInputError(f"unknown fitness epilogue {epilogue!r}; expected one of {EPILOGUES}")
        if self.head.token_axis and evaluator == "sparse" and kernel == "folded":
            raise RepairInputError(f"repair 'de': kernel='folded' is not exact on the FFN head of block "
                                   f"{self.head.block} (its post runs the later blocks / the pooling); use "
                                   "kernel='auto' or 'explicit'")
        self.de_options = {"pop_size": int(pop_size), "generations": int(generations), "cr": float(cr),
                           "f_range": tuple(float(f) for f in f_range), "update": update,
                           "patience": default_patience(int(generations)) if patience is None else int(patience),
                           "init": init, "evaluator": evaluator, "kernel": kernel, "chunk_size": chunk_size,
                           "epilogue": epilogue, "early_stop": early_stop, "best": best}
        # per-weight bounds and initial distribution from the weight's matrix
        lo, hi, mu, sd = (torch.empty(len(self.weights), dtype=torch.float64) for _ in range(4))
        for k, W in enumerate(self.head.weights()):
            sel = self.weights[:, 0] == k
            lo[sel], hi[sel] = matrix_bounds(W.detach())
            mu[sel], sd[sel] = matrix_init_stats(W.detach())
        if init == "around_original":  # quirk of one RepTran version: N(w_original, 1)
            mu, sd = self.old_values.to(torch.float64), torch.ones_like(sd)
        self._bounds = (lo, hi)
        self._init = (mu, sd)
        self.search: DifferentialEvolution | None = None
        self._restored: dict[str, Any] | None = None
        self._fitness_info: dict[str, Any] = {}

    @property
    def max_steps(self) -> int:
        return self.de_options["generations"]

    def options(self) -> dict[str, Any]:
        return {**self.de_options, "f_range": list(self.de_options["f_range"])}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        o = self.de_options
        extra = ({"kernel": o["kernel"], "chunk_size": o["chunk_size"], "epilogue": o["epilogue"]}
                 if o["evaluator"] == "sparse" else {})
        t = time.perf_counter()
        fitness = self.fitness_evaluator(o["evaluator"], **extra)
        self._fitness_info = fitness.info()
        self.timings["fitness_setup_s"] = time.perf_counter() - t
        self.search = DifferentialEvolution(
            fitness, *self._bounds, *self._init, pop_size=o["pop_size"], generations=o["generations"], cr=o["cr"],
            f_range=o["f_range"], update=o["update"], patience=o["patience"], seed=self.seed,
            dtype=self.head.fc_bef.weight.dtype, device=self.head.fc_bef.weight.device, num_vars=len(self.weights),
            early_stop=o["early_stop"], best=o["best"])
        if self._restored is not None:
            self.search.load_state_dict(self._restored)
            self._restored = None
        else:
            t = time.perf_counter()
            self.search.initialize()
            self.timings["search_s"] = time.perf_counter() - t

    def training_step(self, batch, batch_idx):
        if self.search.done:  # e.g. resumed from a checkpoint of a finished search
            self.trainer.should_stop = True
            return None
        t = time.perf_counter()
        stats = self.search.step()
        self.timings["search_s"] = self.timings.get("search_s", 0.0) + time.perf_counter() - t
        self._count_step()
        self.log("repair/best_fitness", stats["best_fitness"], prog_bar=True, on_step=True, batch_size=1)
        self.log_dict({f"repair/{k}": float(stats[k]) for k in ("mean_fitness", "replaced", "F", "stall",
                                                                 "n_patched", "n_broken") if k in stats},
                      on_step=True, batch_size=1)
        if self.search.done:
            self.trainer.should_stop = True
        return None

    def new_values(self) -> Tensor:
        if self.search is None or not self.search.initialized:
            raise RuntimeError("the DE has not run yet: call Trainer.fit (or fit_repair) first")
        return self.search.best

    def search_summary(self) -> dict[str, Any]:
        if self.search is None:
            return {}
        return {**self.search.summary(), "fitness_evaluator": self._fitness_info}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.search is not None and self.search.initialized:
            checkpoint["repair_search"] = self.search.state_dict()
            checkpoint["repair_weights"] = self.weights.clone()
            checkpoint["repair_timings"] = dict(self.timings)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "repair_search" not in checkpoint:
            return
        if not torch.equal(checkpoint["repair_weights"], self.weights):
            raise RepairInputError("the checkpoint's DE was run on other located weights")
        self._restored = checkpoint["repair_search"]
        self.timings.update(checkpoint.get("repair_timings", {}))
