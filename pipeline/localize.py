"""The localize step: FL methods x settings x budgets over a run's repair split, through the one FL runner
(:func:`vitfl.lightning_modules.fl_runner.compute_scores`), into the run store.

A result's identity (:mod:`vitfl.core.runstore`) is the method with *all* its options (the constructor's defaults merged
with what was given), the seed, the setting, the budget (the resolved N, or "front" for a method that selects its
own set) and the hashes of the model, the state cache and the setting's input sets. Scores are computed once per
identity and shared by its budgets; an identity on disk is skipped; a case that cannot run (e.g. a V-score method on
a set of one input) is recorded once as not applicable and not retried.

Budgets: ints (weights), shares ``"P%"`` of the layer, ``"front"`` (the method's own selection; the only budget of
methods with ``own_selection``, e.g. BL) and ``"avg"`` = N_avg, the mean size of BL's Pareto front over the N_avg
settings (the 9 benchmark settings the run has, else every setting), resolved once per (run, FL inputs) by
:func:`resolve_n_avg`, saved, and used by every reader. :func:`check_budgets` checks the labels as given (before any
work); :func:`resolve_budgets`, the one resolver, turns a run's labels for a method into
:class:`vitfl.localization.ranking.ResolvedBudget` (label, n) once; the localize step and the repair sweep carry those.

Readers that list results (FL evaluation, the repair aggregation) keep only those made from the run's *current*
inputs (:func:`stale_reasons`: the recorded model, state-cache and setting hashes against the run's own now), and
say how many they left out and why (:func:`stale_note`); ``include_stale`` keeps them, labelled.
"""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from vitfl.core.io import provenance, to_jsonable
from vitfl.core.runstore import RunStore, identity_key
from vitfl.localization.base import FL_METHODS, FLResult, method_meta, selects_own
from vitfl.localization.ranking import DEFAULT_BUDGETS, BudgetError, ResolvedBudget, budget_size, parse_budget, select
from vitfl.pipeline.context import RunContext

__all__ = ["BENCHMARK_SETTINGS", "N_AVG_METHOD", "fl_identity", "run_method", "resolve_n_avg", "resolve_budgets",
           "run_localization", "load_fl_result", "fl_results", "current_fl_results", "check_budgets",
           "stale_reasons", "stale_note", "DiskFullError", "is_disk_full", "disk_full_names", "status_summary",
           "STATUSES", "read_fl_timing"]

#: what a status row of :func:`run_method` / :func:`run_localization` says, by its first word(s): computed now,
#: selections made now from scores already on disk, every selection already on disk, not applicable, failed
STATUSES = {"done": "computed", "done (scores on disk)": "selected", "exists": "on_disk",
            "not applicable": "not_applicable", "error": "failed"}

BENCHMARK_SETTINGS = tuple(f"{k}_r{r}" for k in ("src_tgt", "tgt_fp", "tgt_fn") for r in (1, 2, 3))
#: the method whose own selection defines N_avg
N_AVG_METHOD = "bl"
NOT_APPLICABLE_MARKERS = ("needs at least", "needs >= ", "at least 2 inputs", "no I_neg")


