"""The localize step: FL methods x settings x budgets over a run's repair split, through the one FL runner
(:func:`lightning_modules.fl_runner.compute_scores`), into the run store.

A result's identity (:mod:`core.runstore`) is the method with *all* its options (the constructor's defaults merged
with what was given), the seed, the setting, the budget (the resolved N, or "front" for a method that selects its
own set) and the hashes of the model, the state cache and the setting's input sets. Scores are computed once per
identity and shared by its budgets; an identity on disk is skipped; a case that cannot run (e.g. a V-score method on
a set of one input) is recorded once as not applicable and not retried.

Budgets: ints (weights), ``"front"`` (the method's own selection; the only budget of methods with
``own_selection``, e.g. BL) and ``"avg"`` = N_avg, the mean size of BL's Pareto front over the N_avg settings (the
9 benchmark settings the run has, else every setting), resolved once per (run, FL inputs) by :func:`resolve_n_avg`,
saved, and used by every reader.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from core.io import provenance
from core.runstore import RunStore, identity_key
from localization.base import FL_METHODS, FLResult, method_meta, selects_own
from localization.ranking import BudgetError, select
from pipeline.context import RunContext

__all__ = ["BENCHMARK_SETTINGS", "N_AVG_METHOD", "fl_identity", "run_method", "resolve_n_avg", "resolve_budgets",
           "run_localization", "load_fl_result", "fl_results", "check_budgets"]

BENCHMARK_SETTINGS = tuple(f"{k}_r{r}" for k in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3))
#: the method whose own selection defines N_avg
N_AVG_METHOD = "bl"
NOT_APPLICABLE_MARKERS = ("needs at least", "needs >= ", "at least 2 inputs", "no I_neg")


#: the keyword arguments torchmetrics' Metric itself takes (every Localizer passes them on)
_METRIC_KWARGS = {"compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn", "distributed_available_fn",
                  "sync_on_compute", "compute_with_cache"}


def _accepted_options(cls) -> set[str]:
    """Every keyword a Localizer class accepts: the named parameters of each ``__init__`` along its MRO (they pass
    the rest on with ``**kwargs``) and torchmetrics' own."""
    import inspect

    names = set(_METRIC_KWARGS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith(("torch", "torchmetrics")):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "head"):
                names.add(p.name)
    return names


def resolved_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's constructor defaults merged with ``options`` (unknown options: a clear error)."""
    defaults = FL_METHODS.options(method)
    defaults.pop("seed", None)
    options = dict(options or {})
    accepted = _accepted_options(FL_METHODS.get(method))
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"FL method {method!r} has no option(s) {unknown}; its options: "
                         f"{sorted(accepted - _METRIC_KWARGS - {'seed'})}")
    return {**defaults, **options}


def fl_identity(ctx: RunContext, method: str, setting: str, options: Mapping[str, Any] | None = None,
                seed: int = 0) -> dict[str, Any]:
    """The identity of a method's score vector on a setting of the run's repair split."""
    return {"kind": "fl_scores", "method": method, "options": resolved_options(method, options), "seed": int(seed),
            "setting": setting, "inputs": ctx.inputs(setting)}


def check_budgets(budgets: Iterable[int | str], total: int | None = None) -> list[int | str]:
    """Budgets as given (ints, "avg", "front"), checked before any work: positive, at most the layer's size."""
    out: list[int | str] = []
    for b in budgets:
        if isinstance(b, str) and b.strip().lstrip("-").isdigit():
            b = int(b)
        if isinstance(b, bool) or not (isinstance(b, int) or b in ("avg", "front")):
            raise BudgetError(f"budget {b!r}: expected a positive int, 'avg' or 'front'")
        if isinstance(b, int) and (b < 1 or (total is not None and b > total)):
            raise BudgetError(f"budget {b} is outside [1, {total if total is not None else 'layer size'}] "
                              "(the number of last-FFN weights)")
        out.append(b)
    if not out:
        raise BudgetError("no budgets given")
    return list(dict.fromkeys(out))


def _record(res: FLResult, identity: Mapping[str, Any], scores_rel: str, setting: str, extra: Mapping[str, Any]
            ) -> dict[str, Any]:
    return {"kind": "fl_result", "method": res.method, "level": res.level, "setting": setting, "budget": res.budget,
            "n_located": int(res.weights.shape[0]), "scores_key": identity_key(identity["scores"]),
            "scores_file": scores_rel, "weights": res.weights.tolist(),
            "neurons": None if res.neurons is None else res.neurons.tolist(), "provenance": dict(extra)}


def load_fl_result(store: RunStore, rec: Mapping[str, Any]) -> FLResult:
    """An :class:`FLResult` from a stored record (weights from the JSON, scores from its safetensors file)."""
    from core.io import load_tensors

    tensors, _ = load_tensors(store.abs(rec["scores_file"]))
    return FLResult(method=rec["method"], level=rec["level"], budget=rec["budget"], scores=tensors["scores"],
                    weights=torch.tensor(rec["weights"], dtype=torch.long).reshape(-1, 3),
                    neurons=None if rec.get("neurons") is None else torch.tensor(rec["neurons"], dtype=torch.long),
                    provenance={**rec.get("provenance", {}), "identity": rec["identity"], "key": rec["key"],
                                "path": rec.get("path")})


