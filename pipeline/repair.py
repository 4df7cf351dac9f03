"""The repair step: the sweep FL method x setting x budget x repetition (x run directory), one result per run in the
run store, then tables, figures and statistics.

A run (:class:`RepairTask`) repairs one setting of one run directory ("dataset") with the weights one FL method
located at one budget, seeded by its repetition. Its identity (:mod:`vitfl.core.runstore`) is the FL result's identity
(method, all its options, seed, setting, resolved budget, input hashes), the repair method and *all* its options
(generations, fitness, update mode, ... as resolved), the repetition and seed, and the hashes of the test cache:
two sweeps that differ in one option write two results and both are reported; a rerun with the same identity is
skipped. FL methods that are redrawn per repetition (``reseed_per_rep``, e.g. random) use the repetition as their
seed; the others are localized once. A task carries its budget resolved (:class:`ResolvedBudget`: the label as
given, for tables, and the number n of weights, for the identity), made once per (run directory, FL method) by
:func:`build_grid` through ``vitfl.pipeline.localize.resolve_budgets``: methods that select their own set
(``own_selection``, e.g. BL) get "front"; ``"avg"`` = N_avg of the run (``vitfl.pipeline.localize.resolve_n_avg``: one
value per run, whatever settings the sweep covers).

**Any block's FFN** (``block``, default -1 = the last): the sweep repairs the FFN of the transformer block ``block``
through :class:`RunContext` ``(store, epoch, block)``: the head is ``ffn_head(model, block)`` and the states are that
block's token caches (made by the cache step with the same ``block``: the repair and test splits). FL results are
those of that head (their identities hold ``"head"``, so another block's are never used), and a repair identity of
a head other than the last-block CLS head holds ``"head": ctx.view()`` as well; on the last-block CLS head every
identity, key and file is exactly what it was before block addressing. Each new record holds ``"block"``, the
non-negative index of the repaired block (:func:`collect_results`'s ``block`` column).

Concurrent workers on one run claim each task (a lock file in the store), so no task runs twice; ``shard=(k, n)``
takes every n-th task of the deterministic grid from k, so n SLURM array tasks split the grid with no coordination.
Repair itself uses I_neg = the setting's ``i_neg`` and I_pos = ``i_pos_repair`` (the stratified 5 % sample) of the
repair split; metrics are computed on the held-out test fold and on the repair split.
"""
from __future__ import annotations

import os

import itertools
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from vitfl.core.io import provenance, to_jsonable
from vitfl.core.runstore import RunStore, UnsafePathError, identity_key
from vitfl.lightning_modules.repair import REPAIRS
from vitfl.lightning_modules.repair.patch import UnsupportedRepairHeadError
from vitfl.localization.base import FL_METHODS, method_meta
from vitfl.localization import ranking
from vitfl.localization.ranking import ResolvedBudget
from vitfl.pipeline.context import RunContext
from vitfl.pipeline.localize import (N_AVG_METHOD, STALE_WHY, check_budgets, count_stale, disk_full_names, fl_identity,
                               resolve_budgets, run_method, stale_note, stale_reasons)

__all__ = ["RepairTask", "DEFAULT_METHODS", "DEFAULT_BUDGETS", "parse_shard", "dataset_dirs", "build_grid",
           "shard_tasks", "run_sweep", "collect_results", "record_block", "aggregate", "summary_table", "statistics",
           "METRICS"]

DEFAULT_METHODS = ("ours", "arachne_w", "random")
#: the sweep's default budget labels: the published shares and N_avg (the one place "avg" is added to them;
#: ``scripts/_cli.py`` spells the same list out so ``--help`` imports no torch, and a test compares the two)
DEFAULT_BUDGETS: tuple[int | str, ...] = (*ranking.DEFAULT_BUDGETS, "avg")
METRICS = ("rr", "br", "delta_acc")
METRIC_NAMES = {"rr": "repair rate (RR)", "br": "break rate (BR)", "delta_acc": "delta accuracy"}