def resolved_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The method's constructor defaults merged with ``options`` checked by the one options rule
    (:meth:`vitfl.core.registry.Registry.check_options`: names, types, declared ranges; the same check as the command
    lines' and the experiment configs')."""
    defaults = FL_METHODS.options(method)
    defaults.pop("seed", None)
    return {**defaults, **FL_METHODS.check_options(method, options)}


def fl_identity(ctx: RunContext, method: str, setting: str, options: Mapping[str, Any] | None = None,
                seed: int = 0) -> dict[str, Any]:
    """The identity of a method's score vector on a setting of the run's repair split. On a head other than the
    last-block CLS head (``ctx.view()`` not empty) it holds ``"head"``: the head's ``identity()`` (the
    non-negative ``block``, ``pooling``, ``token_statistic``); on the last-block CLS head it is exactly the identity
    of every run before block addressing (no ``"head"`` key)."""
    ident = {"kind": "fl_scores", "method": method, "options": resolved_options(method, options), "seed": int(seed),
             "setting": setting, "inputs": ctx.inputs(setting)}
    view = ctx.view()
    if view:
        ident["head"] = dict(view)
    return ident


def check_budgets(budgets: Iterable[int | str], total: int | None = None) -> list[int | str]:
    """Budget labels as given (ints, shares ``"P%"`` of the layer, "avg", "front") in canonical form
    (:func:`vitfl.localization.ranking.parse_budget`), deduplicated, checked before any work: a list, positive, at most
    the layer's size (``total``, when known: the scripts and configs check without a model). A share stays a share
    here; :func:`resolve_budgets` turns the labels into their sizes (and checks them against the layer)."""
    if isinstance(budgets, (str, int)):
        raise BudgetError(f"budgets must be a list (e.g. [{budgets!r}]), got the single value {budgets!r}")
    out: list[int | str] = []
    for b in budgets:
        b = parse_budget(b)
        if total is not None and b not in ("avg", "front"):
            budget_size(b, total)
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
    from vitfl.core.io import load_tensors

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
    from vitfl.lightning_modules.fl_runner import compute_scores, setting_rows

    store = ctx.store
    meta = method_meta(method)
    options = FL_METHODS.check_options(method, options)  # the values the identity records are the ones used
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
            with disk_full_names(store.fl_scores_path(sid)):
                store.save_fl_scores(sid, scores, {"options": opts, "own": own, "wall_s": wall, "inputs": desc})
        store.append_row(store.fl_timing, {"method": method, "setting": setting, "block": _head_block(ctx),
                                           "scores_key": skey,
                                           "n_neg": desc["n_neg"], "n_pos": desc["n_pos"], "wall_s": round(wall, 4),
                                           "peak_mb": round(run.peak_mb, 1),
                                           "cuda_peak_mb": None if run.cuda_peak_mb is None else round(run.cuda_peak_mb, 1),
                                           "world_size": run.info.get("world_size", 1),
                                           "batch_size": batch_size}, widen=True)
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
            with disk_full_names(path):
                rec = store.write_result(path, rid, rec)
            res.provenance = {**prov, "identity": rid, "key": rec["key"], "path": store.rel(path)}
        else:
            res.provenance = {**prov, "identity": rid}
        out[b] = res
    return out, {**row, "status": status, "n_neg": desc["n_neg"], "n_pos": desc["n_pos"]}


def _head_block(ctx: RunContext) -> int | None:
    """The non-negative index of the block ``ctx``'s head localizes (what ``fl/timing.csv`` records; None for a head
    built by hand that does not know it)."""
    b = getattr(ctx.head, "block", None)
    return None if b is None else int(b)


def read_fl_timing(store: RunStore):
    """``(DataFrame, problems)`` of the run's ``fl/timing.csv`` (:meth:`RunStore.read_log`) with a ``block`` column
    in every case: a log (or rows) written before the column existed has it empty (NaN), which is the last block
    for every FL run made before block addressing."""
    df, problems = store.read_log(store.fl_timing)
    if len(df.columns) and "block" not in df.columns:
        df.insert(min(2, len(df.columns)), "block", float("nan"))
    return df, problems


def _status_kind(status: str) -> str:
    if status in STATUSES:
        return STATUSES[status]
    head = status.split(":", 1)[0]
    if head in STATUSES:
        return STATUSES[head]
    raise ValueError(f"unknown FL status {status!r}; known: {sorted(STATUSES)}")


def _sort_budgets(budgets):
    from vitfl.core.style import sort_budgets

    return sort_budgets(budgets)


def status_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method from :func:`run_localization`'s status rows: settings computed now, selected now from
    scores on disk, already on disk, not applicable and failed (each with the settings' names), the budgets, and
    the mean / max wall time of the settings computed now ('-' when none was)."""
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = by.setdefault(r["method"], {k: [] for k in (*STATUSES.values(), "t")} | {"budgets": set()})
        kind = _status_kind(str(r["status"]))
        d[kind].append(r["setting"] if kind in ("computed", "selected", "on_disk")
                       else f"{r['setting']} ({str(r['status']).split(':', 1)[-1].strip()[:60]})")
        d["budgets"].update(str(r.get("budgets", "")).split())
        if kind == "computed" and r.get("wall_s") is not None:
            d["t"].append(float(r["wall_s"]))
    out = []
    for m, d in by.items():
        t = d["t"]
        out.append({"method": m, "computed": len(d["computed"]), "selected": len(d["selected"]),
                    "on disk": len(d["on_disk"]), "n/a": len(d["not_applicable"]), "failed": len(d["failed"]),
                    "N": " ".join(_sort_budgets(d["budgets"])),
                    "mean_s": f"{sum(t) / len(t):.3f}" if t else "-", "max_s": f"{max(t):.3f}" if t else "-",
                    "not run": "; ".join(d["not_applicable"] + d["failed"]) or "-"})
    return out


