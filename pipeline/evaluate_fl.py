"""The FL evaluation step of one run directory: interventions on every FL result in the run store, the checkpoint
benchmark and the injected-fault benchmark, with statistics, figures, TensorBoard and a headline table.

Reads what the earlier steps wrote (through :class:`vitfl.core.runstore.RunStore`): the checkpoints and last-FFN weight
files, the repair split's state cache, the misclassification settings and the FL results. Every FL score computed
here (the benchmarks run the methods on other models) comes from the one FL runner
(:func:`vitfl.lightning_modules.fl_runner.localize_with_trainer`). Writes under ``fl_eval/``::

    interventions/{setting}/{result}.csv           per input (``result`` = ``{method}_n{N}-{key}``): prediction and true-class p before / after, for
                                                   the FL result ("fl") and each random draw, per mode (wide)
    interventions/{setting}/{result}.summary.csv   per (method, mode, group): |delta p|, flips, fixed, broken
    interventions/{setting}/{result}.stats.csv     |delta p| vs random: Wilcoxon, Cliff's delta (raw p)
    interventions_summary.csv
    interventions_meta.json                        FL results checked / evaluated / left out as stale (and why)
    checkpoint/epoch=NNN/{setting}/{method}.json   one checkpoint-benchmark row
    checkpoint_benchmark.csv, checkpoint_benchmark_meta.json
    injected/seed=S/fault.json, injected/seed=S/{method}.json
    injected_benchmark.csv
    stats/{question}.csv|.md|.tex                  one table per question (p raw and Holm, effect sizes)
    figures/*.png|.pdf                             (also in TensorBoard: tb/fl_eval)
    headline.csv|.md

Resumable: an output that exists is read back, not recomputed (``overwrite=True`` recomputes). Every write is
atomic.

**Any block's FFN** (``block``, ``--block``; default -1, the last). Everything above runs on the FFN head of
transformer block ``block`` (:class:`vitfl.pipeline.context.RunContext`, :func:`vitfl.localization.ffn.ffn_head`):
for the last block of a CLS-pooled model the CLS head, with every file, identity and number exactly as before block
addressing; for any other block the token head (``TokenFFNHead``) on the block's token cache
(``scripts/cache_states.py --block L``), the interventions use only the FL results made on that head (their
identity's ``"head"`` equals ``head.identity()``), the checkpoint benchmark's ground truth is |W_L(e) - W_L(e-1)| of
block L's FFN (the ``block=L.*`` tensors of the per-epoch weight files, or, for a run trained before per-block
weight files, the per-epoch checkpoints; the SGD replay follows block L's parameters), and the injected faults
perturb block L's weights. Its outputs go to ``fl_eval/block=L/`` (the same names as above; RunStore kind
``fl_eval_block``), its TensorBoard run to ``tb/fl_eval.block=L``: beside the last block's, never over them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from vitfl.evaluation import figures as figs
from vitfl.evaluation.checkpoint_benchmark import (WORST_POSSIBLE, GroundTruth, block_weights_of_epoch, fl_facts,
                                             head_at_epoch, is_circular, load_ffn_weights, localize_on_checkpoint,
                                             ranking_row, weight_change_ground_truth, worst_possible_scores)
from vitfl.evaluation.injected_faults import (DEFAULT_STRENGTH, InjectionError, evaluate_method_on_fault, fault_facts,
                                        inject_with_strength, loss_gradient, strength_label, strength_requirement)
from vitfl.evaluation.interventions import (MODES, compare_to_random, records_to_wide, run_interventions,
                                      summarize_interventions, wide_to_records)
from vitfl.evaluation.ranking_metrics import COMPARISONS, DEFAULT_FRACTIONS, K_ROUNDINGS, fraction_label
from vitfl.evaluation.headline import HeadlineBlock, benchmark_block, blocks_markdown
from vitfl.evaluation.stats import holm, wilcoxon_holm, write_stats_table
from vitfl.core.io import provenance, read_json
from vitfl.core.runstore import RunStore, require_store
from vitfl.core.runstore import identity_key
from vitfl.lightning_modules.fl_runner import localize_with_trainer, setting_rows
from vitfl.pipeline.context import load_misclf
from vitfl.pipeline.localize import current_fl_results, load_fl_result, stale_note

__all__ = ["PARTS", "OPTIMIZERS", "QUICK_METHODS", "run_evaluation", "headline_blocks"]

PARTS = ("interventions", "checkpoint", "injected")
#: the checkpoint benchmark's ground truths: the run's own optimizer ("recorded") and an SGD + momentum replay of the
#: same epoch ("sgd", :mod:`vitfl.evaluation.optimizer_replay`)
OPTIMIZERS = ("recorded", "sgd")
#: the methods the main job's quick mode localizes with
QUICK_METHODS = ("random", "grad_loss", "arachne_w", "ours", "bl")
#: settings whose intervention figures are drawn by default (the rest are in the CSVs and statistics)
FIGURE_SETTINGS = ("all",)


@dataclass
class _Ctx:
    layout: RunStore
    out: Path
    log: Callable[[str], None]
    overwrite: bool
    writer: Any = None
    figures: bool = True
    made: list = field(default_factory=list)
    #: cases that cannot run (recorded in the run store's not_applicable.json), new and known, one row each
    not_applicable: list = field(default_factory=list)
    #: the run context of the evaluated head (:class:`vitfl.pipeline.context.RunContext`; its block)
    rc: Any = None

    @property
    def view(self) -> dict[str, Any]:
        """The evaluated head's identity (``{}``: the last-block CLS head)."""
        return self.rc.view() if self.rc is not None else {}

    @property
    def block(self) -> int | None:
        """The evaluated block (non-negative) where it is not the last-block CLS head, else None."""
        return int(self.rc.head.block) if self.view else None

    @property
    def prefix(self) -> str:
        """The outputs' folder relative to the run root (``fl_eval``, or ``fl_eval/block=L``): what keys recorded in
        ``not_applicable.json`` start with."""
        return self.layout.rel(self.out)

    def figure(self, fig, name: str) -> None:
        from vitfl.core.style import is_nothing_to_plot

        if self.writer is not None and not is_nothing_to_plot(fig):
            self.writer.add_figure(f"fl_eval/{name}", fig, close=False)
        self.made.extend(figs.save_figure(fig, self.out / "figures" / name, writer=self.layout.save_figure))

    def done(self, path: Path) -> bool:
        return path.exists() and not self.overwrite

    def scalars(self, df: pd.DataFrame, fractions, bench: str, metrics) -> None:
        """Each method's metric@K (mean over settings / seeds) as TensorBoard scalars, one series per method with
        K (in 0.1 % steps) on the step axis: ``fl_eval/{bench}/{metric}@K/{method}``."""
        if self.writer is None or not len(df):
            return
        for method, g in df.groupby("method", sort=False):
            for metric in metrics:
                for f in fractions:
                    col = f"{metric}@{fraction_label(f)}"
                    if col in g.columns:
                        self.writer.add_scalar(f"fl_eval/{bench}/{metric}@K/{method}", float(g[col].mean()),
                                               global_step=int(round(f * 1000)))

    def write_text(self, path: Path, text: str) -> None:
        self.layout.write_text(path, text)

    def write_json(self, path: Path, obj) -> None:
        self.layout.write_json(path, obj)


