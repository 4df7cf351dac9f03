"""Cross-validated repair: the held-out repair rate estimated over the k folds of the evaluation split.

For each fold k: the repair split is the other k - 1 folds, the test split is fold k. Each fold is a *fold run*
(``cv/fold=K/`` inside the run, :meth:`vitfl.core.runstore.RunStore.fold`) that holds that fold's state caches (rows of
the run's evaluation-split cache, so sample indices are the same in every fold), its own misclassification
settings (analysed on its repair split) and its own FL and repair results; the model is the run's own (a fold run
names its parent). The ordinary localize and repair steps run on each fold run, so every fold's results are
addressed, resumed and skipped like any other. Each evaluation input is tested exactly once over the k folds.

Pooling (:func:`pooled_table`): per (repair method, FL method, budget, setting kind) the counts are summed over
folds, settings and repetitions: RR = sum fixed / sum targets (so the pooled RR is the target-count-weighted mean
of the per-run RRs), BR = sum broken / sum correct, each with its Wilson 95% interval and its n; runs whose test fold
holds no target are counted and shown, never dropped in silence. Only results made from each fold run's current
inputs are pooled (:func:`vitfl.pipeline.repair.collect_results`): stale ones are left out and counted (the note of
``crossval.md`` and the ``provenance`` of the return value), or with ``include_stale`` kept and labelled.

**Any block's FFN** (``block``, default -1 = the last): the fold runs also get that block's token caches, cut from
the run's evaluation-split token cache of the block (made here when missing, by the cache step's
``cache_run_states(..., block=block)``), and the sweep on each fold repairs that block
(:func:`vitfl.pipeline.repair.run_sweep` with ``block``). The folds' settings are the same for every block (made
from the CLS fold caches, as always).
Results of several blocks in one store are pooled per block (a ``block`` column in the table).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from vitfl.core.runstore import RunStore, require_store

__all__ = ["prepare_folds", "run_crossval", "step_crossval", "collect_crossval", "pooled_table", "wilson"]


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of k in n (:func:`vitfl.evaluation.intervals.wilson_interval`); (NaN, NaN) when n = 0."""
    from vitfl.evaluation.intervals import wilson_interval

    ci = wilson_interval(int(k), int(n))
    return (float("nan"), float("nan")) if ci is None else ci


def prepare_folds(store: RunStore, trainer_kwargs: dict[str, Any] | None = None,
                  misclf_options: dict[str, Any] | None = None, block: int = -1) -> list[RunStore]:
    """The k fold runs of ``store`` (made where missing): fold caches cut from the run's evaluation-split cache (the
    CLS cache; for an average-pooled model its last block's token cache, which its default head reads) and
    each fold's misclassification settings; with ``block`` (not -1) also the block's token caches of each fold,
    cut from the run's evaluation-split token cache of that block (cached here when missing)."""
    from vitfl.datamodules.folds import kfold_split
    from vitfl.lightning_modules.runs import cache_block, cache_run_states, datamodule_from_run, load_run
    from vitfl.core.states import load_states, save_states
    from vitfl.localization.misclf import analyze

    dm = datamodule_from_run(require_store(store, "prepare_folds"))
    n_folds, fold_seed = int(dm.n_folds), int(dm.fold_seed)
    cache_run_states(store, ["eval"], trainer_kwargs=trainer_kwargs)
    run = load_run(store)
    h = run.model_hash
    ev = run.states("eval")
    base = cache_block(run.head)  # None: the CLS cache; an average-pooled model: its last block's token cache
    views = [(ev, base)]
    if block != -1:
        brun = load_run(store, block=block)  # an index out of range: BlockIndexError naming the number of blocks
        wblock = cache_block(brun.head)
        if wblock != base:  # another FFN than the run's default head's: its token cache, cut per fold too
            cache_run_states(store, ["eval"], trainer_kwargs=trainer_kwargs, block=block)
            views.append((brun.states("eval"), wblock))
    folds = []
    for k in range(n_folds):
        fs = store.fold(k)
        split = kfold_split(len(ev), n_folds, fold_seed, k)
        for src, wblock in views:
            for name, pos in (("repair", split.repair), ("test", split.test)):
                path = fs.states(name, block=wblock)
                if path.is_file():
                    continue
                rows = src.rows_of(torch.as_tensor(pos, dtype=torch.long))
                if fs.writes():
                    save_states(path, src.x[rows], None if src.a is None else src.a[rows], src.logits[rows],
                                src.label[rows], src.index[rows],
                                {**src.metadata, "split": name, "fold": str(k), "n_folds": str(n_folds)})
        if not fs.misclf_info.is_file():
            rep = load_states(fs.states("repair", block=base), expected_hash=h)
            info = analyze(rep.label, rep.pred, rep.index, num_classes=rep.logits.shape[1], split="repair",
                           **(misclf_options or {}))
            info["model_hash"] = h
            info["fold"] = {"k": k, "n_folds": n_folds, "fold_seed": fold_seed}
            fs.write_json(fs.misclf_info, info)
        folds.append(fs)
    return folds