def run_method(ctx: RunContext, method: str, setting: str, budgets: Sequence[int | str], *,
               options: Mapping[str, Any] | None = None, seed: int = 0, batch_size: int = 512,
               trainer_kwargs: Mapping[str, Any] | None = None, save: bool = True
               ) -> tuple[dict[int | str, FLResult], dict[str, Any]]:
    """One method on one setting at resolved budgets (ints or "front"): (results by budget, a status row).

    Results on disk with the same identity are read, not recomputed. ``save=False`` computes without writing."""
    from lightning_modules.fl_runner import compute_scores, setting_rows

    store = ctx.store
    meta = method_meta(method)
    sid = fl_identity(ctx, method, setting, options, seed)
    skey = identity_key(sid)
    row: dict[str, Any] = {"method": method, "setting": setting, "scores_key": skey, "budgets": " ".join(map(str, budgets))}
    out: dict[int | str, FLResult] = {}
    todo = []
    for b in budgets:
        rid = {"kind": "fl_result", "scores": sid, "budget": b}
        rec = store.find_fl_result(rid) if save else None
        if rec is not None:
            out[b] = load_fl_result(store, {**rec, "path": store.rel(store.fl_result_path(rid))})
        else:
            todo.append(b)
    if not todo:
        return out, {**row, "status": "exists"}
    na = store.not_applicable().get(f"fl/{skey}")
    if na is not None:
        return out, {**row, "status": f"not applicable: {na}"}
    x, label, is_neg, extra, desc = setting_rows(ctx.states("repair"), ctx.setting(setting), method, seed)
    loaded = store.load_fl_scores(sid) if save else None
    if loaded is not None:
        scores, smeta = loaded
        own = torch.tensor(smeta["own"], dtype=torch.long) if smeta.get("own") is not None else None
        opts, wall, status = smeta.get("options", {}), smeta.get("wall_s"), "done (scores on disk)"
    else:
        try:
            run = compute_scores(ctx.head, method, x, label, is_neg, options={**(options or {}), **extra},
                                 seed=seed, batch_size=batch_size, trainer_kwargs=trainer_kwargs)
        except ValueError as e:
            msg = str(e)
            if any(m in msg for m in NOT_APPLICABLE_MARKERS):
                store.mark_not_applicable(f"fl/{skey}", f"{method} on {setting}: {msg}")
                return out, {**row, "status": f"not applicable: {msg}", "n_neg": desc["n_neg"],
                             "n_pos": desc["n_pos"]}
            raise
        scores, own, opts, wall, status = run.scores, run.own, run.options, run.wall_s, "done"
        if save:
            store.save_fl_scores(sid, scores, {"options": opts, "own": own, "wall_s": wall, "inputs": desc})
        store.append_row(store.fl_timing, {"method": method, "setting": setting, "scores_key": skey,
                                           "n_neg": desc["n_neg"], "n_pos": desc["n_pos"], "wall_s": round(wall, 4),
                                           "peak_mb": round(run.peak_mb, 1),
                                           "cuda_peak_mb": None if run.cuda_peak_mb is None else round(run.cuda_peak_mb, 1),
                                           "world_size": run.info.get("world_size", 1),
                                           "batch_size": batch_size})
        row.update(wall_s=round(wall, 4), peak_mb=round(run.peak_mb, 1))
    scores_rel = store.rel(store.fl_scores_path(sid))
    for b in todo:
        weights, neurons = select(scores, meta["level"], b, ctx.head.index, own=own)
        res = FLResult(method=method, level=meta["level"], budget=b, scores=scores, weights=weights, neurons=neurons)
        rid = {"kind": "fl_result", "scores": sid, "budget": b}
        prov = provenance(setting=setting, seed=seed, options=opts, inputs=desc, epoch=ctx.epoch,
                          model_hash=ctx.model_hash, wall_time_s=wall)
        rec = _record(res, rid, scores_rel, setting, prov)
        if save:
            path = store.fl_result_path(rid)
            rec = store.write_result(path, rid, rec)
            res.provenance = {**prov, "identity": rid, "key": rec["key"], "path": store.rel(path)}
        else:
            res.provenance = {**prov, "identity": rid}
        out[b] = res
    return out, {**row, "status": status, "n_neg": desc["n_neg"], "n_pos": desc["n_pos"]}


def n_avg_settings(ctx: RunContext) -> list[str]:
    """The settings N_avg averages over: the 9 benchmark settings the run has, else every available one."""
    bench = [s for s in BENCHMARK_SETTINGS if s in ctx.settings]
    return bench or sorted(ctx.settings)


