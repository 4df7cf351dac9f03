"""The repair step: the sweep FL method x setting x budget x repetition (x run directory), one result per run in the
run store, then tables, figures and statistics.

A run (:class:`RepairTask`) repairs one setting of one run directory ("dataset") with the weights one FL method
located at one budget, seeded by its repetition. Its identity (:mod:`core.runstore`) is the FL result's identity
(method, all its options, seed, setting, resolved budget, input hashes), the repair method and *all* its options
(generations, fitness, update mode, ... as resolved), the repetition and seed, and the hashes of the test cache:
two sweeps that differ in one option write two results and both are reported; a rerun with the same identity is
skipped. FL methods that are redrawn per repetition (``reseed_per_rep``, e.g. random) use the repetition as their
seed; the others are localized once. Methods that select their own set (``own_selection``, e.g. BL) get the budget
"front"; ``"avg"`` = N_avg of the run (``pipeline.localize.resolve_n_avg``: one value per run, whatever settings
the sweep covers).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from core.io import provenance
from core.runstore import RunStore, identity_key
from lightning_modules.repair import REPAIRS
from localization.base import FL_METHODS, method_meta
from pipeline.context import RunContext
from pipeline.localize import check_budgets, fl_identity, resolve_budgets, run_method

__all__ = ["RepairTask", "DEFAULT_METHODS", "DEFAULT_BUDGETS", "parse_shard", "dataset_dirs", "build_grid",
           "shard_tasks", "run_sweep", "collect_results", "aggregate", "summary_table", "statistics", "METRICS"]

DEFAULT_METHODS = ("ours", "arachne_w", "random")
DEFAULT_BUDGETS: tuple[int | str, ...] = (236, 472, 944, "avg")
METRICS = ("rr", "br", "delta_acc")
METRIC_NAMES = {"rr": "repair rate (RR)", "br": "break rate (BR)", "delta_acc": "delta accuracy"}


# ------------------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class RepairTask:
    dataset: str
    run_dir: str
    setting: str
    method: str
    budget: int | str
    rep: int
    repair: str = "de"

    @property
    def label(self) -> str:
        """The FL method, plus ``+{repair}`` unless DE (for file names and tables)."""
        return self.method if self.repair == "de" else f"{self.method}+{self.repair}"


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
    """Dataset name -> run directory, from a mapping, ``"name=path"`` strings, or paths (name = folder name)."""
    if isinstance(run_dirs, Mapping):
        out = {str(k): Path(v) for k, v in run_dirs.items()}
    else:
        out = {}
        for item in run_dirs:
            item = str(item)
            name, _, path = item.partition("=") if "=" in item else (Path(item).name, "", item)
            if name in out:
                raise ValueError(f"two run directories named {name!r}: give them names ('name=path')")
            out[name] = Path(path)
    if not out:
        raise ValueError("no run directories given")
    return out


def _budget_key(b: int | str) -> tuple[int, Any]:
    return (0, b) if isinstance(b, int) else (1, str(b))


def _available_settings(root: Path) -> dict[str, Any]:
    from pipeline.context import load_misclf

    info = load_misclf(RunStore(root))
    return info


def build_grid(run_dirs, methods: Iterable[str] = DEFAULT_METHODS, settings: Iterable[str] | None = None,
               budgets: Iterable[int | str] = DEFAULT_BUDGETS, reps: int | Iterable[int] = 5,
               repair: str = "de") -> list[RepairTask]:
    """Every run of the sweep in a deterministic order (dataset, setting, method, budget, rep), every option checked
    first: unknown FL or repair methods, budgets <= 0, no repetitions, or a setting a run directory has neither
    made nor reported as skipped are errors."""
    from pipeline.localize import BENCHMARK_SETTINGS

    dirs = dataset_dirs(run_dirs)
    methods = FL_METHODS.check(list(dict.fromkeys(methods)))
    if not methods:
        raise ValueError("no FL methods given")
    REPAIRS.check([repair])
    budgets = sorted(check_budgets(budgets), key=_budget_key)
    reps = list(range(reps)) if isinstance(reps, int) else sorted(set(int(r) for r in reps))
    if not reps or min(reps) < 0:
        raise ValueError(f"reps must give at least one repetition >= 0, got {reps}")
    tasks = []
    for name, root in dirs.items():
        info = _available_settings(root)
        avail, skipped = info["settings"], info.get("skipped", {})
        if settings is None:
            sets = [s for s in BENCHMARK_SETTINGS if s in avail] + sorted(s for s in avail
                                                                        if s not in BENCHMARK_SETTINGS)
        else:
            sets = list(dict.fromkeys(settings))
            unknown = [s for s in sets if s not in avail and s not in skipped]
            if unknown:
                raise ValueError(f"{name}: unknown setting(s) {unknown}; available: {sorted(avail)}; skipped by "
                                 f"the analysis: {sorted(skipped)}")
        for s in sets:
            for m in methods:
                bs = ["front"] if method_meta(m)["own_selection"] else [b for b in budgets if b != "front"]
                for b in bs:
                    for r in reps:
                        tasks.append(RepairTask(name, str(root), s, m, b, r, repair))
    return tasks


def shard_tasks(tasks: Sequence[RepairTask], shard: str | tuple[int, int] | None) -> list[RepairTask]:
    k, n = parse_shard(shard)
    return list(tasks[k::n])


# ------------------------------------------------------------------------------------------------- one run
def resolved_repair_options(repair: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The repair method's constructor defaults merged with ``options``; unknown options are an error."""
    defaults = REPAIRS.options(repair)
    defaults.pop("seed", None)
    options = dict(options or {})
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise ValueError(f"repair method {repair!r} has no option(s) {unknown}; its options: {sorted(defaults)}")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**defaults, **options}.items()}