def run_crossval(store: RunStore, methods: Sequence[str], settings: Sequence[str] | None,
                 budgets: Sequence[int | str], reps: int, repair: str = "de",
                 repair_options: dict[str, Any] | None = None, progress: bool = False,
                 trainer_kwargs: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1),
                 workers: int | str | None = 1, logger: bool = False, block: int = -1) -> list[dict[str, Any]]:
    """The repair sweep on every fold run (settings each fold has; those it lacks are reported by the sweep):
    this ``shard`` of each fold's grid, on ``workers`` processes (``pipeline/parallel.py``; the fold runs are
    made first, here). ``logger``: TensorBoard runs under each fold run's ``tb/repair``. ``block``: the
    transformer block whose FFN is repaired (default -1, the last; the module docstring)."""
    from vitfl.pipeline.context import load_misclf
    from vitfl.pipeline.parallel import resolve_workers, run_sharded
    from vitfl.pipeline.repair import run_sweep

    folds = prepare_folds(store, trainer_kwargs, block=block)
    n_workers = resolve_workers(workers)
    if n_workers > 1:
        return run_sharded(run_crossval, dict(store=store, methods=list(methods),
                                              settings=None if settings is None else list(settings),
                                              budgets=list(budgets), reps=reps, repair=repair,
                                              repair_options=repair_options, progress=progress,
                                              trainer_kwargs=trainer_kwargs, logger=logger, block=block),
                           n_workers, shard)
    rows = []
    for fs in folds:
        avail = load_misclf(fs)["settings"]
        sets = [s for s in (settings or avail) if s in avail]
        if not sets:
            continue
        rows += run_sweep({fs.root.name: fs.root}, methods, sets, budgets, reps, shard=shard, repair=repair,
                          repair_options=repair_options, progress=progress, logger=logger, block=block)
    return rows


def step_crossval(store: RunStore, methods: Sequence[str] = ("ours", "arachne_w", "random"),
                  settings: Sequence[str] | None = None, budgets: Sequence[int | str] = ("0.5%",), reps: int = 1,
                  repairs: Sequence[dict[str, Any]] = ({"repair": "de"}, {"repair": "lp", "logger": True}),
                  workers: int | str | None = 1, log=print, block: int = -1) -> list[dict[str, Any]]:
    """The cross-validated repair step of an experiment: for each entry of ``repairs`` (``{repair, repair_options,
    logger}``) the sweep ``methods`` x ``settings`` x ``budgets`` x ``reps`` on every fold run, then the pooled
    table (``repair/summary/crossval.md``) and, with the LP optimiser among them, repairability@N. Runs already in
    the fold runs' stores are skipped. Returns the sweep rows. ``block``: the transformer block whose FFN is
    repaired (default -1, the last): the fold runs get its token caches (the module docstring). A repair method
    that refuses a token head (``lp`` on a block other than the last-block CLS head) reports each run as an error
    row naming why, and the other entries of ``repairs`` go on."""
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int (0 the first block, -1 the last), got {block!r}")
    rows: list[dict[str, Any]] = []
    for r in repairs:
        rows += run_crossval(store, methods, settings, budgets, reps, repair=r.get("repair", "de"),
                             progress=True,
                             repair_options=r.get("repair_options") or {}, logger=bool(r.get("logger", False)),
                             trainer_kwargs={"enable_progress_bar": False}, workers=workers, block=block)
    agg = aggregate_crossval(store)
    df = agg.get("runs")
    if df is not None and len(df):
        one = df[(df["fl_method"] == df["fl_method"].iloc[0]) & (df["repair"] == df["repair"].iloc[0])]
        n_all = int(one.loc[one["setting"] == "all", "n_targets"].sum())
        n_other = int(one.loc[one["setting"] != "all", "n_targets"].sum())
        log(f"cross-validated repair: {len(df)} runs over {df['fold'].nunique()} folds; held-out targets per FL "
            f"method and repetition: 'all' {n_all}, the other settings together {n_other}")
        log(agg["markdown"])
        if agg.get("repairability") is not None:
            log(agg["repairability"].sentence)
    return rows