def _log_default(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------ loading
def eval_dir(layout: RunStore, head) -> Path:
    """Where the FL evaluation of ``head`` writes: ``fl_eval/`` for the last block (the CLS head, or the last
    block's token head of an average-pooled model), else ``fl_eval/block=L/`` (RunStore kind ``fl_eval_block``)."""
    if not head.identity() or head.block is None or head.block == head.num_blocks - 1:
        return layout.fl_eval_dir
    return layout.path("fl_eval_block", block=int(head.block), name="headline.csv").parent


def _tb_name(layout: RunStore, head) -> str:
    """The TensorBoard run of the evaluation of ``head``: ``fl_eval`` for the last block, else ``fl_eval.block=L``."""
    return "fl_eval" if eval_dir(layout, head) == layout.fl_eval_dir else f"fl_eval.block={int(head.block)}"


def _misclf(layout: RunStore) -> dict[str, Any]:
    return load_misclf(layout)


def _fl_results(layout: RunStore, methods, settings, budgets, include_stale: bool = False, rc=None
                ) -> tuple[list[tuple[str, str, dict]], dict[str, Any]]:
    """(setting, result name, record) of every FL result in the store that passes the filters and was made from the
    run's current model, repair-split cache and settings (``include_stale``: the others too, each record's
    ``stale`` saying why it is not current), and the counts of the stale ones (``vitfl.pipeline.localize.count_stale``).
    ``rc``: the run context of the head (its block; default the last block's): only results made on that head."""
    from vitfl.pipeline.context import RunContext

    recs, counts = current_fl_results(rc if rc is not None else RunContext(layout), methods, settings, budgets,
                                      include_stale)
    return [(rec["setting"], f"{rec['method']}_n{rec['budget']}-{rec['key']}", rec) for rec in recs], counts


# ------------------------------------------------------------------------------------------------ interventions
def _interventions(ctx: _Ctx, head, states, misclf, methods, settings, budgets, modes, where, n_random, seed,
                   batch_size, figure_settings, include_stale: bool = False) -> dict[str, pd.DataFrame]:
    found, counts = _fl_results(ctx.layout, methods, settings, budgets, include_stale, ctx.rc)
    note = stale_note(counts, "FL results", include_stale)
    if note:
        ctx.log(f"interventions: {note}")
    ctx.write_json(ctx.out / "interventions_meta.json",
                   {"fl_results_checked": counts["checked"], "evaluated": len(found), "stale": counts["stale"],
                    "stale_why": counts["why"], "stale_included": bool(include_stale), "note": note})
    if not found:
        ctx.log("interventions: no current FL results found under fl/ (run scripts/localize.py first); skipped")
        return {}
    summaries, stats, neg_records = [], [], []
    t0 = time.perf_counter()
    for i, (setting, stem, rec) in enumerate(found):
        rec_meta_stale = rec.get("stale", "")
        info = misclf["settings"].get(setting)
        if info is None:
            ctx.log(f"interventions: {setting} is not in misclf_info.json; skipped")
            continue
        d = ctx.out / "interventions" / setting
        p_rec, p_sum, p_st = d / f"{stem}.csv", d / f"{stem}.summary.csv", d / f"{stem}.stats.csv"
        want_fig = ctx.figures and setting in figure_settings
        if ctx.done(p_rec) and p_sum.exists() and p_st.exists():
            # read the per-input table back only where a figure needs it
            rec = wide_to_records(pd.read_csv(p_rec), stem) if want_fig else None
            summ = pd.read_csv(p_sum, keep_default_na=False, dtype={"budget": str, "baseline_of": str})
            st = pd.read_csv(p_st, dtype={"budget": str})
        else:
            res = load_fl_result(ctx.layout, rec)
            rec = run_interventions(head, states.x, states.label, states.index, info["i_neg"], info["i_pos"],
                                    {stem: res}, modes, where, n_random, seed, batch_size)
            summ = summarize_interventions(rec)
            st = compare_to_random(rec)
            for df in (summ, st):
                df.insert(0, "setting", setting)
                df.insert(1, "result", stem)
                df.insert(2, "fl_method", res.method)
                df.insert(3, "budget", str(res.budget))
            ctx.write_text(p_rec, records_to_wide(rec).to_csv(index=False, float_format="%.9g"))
            ctx.write_text(p_sum, summ.to_csv(index=False))
            ctx.write_text(p_st, st.to_csv(index=False))
        if include_stale:  # why the result is not current ("" if it is): decided now, not when the files were made
            summ, st = summ.assign(stale=rec_meta_stale), st.assign(stale=rec_meta_stale)
        summaries.append(summ)
        stats.append(st)
        if want_fig:
            keep = rec[rec["group"] == "I_neg"][["method", "baseline_of", "mode", "group", "abs_delta_p"]].copy()
            keep.insert(0, "setting", setting)
            keep.insert(1, "budget", str(summ["budget"].iloc[0]) if len(summ) else "")
            neg_records.append(keep)
        if (i + 1) % 25 == 0 or i + 1 == len(found):
            ctx.log(f"interventions: {i + 1}/{len(found)} FL results ({time.perf_counter() - t0:.1f} s)")
    if not summaries:
        return {}
    summary = pd.concat(summaries, ignore_index=True)
    st = pd.concat(stats, ignore_index=True)
    # Holm across every method and budget of one (setting, mode, group) question
    st["p_holm"] = np.nan
    for _, idx in st.groupby(["setting", "mode", "group"]).groups.items():
        st.loc[idx, "p_holm"] = holm(st.loc[idx, "p"].to_numpy())
    ctx.write_text(ctx.out / "interventions_summary.csv", summary.to_csv(index=False))
    cols = ["setting", "mode", "group", "result", "method_a", "method_b", "n", "n_nonzero", "median_a", "median_b",
            "median_diff", "statistic", "p", "p_holm", "cliffs_delta", "magnitude", "note", "stale"]
    st = st[[c for c in cols if c in st.columns]]
    write_stats_table(st, ctx.out / "stats" / "interventions_vs_random",
                      caption="Per-input |delta p| of each FL result vs random at the same count (Wilcoxon "
                              "signed-rank, Holm over the results of one setting/mode/group)")
    if ctx.figures and neg_records:
        neg = pd.concat(neg_records, ignore_index=True)
        for setting in [s for s in dict.fromkeys(summary["setting"]) if s in figure_settings]:
            for budget in dict.fromkeys(summary.loc[summary["setting"] == setting, "budget"]):
                r = neg[(neg["setting"] == setting) & (neg["budget"] == budget)]
                s = summary[(summary["setting"] == setting) & (summary["budget"] == budget)]
                ctx.figure(figs.intervention_distributions(r, f"{setting} n={budget}"),
                           f"interventions_{setting}_n{budget}")
                ctx.figure(figs.flip_counts(s, f"{setting} n={budget}"), f"flips_{setting}_n{budget}")
    return {"interventions_summary": summary, "interventions_stats": st}


# -------------------------------------------------------------------------------------------- checkpoint bench
def _ckpt_epochs(layout: RunStore) -> int | None:
    eps = layout.ffn_weight_epochs()
    for e in reversed(eps):
        if e - 1 in eps and layout.checkpoint(e - 1).is_file():
            return e
    return None


def _states_for(layout: RunStore, model, split: str, tag: str, log, block: int | None = None,
                expected_states: dict[str, Any] | None = None):
    """States of ``split`` made by ``model``: the untagged cache if it is this model's, else ``{split}.{tag}``
    (made now with one predict pass if missing). ``block``: block ``block``'s token caches (``expected_states``: its
    head's ``state_identity()``) instead of the CLS caches."""
    from vitfl.lightning_modules.runs import cache_states
    from vitfl.core.states import CacheError, load_states, read_metadata
    from vitfl.localization.ffn import model_fingerprint

    h = model_fingerprint(model)
    for path in (layout.states(split, block=block), layout.states(split, tag, block=block)):
        try:
            if path.is_file() and read_metadata(path).get("model_hash") == h:
                return load_states(path, expected_hash=h, expected_states=expected_states), path
        except CacheError:
            pass
    log(f"checkpoint benchmark: caching {split} states of the {tag} model"
        + ("" if block is None else f" (block {block})"))
    if block is None:
        cache_states(layout, model, [split], tag=tag, trainer_kwargs={"enable_progress_bar": False})
    else:
        cache_states(layout, model, [split], tag=tag, trainer_kwargs={"enable_progress_bar": False}, block=block)
    path = layout.states(split, tag, block=block)
    return load_states(path, expected_hash=h, expected_states=expected_states), path


def _bench_key(method: str, options, seed: int, states_hash: str, what) -> str:
    """The identity of one benchmark row: the method and all its options, seed, the states and the ground truth."""
    from vitfl.pipeline.localize import resolved_options

    return identity_key({"method": method, "options": resolved_options(method, options), "seed": seed,
                         "states": states_hash, "what": what})


def _not_applicable_reason(ex: BaseException) -> str | None:
    """The reason an FL method cannot run on these inputs (a V-score method on one I_neg input, a setting without
    I_neg), as the localize step recognises it (``vitfl.pipeline.localize.NOT_APPLICABLE_MARKERS``); None for a failure."""
    from vitfl.pipeline.localize import NOT_APPLICABLE_MARKERS

    msg = str(ex)
    return msg if isinstance(ex, ValueError) and any(m in msg for m in NOT_APPLICABLE_MARKERS) else None


def _na_case(ctx: _Ctx, key: str, part: str, method: str, where: str) -> dict[str, Any] | None:
    """A case recorded as not applicable in the run store (``not_applicable.json``): its row, else None (with
    ``overwrite``: None, so it is tried again)."""
    why = None if ctx.overwrite else ctx.layout.not_applicable().get(key)
    return None if why is None else {"part": part, "method": method, "where": where, "reason": why, "key": key}


def _mark_na(ctx: _Ctx, key: str, part: str, method: str, where: str, why: str) -> dict[str, Any]:
    """Record a case that cannot run once in the run store (not retried, counted by every later run) and say so."""
    text = f"{part}: {method} on {where}: {why}"
    ctx.layout.mark_not_applicable(key, text)
    ctx.log(f"{part}: {method} on {where} is not applicable (recorded, not retried): {why}")
    ctx.not_applicable.append({"part": part, "method": method, "where": where, "reason": text, "key": key})
    return ctx.not_applicable[-1]


def _vs_expectation(df: pd.DataFrame, metrics: Sequence[str], pair_key: str, question: str) -> pd.DataFrame:
    """Each method's metric against random's exact expectation, paired by ``pair_key`` (setting or seed);
    Wilcoxon + Holm across the methods, per metric."""
    tables = []
    ok = df[df.get("error", pd.Series("", index=df.index)).fillna("") == ""] if len(df) else df
    for metric in metrics:
        if metric not in ok.columns:
            continue
        values, pairs = {}, []
        for m, sub in ok.groupby("method", sort=False):
            sub = sub.sort_values(pair_key)
            values[m] = sub[metric].to_numpy(dtype=float)
            values[f"E[random]@{m}"] = sub[f"rand_{metric}"].to_numpy(dtype=float)
            pairs.append((m, f"E[random]@{m}"))
        if pairs:
            t = wilcoxon_holm(values, pairs, question=f"{question}: {metric}")
            t.insert(1, "metric", metric)
            tables.append(t)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _recorded_optimizer(model) -> str:
    """The name of the optimizer the run trained with (what made the recorded W(e)), e.g. "adamw"."""
    try:
        return type(model.build_optimizer(1, 1)[0]).__name__.lower()
    except Exception:  # noqa: BLE001 - a model without the classifier's optimizer builder
        return "recorded"


def _epoch_weights(ctx: _Ctx, e: int) -> tuple[dict[str, Any], Path]:
    """The evaluated block's FFN weights of epoch ``e`` and the file they came from: the last FFN's tensors of
    ``ffn_weights/epoch=NNN.safetensors``; for another block its ``block=L.*`` tensors there, or (a run trained
    before per-block weight files) the epoch's checkpoint
    (:func:`vitfl.evaluation.checkpoint_benchmark.block_weights_of_epoch`)."""
    layout = ctx.layout
    if ctx.block is None:
        return load_ffn_weights(layout.ffn_weights(e)), layout.ffn_weights(e)
    return block_weights_of_epoch(layout.ffn_weights(e), layout.checkpoint(e), ctx.block, ctx.rc.head.num_blocks)


def _head_of(ctx: _Ctx, model):
    """The evaluated block's FFN head of ``model`` (another epoch's model of the run)."""
    from vitfl.localization.ffn import ffn_head, last_ffn_head

    return last_ffn_head(model) if ctx.block is None else ffn_head(model, ctx.block)


def _replayed_ground_truths(ctx: _Ctx, e: int, pos_fraction: float, k_rounding: str, replay: dict[str, Any],
                            fl_grad, log) -> tuple[list[GroundTruth], dict[str, Any]]:
    """The replayed ground truths of epoch e (SGD + momentum from the recorded W(e-1), the same batches and schedule
    shape; :mod:`vitfl.evaluation.optimizer_replay`) and the diagnostics of what |dW| follows under each optimizer. The
    SGD weights and the diagnostics are stored under ``fl_eval/checkpoint/epoch=NNN/`` (keyed by the replay's
    options and the input files' hashes), so a rerun replays nothing."""
    from vitfl.evaluation.optimizer_replay import optimizer_ground_truths, sgd_name
    from vitfl.lightning_modules.runs import datamodule_from_run, run_config

    layout = ctx.layout
    opts = {"sgd_lr": float(replay.get("sgd_lr", 0.02)), "momentum": float(replay.get("momentum", 0.9)),
            "nesterov": bool(replay.get("nesterov", False)), "verify": bool(replay.get("verify", True))}
    if not layout.run_config.is_file():
        raise FileNotFoundError(f"no {layout.run_config}: the replay rebuilds the training data and schedule from it")
    if ctx.block is None:
        ident = {"epoch": e, **opts, "ffn_prev": layout.file_hash(layout.ffn_weights(e - 1)),
                 "ffn": layout.file_hash(layout.ffn_weights(e)),
                 "ckpt_prev": layout.file_hash(layout.checkpoint(e - 1)), "run_config": layout.file_hash(layout.run_config)}
        block_kw: dict[str, Any] = {}
    else:  # block L: its weights' source files (the weight files, or the checkpoints of an older run)
        src_prev, src = _epoch_weights(ctx, e - 1)[1], _epoch_weights(ctx, e)[1]
        ident = {"epoch": e, **opts, "block": ctx.block, "ffn_prev": layout.file_hash(src_prev),
                 "ffn": layout.file_hash(src), "ckpt_prev": layout.file_hash(layout.checkpoint(e - 1)),
                 "run_config": layout.file_hash(layout.run_config)}
        block_kw = {"block": ctx.block, "load_weights": lambda ep: _epoch_weights(ctx, ep)[0]}
    key = identity_key(ident)
    d = ctx.out / "checkpoint" / f"epoch={e:03d}"
    info_path, w_path = d / f"replay-{key}.json", d / f"replay-{key}.sgd_weights.safetensors"
    if info_path.is_file() and w_path.is_file() and not ctx.overwrite:
        info = read_json(info_path)
        weights, _ = layout.read_tensors(w_path)
    else:
        log(f"checkpoint benchmark: replaying epoch {e} ({'verifying the recorded optimizer from W(0), ' if opts['verify'] else ''}"
            f"then {sgd_name(opts['momentum'], opts['nesterov'])} from W({e - 1}))")
        out = optimizer_ground_truths(run_config(layout), datamodule_from_run(layout), e,
                                      checkpoint_path=layout.checkpoint, ffn_weights_path=layout.ffn_weights,
                                      sgd_lr=opts["sgd_lr"], momentum=opts["momentum"], nesterov=opts["nesterov"],
                                      replay_recorded=opts["verify"], verify=opts["verify"], fl_grad=fl_grad,
                                      pos_fraction=pos_fraction, k_rounding=k_rounding, **block_kw)
        weights = out["sgd"]["weights"]
        info = {"identity": ident, "key": key, "optimizer": out["optimizer"], "sgd_name": out["sgd"]["name"],
                "replay": out["replay"], "sgd": {k: v for k, v in out["sgd"].items() if k != "weights"},
                "accuracy": out["accuracy"], "eval_split": out["eval_split"], "diagnostics": out["diagnostics"],
                "timing": out["timing"], "summary": out["summary"], "provenance": provenance()}
        layout.write_tensors(w_path, weights, {"key": key})
        ctx.write_json(info_path, info)
    log(info["summary"])
    w_prev = _epoch_weights(ctx, e - 1)[0]
    gt = weight_change_ground_truth(w_prev, weights, e, pos_fraction, optimizer=info["sgd_name"],
                                    k_rounding=k_rounding)
    gt.info.update({"source": f"{info['sgd_name']} replay of epoch {e} from W({e - 1})", "replay_key": key,
                    "sgd_lr": opts["sgd_lr"], "momentum": opts["momentum"], "nesterov": opts["nesterov"]})
    return [gt], {**info, "path": layout.rel(info_path)}


def _checkpoint(ctx: _Ctx, methods, settings, fractions, pos_fraction, split, batch_size, seed,
                training_splits, method_opts, ckpt_epoch: int | None = None,
                comparisons: Sequence[str] = COMPARISONS, k_rounding: str = "round",
                optimizers: Sequence[str] = OPTIMIZERS, replay: dict[str, Any] | None = None
                ) -> dict[str, pd.DataFrame]:
    """The checkpoint benchmark: every method on every setting of the epoch e-1 model, localized once and compared
    with every ground truth (the recorded optimizer's |W(e) - W(e-1)|, and with ``"sgd"`` in ``optimizers`` the SGD
    replay's) under every comparison; plus the worst-possible ranking as a control row per ground truth and
    comparison."""
    from vitfl.lightning_modules.runs import load_classifier
    from vitfl.localization.ffn import model_fingerprint
    from vitfl.localization.misclf import analyze

    layout = ctx.layout
    bad = [c for c in comparisons if c not in COMPARISONS]
    if bad or not comparisons:
        raise ValueError(f"unknown checkpoint comparison(s) {bad or comparisons}; choose from {COMPARISONS}")
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or "recorded" not in optimizers:
        raise ValueError(f"optimizers must include 'recorded' and come from {OPTIMIZERS}, got {list(optimizers)}")
    if ckpt_epoch is not None:  # the epoch pair is a config value: ground truth |W(e) - W(e-1)|
        have = layout.ffn_weight_epochs()
        e = int(ckpt_epoch)
        if e not in have or e - 1 not in have or not layout.checkpoint(e - 1).is_file():
            raise ValueError(f"checkpoint benchmark at epoch {e} needs the last-FFN weights of epochs {e - 1} and {e} "
                             f"and the epoch {e - 1} checkpoint; this run has weights for epochs {have}")
    else:
        e = _ckpt_epochs(layout)
    if e is None:
        ctx.log("checkpoint benchmark: needs ffn_weights for two consecutive epochs and the earlier checkpoint; "
                "skipped")
        return {}
    (w_prev, src_prev), (w_next, src_next) = _epoch_weights(ctx, e - 1), _epoch_weights(ctx, e)
    model_prev = load_classifier(layout.checkpoint(e - 1))
    recorded = _recorded_optimizer(model_prev)
    gts = [weight_change_ground_truth(w_prev, w_next, e, pos_fraction, optimizer=recorded, k_rounding=k_rounding)]
    gts[0].info["source"] = f"the run's own epoch {e} ({recorded}, recorded)"
    head_prev = head_at_epoch(_head_of(ctx, model_prev), w_prev, check_tol=1e-5).eval()
    tag = f"epoch={e - 1:03d}"
    if ctx.block is None:
        states, spath = _states_for(layout, model_prev, split, tag, ctx.log)
    else:
        states, spath = _states_for(layout, model_prev, split, tag, ctx.log, ctx.block, head_prev.state_identity())
    spath_hash = layout.file_hash(spath)
    replay_info = None
    if "sgd" in optimizers:
        from vitfl.evaluation.optimizer_replay import ReplayError
        from vitfl.lightning_modules.runs import RunError

        fl_grad = loss_gradient(head_prev, states.x, states.label, batch_size=max(1024, batch_size))
        try:
            extra, replay_info = _replayed_ground_truths(ctx, e, pos_fraction, k_rounding, dict(replay or {}),
                                                         fl_grad, ctx.log)
            gts += extra
        except (ReplayError, RunError, FileNotFoundError) as ex:  # the run cannot be replayed: said, not fatal
            replay_info = {"error": f"{type(ex).__name__}: {ex}"}
            ctx.log(f"checkpoint benchmark: no SGD ground truth for this run ({replay_info['error']}); the recorded "
                    "optimizer's ground truth only")
    info = analyze(states.label, states.pred, states.index, num_classes=states.logits.shape[1], split=split)
    names = [s for s in info["settings"] if settings is None or s in settings]
    gt = gts[0]
    which = "" if ctx.block is None else f"block {ctx.block}: "
    ctx.log(f"checkpoint benchmark: {which}ground truths |W({e}) - W({e - 1})| under {[g.optimizer for g in gts]}, top "
            f"{fraction_label(pos_fraction)} = {gt.info['n_pos']} of {gt.info['total']} weights (K {k_rounding}ed); "
            f"comparisons {list(comparisons)}; FL on the epoch {e - 1} model ({split}: {len(states)} inputs, "
            f"accuracy {info['accuracy']:.3f}); settings {names}")
    variants = [(g, c) for g in gts for c in comparisons]
    rows, errors = [], []
    d = ctx.out / "checkpoint" / f"epoch={e:03d}"
    t0 = time.perf_counter()
    todo = [(s, m) for s in names for m in methods]
    for i, (setting, method) in enumerate(todo):
        opts = dict((method_opts or {}).get(method) or {})
        paths = {(g.optimizer, c): d / setting / f"{method}-{_bench_key(method, opts, seed, spath_hash, {**g.info, 'comparison': c})}.json"
                 for g, c in variants}
        missing = [(g, c) for g, c in variants if not ctx.done(paths[(g.optimizer, c)])]
        have = set(paths) - {(g.optimizer, c) for g, c in missing}
        rows.extend(read_json(paths[v]) for v in paths if v in have)
        if not missing:
            continue
        na_key = f"{ctx.prefix}/checkpoint/epoch={e:03d}/{setting}/{method}-{_bench_key(method, opts, seed, spath_hash, {'checkpoint_fl': e})}"
        where = f"{setting} (epoch {e - 1} model)"
        known = _na_case(ctx, na_key, "checkpoint benchmark", method, where)
        if known is not None:  # counted, not retried, not printed again
            ctx.not_applicable.append(known)
            continue
        x, y, is_neg, extra_opts, desc = setting_rows(states, info["settings"][setting], method, seed)
        fl_inputs = {"split": split, "setting": setting, "states": layout.rel(spath),
                     "model_hash": model_fingerprint(model_prev), "i_neg": desc["i_neg"], "i_pos": desc["i_pos"]}
        if ctx.block is not None:
            fl_inputs["block"] = ctx.block
        try:
            scores, level, wall = localize_on_checkpoint(head_prev, x, y, is_neg, method, int(gt.positives.sum()),
                                                         seed, batch_size, {**opts, **extra_opts},
                                                         localize_with_trainer)
        except Exception as ex:  # recorded, not written: retried on the next run
            why = _not_applicable_reason(ex)
            if why is not None:  # e.g. a V-score method on a setting with one I_neg: not applicable, not a failure
                _mark_na(ctx, na_key, "checkpoint benchmark", method, where, why)
                continue
            errors.append({"setting": setting, "method": method, "error": f"{type(ex).__name__}: {ex}"})
            ctx.log(f"checkpoint benchmark: {method} on {setting} failed: {errors[-1]['error']}")
            continue
        for g, c in missing:
            row = {**fl_facts(method, level, g, fl_inputs, is_neg, wall, seed, training_splits),
                   **ranking_row(scores, g, c, fractions), "setting": setting}
            ctx.write_json(paths[(g.optimizer, c)], row)
            rows.append(row)
        if (i + 1) % 20 == 0:
            ctx.log(f"checkpoint benchmark: {i + 1}/{len(todo)} ({time.perf_counter() - t0:.1f} s)")
    for g, c in variants:  # the control: the worst possible ranking (least-changed weights first)
        rows.append({"method": WORST_POSSIBLE, "level": "weight", "setting": "-", "control": True,
                     "epoch_prev": g.prev_epoch, "epoch": g.epoch, "pos_fraction": g.pos_fraction,
                     **ranking_row(worst_possible_scores(g), g, c, fractions)})
    df = pd.DataFrame(rows)
    if errors:
        df = pd.concat([df, pd.DataFrame(errors)], ignore_index=True)
    for col, default in (("error", ""), ("control", False)):
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].fillna(default)
    df["control"] = df["control"].astype(bool)
    ctx.write_text(ctx.out / "checkpoint_benchmark.csv", df.to_csv(index=False))
    meta = {"epoch": e, "epoch_prev": e - 1,
            "ground_truth": {**gt.info, "pos_fraction": pos_fraction,
                             "source": [layout.rel(src_prev), layout.rel(src_next)]},
            "ground_truths": [{**g.info, "optimizer": g.optimizer} for g in gts], "recorded_optimizer": recorded,
            "comparisons": list(comparisons), "k_rounding": k_rounding, "replay": replay_info,
            "fl_inputs": {"split": split, "states": layout.rel(spath), "n": len(states), "settings": names,
                          "i_neg": "the setting's misclassified inputs of the epoch e-1 model",
                          "i_pos": "all correctly classified inputs of the split"},
            "circular": is_circular(split, training_splits), "training_splits": list(training_splits),
            "not_applicable": [c["reason"] for c in ctx.not_applicable if c["part"] == "checkpoint benchmark"],
            "circularity_note": "ground truth = the training update of epoch e on the training split; the FL "
                                f"inputs come from {split!r}" + (" (the same data: circular)"
                                                                 if is_circular(split, training_splits) else
                                                                 " (disjoint from training)"),
            "provenance": provenance(model_hash_prev=model_fingerprint(model_prev))}
    if ctx.block is not None:
        meta["head"] = ctx.view
    ctx.write_json(ctx.out / "checkpoint_benchmark_meta.json", meta)
    lab = fraction_label(pos_fraction)
    ok = df[(df["error"] == "") & ~df["control"]]
    tables = []
    for (opt, comp), sub in ok.groupby(["optimizer", "comparison"], sort=False):
        metrics = [f"P@{lab}", "AP"] if comp == "corrected" else [f"P@{lab}"]
        st = _vs_expectation(sub, metrics, "setting", f"checkpoint ({opt}, {comp})")
        if len(st):
            st.insert(0, "comparison", comp)
            st.insert(0, "optimizer", opt)
            tables.append(st)
    st = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(st):
        write_stats_table(st, ctx.out / "stats" / "checkpoint_vs_random",
                          caption=f"Checkpoint benchmark ({which.replace(':', ',')}epoch {e - 1} -> {e}): each method "
                                  "vs random's exact "
                                  "expectation, paired by setting, per ground truth (optimizer) and comparison")
    for (opt, comp), sub in ok.groupby(["optimizer", "comparison"], sort=False):
        ctx.scalars(sub, fractions, f"checkpoint/{opt}/{comp}", ("P", "R", "overlap"))
    if ctx.figures and len(ok):
        for opt, sub in ok[ok["comparison"] == "corrected"].groupby("optimizer", sort=False):
            suffix = "" if opt == recorded else f"_{opt}"
            for metric in ("P", "R", "overlap"):
                ctx.figure(figs.ranking_curves(sub, fractions, metric, f"checkpoint benchmark {e - 1}->{e}, "
                                                                       f"{opt} ground truth: {metric}@K (mean over "
                                                                       "settings)"),
                           f"checkpoint_{metric}_at_k{suffix}")
    return {"checkpoint": df, "checkpoint_stats": st}