def _fl_seed(task: RepairTask) -> int:
    return task.rep if method_meta(task.method)["reseed_per_rep"] else 0


def task_identity(ctx: RunContext, task: RepairTask, n: int | str, *, seed: int,
                  repair_options: Mapping[str, Any] | None, fl_options: Mapping[str, Any] | None) -> dict[str, Any]:
    fl_id = {"kind": "fl_result", "scores": fl_identity(ctx, task.method, task.setting, fl_options, _fl_seed(task)),
             "budget": n}
    return {"kind": "repair", "fl": fl_id, "repair": task.repair,
            "repair_options": resolved_repair_options(task.repair, repair_options), "rep": task.rep,
            "seed": seed + task.rep, "inputs": {"test_states": ctx.states_hash("test")}}


def _setting_summary(s: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "rank", "true", "pred", "label", "n_neg")
    return {**{k: s.get(k) for k in keys}, "n_pos_repair": len(s.get("i_pos_repair") or [])}


def run_task(task: RepairTask, ctx: RunContext, identity: Mapping[str, Any], path: Path, *, seed: int = 0,
             repair_options: Mapping[str, Any] | None = None, fl_options: Mapping[str, Any] | None = None,
             fl_batch_size: int = 512, logger: bool = False, progress_bar: bool = False, accelerator: str = "cpu",
             config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One repair run; returns the result record (also written, atomically, to ``path``)."""
    from lightning_modules.repair.base import fit_repair
    from lightning_modules.repair.metrics import evaluate_patch
    from localization.misclf import target_mask

    t_start = time.perf_counter()
    store = ctx.store
    setting = ctx.setting(task.setting)
    n = identity["fl"]["budget"]
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

        tb = TensorBoardLogger(save_dir=str(store.tensorboard), name=f"repair/{task.setting}",
                               version=f"{task.label}_n{n}_rep{task.rep}-{identity_key(identity)}",
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
                            "budget": str(task.budget), "n_weights": len(weights), "rep": task.rep},
                           {f"final/{k}_{split}": (float("nan") if metrics[split][k] is None else metrics[split][k])
                            for split in ("test", "repair") for k in METRICS})
        tb.finalize("success")
    timings = {"fl_s": fl_s, "repair_s": repair_s, "eval_s": eval_s, **summary.pop("timings", {}),
               "total_s": time.perf_counter() - t_start}
    record = {"kind": "repair_result", **asdict(task), "run_dir": ".", "label": task.label,
              "n_weights": len(weights), "budget_n": n, "seed": identity["seed"],
              "setting_info": _setting_summary(setting),
              "fl": {"method": task.method, "key": res.provenance.get("key"), "path": res.provenance.get("path"),
                     "seed": _fl_seed(task), "status": fl_row["status"]},
              "metrics": metrics, "fitness": summary, "timings": timings, "patch": patch.to_dict(),
              "provenance": provenance(model_hash=ctx.model_hash, epoch=ctx.epoch, config=dict(config or {}))}
    return store.write_result(path, identity, record)


# ---------------------------------------------------------------------------------------------------- the sweep
def run_sweep(run_dirs, methods: Iterable[str] = DEFAULT_METHODS, settings: Iterable[str] | None = None,
              budgets: Iterable[int | str] = DEFAULT_BUDGETS, reps: int | Iterable[int] = 5,
              shard: str | tuple[int, int] | None = (0, 1), repair: str = "de",
              repair_options: Mapping[str, Any] | None = None, seed: int = 0,
              fl_options: Mapping[str, Mapping[str, Any]] | None = None, fl_batch_size: int = 512,
              logger: bool = False, progress: bool = True, progress_bar: bool = False, accelerator: str = "cpu",
              on_error: str = "continue", on_result: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run this shard's part of the grid, skipping runs whose identity is in the store. Returns one row per task:
    ``status`` in {"done", "exists", "claimed elsewhere", "not applicable: ...", "error: ..."} plus metrics.

    ``repair_options`` go to the repair module (e.g. ``{"generations": 100}``); ``fl_options`` map an FL method to
    its options; ``logger``: TensorBoard under the run's ``tb/repair/{setting}`` (one version per identity, with
    hparams and final metrics); ``on_error``: "continue" (report and go on; retried next time) or "raise";
    ``on_result`` is called with each new result (tests use it to simulate a kill)."""
    if on_error not in ("continue", "raise"):
        raise ValueError(f"on_error must be 'continue' or 'raise', got {on_error!r}")
    if isinstance(fl_batch_size, bool) or not isinstance(fl_batch_size, int) or fl_batch_size < 1:
        raise ValueError(f"fl_batch_size must be a positive int, got {fl_batch_size!r}")
    fl_options = {m: dict(o) for m, o in (fl_options or {}).items()}
    resolved_repair_options(repair, repair_options)  # unknown options: an error before any work
    grid = build_grid(run_dirs, methods, settings, budgets, reps, repair)
    tasks = shard_tasks(grid, shard)
    config = {"methods": list(methods), "settings": None if settings is None else list(settings),
              "budgets": list(budgets), "reps": reps if isinstance(reps, int) else list(reps), "repair": repair,
              "repair_options": dict(repair_options or {}), "seed": seed, "shard": list(parse_shard(shard)),
              "fl_options": fl_options}
    contexts: dict[str, RunContext] = {}
    for root in dict.fromkeys(t.run_dir for t in grid):  # budgets above the layer's size: an error up front
        contexts[root] = RunContext(root)
        check_budgets(budgets, contexts[root].head.index.total)
    rows = []
    k, n_sh = parse_shard(shard)
    bar = tqdm(tasks, desc=f"repair {k}/{n_sh}", disable=not progress)
    for task in bar:
        row = {**asdict(task), "label": task.label}
        try:
            if task.run_dir not in contexts:
                contexts[task.run_dir] = RunContext(task.run_dir)
            ctx = contexts[task.run_dir]
            if task.setting not in ctx.settings:
                rows.append({**row, "status": f"not applicable: {ctx.misclf.get('skipped', {}).get(task.setting)}"})
                continue
            nb = resolve_budgets(ctx, task.method, [task.budget], options=fl_options.get("bl"), seed=0,
                                 batch_size=fl_batch_size)
            n = nb[0]
            identity = task_identity(ctx, task, n, seed=seed, repair_options=repair_options,
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
            if on_error == "raise":
                raise
            msg = f"{type(e).__name__}: {e}"
            if "not applicable" in msg or "needs at least" in msg:
                rows.append({**row, "status": f"not applicable: {e}"})
                continue
            rows.append({**row, "status": f"error: {msg}", "traceback": traceback.format_exc(limit=4)})
            bar.write(f"repair run {task.label} {task.setting} n={task.budget} rep={task.rep} failed: {msg}")
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


def collect_results(run_dirs) -> "pd.DataFrame":  # noqa: F821
    """One row per repair result in each run directory's store."""
    import pandas as pd

    rows = []
    for name, root in dataset_dirs(run_dirs).items():
        store = RunStore(root)
        for r in store.list_results("repair_result"):
            t, rp, f = r["metrics"]["test"], r["metrics"]["repair"], r["fitness"]
            rows.append({"dataset": name, "setting": r["setting"], "kind": r["setting_info"]["kind"],
                         "rank": r["setting_info"]["rank"], "fl_method": r["method"], "repair": r["repair"],
                         "budget": str(r["budget"]), "n_weights": r["n_weights"], "rep": r["rep"],
                         "seed": r["seed"], "key": r["key"],
                         "options": identity_key(r["identity"]["repair_options"]),
                         "rr": _nan(t["rr"]), "br": _nan(t["br"]), "acc_before": _nan(t["acc_before"]),
                         "acc_after": _nan(t["acc_after"]), "delta_acc": _nan(t["delta_acc"]),
                         "n_targets": t["n_targets"], "n_fixed": t["n_fixed"],
                         "n_correct_before": t["n_correct_before"], "n_broken": t["n_broken"],
                         "rr_repair": _nan(rp["rr"]), "br_repair": _nan(rp["br"]),
                         "delta_acc_repair": _nan(rp["delta_acc"]),
                         "n_targets_repair": rp["n_targets"], "n_fixed_repair": rp["n_fixed"],
                         "n_patched": f.get("n_patched"), "n_broken_fit": f.get("n_broken"),
                         "fitness_original": f.get("fitness_original"), "fitness_patched": f.get("fitness_patched"),
                         "generations_run": f.get("generations_run"), "early_stopped": f.get("early_stopped"),
                         "repair_s": r["timings"].get("repair_s"), "total_s": r["timings"].get("total_s"),
                         "path": r["path"]})
    return pd.DataFrame(rows)


def _method_order(methods: Iterable[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    return [m for m in DEFAULT_METHODS if m in methods] + sorted(m for m in methods if m not in DEFAULT_METHODS)


def _budget_order(budgets: Iterable[str]) -> list[str]:
    return sorted(set(budgets), key=lambda b: (0, int(b), "") if b.isdigit() else (1, 0, b))


def summary_table(df) -> "pd.DataFrame":  # noqa: F821
    """Per dataset, repair, FL method and budget: mean, std of RR, BR, delta acc over the runs that have them, the
    pooled counts (targets, fixed) with the pooled RR, how many runs had no test target, and the in-sample RR."""
    keys = ["dataset", "repair", "fl_method", "budget"]
    g = df.groupby(keys, sort=False)
    out = g[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["n_runs"] = g.size()
    out["n_weights"] = g["n_weights"].mean()
    out["n_test_targets"] = g["n_targets"].sum()
    out["n_test_fixed"] = g["n_fixed"].sum()
    out["runs_without_target"] = g["n_targets"].apply(lambda s: int((s == 0).sum()))
    rep = g[["rr_repair", "br_repair"]].mean()
    out["rr_repair_mean"], out["br_repair_mean"] = rep["rr_repair"], rep["br_repair"]
    out = out.reset_index()
    out["_m"] = out["fl_method"].map({m: i for i, m in enumerate(_method_order(out["fl_method"]))})
    out["_b"] = out["budget"].map({b: i for i, b in enumerate(_budget_order(out["budget"]))})
    return out.sort_values(["dataset", "repair", "_b", "_m"]).drop(columns=["_m", "_b"]).reset_index(drop=True)


def _markdown(table) -> str:
    lines = ["| dataset | repair | FL method | budget | N | runs | RR | BR | delta acc | test targets (fixed) | "
             "runs without a test target | RR (repair split) | BR (repair split) |",
             "|:---|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(m, s):
        if m != m:
            return "n/a"
        return f"{m:.4f} ± {0.0 if s != s else s:.4f}"

    for r in table.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.repair} | {r.fl_method} | {r.budget} | {r.n_weights:.0f} | {r.n_runs} | "
                     f"{fmt(r.rr_mean, r.rr_std)} | {fmt(r.br_mean, r.br_std)} | "
                     f"{fmt(r.delta_acc_mean, r.delta_acc_std)} | {r.n_test_targets:.0f} ({r.n_test_fixed:.0f}) | "
                     f"{r.runs_without_target} of {r.n_runs} | {r.rr_repair_mean:.4f} | {r.br_repair_mean:.4f} |")
    return "\n".join(lines) + "\n"


def _plots(store: RunStore, df, table, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for (dataset, repair), t in table.groupby(["dataset", "repair"], sort=False):
        methods = _method_order(t["fl_method"])
        budgets = _budget_order(t["budget"])
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
        width = 0.8 / max(len(methods), 1)
        for ax, metric in zip(axes, METRICS):
            for i, m in enumerate(methods):
                sub = t[t["fl_method"] == m].set_index("budget")
                mean = [sub[f"{metric}_mean"].get(b, np.nan) for b in budgets]
                std = [sub[f"{metric}_std"].get(b, np.nan) for b in budgets]
                ax.bar(np.arange(len(budgets)) + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std,
                       label=m, capsize=2)
            ax.set_xticks(range(len(budgets)), budgets)
            ax.set_xlabel("budget (weights)")
            ax.set_title(METRIC_NAMES[metric])
            ax.axhline(0, color="k", lw=0.5)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{dataset}: repair ({repair}), mean ± std over settings and repetitions", fontsize=10)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            paths.append(store.save_figure(fig, out_dir / f"bar_{dataset}_{repair}.{ext}", dpi=150))
        plt.close(fig)
    return paths


def statistics(df, pairs: Sequence[tuple[str, str]] | None = None):
    """(paired, unpaired) tables: per dataset, repair, budget and metric, Wilcoxon signed-rank + Holm + paired
    Cliff's delta over runs matched by (setting, rep), and Mann-Whitney U + A12 + Holm. ``pairs`` None: every pair
    of the FL methods present. Runs with a NaN metric (e.g. RR without test targets) are left out of that metric's
    comparison."""
    import pandas as pd

    from evaluation.stats import mann_whitney_holm, wilcoxon_holm

    paired, unpaired = [], []
    order = {b: i for i, b in enumerate(_budget_order(df["budget"]))}
    df = df.assign(_b=df["budget"].map(order)).sort_values(["dataset", "repair", "_b"], kind="stable")
    for (dataset, repair, budget), g in df.groupby(["dataset", "repair", "budget"], sort=False):
        present = _method_order(g["fl_method"])
        use = [(a, b) for a, b in (pairs or itertools.combinations(present, 2)) if a in present and b in present]
        if not use:
            continue
        methods = _method_order({m for p in use for m in p})
        for metric in METRICS:
            q = f"{dataset} / {repair} / n={budget} / {metric}"
            wide = g.pivot_table(index=["setting", "rep"], columns="fl_method", values=metric, aggfunc="first")
            wide = wide[[m for m in methods if m in wide.columns]].dropna()
            if len(wide):
                paired.append(wilcoxon_holm({m: wide[m].to_numpy() for m in wide.columns}, pairs=use, question=q))
            vals = {m: g.loc[g["fl_method"] == m, metric].dropna().to_numpy() for m in methods}
            unpaired.append(mann_whitney_holm(vals, pairs=use, question=q))
    cat = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return cat(paired), cat(unpaired)


def aggregate(run_dirs, summary_dir: str | Path | None = None,
              pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Tables (CSV + Markdown), bar plots (PNG + PDF) and statistics of every result of the run dirs, written to
    ``summary_dir`` (default: the first run directory's ``repair/summary``)."""
    from evaluation.stats import write_stats_table

    dirs = dataset_dirs(run_dirs)
    store = RunStore(next(iter(dirs.values())))
    out = Path(summary_dir) if summary_dir else store.repair_summary_dir
    df = collect_results(dirs)
    if df.empty:
        return {"n_runs": 0, "summary_dir": str(out), "files": []}
    files = [store.write_text(out / "runs.csv", df.to_csv(index=False))]
    table = summary_table(df)
    files.append(store.write_text(out / "summary.csv", table.to_csv(index=False)))
    md = _markdown(table)
    files.append(store.write_text(out / "summary.md", "# Repair results\n\nRR, BR and delta acc on the held-out "
                                  "test fold (mean ± std over the runs with a target; runs without one are counted); "
                                  "RR / BR (repair split) in-sample.\n\n" + md))
    files += _plots(store, df, table, out)
    paired, unpaired = statistics(df, pairs)
    if len(paired):
        files += list(write_stats_table(paired, out / "stats_wilcoxon_holm",
                                        caption="Repair: Wilcoxon signed-rank (Holm) and paired Cliff's delta, "
                                                "runs matched by (setting, repetition)").values())
    if len(unpaired):
        files += list(write_stats_table(unpaired, out / "stats_mann_whitney",
                                        caption="Repair: Mann-Whitney U (Holm) and Vargha-Delaney A12").values())
    return {"n_runs": len(df), "summary_dir": str(out), "files": [str(f) for f in files], "table": table,
            "markdown": md, "paired": paired, "unpaired": unpaired}


# ----------------------------------------------------------------------------------------------------- main job
def main_job_sweep(store: RunStore | str, budgets: Sequence[int] = (33, 164, 328), reps: int = 2,
                   quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """The main job's small sweep on one run: Ours / ArachneW / random at the given budgets plus N_avg on the
    rank-1 setting of each kind and ``all``, DE with the published constants (quick: 5 generations of 20, one
    setting, one budget, one repetition), then the prune and masked fine-tuning baselines on the same weights;
    aggregated into ``repair/summary``."""
    store = RunStore(store) if isinstance(store, (str, os.PathLike)) else store
    info = _available_settings(store.root)
    avail = info["settings"]
    settings = [s for s in ("src_tgt_r1", "tgt_fp_r1", "tgt_fn_r1", "all") if s in avail] or list(avail)[:1]
    methods = [m for m in DEFAULT_METHODS if m in FL_METHODS]
    budgets = [*budgets, "avg"]
    de_opts: dict[str, Any] = {}
    if quick:
        settings, budgets, reps, de_opts = settings[:1], budgets[:1], 1, {"generations": 5, "pop_size": 20}
    runs = {store.root.name: store.root}
    rows = run_sweep(runs, methods, settings, budgets, reps, repair="de", repair_options=de_opts, logger=True,
                     progress=progress)
    for repair in ("prune", "finetune"):
        opts = {"epochs": 3} if repair == "finetune" and quick else {}
        rows += run_sweep(runs, methods, settings, budgets[:1] if quick else budgets, 1, repair=repair,
                          repair_options=opts, progress=progress)
    agg = aggregate(runs)
    failed = [r for r in rows if r["status"].startswith("error")]
    na = [r for r in rows if r["status"].startswith("not applicable")]
    print(f"repair: {sum(r['status'] == 'done' for r in rows)} runs done, "
          f"{sum(r['status'] == 'exists' for r in rows)} already on disk, {len(na)} not applicable, "
          f"{len(failed)} failed; summary in {agg['summary_dir']}")
    for r in failed[:5]:
        print(f"  {r['label']} {r['setting']} n={r['budget']} rep={r['rep']}: {r['status']}")
    if agg.get("markdown"):
        print(agg["markdown"])
    return {"rows": rows, "aggregate": {k: v for k, v in agg.items() if k in ("n_runs", "summary_dir", "files")}}