def collect_crossval(store: RunStore, include_stale: bool = False):
    """One row per current repair run of every fold run (``fold`` = k), as :func:`vitfl.pipeline.repair.collect_results`
    (``include_stale``: stale ones too, labelled in ``stale``); ``df.attrs["provenance"]``: the stale counts summed
    over the folds."""
    require_store(store, "collect_crossval")
    import pandas as pd

    from vitfl.pipeline.localize import count_stale
    from vitfl.pipeline.repair import collect_results

    parts = []
    prov = {**count_stale([]), "included": bool(include_stale)}
    for k in store.fold_indices():
        df = collect_results({f"fold={k}": store.fold(k).root}, include_stale=include_stale)
        p = df.attrs.get("provenance") or {}
        prov["checked"] += p.get("checked", 0)
        prov["stale"] += p.get("stale", 0)
        for why, n in (p.get("why") or {}).items():
            prov["why"][why] = prov["why"].get(why, 0) + n
        prov["unverified"] = prov.get("unverified", 0) + p.get("unverified", 0)
        for why, n in (p.get("unverified_why") or {}).items():
            prov.setdefault("unverified_why", {})[why] = prov.get("unverified_why", {}).get(why, 0) + n
        if len(df):
            parts.append(df.assign(fold=k))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    out.attrs["provenance"] = prov
    return out


def pooled_table(df, by: Sequence[str] = ("repair", "fl_method", "budget")):
    """Pooled held-out counts and rates per group (see the module docstring), plus the in-sample RR."""
    import pandas as pd

    rows = []
    for key, g in df.groupby(list(by), sort=False):
        t, f = int(g["n_targets"].sum()), int(g["n_fixed"].sum())
        c, b = int(g["n_correct_before"].sum()), int(g["n_broken"].sum())
        rr, br = (f / t if t else float("nan")), (b / c if c else float("nan"))
        rr_lo, rr_hi = wilson(f, t)
        br_lo, br_hi = wilson(b, c)
        tr, fr = int(g["n_targets_repair"].sum()), int(g["n_fixed_repair"].sum())
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "runs": len(g),
                     "folds": int(g["fold"].nunique()) if "fold" in g else 1,
                     "runs_without_test_target": int((g["n_targets"] == 0).sum()),
                     "test_targets": t, "test_fixed": f, "rr": rr, "rr_lo": rr_lo, "rr_hi": rr_hi,
                     "test_correct": c, "test_broken": b, "br": br, "br_lo": br_lo, "br_hi": br_hi,
                     "repair_targets": tr, "repair_fixed": fr, "rr_in_sample": fr / tr if tr else float("nan")})
    return pd.DataFrame(rows)