def resolve_n_avg(ctx: RunContext, *, options: Mapping[str, Any] | None = None, seed: int = 0,
                  batch_size: int = 512, trainer_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """N_avg of the run (computed once, saved, read by every later caller): ``{"n_avg", "settings", "sizes"}``."""
    store = ctx.store
    settings = n_avg_settings(ctx)
    fronts = {s: identity_key(fl_identity(ctx, N_AVG_METHOD, s, options, seed)) for s in settings}
    nid = {"kind": "n_avg", "method": N_AVG_METHOD, "settings": settings, "fronts": fronts}
    path = store.n_avg_path(nid)
    rec = store.read_result(path, nid)
    if rec is not None:
        return rec
    sizes = {}
    for s in settings:
        res, row = run_method(ctx, N_AVG_METHOD, s, ["front"], options=options, seed=seed, batch_size=batch_size,
                              trainer_kwargs=trainer_kwargs)
        if "front" in res:
            sizes[s] = int(res["front"].weights.shape[0])
    if not sizes:
        raise ValueError(f"N_avg needs BL's Pareto front on at least one of {settings}; none could be computed")
    value = max(1, round(sum(sizes.values()) / len(sizes)))
    return store.write_result(path, nid, {"kind": "n_avg", "n_avg": value, "settings": settings, "sizes": sizes,
                                          "provenance": provenance(model_hash=ctx.model_hash)})


def resolve_budgets(ctx: RunContext, method: str, budgets: Sequence[int | str], *,
                    method_options: Mapping[str, Any] | None = None, **n_avg_kw: Any) -> list[int | str]:
    """A method's concrete budgets: "front" alone for methods that select their own set; "avg" -> N_avg."""
    if selects_own(method, method_options):
        return ["front"]
    out: list[int | str] = []
    for b in budgets:
        if b == "front":
            continue
        out.append(int(resolve_n_avg(ctx, **n_avg_kw)["n_avg"]) if b == "avg" else int(b))
    return list(dict.fromkeys(out))


def run_localization(store: RunStore | str, methods: Sequence[str] | None = None,
                     settings: Sequence[str] | None = None, budgets: Sequence[int | str] = (236, 472, 944),
                     seed: int = 0, batch_size: int = 512, trainer_kwargs: Mapping[str, Any] | None = None,
                     method_options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True,
                     epoch: int | None = None) -> list[dict[str, Any]]:
    """Every (method, setting) not yet in the store; one status row per pair. Every option is checked first."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    devices = (trainer_kwargs or {}).get("devices", 1)
    if not (devices == "auto" or devices == -1 or (isinstance(devices, int) and not isinstance(devices, bool)
                                                  and devices >= 1)):
        raise ValueError(f"devices must be a positive int, -1 or 'auto', got {devices!r}")
    ctx = RunContext(store, epoch)
    methods = FL_METHODS.check(methods or FL_METHODS.names())
    method_options = dict(method_options or {})
    for m, o in method_options.items():
        FL_METHODS.check([m])
        resolved_options(m, o)
    budgets = check_budgets(budgets, ctx.head.index.total)
    available = ctx.settings
    settings = list(settings or available)
    missing = [s for s in settings if s not in available]
    if missing:
        raise KeyError(f"settings {missing} not available; available: {sorted(available)}; skipped: "
                       f"{ctx.misclf.get('skipped', {})}")
    n_avg_kw = {"options": method_options.get(N_AVG_METHOD), "seed": seed, "batch_size": batch_size,
                "trainer_kwargs": trainer_kwargs}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods) * len(settings), desc="FL", disable=not progress or not store_writes())
    for method in methods:
        want = resolve_budgets(ctx, method, budgets, method_options=method_options.get(method), **n_avg_kw)
        for setting in settings:
            bar.set_postfix_str(f"{method} @ {setting}")
            try:
                _, row = run_method(ctx, method, setting, want, options=method_options.get(method), seed=seed,
                                    batch_size=batch_size, trainer_kwargs=trainer_kwargs)
            except ValueError as e:
                row = {"method": method, "setting": setting, "budgets": " ".join(map(str, want)),
                       "status": f"error: {e}"}
            rows.append(row)
            bar.update()
    bar.close()
    return rows


def store_writes() -> bool:
    return RunStore.writes()


def fl_results(store: RunStore, methods: Iterable[str] | None = None, settings: Iterable[str] | None = None,
               budgets: Iterable[int | str] | None = None) -> list[dict[str, Any]]:
    """Every FL result record of the run (filters: method, setting, budget)."""
    methods = None if methods is None else set(methods)
    settings = None if settings is None else set(settings)
    budgets = None if budgets is None else {str(b) for b in budgets}
    out = []
    for rec in store.list_results("fl_result"):
        if methods is not None and rec["method"] not in methods:
            continue
        if settings is not None and rec["setting"] not in settings:
            continue
        if budgets is not None and str(rec["budget"]) not in budgets:
            continue
        out.append(rec)
    return out