def status_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`status_summary` as a plain-text table (what the experiment runner prints after the FL step)."""
    import pandas as pd

    out = status_summary(rows)
    return pd.DataFrame(out).to_string(index=False) if out else "(no FL method was asked for)"


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
    with disk_full_names(path):
        return store.write_result(path, nid, {"kind": "n_avg", "n_avg": value, "settings": settings,
                                              "sizes": sizes, "provenance": provenance(model_hash=ctx.model_hash)})


def resolve_budgets(ctx: RunContext, method: str, budgets: Sequence[int | str], *,
                    method_options: Mapping[str, Any] | None = None,
                    n_avg_options: Mapping[str, Any] | None = None, n_avg_seed: int = 0, batch_size: int = 512,
                    trainer_kwargs: Mapping[str, Any] | None = None) -> list[ResolvedBudget]:
    """The one resolver: a run's budget labels for ``method`` as :class:`ResolvedBudget` (label, n), one per
    label in the order given. Made once per (run, method) and carried (no caller derives n from a label again).

    * an int or a share ``"P%"`` -> its count of the run's layer (:func:`vitfl.localization.ranking.budget_size`; a
      budget larger than the layer is a :class:`BudgetError` for every method, before N_avg is looked up);
    * ``"avg"`` -> N_avg (:func:`resolve_n_avg` of :data:`N_AVG_METHOD` with ``n_avg_options``, ``n_avg_seed``,
      ``batch_size``, ``trainer_kwargs``: read from the store, computed only when missing);
    * ``"front"`` -> n None. A method that selects its own set (``own_selection`` with ``method_options``) gets
      ``"front"`` alone, whatever was asked; the others drop ``"front"``.

    Two labels may resolve to the same n (a share and its count, ``avg`` and an int): one FL identity, which
    :func:`run_localization` selects once and the repair sweep finds on disk."""
    labels = list(dict.fromkeys(map(parse_budget, budgets)))
    total = ctx.head.index.total
    out = {b: ResolvedBudget.resolve(b, total) for b in labels if b not in ("avg", "front")}
    if selects_own(method, method_options):
        return [ResolvedBudget("front", None)]
    if "avg" in labels:
        n_avg = resolve_n_avg(ctx, options=n_avg_options, seed=n_avg_seed, batch_size=batch_size,
                              trainer_kwargs=trainer_kwargs)["n_avg"]
        out["avg"] = ResolvedBudget.resolve("avg", total, n_avg=n_avg)
    return [out[b] for b in labels if b != "front"]


def run_localization(store: RunStore, methods: Sequence[str] | None = None,
                     settings: Sequence[str] | None = None, budgets: Sequence[int | str] = DEFAULT_BUDGETS,
                     seed: int = 0, batch_size: int = 512, trainer_kwargs: Mapping[str, Any] | None = None,
                     method_options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True,
                     epoch: int | None = None, block: int = -1, token_statistic: str = "readout"
                     ) -> list[dict[str, Any]]:
    """Every (method, setting) not yet in the store; one status row per pair. Every option is checked first.

    ``block``: the transformer block whose FFN is localized (:class:`vitfl.pipeline.context.RunContext`: default
    -1, the last; Python-style negative allowed; out of range: :class:`vitfl.localization.ffn.BlockIndexError`
    naming the number of blocks, before any work). The last block of a CLS-pooled model reads the CLS cache and
    makes the identities of every run before block addressing; another block reads that block's token cache (made by
    the cache step with the same ``block``) and its identities record the head (``fl_identity``).

    ``token_statistic`` (``"readout"``, ``"cls"`` or ``"mean"``; default ``"readout"``): a token head's per-input
    statistic over tokens (:class:`vitfl.localization.ffn.TokenFFNHead`: what the activation-based methods rank by),
    recorded in the identities' ``"head"``; the last-block CLS head takes only ``"readout"`` / ``"cls"`` (both the
    CLS token: the same head and identities) and refuses ``"mean"`` before any work
    (:class:`vitfl.lightning_modules.runs.TokenStatisticError`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int (0 the first block, -1 the last), got {block!r}")
    devices = (trainer_kwargs or {}).get("devices", 1)
    if not (devices == "auto" or devices == -1 or (isinstance(devices, int) and not isinstance(devices, bool)
                                                  and devices >= 1)):
        raise ValueError(f"devices must be a positive int, -1 or 'auto', got {devices!r}")
    if not isinstance(token_statistic, str):
        raise TypeError(f"token_statistic must be a string (readout, cls or mean), got {token_statistic!r}")
    ctx = RunContext(store, epoch, block, token_statistic)
    methods = FL_METHODS.check(methods or FL_METHODS.names())
    method_options = dict(method_options or {})
    for m, o in method_options.items():
        FL_METHODS.check([m])
        method_options[m] = FL_METHODS.check_options(m, o)
    budgets = check_budgets(budgets)  # the labels; resolve_budgets checks them against the layer
    available = ctx.settings
    settings = list(settings or available)
    missing = [s for s in settings if s not in available]
    if missing:
        raise KeyError(f"settings {missing} not available; available: {sorted(available)}; skipped: "
                       f"{ctx.misclf.get('skipped', {})}")
    resolved = {m: resolve_budgets(ctx, m, budgets, method_options=method_options.get(m),
                                   n_avg_options=method_options.get(N_AVG_METHOD), n_avg_seed=seed,
                                   batch_size=batch_size, trainer_kwargs=trainer_kwargs)
                for m in methods}  # every method's budgets, once, before any work
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods) * len(settings), desc="FL", disable=not progress or not store_writes())
    for method in methods:
        want = list(dict.fromkeys(b.value for b in resolved[method]))  # labels of one size: one selection
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