def pooled_markdown(table) -> str:
    def rate(v, lo, hi):
        return "n/a" if v != v else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    blk = "block" in table.columns
    lines = [("| block " if blk else "") + "| repair | FL method | budget | runs (folds) | RR, test folds (95% Wilson) "
             "| targets fixed / n | BR, test folds (95% Wilson) | broken / n correct | runs without a test target | "
             "RR in-sample |", ("|:---" if blk else "") + "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        lines.append((f"| {r.block} " if blk else "")
                     + f"| {r.repair} | {r.fl_method} | {r.budget} | {r.runs} ({r.folds}) | "
                     f"{rate(r.rr, r.rr_lo, r.rr_hi)} | {r.test_fixed} / {r.test_targets} | "
                     f"{rate(r.br, r.br_lo, r.br_hi)} | {r.test_broken} / {r.test_correct} | "
                     f"{r.runs_without_test_target} of {r.runs} | "
                     f"{'n/a' if r.rr_in_sample != r.rr_in_sample else f'{r.rr_in_sample:.3f}'} |")
    return "\n".join(lines) + "\n"


def _block_order(b: str) -> tuple:
    """Blocks in their order (``"0"``, ``"1"``, ..., then names such as ``"last"``)."""
    return (0, int(b), "") if str(b).lstrip("-").isdigit() else (1, 0, str(b))


def aggregate_crossval(store: RunStore, include_stale: bool = False) -> dict[str, Any]:
    """Write ``repair/summary/crossval.csv|md`` (pooled over folds) and return the table and its Markdown, with
    ``provenance`` (stale results left out, or kept with ``include_stale``) and ``stale_note`` (one sentence, "" if
    none)."""
    import pandas as pd

    from vitfl.pipeline.localize import stale_note

    df = collect_crossval(store, include_stale=include_stale)
    prov = dict(df.attrs.get("provenance") or {})
    note = stale_note(prov, "cross-validated repair results", include_stale)
    if df.empty:
        return {"n_runs": 0, "table": None, "markdown": "", "provenance": prov, "stale_note": note}
    blocks = "block" in df.columns and df["block"].astype(str).nunique() > 1
    if blocks:  # results of several blocks: each block pooled on its own
        df = df.assign(block=df["block"].astype(str))
    table = pooled_table(df, by=("block", "repair", "fl_method", "budget") if blocks else
                         ("repair", "fl_method", "budget"))
    md = pooled_markdown(table)
    n_eval = sum(1 for _ in store.fold_indices())
    store.write_text(store.path("crossval_runs"), df.to_csv(index=False))
    store.write_text(store.path("crossval_table", ext="csv"), table.to_csv(index=False))
    store.write_text(store.path("crossval_table", ext="md"),
                     f"# Cross-validated repair ({n_eval} folds; each evaluation input tested once)\n\n"
                     "Counts pooled over folds, settings and repetitions; RR = fixed / targets of the held-out "
                     "fold, BR = broken / correct, 95% Wilson intervals." + (f" Provenance: {note}." if note else "")
                     + "\n\n" + md)
    out = {"n_runs": len(df), "table": table, "markdown": (f"Provenance: {note}.\n\n" if note else "") + md,
           "runs": df, "provenance": prov, "stale_note": note}
    if "lp" in set(table["repair"]):  # repairability@N: the LP optimiser's RR on each FL method's weights
        from vitfl.evaluation.headline import blocks_markdown, repairability_block

        what = f"{n_eval} folds, {df['setting'].nunique()} settings"
        if blocks:  # one headline per block: an FL method's weights of two blocks are two different questions
            parts = [repairability_block(table[table["block"] == b].drop(columns="block"),
                                         title=f"Repairability@N, block {b}", what=what)
                     for b in sorted(table["block"].unique(), key=_block_order)]
            csv = pd.concat([p.table.assign(block=b) for p, b in
                             zip(parts, sorted(table["block"].unique(), key=_block_order))], ignore_index=True)
        else:
            parts = [repairability_block(table, what=what)]
            csv = parts[0].table
        store.write_text(store.path("repairability", ext="csv"), csv.to_csv(index=False))
        store.write_text(store.path("repairability", ext="md"),
                         "# Repairability@N: where (FL) apart from what (the search)\n\n" + blocks_markdown(parts))
        out["repairability"] = parts[-1]  # the last block's (the one every run before block addressing had)
        out["repairability_by_block"] = parts
    return out