# ---------------------------------------------------------------------------------------------- injected faults
def _injected(ctx: _Ctx, head, states, methods, seeds, fractions, batch_size, strengths,
              method_opts) -> dict[str, pd.DataFrame]:
    """The injected-fault benchmark at every strength (how many predictions the fault must change) and seed."""
    states_hash = (ctx.rc.states_hash("repair") if ctx.rc is not None
                   else ctx.layout.file_hash(ctx.layout.states("repair")))
    x, label = states.x, states.label
    grad = None
    rows = []
    t0 = time.perf_counter()
    for strength in strengths:
        sl = strength_label(strength)
        for si, seed in enumerate(seeds):
            d = ctx.out / "injected" / f"strength={sl}" / f"seed={seed}"
            name = {m: f"{m}-{_bench_key(m, (method_opts or {}).get(m) or {}, seed, states_hash, {'injected': 1, 'strength': sl})}.json"
                    for m in methods}
            todo = [m for m in methods if not ctx.done(d / name[m])]
            rows.extend(read_json(d / name[m]) for m in methods if m not in todo)
            if not todo:
                continue
            if grad is None:
                grad = loss_gradient(head, x, label, batch_size=max(1024, batch_size))
            try:
                fault = inject_with_strength(head, x, label, seed, strength, grad=grad)
            except InjectionError as ex:
                ctx.log(f"injected faults: {ex}")
                rows.append({"strength": sl, "seed": seed, "method": "", "error": f"InjectionError: {ex}"})
                continue
            ctx.write_json(d / "fault.json", {**fault_facts(fault, head), **fault.info,
                                                 "original": fault.original.tolist(), "values": fault.values.tolist(),
                                                 "changed": torch.nonzero(fault.changed).view(-1).tolist()})
            ctx.log(f"injected faults: strength {sl}, seed {seed}: {len(fault.weights)} weights perturbed, "
                    f"{fault.n_changed} of {len(x)} predictions changed")
            for method in todo:
                na_key = f"{ctx.prefix}/injected/strength={sl}/seed={seed}/{name[method][:-len('.json')]}"
                where = f"strength {sl}, seed {seed}"
                known = _na_case(ctx, na_key, "injected faults", method, where)
                if known is not None:  # counted, not retried, not printed again
                    ctx.not_applicable.append(known)
                    continue
                try:
                    row = evaluate_method_on_fault(fault, head, x, label, method, fractions, batch_size,
                                                   (method_opts or {}).get(method), localize_with_trainer)
                except Exception as ex:
                    why = _not_applicable_reason(ex)
                    if why is not None:
                        _mark_na(ctx, na_key, "injected faults", method, where, why)
                        continue
                    ctx.log(f"injected faults: {method} on strength {sl}, seed {seed} failed: "
                            f"{type(ex).__name__}: {ex}")
                    rows.append({**fault_facts(fault, head), "method": method,
                                 "error": f"{type(ex).__name__}: {ex}"})
                    continue
                ctx.write_json(d / name[method], row)
                rows.append(row)
            ctx.log(f"injected faults: strength {sl}, seed {seed} done ({si + 1}/{len(seeds)}, "
                    f"{time.perf_counter() - t0:.1f} s)")
    df = pd.DataFrame(rows)
    if "error" not in df.columns:
        df["error"] = ""
    df["error"] = df["error"].fillna("")
    if "strength" in df.columns:
        df["strength"] = df["strength"].astype(str)
    ctx.write_text(ctx.out / "injected_benchmark.csv", df.to_csv(index=False))
    ok = df[df["error"] == ""]
    tables = []
    for sl, sub in ok.groupby("strength", sort=False) if len(ok) else []:
        st = _vs_expectation(sub, ["P@1%", "R@1%", "AP"], "seed", f"injected faults ({sl})")
        if len(st):
            st.insert(0, "strength", sl)
            tables.append(st)
    st = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(st):
        write_stats_table(st, ctx.out / "stats" / "injected_vs_random",
                          caption="Injected-fault benchmark: each method vs random's exact expectation, paired by "
                                  "seed, per strength")
    for sl, sub in ok.groupby("strength", sort=False) if len(ok) else []:
        ctx.scalars(sub, fractions, f"injected/strength={sl}", ("P", "R"))
        if ctx.figures:
            ctx.figure(figs.ranking_curves(sub, fractions, "R", f"injected faults, strength {sl}: R@K (mean over "
                                                                "seeds)"),
                       "injected_R_at_k" + ("" if sl == strength_label(strengths[0]) else f"_strength{sl}"))
    return {"injected": df, "injected_stats": st}