# ------------------------------------------------------------------------------------------------ provenance
#: why a stored result is not one of the run's current ones (the recorded input hash that differs)
STALE_WHY = {"model": "made by another model", "states": "made from another repair-split state cache",
             "setting": "made from other input sets of its setting",
             "no_setting": "its setting is no longer one of the run's settings",
             "no_settings": "its setting cannot be checked (the run's misclf_info.json is missing, unreadable or made "
                            "by another model)",
             "test_states": "evaluated on another test-split state cache"}


def _current(fn, *args) -> str | None:
    try:
        return fn(*args)
    except (OSError, ValueError, RuntimeError):  # no current cache to compare with: nothing recorded matches it
        return None


def stale_reasons(ctx: RunContext, scores_identity: Mapping[str, Any]) -> list[str]:
    """Why an FL score identity (``fl_identity``) is not made from the run's current inputs: each recorded hash
    (model, repair-split state cache, the setting's input sets) that differs from the run's own now; [] if none."""
    setting = scores_identity.get("setting")
    recorded = scores_identity.get("inputs") or {}
    current = {"model": ctx.model_hash, "states": _current(ctx.states_hash, "repair")}
    why = [STALE_WHY[k] for k in ("model", "states") if current[k] is None or recorded.get(k) != current[k]]
    try:
        settings = ctx.settings
    except (OSError, ValueError, KeyError, RuntimeError):  # no settings of the current model to compare with
        return why + [STALE_WHY["no_settings"]]
    if setting not in settings:
        return why + [STALE_WHY["no_setting"]]
    if recorded.get("setting") != _current(ctx.setting_hash, setting):
        why.append(STALE_WHY["setting"])
    return why