# ------------------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class RepairTask:
    """One repair run; ``budget`` resolved for its run directory and FL method (label and n, by :func:`build_grid`)."""
    dataset: str
    run_dir: str
    setting: str
    method: str
    budget: ResolvedBudget
    rep: int
    repair: str = "de"

    @property
    def label(self) -> str:
        """The FL method, plus ``+{repair}`` unless DE (for file names and tables)."""
        return self.method if self.repair == "de" else f"{self.method}+{self.repair}"

    def as_row(self) -> dict[str, Any]:
        """The task's fields as status rows and result records show them: the budget as its label."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"budget": self.budget.label}


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"k/n"`` (0 <= k < n) -> (k, n); None -> (0, 1)."""
    if spec is None:
        return (0, 1)
    if isinstance(spec, str):
        try:
            k, n = (int(v) for v in spec.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'k/n' (e.g. '3/8', 0-based), got {spec!r}") from None
    else:
        k, n = spec
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: need n >= 1 and 0 <= k < n")
    return int(k), int(n)


def dataset_dirs(run_dirs: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
    """Dataset name -> run directory, from a mapping, ``"name=path"`` strings, or paths (name = folder name; a path
    whose folders hold "=", e.g. a fold run ``cv/fold=0``, is a path)."""
    if isinstance(run_dirs, Mapping):
        out = {str(k): Path(v) for k, v in run_dirs.items()}
    else:
        out = {}
        for item in run_dirs:
            item = str(item)
            named = "=" in item and "/" not in item.partition("=")[0] and os.sep not in item.partition("=")[0]
            name, _, path = item.partition("=") if named else (Path(item).name, "", item)  # (a path may hold "=")
            if name in out:
                raise ValueError(f"two run directories named {name!r}: give them names ('name=path')")
            out[name] = Path(path)
    if not out:
        raise ValueError("no run directories given")
    return out


def _budget_key(b: int | str) -> tuple:
    from vitfl.core.style import budget_key

    return budget_key(b)


def _available_settings(root: Path) -> dict[str, Any]:
    from vitfl.pipeline.context import load_misclf

    info = load_misclf(RunStore(root))
    return info


def build_grid(run_dirs, methods: Iterable[str] = DEFAULT_METHODS, settings: Iterable[str] | None = None,
               budgets: Iterable[int | str] = DEFAULT_BUDGETS, reps: int | Iterable[int] = 5,
               repair: str = "de", fl_options: Mapping[str, Mapping[str, Any]] | None = None, *,
               fl_batch_size: int = 512, contexts: dict[str, RunContext] | None = None,
               block: int = -1) -> list[RepairTask]:
    """Every run of the sweep in a deterministic order (dataset, setting, method, budget label, rep), every option
    checked first: unknown FL or repair methods, budgets <= 0 or larger than a run's layer, no repetitions, or a
    setting a run directory has neither made nor reported as skipped are errors.

    Each task carries its budget resolved once per (run directory, FL method) by
    :func:`vitfl.pipeline.localize.resolve_budgets` (shares against the run's layer; ``"avg"``: the run's N_avg, from
    the store or computed with ``fl_options[N_AVG_METHOD]``, seed 0 and ``fl_batch_size``). ``contexts``: the
    runs' :class:`RunContext` by run directory, used and filled (the sweep passes its own: one model load).
    ``block``: the transformer block whose FFN is repaired (default -1, the last; out of range: a
    :class:`vitfl.localization.ffn.BlockIndexError` naming the number of blocks); the budgets resolve against that
    block's layer and its FL results."""
    from vitfl.pipeline.localize import BENCHMARK_SETTINGS

    _check_block(block)
    dirs = dataset_dirs(run_dirs)
    methods = FL_METHODS.check(list(dict.fromkeys(methods)))
    if not methods:
        raise ValueError("no FL methods given")
    REPAIRS.check([repair])
    labels = sorted(check_budgets(budgets), key=_budget_key)
    reps = list(range(reps)) if isinstance(reps, int) else sorted(set(int(r) for r in reps))
    if not reps or min(reps) < 0:
        raise ValueError(f"reps must give at least one repetition >= 0, got {reps}")
    fl_options = fl_options or {}
    contexts = {} if contexts is None else contexts
    run_sets = {}
    for name, root in dirs.items():  # every run's settings checked before any budget is resolved
        info = _available_settings(root)
        avail, skipped = info["settings"], info.get("skipped", {})
        if settings is None:
            run_sets[name] = [s for s in BENCHMARK_SETTINGS if s in avail] + sorted(s for s in avail
                                                                                  if s not in BENCHMARK_SETTINGS)
        else:
            run_sets[name] = list(dict.fromkeys(settings))
            unknown = [s for s in run_sets[name] if s not in avail and s not in skipped]
            if unknown:
                raise ValueError(f"{name}: unknown setting(s) {unknown}; available: {sorted(avail)}; skipped by "
                                 f"the analysis: {sorted(skipped)}")
    tasks = []
    for name, root in dirs.items():
        if str(root) not in contexts:
            contexts[str(root)] = RunContext(RunStore(root), block=block)
        elif block != -1:
            _check_context_block(contexts[str(root)], block)
        resolved = {m: resolve_budgets(contexts[str(root)], m, labels, method_options=fl_options.get(m),
                                       n_avg_options=fl_options.get(N_AVG_METHOD), n_avg_seed=0,
                                       batch_size=fl_batch_size)
                    for m in methods}
        for s in run_sets[name]:
            for m in methods:
                for b in resolved[m]:
                    for r in reps:
                        tasks.append(RepairTask(name, str(root), s, m, b, r, repair))
    return tasks


def _check_block(block: Any) -> None:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int (0 the first block, -1 the last), got {block!r}")


def _check_context_block(ctx: RunContext, block: int | None) -> None:
    """A ValueError unless ``ctx``'s head is the FFN of ``block`` (None: any)."""
    if block is None:
        return
    n = ctx.head.num_blocks
    want = block % n if n else block
    if ctx.head.block is not None and ctx.head.block != want:
        raise ValueError(f"the run context holds the FFN head of block {ctx.head.block}, not of block {block}: "
                         f"build it as RunContext(store, epoch, block={block})")


def shard_tasks(tasks: Sequence[RepairTask], shard: str | tuple[int, int] | None) -> list[RepairTask]:
    k, n = parse_shard(shard)
    return list(tasks[k::n])


# ------------------------------------------------------------------------------------------------- one run
def resolved_repair_options(repair: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The repair method's constructor defaults merged with ``options`` checked by the one options rule
    (:meth:`vitfl.core.registry.Registry.check_options`: unknown names, wrong types and values outside the method's
    declared ranges are errors, naming the option; ints stay ints, an int for a float option becomes a float)."""
    defaults = REPAIRS.options(repair)
    defaults.pop("seed", None)
    options = REPAIRS.check_options(repair, options)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**defaults, **options}.items()}


def _fl_seed(task: RepairTask) -> int:
    return task.rep if method_meta(task.method)["reseed_per_rep"] else 0


def task_identity(ctx: RunContext, task: RepairTask, *, seed: int, repair_options: Mapping[str, Any] | None,
                  fl_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A repair run's identity: its FL result's (the budget as n, or "front"), the repair method with all its
    options, the repetition and seed, and the test cache's hash; on a head other than the last-block CLS head also
    ``"head": ctx.view()`` (its FL identity holds it too)."""
    fl_id = {"kind": "fl_result", "scores": fl_identity(ctx, task.method, task.setting, fl_options, _fl_seed(task)),
             "budget": task.budget.value}
    ident = {"kind": "repair", "fl": fl_id, "repair": task.repair,
             "repair_options": resolved_repair_options(task.repair, repair_options), "rep": task.rep,
             "seed": seed + task.rep, "inputs": {"test_states": ctx.states_hash("test")}}
    view = ctx.view()
    if view:  # another head than the last-block CLS head (whose identities stay what they were)
        ident["head"] = dict(view)
    return ident


def _record_block(ctx: RunContext) -> dict[str, Any]:
    """``{"block": L}``: the repaired block's non-negative index (also for the last-block CLS head); {} when the
    head does not know it (a head built by hand)."""
    return {} if ctx.head.block is None else {"block": int(ctx.head.block)}


def _setting_summary(s: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "rank", "true", "pred", "label", "n_neg")
    return {**{k: s.get(k) for k in keys}, "n_pos_repair": len(s.get("i_pos_repair") or [])}


def run_task(task: RepairTask, ctx: RunContext, identity: Mapping[str, Any], path: Path, *, seed: int = 0,
             repair_options: Mapping[str, Any] | None = None, fl_options: Mapping[str, Any] | None = None,
             fl_batch_size: int = 512, logger: bool = False, progress_bar: bool = False, accelerator: str = "cpu",
             config: Mapping[str, Any] | None = None, block: int | None = None) -> dict[str, Any]:
    """One repair run; returns the result record (also written, atomically, to ``path``). The FFN repaired is
    ``ctx``'s head (``RunContext(store, epoch, block)``); ``block``, when given, must be that head's block (a check:
    a ValueError otherwise). The record's ``block`` is the repaired block's non-negative index."""
    from vitfl.lightning_modules.repair.base import fit_repair
    from vitfl.lightning_modules.repair.metrics import evaluate_patch
    from vitfl.localization.misclf import target_mask

    _check_context_block(ctx, block)
    t_start = time.perf_counter()
    store = ctx.store
    setting = ctx.setting(task.setting)
    n = task.budget.value
    t0 = time.perf_counter()
    fl, fl_row = run_method(ctx, task.method, task.setting, [n], options=fl_options, seed=_fl_seed(task),
                            batch_size=fl_batch_size)
    if n not in fl:
        raise ValueError(f"FL {task.method} on {task.setting}: {fl_row['status']}")
    res = fl[n]
    fl_s = time.perf_counter() - t0
    weights = torch.as_tensor(res.weights, dtype=torch.long)
    rep_states = ctx.states("repair")
    neg = rep_states.rows_of(torch.tensor(setting["i_neg"], dtype=torch.long))
    pos = rep_states.rows_of(torch.tensor(setting.get("i_pos_repair") or [], dtype=torch.long))
    module = REPAIRS.get(task.repair)(ctx.head, weights, rep_states.x[neg], rep_states.label[neg],
                                      rep_states.x[pos], rep_states.label[pos], seed=identity["seed"],
                                      **(repair_options or {}))
    tb = False
    if logger and store.writes():
        from lightning.pytorch.loggers import TensorBoardLogger

        d = store.repair_tb_dir(setting=task.setting, label=task.label, budget=n, rep=task.rep,
                                key=identity_key(identity))
        tb = TensorBoardLogger(save_dir=str(d.parent.parent), name=d.parent.name, version=d.name,
                               default_hp_metric=False)
    t0 = time.perf_counter()
    patch = fit_repair(module, logger=tb, enable_progress_bar=progress_bar, accelerator=accelerator)
    repair_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = module.summary()
    target_fn = lambda y, p: target_mask(setting, y, p)  # noqa: E731
    metrics = {split: evaluate_patch(ctx.head, patch, ctx.states(split).x, ctx.states(split).label, target_fn)
               for split in ("repair", "test")}
    eval_s = time.perf_counter() - t0
    if tb:
        tb.log_hyperparams({"fl_method": task.method, "repair": task.repair, "setting": task.setting,
                            "budget": str(task.budget.label), "n_weights": len(weights), "rep": task.rep},
                           {f"repair_final/{k}_{split}": (float("nan") if metrics[split][k] is None else metrics[split][k])
                            for split in ("test", "repair") for k in METRICS})
        tb.finalize("success")
    timings = {"fl_s": fl_s, "repair_s": repair_s, "eval_s": eval_s, **summary.pop("timings", {}),
               "total_s": time.perf_counter() - t_start}
    record = {"kind": "repair_result", **task.as_row(), "run_dir": ".", "label": task.label,
              "n_weights": len(weights), "budget_n": n, "seed": identity["seed"], **_record_block(ctx),
              "setting_info": _setting_summary(setting),
              "fl": {"method": task.method, "key": res.provenance.get("key"), "path": res.provenance.get("path"),
                     "seed": _fl_seed(task), "status": fl_row["status"]},
              "metrics": metrics, "fitness": summary, "timings": timings, "patch": patch.to_dict(),
              "provenance": provenance(model_hash=ctx.model_hash, epoch=ctx.epoch, config=dict(config or {}))}
    with disk_full_names(path):
        return store.write_result(path, identity, record)


# ---------------------------------------------------------------------------------------------------- the sweep
def run_sweep(run_dirs, methods: Iterable[str] = DEFAULT_METHODS, settings: Iterable[str] | None = None,
              budgets: Iterable[int | str] = DEFAULT_BUDGETS, reps: int | Iterable[int] = 5,
              shard: str | tuple[int, int] | None = (0, 1), repair: str = "de",
              repair_options: Mapping[str, Any] | None = None, seed: int = 0,
              fl_options: Mapping[str, Mapping[str, Any]] | None = None, fl_batch_size: int = 512,
              logger: bool = False, progress: bool = True, progress_bar: bool = False, accelerator: str = "cpu",
              on_error: str = "continue", on_result: Callable[[dict[str, Any]], None] | None = None,
              workers: int | str | None = 1, block: int = -1) -> list[dict[str, Any]]:
    """Run this shard's part of the grid, skipping runs whose identity is in the store. Returns one row per task:
    ``status`` in {"done", "exists", "claimed elsewhere", "not applicable: ...", "error: ..."} plus metrics.

    ``repair_options`` go to the repair module (e.g. ``{"generations": 100}``); ``fl_options`` map an FL method to
    its options; ``logger``: TensorBoard under the run's ``tb/repair/{setting}`` (one version per identity, with
    hparams and final metrics); ``on_error``: "continue" (report and go on; retried next time) or "raise";
    ``on_result`` is called with each new result (tests use it to simulate a kill); ``workers``: processes on this
    machine, each one sub-shard of ``shard`` (``pipeline/parallel.py``; "auto": the cores, at most 4; rows of
    worker 0 first); ``block``: the transformer block whose FFN is repaired (default -1, the last; the module
    docstring), with that block's token caches (the cache step with the same ``block``) and FL results."""
    _check_block(block)
    if on_error not in ("continue", "raise"):
        raise ValueError(f"on_error must be 'continue' or 'raise', got {on_error!r}")
    from vitfl.pipeline.parallel import resolve_workers, run_sharded

    # every option checked once, before any work (and the checked values are the ones every run uses and records)
    REPAIRS.check([repair])
    repair_options = REPAIRS.check_options(repair, repair_options)
    if fl_options is not None and not isinstance(fl_options, Mapping):
        raise ValueError(f"fl_options must map an FL method to its options, got {fl_options!r}")
    FL_METHODS.check(list(fl_options or {}))
    fl_options = {m: FL_METHODS.check_options(m, o) for m, o in (fl_options or {}).items()}
    n_workers = resolve_workers(workers)
    if n_workers > 1:
        if on_result is not None:
            raise ValueError("on_result needs workers=1 (it cannot be called from another process)")
        return run_sharded(run_sweep, dict(run_dirs=run_dirs, methods=list(methods),
                                           settings=None if settings is None else list(settings),
                                           budgets=list(budgets), reps=reps if isinstance(reps, int) else list(reps),
                                           repair=repair, repair_options=repair_options, seed=seed,
                                           fl_options=fl_options, fl_batch_size=fl_batch_size, logger=logger,
                                           progress=progress, progress_bar=progress_bar, accelerator=accelerator,
                                           on_error=on_error, block=block), n_workers, parse_shard(shard))
    if isinstance(fl_batch_size, bool) or not isinstance(fl_batch_size, int) or fl_batch_size < 1:
        raise ValueError(f"fl_batch_size must be a positive int, got {fl_batch_size!r}")
    fl_options = {m: dict(o) for m, o in (fl_options or {}).items()}
    contexts: dict[str, RunContext] = {}  # budgets resolved once per (run, FL method), checked against its layer
    grid = build_grid(run_dirs, methods, settings, budgets, reps, repair, fl_options, fl_batch_size=fl_batch_size,
                      contexts=contexts, block=block)
    tasks = shard_tasks(grid, shard)
    config = {"methods": list(methods), "settings": None if settings is None else list(settings),
              "budgets": list(budgets), "reps": reps if isinstance(reps, int) else list(reps), "repair": repair,
              "repair_options": dict(repair_options or {}), "seed": seed, "shard": list(parse_shard(shard)),
              "fl_options": fl_options}
    if block != -1:  # (the last block's config is what it was)
        config["block"] = block
    rows = []
    k, n_sh = parse_shard(shard)
    bar = tqdm(tasks, desc=f"repair {k}/{n_sh}", disable=not progress)
    for task in bar:
        row = {**task.as_row(), "label": task.label}
        try:
            ctx = contexts[task.run_dir]
            if task.setting not in ctx.settings:
                rows.append({**row, "status": f"not applicable: {ctx.misclf.get('skipped', {}).get(task.setting)}"})
                continue
            n = task.budget.value
            identity = task_identity(ctx, task, seed=seed, repair_options=repair_options,
                                     fl_options=fl_options.get(task.method))
            key = identity_key(identity)
            path = ctx.store.repair_result_path(identity, setting=task.setting, label=task.label, budget=n,
                                                rep=task.rep)
            row.update(budget_n=n, key=key, path=ctx.store.rel(path))
            if ctx.store.read_result(path, identity) is not None:
                rows.append({**row, "status": "exists"})
                continue
            na = ctx.store.not_applicable().get(f"fl/{identity_key(identity['fl']['scores'])}")
            if na is not None:
                rows.append({**row, "status": f"not applicable: {na}"})
                continue
            bar.set_postfix_str(f"{task.dataset} {task.setting} {task.label} n={n} rep={task.rep}")
            with ctx.store.claim(key) as mine:
                if not mine:
                    rows.append({**row, "status": "claimed elsewhere"})
                    continue
                if ctx.store.read_result(path, identity) is not None:  # finished while we waited
                    rows.append({**row, "status": "exists"})
                    continue
                res = run_task(task, ctx, identity, path, seed=seed, repair_options=repair_options,
                               fl_options=fl_options.get(task.method), fl_batch_size=fl_batch_size, logger=logger,
                               progress_bar=progress_bar, accelerator=accelerator, config=config)
        except Exception as e:  # noqa: BLE001 - reported per run; the sweep goes on
            if isinstance(e, UnsupportedRepairHeadError):  # the method cannot run on this block: a case, not a fault
                rows.append({**row, "status": f"not applicable: {e}"})
                continue
            if on_error == "raise":
                raise
            msg = f"{type(e).__name__}: {e}"
            if "not applicable" in msg or "needs at least" in msg:
                rows.append({**row, "status": f"not applicable: {e}"})
                continue
            rows.append({**row, "status": f"error: {msg}", "traceback": traceback.format_exc(limit=4)})
            bar.write(f"repair run {task.label} {task.setting} n={task.budget.label} rep={task.rep} failed: {msg}")
            continue
        m = res["metrics"]["test"]
        rows.append({**row, "status": "done", "n_weights": res["n_weights"], "rr": m["rr"], "br": m["br"],
                     "delta_acc": m["delta_acc"], "generations": res["fitness"].get("generations_run"),
                     "total_s": res["timings"]["total_s"]})
        if on_result is not None:
            on_result(res)
    bar.close()
    return rows


# ---------------------------------------------------------------------------------------------------- aggregation
def _nan(v):
    return float("nan") if v is None else v


def repair_stale_reasons(ctx: RunContext, rec: Mapping[str, Any]) -> list[str]:
    """Why a stored repair result was not made from the run's current inputs (its FL result's model, repair-split
    cache and setting, and the test-split cache it was evaluated on); [] if it was."""
    ident = rec.get("identity") or {}
    why = stale_reasons(ctx, (ident.get("fl") or {}).get("scores") or {})
    test = (ident.get("inputs") or {}).get("test_states")
    try:
        current = ctx.states_hash("test")
    except (OSError, ValueError, RuntimeError):
        current = None
    if current is None or test != current:
        why.append(STALE_WHY["test_states"])
    return why


def _record_head(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The head a repair record was made on: its identity's ``"head"`` ({} = the last-block CLS head)."""
    return dict((rec.get("identity") or {}).get("head") or {})


def record_block(rec: Mapping[str, Any]) -> int | str:
    """The repaired block of a stored repair result (``collect_results``'s ``block`` column): the record's
    ``block`` (every record since block addressing), else its identity's head's block, else its patch's, else
    ``"last"`` (a result made before block addressing: the last block's FFN through the CLS head)."""
    for b in (rec.get("block"), _record_head(rec).get("block"), (rec.get("patch") or {}).get("block")):
        if b is not None:
            return int(b)
    return "last"


def _stale_checker(root: Path) -> tuple[Callable[[Mapping[str, Any]], list[str]], str, int | None]:
    """(why a record is stale, "", the index of the model's last block) for a run whose current model loads; else
    (no reason, why nothing can be checked, None): a run without a model to compare with (e.g. a copied store of
    results only) keeps its results, counted as unverified, never silently. A record of another head than the
    last-block CLS head is checked against that head's context (its block's token caches)."""
    try:
        ctx = RunContext(RunStore(root))
    except Exception as e:  # noqa: BLE001 - whatever keeps the check from running: said, not guessed
        first = (str(e).strip().splitlines() or [""])[0]
        return ((lambda rec: []), f"the run's model cannot be loaded to compare with ({type(e).__name__}: {first})",
                None)
    contexts: dict[int, Any] = {}

    def check(rec: Mapping[str, Any]) -> list[str]:
        head = _record_head(rec)
        if not head:
            return repair_stale_reasons(ctx, rec)
        b = int(head.get("block", -1))
        if b not in contexts:
            try:
                contexts[b] = RunContext(RunStore(root), block=b)
            except Exception as e:  # noqa: BLE001 - e.g. the block no longer exists in the run's model
                contexts[b] = f"its head (block {b}) cannot be loaded from the run's model ({type(e).__name__})"
        c = contexts[b]
        if isinstance(c, str):
            return [c]
        why = repair_stale_reasons(c, rec)
        if to_jsonable(c.view()) != to_jsonable(head):
            why.append(f"made on another view of block {b} ({head}) than the run's current one ({c.view()})")
        return why
    return check, "", (None if ctx.head.num_blocks is None else ctx.head.num_blocks - 1)


def _collect(run_dirs) -> "pd.DataFrame":  # noqa: F821
    """Every repair result of the run dirs, with ``stale``: "" for a result made from its run's current inputs,
    else why not."""
    import pandas as pd

    rows = []
    for name, root in dataset_dirs(run_dirs).items():
        store = RunStore(root)
        recs = store.list_results("repair_result")
        check, unverified, last = _stale_checker(root) if recs else (None, "", None)
        for r in recs:
            block = record_block(r)
            if block == "last" and last is not None:  # made before records named their block: the last one
                block = last
            t, rp, f = r["metrics"]["test"], r["metrics"]["repair"], r["fitness"]
            rows.append({"dataset": name, "setting": r["setting"], "kind": r["setting_info"]["kind"],
                         "rank": r["setting_info"]["rank"], "fl_method": r["method"], "repair": r["repair"],
                         "label": r.get("label", r["method"]), "block": block,
                         "budget": str(r["budget"]),
                         "budget_n": r.get("budget_n", r["n_weights"]), "n_weights": r["n_weights"],
                         "rep": r["rep"], "seed": r["seed"], "key": r["key"],
                         "options": identity_key(r["identity"]["repair_options"]),
                         "rr": _nan(t["rr"]), "br": _nan(t["br"]), "acc_before": _nan(t["acc_before"]),
                         "acc_after": _nan(t["acc_after"]), "delta_acc": _nan(t["delta_acc"]),
                         "n_test": t.get("n"), "n_targets": t["n_targets"], "n_fixed": t["n_fixed"],
                         "n_correct_before": t["n_correct_before"], "n_broken": t["n_broken"],
                         "rr_repair": _nan(rp["rr"]), "br_repair": _nan(rp["br"]),
                         "delta_acc_repair": _nan(rp["delta_acc"]),
                         "n_targets_repair": rp["n_targets"], "n_fixed_repair": rp["n_fixed"],
                         "n_correct_repair": rp["n_correct_before"], "n_broken_repair": rp["n_broken"],
                         "n_patched": f.get("n_patched"), "n_broken_fit": f.get("n_broken"),
                         "fitness_original": f.get("fitness_original"), "fitness_patched": f.get("fitness_patched"),
                         "generations_run": f.get("generations_run"), "early_stopped": f.get("early_stopped"),
                         "fl_s": r["timings"].get("fl_s"), "repair_s": r["timings"].get("repair_s"),
                         "total_s": r["timings"].get("total_s"), "path": r["path"],
                         "stale": "; ".join(check(r)), "_unverified": unverified})
    return pd.DataFrame(rows)


def _split_stale(df, include_stale: bool):
    """(the rows to tabulate, ``count_stale`` counts); without ``include_stale`` the stale rows are left out and
    the column dropped."""
    if df.empty:
        return df, count_stale([])
    counts = count_stale([s.split("; ") if s else [] for s in df["stale"]])
    unverified = df.loc[df["_unverified"] != "", "_unverified"]
    counts.update(unverified=len(unverified), unverified_why=unverified.value_counts().to_dict())
    df = df.drop(columns="_unverified")
    if not include_stale:
        df = df[df["stale"] == ""].drop(columns="stale").reset_index(drop=True)
    return df, counts


def collect_results(run_dirs, include_stale: bool = False) -> "pd.DataFrame":  # noqa: F821
    """One row per repair result in each run directory's store (``block``: the repaired transformer block, an int
    >= 0; a result made before records named their block is the last block's, its index read from the run's model,
    or ``"last"`` where that model cannot be loaded: :func:`record_block`) (counts of the test fold and of the repair
    split,
    fitness summary, timings) made from the run's current inputs: a result whose recorded model, state-cache or
    setting hashes differ from the run's own now is left out (``include_stale``: kept, with its reason in the
    ``stale`` column). ``df.attrs["provenance"]``: ``{"checked", "stale", "why", "unverified", "unverified_why",
    "included"}`` (unverified: results of a run whose model cannot be loaded to compare with; kept and counted)."""
    df, counts = _split_stale(_collect(run_dirs), include_stale)
    df.attrs["provenance"] = {**counts, "included": bool(include_stale)}
    return df


def _method_order(methods: Iterable[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    return [m for m in DEFAULT_METHODS if m in methods] + sorted(m for m in methods if m not in DEFAULT_METHODS)


def _budget_order(budgets: Iterable[str]) -> list[str]:
    from vitfl.core.style import sort_budgets

    return sort_budgets(budgets)


def summary_table(df, by: Sequence[str] = (), confidence: float = 0.95) -> "pd.DataFrame":  # noqa: F821
    """Per dataset, repair, FL method, budget (and the ``by`` columns, e.g. ``("kind",)`` for the published
    per-kind pooling over ranks and repetitions) over every run of the cell:

    * ``rr_pooled`` = sum fixed / sum targets of the test fold with its Wilson interval (``rr_lo``, ``rr_hi``;
      NaN, shown "n/a", when the cell has no target), ``n_test_targets``, ``n_test_fixed``; the same for BR
      (broken / correct-before: ``br_pooled``, ``n_test_correct``, ``n_test_broken``) and for RR / BR on the
      repair split (in-sample: ``rr_repair_pooled``, ...);
    * ``delta_acc_mean`` with a ``scipy.stats.bootstrap`` interval over the runs (``delta_acc_lo/hi``);
    * ``rr_mean`` / ``rr_std`` etc.: the per-run means and standard deviations over the runs that have the value
      (the published tables' mean over repetitions), ``runs_with_rr``, and ``runs_without_target`` (runs with no
      target in the test fold: counted, never dropped in silence); ``n_runs``, ``n_weights``."""
    from vitfl.evaluation.intervals import bootstrap_mean, pooled_rate

    df, blocks = _by_block(df)
    keys = ["dataset", *blocks, "repair", "fl_method", "budget", *by]
    g = df.groupby(keys, sort=False)
    out = g[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["n_runs"] = g.size()
    out["n_weights"] = g["n_weights"].mean()
    out["n_test_targets"] = g["n_targets"].sum()
    out["n_test_fixed"] = g["n_fixed"].sum()
    out["runs_without_target"] = g["n_targets"].apply(lambda s: int((s == 0).sum()))
    out["runs_with_rr"] = g["rr"].apply(lambda s: int(s.notna().sum()))
    out["n_test_correct"] = g["n_correct_before"].sum()
    out["n_test_broken"] = g["n_broken"].sum()
    out["n_targets_repair"] = g["n_targets_repair"].sum()
    out["n_fixed_repair"] = g["n_fixed_repair"].sum()
    rep = g[["rr_repair", "br_repair"]].mean()
    out["rr_repair_mean"], out["br_repair_mean"] = rep["rr_repair"], rep["br_repair"]
    extra = {}
    for k, sub in g:
        cell = {}
        for name, fixed, total in (("rr", "n_fixed", "n_targets"), ("br", "n_broken", "n_correct_before"),
                                   ("rr_repair", "n_fixed_repair", "n_targets_repair"),
                                   ("br_repair", "n_broken_repair", "n_correct_repair")):
            r = pooled_rate(sub[fixed].to_numpy(), sub[total].to_numpy(), confidence)
            cell.update({f"{name}_pooled": _nan(r.rate), f"{name}_lo": _nan(r.lo), f"{name}_hi": _nan(r.hi)})
        m = bootstrap_mean(sub["delta_acc"].dropna().to_numpy(), confidence)
        cell.update({"delta_acc_lo": _nan(m.lo), "delta_acc_hi": _nan(m.hi)})
        extra[k] = cell
    import pandas as pd

    ex = pd.DataFrame.from_dict(extra, orient="index")
    ex.index = out.index
    out = pd.concat([out, ex], axis=1).reset_index()
    out["_m"] = out["fl_method"].map({m: i for i, m in enumerate(_method_order(out["fl_method"]))})
    out["_b"] = out["budget"].map({b: i for i, b in enumerate(_budget_order(out["budget"]))})
    return out.sort_values(["dataset", *blocks, "repair", *by, "_b", "_m"]).drop(columns=["_m", "_b"]).reset_index(
        drop=True)


def _by_block(df):
    """(df, ["block"]) when the results repair more than one block (each block its own cells, the column as
    text: ``"last"`` for results made before block addressing), else (df, [])."""
    if "block" not in df.columns or df["block"].astype(str).nunique() <= 1:
        return df, []
    return df.assign(block=df["block"].astype(str)), ["block"]


def _rate_cell(rate, lo, hi, k, n, what: str) -> str:
    if n == 0 or rate != rate:
        return f"n/a (0 {what})"
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}] ({k:.0f}/{n:.0f})"


def _mean_cell(mean, lo, hi, n) -> str:
    if n == 0 or mean != mean:
        return "n/a (no run)"
    if lo != lo:
        return f"{mean:+.4f} (n={n}, no interval)"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] (n={n})"


def _markdown(table, by: Sequence[str] = ()) -> str:
    """The headline table: the header of each column says the split and n (totals over the table's runs)."""
    import pandas as pd

    from vitfl.evaluation.stats import to_markdown

    n_runs = int(table["n_runs"].sum())
    head_rr = (f"RR (test fold, n = {int(table['n_test_targets'].sum())} targets over {n_runs} runs; pooled, "
               f"Wilson 95% CI)")
    head_br = (f"BR (test fold, n = {int(table['n_test_correct'].sum())} correct inputs over {n_runs} runs; "
               f"pooled, Wilson 95% CI)")
    head_da = f"Δ acc (test fold, mean over runs, bootstrap 95% CI; {n_runs} runs)"
    head_in = (f"RR (repair split, in-sample, n = {int(table['n_targets_repair'].sum())} targets over {n_runs} "
               "runs)")
    rows = []
    for r in table.to_dict("records"):
        row = {"dataset": r["dataset"], **({"block": r["block"]} if "block" in r else {}), "repair": r["repair"],
               "FL method": r["fl_method"]}
        row.update({b: r[b] for b in by})
        row.update({"budget": r["budget"], "N": f"{r['n_weights']:.0f}", "runs": int(r["n_runs"]),
                    head_rr: _rate_cell(r["rr_pooled"], r["rr_lo"], r["rr_hi"], r["n_test_fixed"],
                                        r["n_test_targets"], "targets"),
                    "runs without a test target": f"{r['runs_without_target']} of {r['n_runs']}",
                    head_br: _rate_cell(r["br_pooled"], r["br_lo"], r["br_hi"], r["n_test_broken"],
                                        r["n_test_correct"], "correct"),
                    head_da: _mean_cell(r["delta_acc_mean"], r["delta_acc_lo"], r["delta_acc_hi"],
                                        int(r["n_runs"])),
                    head_in: _rate_cell(r["rr_repair_pooled"], r["rr_repair_lo"], r["rr_repair_hi"],
                                        r["n_fixed_repair"], r["n_targets_repair"], "targets")})
        rows.append(row)
    return to_markdown(pd.DataFrame(rows))


def targetless_note(df) -> str:
    """"k of n runs had no target in the test fold" (their RR is undefined; counted in every table)."""
    k, n = int((df["n_targets"] == 0).sum()), len(df)
    note = f"{k} of {n} runs had no target in the test fold (their RR is undefined and shown as n/a, not 0)"
    if k:
        per = df[df["n_targets"] == 0].groupby("setting").size().sort_values(ascending=False)
        note += "; by setting: " + ", ".join(f"{s}: {c}" for s, c in per.items())
    return note + "."


def _tb_run_dir(store: RunStore, row) -> Path:
    """The TensorBoard folder of one repair run: ``run_task``'s logger names it
    ``tb/repair/{setting}/{label}_n{N}_rep{rep}-{key}``."""
    return store.repair_tb_dir(setting=row["setting"], label=row["label"], budget=row["budget_n"], rep=row["rep"],
                               key=row["key"])


def fitness_curves(run_dirs, df) -> "pd.DataFrame":  # noqa: F821
    """Per-generation DE fitness of every DE run that logged to TensorBoard (``repair/best_fitness``,
    ``repair/mean_fitness`` read with ``tensorboard.backend.event_processing``), relative to the run's unpatched
    fitness. Columns dataset, repair, fl_method, budget, run, step, best, mean; empty without event files."""
    import pandas as pd

    dirs = dataset_dirs(run_dirs)
    sub = df[df["repair"] == "de"] if len(df) else df
    rows = []
    if not len(sub):
        return pd.DataFrame(columns=["dataset", "repair", "fl_method", "budget", "run", "step", "best", "mean"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in sub.to_dict("records"):
        d = _tb_run_dir(RunStore(dirs[r["dataset"]]), r)
        if not d.is_dir():
            continue
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
        try:
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
        except Exception:  # noqa: BLE001 - a damaged event file: that run has no curve
            continue
        if "repair/best_fitness" not in tags:
            continue
        base = r["fitness_original"] if r["fitness_original"] and r["fitness_original"] > 0 else None
        best = {e.step: e.value for e in acc.Scalars("repair/best_fitness")}
        mean = {e.step: e.value for e in acc.Scalars("repair/mean_fitness")} if "repair/mean_fitness" in tags else {}
        for step in sorted(best):
            rows.append({"dataset": r["dataset"], "repair": r["repair"], "fl_method": r["fl_method"],
                         "budget": r["budget"], "run": r["key"], "step": step + 1,
                         "best": best[step] / base if base else best[step],
                         "mean": (mean.get(step, float("nan")) / base if base else mean.get(step, float("nan")))})
    return pd.DataFrame(rows, columns=["dataset", "repair", "fl_method", "budget", "run", "step", "best", "mean"])


def _plots(store: RunStore, df, table, by_kind, curves, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The repair figures (PNG + PDF) per (dataset, repair); returns (files, {stem: reason} for the figures with
    nothing to plot)."""
    from vitfl.evaluation import figures as figs

    paths, empty = [], {}

    def save(fig, stem):
        made = figs.save_figure(fig, out_dir / stem, writer=store.save_figure)
        if not made:
            from vitfl.core.style import is_nothing_to_plot

            empty[stem] = is_nothing_to_plot(fig) or "nothing to plot"
        paths.extend(made)

    blocks = ["block"] if "block" in table.columns else []  # several blocks: one set of figures per block
    for key, t in table.groupby(["dataset", *blocks, "repair"], sort=False):
        dataset, repair = key[0], key[-1]
        methods = _method_order(t["fl_method"])
        budgets = _budget_order(t["budget"])
        sub = df[(df["dataset"] == dataset) & (df["repair"] == repair)]
        k = by_kind[(by_kind["dataset"] == dataset) & (by_kind["repair"] == repair)]
        name = f"{dataset}_{repair}"
        if blocks:
            sub = sub[sub["block"].astype(str) == key[1]]
            k = k[k["block"] == key[1]]
            name = f"{dataset}_block{key[1]}_{repair}"
        n = len(sub)
        what = (f"{dataset}{f' (block {key[1]})' if blocks else ''}, {repair}: {n} {repair} runs")  # this method's
        save(figs.repair_bars(t, what, methods, budgets), f"bar_{name}")
        save(figs.in_sample_vs_held_out(t, f"{what}: RR in-sample vs held out"), f"rr_in_vs_held_{name}")
        save(figs.rates_by_kind(k, f"{what}: RR / BR per setting kind (pooled, Wilson 95% CI)"), f"by_kind_{name}")
        cost = sub.groupby(["fl_method", "budget"], sort=False).agg(repair_s=("repair_s", "median")).reset_index()
        cost = cost.merge(t[["fl_method", "budget", "rr_pooled", "rr_lo", "rr_hi"]], on=["fl_method", "budget"])
        save(figs.cost_vs_quality(cost, "repair_s", "rr_pooled", "repair time per run (s, median)",
                                  "RR (test fold, pooled)", f"{what}: repair time vs RR", label_col="fl_method",
                                  y_lo="rr_lo", y_hi="rr_hi", marker_col="budget"), f"time_vs_rr_{name}")
        if repair == "de":
            c = curves[(curves["dataset"] == dataset) & (curves["repair"] == repair)] if len(curves) else curves
            if blocks and len(c):
                c = c[c["run"].isin(set(sub["key"]))]
            save(figs.fitness_curves(c, f"{what}: DE fitness / unpatched fitness, median over runs"),
                 f"fitness_{name}")
    return paths, empty


def statistics(df, pairs: Sequence[tuple[str, str]] | None = None):
    """(paired, unpaired) tables: per dataset, repair, budget and metric, Wilcoxon signed-rank + Holm + paired
    Cliff's delta over runs matched by (setting, rep), and Mann-Whitney U + A12 + Holm. ``pairs`` None: every pair
    of the FL methods present. Runs with a NaN metric (e.g. RR without test targets) are left out of that metric's
    comparison; the tables' ``n`` / ``n_a`` / ``n_b`` columns say how many runs each row used."""
    import pandas as pd

    from vitfl.evaluation.stats import mann_whitney_holm, wilcoxon_holm

    paired, unpaired = [], []
    order = {b: i for i, b in enumerate(_budget_order(df["budget"]))}
    df, blocks = _by_block(df)
    df = df.assign(_b=df["budget"].map(order)).sort_values(["dataset", *blocks, "repair", "_b"], kind="stable")
    for key, g in df.groupby(["dataset", *blocks, "repair", "budget"], sort=False):
        dataset, repair, budget = key[0], key[-2], key[-1]
        if blocks:
            dataset = f"{dataset} (block {key[1]})"
        present = _method_order(g["fl_method"])
        use = [(a, b) for a, b in (pairs or itertools.combinations(present, 2)) if a in present and b in present]
        if not use:
            continue
        methods = _method_order({m for p in use for m in p})
        for metric in METRICS:
            q = f"{dataset} / {repair} / n={budget} / {metric} (test fold)"
            wide = g.pivot_table(index=["setting", "rep"], columns="fl_method", values=metric, aggfunc="first")
            wide = wide[[m for m in methods if m in wide.columns]].dropna()
            # a method whose every run lacks the metric (RR without test targets) has no paired values
            use_p = [(a, b) for a, b in use if a in wide.columns and b in wide.columns]
            if len(wide) and use_p:
                paired.append(wilcoxon_holm({m: wide[m].to_numpy() for m in wide.columns}, pairs=use_p,
                                            question=q))
            vals = {m: g.loc[g["fl_method"] == m, metric].dropna().to_numpy() for m in methods}
            unpaired.append(mann_whitney_holm(vals, pairs=use, question=q))
    cat = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return cat(paired), cat(unpaired)


def is_inside(store: RunStore, path: str | Path) -> bool:
    try:
        store.inside(path)
    except UnsafePathError:
        return False
    return True


def aggregate(run_dirs, summary_dir: str | Path | None = None,
              pairs: Sequence[tuple[str, str]] | None = None, keys: Iterable[str] | None = None,
              include_stale: bool = False) -> dict[str, Any]:
    """Tables (CSV + Markdown), figures (PNG + PDF) and statistics of every current result of the run dirs
    (:func:`collect_results`: stale ones are left out and counted, or with ``include_stale`` kept and labelled),
    written to ``summary_dir`` (default: the first run directory's ``repair/summary``), plus ``manifest.json``: for
    each table and figure its file, split, n and a caption (what the report links), and ``provenance``: how many
    results were left out as stale, and why. The return value's ``stale_note`` says the same in one sentence."""
    from vitfl.evaluation.stats import write_stats_table

    dirs = dataset_dirs(run_dirs)
    store = RunStore(next(iter(dirs.values())))
    out = store.repair_summary_dir if summary_dir is None else Path(summary_dir)
    if summary_dir is not None and not is_inside(store, out):
        store = RunStore(out)  # a summary over several runs, in a folder of its own: a store of its own

    def sf(what: str, ext: str = "") -> Path:
        return store.summary_file(what, out, ext)
    df = _collect(dirs)
    if keys is not None and not df.empty:  # one experiment's results only (several may share a run directory)
        df = df[df["key"].isin(set(keys))].reset_index(drop=True)
    df, counts = _split_stale(df, include_stale)
    prov = {**counts, "included": bool(include_stale)}
    stale = stale_note(counts, "repair results", include_stale)
    if df.empty:
        return {"n_runs": 0, "summary_dir": str(out), "files": [], "manifest": {"tables": [], "figures": []},
                "provenance": prov, "stale_note": stale}
    files = [store.write_text(sf("runs"), df.to_csv(index=False))]
    table = summary_table(df)
    by_kind = summary_table(df, by=("kind",))
    files.append(store.write_text(sf("summary", "csv"), table.to_csv(index=False)))
    files.append(store.write_text(sf("by_kind", "csv"), by_kind.to_csv(index=False)))
    note = targetless_note(df)
    md = _markdown(table)
    intro = ("RR and BR on the held-out test fold are pooled over the settings and repetitions of each cell "
             "(sum of fixed / sum of targets; sum of broken / sum of correct) with Wilson 95% intervals; Δ acc is "
             "the mean over runs with a bootstrap 95% interval; RR (repair split) is in-sample. "
             f"{note}" + (f" Provenance: {stale}." if stale else "") + "\n\n")
    files.append(store.write_text(sf("summary", "md"), "# Repair results\n\n" + intro + md))
    md_kind = _markdown(by_kind, by=("kind",))
    files.append(store.write_text(sf("by_kind", "md"), "# Repair results per setting kind\n\nPooled over the "
                                  "ranks and repetitions of each kind, as the published per-kind tables pooled "
                                  f"them. {note}\n\n" + md_kind))
    curves = fitness_curves(dirs, df)
    if len(curves):
        files.append(store.write_text(sf("fitness_curves"), curves.to_csv(index=False)))
    figs, empty = _plots(store, df, table, by_kind, curves, out)
    files += figs
    paired, unpaired = statistics(df, pairs)
    n_runs = len(df)
    tables = [{"file": sf("summary", "md").name, "title": "Repair: RR, BR, Δ acc per FL method and budget",
               "split": "test fold (held out); RR in-sample on the repair split", "n": f"{n_runs} runs, "
               f"{int(df['n_targets'].sum())} test targets", "note": note},
              {"file": sf("by_kind", "md").name, "title": "Repair per setting kind", "split": "test fold",
               "n": f"{n_runs} runs", "note": note}]
    if len(paired):
        files += list(write_stats_table(paired, sf("stats_paired"),
                                        caption="Repair (test fold): Wilcoxon signed-rank (Holm) and paired "
                                                "Cliff's delta, runs matched by (setting, repetition)").values())
        tables.append({"file": sf("stats_paired").name + ".md", "title": "Repair statistics, paired", "split": "test fold",
                       "n": f"{int(paired['n'].max())} pairs at most per row (column n)", "note": ""})
    if len(unpaired):
        files += list(write_stats_table(unpaired, sf("stats_unpaired"),
                                        caption="Repair (test fold): Mann-Whitney U (Holm) and Vargha-Delaney "
                                                "A12").values())
        tables.append({"file": sf("stats_unpaired").name + ".md", "title": "Repair statistics, unpaired",
                       "split": "test fold", "n": "per row: columns n_a, n_b", "note": ""})
    captions = {"bar": "pooled RR / BR (Wilson 95% CI) and mean Δ acc (bootstrap 95% CI)",
                "rr_in_vs_held": "RR on the repair split (in-sample) vs the test fold (held out)",
                "by_kind": "RR / BR per setting kind", "time_vs_rr": "repair time vs RR",
                "fitness": "DE best / mean fitness over generations, relative to the unpatched weights"}
    figures = []
    stems = list(dict.fromkeys([Path(p).stem for p in figs] + list(empty)))
    for stem in stems:
        kind = next((k for k in sorted(captions, key=len, reverse=True) if stem.startswith(k + "_")), "")
        dataset = next((d for d in dirs if f"_{d}_" in f"_{stem}_"), "")
        repair = next((r for r in sorted(set(df["repair"]), key=len, reverse=True) if stem.endswith(f"_{r}")), "")
        cell = (df["dataset"] == dataset) if dataset else df["dataset"].notna()
        if repair:
            cell &= df["repair"] == repair
        n = int(cell.sum())  # the runs the figure shows (its own dataset and repair method), as its title says
        split = "repair split and test fold" if kind == "rr_in_vs_held" else (
            "repair split (search)" if kind == "fitness" else "test fold")
        figures.append({"file": f"{stem}.png", "pdf": f"{stem}.pdf", "title": captions.get(kind, stem),
                        "split": split, "n": f"{n} runs", "nothing_to_plot": empty.get(stem)})
    manifest = {"tables": tables, "figures": figures, "n_runs": n_runs,
                "runs_without_target": int((df["n_targets"] == 0).sum()), "note": note,
                "provenance": {**prov, "note": stale}}
    files.append(store.write_json(sf("manifest"), manifest))
    return {"n_runs": n_runs, "summary_dir": str(out), "files": [str(f) for f in files], "table": table,
            "by_kind": by_kind, "markdown": md, "note": note, "paired": paired, "unpaired": unpaired,
            "curves": curves, "manifest": manifest, "provenance": prov, "stale_note": stale}