# ----------------------------------------------------------------------------------------------------- headline
def _wilcoxon_of(stats: pd.DataFrame | None, metric: str, **where: str) -> dict[str, tuple[float, float, str]] | None:
    """method -> (p, p_holm, note) of the Wilcoxon test of ``metric`` against random's expectation, from the
    statistics table the benchmark wrote (None when it has no such rows: the headline then tests itself)."""
    if stats is None or not len(stats) or "metric" not in stats.columns:
        return None
    sel = stats["metric"] == metric
    for k, v in where.items():
        if k not in stats.columns:
            return None
        sel &= stats[k].astype(str) == str(v)
    sub = stats[sel]
    if not len(sub):
        return None
    return {r["method_a"]: (float(r["p"]), float(r["p_holm"]), str(r.get("note") or ""))
            for r in sub.to_dict("records")}


def headline_blocks(results: dict[str, pd.DataFrame], pos_fraction: float = 0.01,
                    meta: dict[str, Any] | None = None) -> list[HeadlineBlock]:
    """The FL evaluation's headline (:mod:`vitfl.evaluation.headline`): one block per checkpoint ground truth (optimizer) x
    comparison (corrected first) and per injected-fault strength, methods sorted by P@1% with their interval and the
    test against random (the Wilcoxon results of the benchmark's statistics tables are reused)."""
    lab = fraction_label(pos_fraction)
    metric = f"P@{lab}"
    blocks = []
    ck = results.get("checkpoint")
    if ck is not None and len(ck) and "optimizer" in ck.columns:
        ok = ck[ck["error"].fillna("") == ""]
        meta = meta or {}
        e = meta.get("epoch")
        recorded = meta.get("recorded_optimizer")
        order = {c: i for i, c in enumerate(COMPARISONS)}
        groups = sorted(ok.groupby(["optimizer", "comparison"], sort=False),
                        key=lambda kv: (order.get(kv[0][1], 9), kv[0][0] != recorded))
        for (opt, comp), sub in groups:
            how = "the run's own epoch" if opt == recorded else f"epoch replayed from W({e - 1 if e else 'e-1'})"
            k_r = sub["k_rounding"].iloc[0] if "k_rounding" in sub else "round"
            what = (f"ground truth: top {lab} of |W({e}) - W({e - 1 if e else 'e-1'})| under **{opt}** ({how}); "
                    f"comparison **{comp}**; K {k_r}ed")
            title = ("Checkpoint benchmark" if comp == "corrected" else
                     "Checkpoint benchmark, published positional comparison (measures only the W_bef / W_aft split)")
            split = (f"FL inputs: the {sub['fl_split'].iloc[0] if 'fl_split' in sub else 'repair'} split's settings "
                     f"on the epoch {e - 1 if e else 'e-1'} model")
            blocks.append(benchmark_block(sub, title, what, metric, "settings", comp, extra=(f"R@{lab}",),
                                          split=split, dependence="comonotone",
                                          wilcoxon=_wilcoxon_of(results.get("checkpoint_stats"), metric,
                                                                optimizer=opt, comparison=comp)))
    inj = results.get("injected")
    if inj is not None and len(inj) and "strength" in inj.columns:
        ok = inj[inj["error"].fillna("") == ""]
        for sl, sub in ok.groupby("strength", sort=False):
            what = (f"strength {sl}: {sub['n_changed'].mean():.0f} changed predictions and "
                    f"{sub['n_perturbed'].mean():.0f} perturbed weights per fault on average, "
                    f"{sub['seed'].nunique()} seeds")
            blocks.append(benchmark_block(sub, "Injected faults", what, metric, "seeds", "corrected",
                                          extra=(f"R@{lab}",), split="the repair split (I_neg = the changed "
                                                                     "predictions)",
                                          wilcoxon=_wilcoxon_of(results.get("injected_stats"), metric,
                                                                strength=sl)))
    return blocks