def stale_note(counts: Mapping[str, Any], what: str, included: bool = False) -> str:
    """One sentence: how many stale results of ``what`` were left out (or kept, labelled) and why, and how many
    could not be checked; "" if none. ``counts``: ``{"stale": n, "why": {reason: n}, "unverified": n,
    "unverified_why": {reason: n}}``."""
    n, u = int(counts.get("stale", 0)), int(counts.get("unverified", 0))
    out = []
    if n:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(counts.get("why", {}).items(), key=lambda kv: -kv[1]))
        if included:
            out.append(f"{n} stale {what} (not made from the run's current model / state caches / settings: {why}) "
                       "are included, labelled in the 'stale' column (--include_stale)")
        else:
            out.append(f"left out {n} stale {what} (not made from the run's current model / state caches / "
                       f"settings: {why}); rerun the step to replace them, or pass --include_stale to keep them, "
                       "labelled")
    if u:
        why = "; ".join(sorted(counts.get("unverified_why", {})))
        out.append(f"{u} {what} could not be checked against the run's current inputs and are kept, unverified "
                   f"({why})")
    return "; ".join(out)


def count_stale(reasons: Iterable[Sequence[str]]) -> dict[str, Any]:
    """``{"checked", "stale", "why": {reason: n}}`` of the reasons lists of several results."""
    out: dict[str, Any] = {"checked": 0, "stale": 0, "why": {}}
    for why in reasons:
        out["checked"] += 1
        if why:
            out["stale"] += 1
            for w in why:
                out["why"][w] = out["why"].get(w, 0) + 1
    return out


def budget_values(ctx: RunContext, budgets: Iterable[int | str] | None) -> list[int | str] | None:
    """What FL result records hold as their budget for each of ``budgets`` as a user spells them (``66``,
    ``"0.1%"``, ``"0.10%"``, ``"avg"``, ``"front"``): the size on ``ctx``'s layer (a share against the head's number of
    weights; ``"avg"``: the run's N_avg, found in the store or computed once), ``"front"`` as itself. A record stores
    the size it selected, so a filter given as a share would otherwise match nothing."""
    if budgets is None:
        return None
    labels = check_budgets(budgets)
    total = ctx.head.index.total
    n_avg = resolve_n_avg(ctx)["n_avg"] if "avg" in labels else None
    return list(dict.fromkeys(ResolvedBudget.resolve(b, total, n_avg=n_avg).value for b in labels))


def current_fl_results(ctx: RunContext, methods: Iterable[str] | None = None, settings: Iterable[str] | None = None,
                       budgets: Iterable[int | str] | None = None, include_stale: bool = False
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`fl_results` of ``ctx``'s head (its block: ``fl_identity``'s ``"head"``) made from its current inputs
    (each record with ``stale``: "" or why not),
    and the counts of the stale ones (:func:`count_stale`); ``include_stale`` keeps the stale ones too."""
    view = to_jsonable(ctx.view())  # results of another block's head are not this head's (nor stale)
    recs = [r for r in fl_results(ctx.store, methods, settings, budget_values(ctx, budgets))
            if to_jsonable(((r.get("identity") or {}).get("scores") or {}).get("head") or {}) == view]
    reasons = [stale_reasons(ctx, (r.get("identity") or {}).get("scores") or {}) for r in recs]
    counts = count_stale(reasons)
    out = [{**r, "stale": "; ".join(why)} for r, why in zip(recs, reasons) if include_stale or not why]
    return out, counts


# ------------------------------------------------------------------------------------------------ disk full
class DiskFullError(OSError):
    """The disk (or quota) filled up while a step wrote ``filename``; nothing half-written was left (every
    artifact is written to a temporary file and renamed only once complete)."""


def is_disk_full(err: BaseException) -> bool:
    """An OSError ENOSPC / EDQUOT, or a library's wrapped form of it (safetensors: ``os error 28``)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def disk_full_names(path: str | Path) -> Iterator[None]:
    """Re-raise a disk-full error of the writes inside as :class:`DiskFullError` naming ``path`` (the artifact,
    not a temporary file or a library's message without it)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - only disk-full errors are translated
        if is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