def _headline_csv(blocks: Sequence[HeadlineBlock]) -> pd.DataFrame:
    parts = []
    for i, b in enumerate(blocks):
        if len(b.table):
            parts.append(b.table.assign(block=i, benchmark=b.title, variant=b.what, sentence=b.sentence))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------------- main
def run_evaluation(store: RunStore, methods: Iterable[str] | None = None, quick: bool = False,
                   parts: Iterable[str] = PARTS, settings: Iterable[str] | None = None,
                   budgets: Iterable[int | str] | None = None, modes: Iterable[str] = MODES, where: str = "post",
                   n_random: int | None = None, inject_seeds: Iterable[int] | None = None,
                   ckpt_settings: Iterable[str] | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   pos_fraction: float = 0.01, split: str = "repair", batch_size: int = 512, seed: int = 0,
                   training_splits: Sequence[str] = ("train",),
                   strengths: Sequence[str | int | float] = (DEFAULT_STRENGTH, "published"),
                   comparisons: Sequence[str] = COMPARISONS, k_rounding: str = "round",
                   optimizers: Sequence[str] = OPTIMIZERS, replay: dict[str, Any] | None = None,
                   method_opts: dict[str, dict] | None = None,
                   figure_settings: Iterable[str] = FIGURE_SETTINGS, figures: bool = True,
                   tensorboard: bool = True, overwrite: bool = False, num_threads: int | str | None = "auto",
                   log: Callable[[str], None] | None = None, ckpt_epoch: int | None = None,
                   include_stale: bool = False, block: int = -1) -> dict[str, pd.DataFrame]:
    """Run the FL evaluation of a run directory and return its tables (DataFrames by name: interventions_summary,
    interventions_stats, checkpoint, checkpoint_stats, injected, injected_stats, headline).

    ``methods``: for the interventions, which FL results to use (by method name; default every result on disk);
    for the benchmarks, which methods to run (default every registered method; quick: :data:`QUICK_METHODS`).
    ``quick``: a smoke run (1 random draw, 1 injection seed, only the ``all`` setting in the checkpoint
    benchmark, interventions only on the ``all`` setting).
    ``strengths``: the injected faults' strengths (``vitfl.evaluation.injected_faults.strength_requirement``: 30 changed
    predictions, and the published 0.1 %). ``comparisons``, ``k_rounding``: how the checkpoint benchmark compares
    rankings (``vitfl.evaluation.ranking_metrics``); ``optimizers``: its ground truths ("recorded", and "sgd": an SGD +
    momentum replay of the same epoch, options in ``replay``: ``sgd_lr``, ``momentum``, ``nesterov``, ``verify``).
    ``num_threads``: torch's intra-op threads while this runs (restored after): ``"auto"`` uses 1 thread when the
    cached activations are small (N x d_ff < 4M, e.g. the digits ViT: thousands of tiny ops, where thread
    start-up dominates and a loaded machine makes it 10-40x slower), else leaves the setting alone; ``None``:
    leave it alone.
    ``include_stale``: the interventions also evaluate FL results made from other inputs than the run's current
    model, repair-split cache and settings (by default they are left out, counted in the log and in
    ``interventions_meta.json``), labelled in a ``stale`` column.
    ``block``: the transformer block whose FFN is evaluated (0 the first, -1 the last, the default; module
    docstring): another block than the last writes to ``fl_eval/block=L/`` (:func:`eval_dir`) and needs its token
    cache of ``split`` (``scripts/cache_states.py --block L``) and, for the interventions, FL results made on it
    (``scripts/localize.py --block L``).
    """
    from vitfl.pipeline.context import RunContext

    from vitfl.localization.base import registered_localizers

    log = log or _log_default
    layout = require_store(store, "run_evaluation")
    parts = list(parts)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    methods = list(methods) if methods is not None else None
    registered = registered_localizers()
    bench_methods = methods or ([m for m in QUICK_METHODS if m in registered] if quick else registered)
    missing = [m for m in bench_methods if m not in registered]
    if missing:
        raise ValueError(f"unknown FL methods {missing}; registered: {registered}")
    if k_rounding not in K_ROUNDINGS:
        raise ValueError(f"k_rounding must be one of {K_ROUNDINGS}, got {k_rounding!r}")
    bad = [c for c in comparisons if c not in COMPARISONS]
    if bad or not list(comparisons):
        raise ValueError(f"unknown comparison(s) {bad or list(comparisons)}; choose from {COMPARISONS}")
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or "recorded" not in optimizers:
        raise ValueError(f"optimizers must include 'recorded' and come from {OPTIMIZERS}, got {list(optimizers)}")
    strengths = list(strengths)
    for st in strengths:
        strength_requirement(st)  # a bad strength is an error before any work
    n_random = n_random if n_random is not None else (1 if quick else 2)
    inject_seeds = list(inject_seeds) if inject_seeds is not None else ([0] if quick else [0, 1, 2])
    ckpt_settings = list(ckpt_settings) if ckpt_settings is not None else (["all"] if quick else None)
    settings = list(settings) if settings is not None else (["all"] if quick else None)
    rc = RunContext(layout, None, block)  # the final model and block's head (an index out of range: an error here)
    out = eval_dir(layout, rc.head)
    writer = None
    if tensorboard and figures and (overwrite or not (out / "headline.csv").is_file()) and layout.writes():
        from torch.utils.tensorboard import SummaryWriter  # a rerun that finds every output adds no event file

        writer = SummaryWriter(str(layout.path("tb_run", name=_tb_name(layout, rc.head))))
    ctx = _Ctx(layout, out, log, overwrite, writer, figures, rc=rc)
    results: dict[str, pd.DataFrame] = {}
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    try:
        epoch, head, states = rc.epoch, rc.head, rc.states(split)
        log(f"FL evaluation of {layout.root} (epoch {epoch} model, {split}: {len(states)} inputs"
            + (f"; block {ctx.block}'s FFN, outputs in {layout.rel(out)})" if ctx.block is not None else ")"))
        if num_threads == "auto":
            tokens = states.x.shape[1] if states.x.dim() == 3 else 1
            if len(states) * tokens * head.d_ff < 4_000_000:
                torch.set_num_threads(1)
        elif num_threads is not None:
            torch.set_num_threads(int(num_threads))
        if "interventions" in parts:
            results.update(_interventions(ctx, head, states, _misclf(layout), methods, settings, budgets,
                                          list(modes), where, n_random, seed, batch_size, set(figure_settings),
                                          include_stale))
        if "checkpoint" in parts:
            results.update(_checkpoint(ctx, bench_methods, ckpt_settings, fractions, pos_fraction, split,
                                       batch_size, seed, training_splits, method_opts, ckpt_epoch, comparisons,
                                       k_rounding, optimizers, replay))
        if "injected" in parts:
            results.update(_injected(ctx, head, states, bench_methods, inject_seeds, fractions, batch_size,
                                     strengths, method_opts))
        if ctx.not_applicable:  # counted by the callers (the experiment runner's evaluate_fl row)
            results["not_applicable"] = pd.DataFrame(ctx.not_applicable)
            log(f"FL evaluation: {len(ctx.not_applicable)} cases not applicable (recorded in "
                f"{layout.rel(layout.path('not_applicable'))}, not retried)")
        meta_path = out / "checkpoint_benchmark_meta.json"
        blocks = headline_blocks(results, pos_fraction, read_json(meta_path) if meta_path.is_file() else None)
        head_df = _headline_csv(blocks)
        if len(head_df):
            results["headline"] = head_df
            ctx.write_text(out / "headline.csv", head_df.to_csv(index=False))
            md = blocks_markdown(blocks)
            if ctx.block is not None and out != layout.fl_eval_dir:
                md = f"FL evaluation of transformer block {ctx.block}'s FFN ({layout.rel(out)}/).\n\n" + md
            ctx.write_text(out / "headline.md", md)
            if writer is not None:
                writer.add_text("fl_eval/headline", md)
            log("FL benchmarks against random (headline):\n" + "\n".join(b.sentence for b in blocks))
        log(f"FL evaluation done in {time.perf_counter() - t0:.1f} s; outputs in {out}")
    finally:
        torch.set_num_threads(threads_before)
        if writer is not None:
            writer.close()
    return results
