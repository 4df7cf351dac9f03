"""The FL evaluation step of one run directory: interventions on every FL result in the run store, the checkpoint
benchmark and the injected-fault benchmark, with statistics, figures, TensorBoard and a headline table.

Reads what the earlier steps wrote (through :class:`core.runstore.RunStore`): the checkpoints and last-FFN weight
files, the repair split's state cache, the misclassification settings and the FL results. Every FL score computed
here (the benchmarks run the methods on other models) comes from the one FL runner
(:func:`lightning_modules.fl_runner.localize_with_trainer`). Writes under ``fl_eval/``::

    interventions/{setting}/{result}.csv           per input (``result`` = ``{method}_n{N}-{key}``): prediction and true-class p before / after, for
                                                   the FL result ("fl") and each random draw, per mode (wide)
    interventions/{setting}/{result}.summary.csv   per (method, mode, group): |delta p|, flips, fixed, broken
    interventions/{setting}/{result}.stats.csv     |delta p| vs random: Wilcoxon, Cliff's delta (raw p)
    interventions_summary.csv
    checkpoint/epoch=NNN/{setting}/{method}.json   one checkpoint-benchmark row
    checkpoint_benchmark.csv, checkpoint_benchmark_meta.json
    injected/seed=S/fault.json, injected/seed=S/{method}.json
    injected_benchmark.csv
    stats/{question}.csv|.md|.tex                  one table per question (p raw and Holm, effect sizes)
    figures/*.png|.pdf                             (also in TensorBoard: tb/fl_eval)
    headline.csv|.md

Resumable: an output that exists is read back, not recomputed (``overwrite=True`` recomputes). Every write is
atomic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from evaluation import figures as figs
from evaluation.checkpoint_benchmark import (evaluate_method_on_checkpoint, head_at_epoch, is_circular,
                                             load_ffn_weights, weight_change_ground_truth)
from evaluation.injected_faults import (InjectionError, evaluate_method_on_fault, fault_facts, inject_faults,
                                        loss_gradient)
from evaluation.interventions import (MODES, compare_to_random, records_to_wide, run_interventions,
                                      summarize_interventions, wide_to_records)
from evaluation.ranking_metrics import DEFAULT_FRACTIONS, fraction_label
from evaluation.stats import holm, to_markdown, wilcoxon_holm, write_stats_table
from core.io import provenance, read_json
from core.runstore import RunStore
from core.runstore import identity_key
from lightning_modules.fl_runner import localize_with_trainer, setting_rows
from pipeline.context import load_misclf
from pipeline.localize import fl_results, load_fl_result

__all__ = ["PARTS", "QUICK_METHODS", "run_evaluation", "headline_table"]

PARTS = ("interventions", "checkpoint", "injected")
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

    def figure(self, fig, name: str) -> None:
        from core.style import is_nothing_to_plot

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
def _load_final(layout: RunStore, split: str):
    from lightning_modules.runs import load_run_model
    from localization.cache import load_states
    from localization.ffn import last_ffn_head, model_fingerprint

    model, epoch = load_run_model(layout)
    head = last_ffn_head(model).eval()
    states = load_states(layout.states(split), expected_hash=model_fingerprint(model))
    return model, epoch, head, states


def _misclf(layout: RunStore) -> dict[str, Any]:
    return load_misclf(layout)


def _fl_results(layout: RunStore, methods, settings, budgets) -> list[tuple[str, str, dict]]:
    """(setting, result name, record) of every FL result in the store that passes the filters."""
    out = []
    for rec in fl_results(layout, methods, settings, budgets):
        out.append((rec["setting"], f"{rec['method']}_n{rec['budget']}-{rec['key']}", rec))
    return out


# ------------------------------------------------------------------------------------------------ interventions
def _interventions(ctx: _Ctx, head, states, misclf, methods, settings, budgets, modes, where, n_random, seed,
                   batch_size, figure_settings) -> dict[str, pd.DataFrame]:
    found = _fl_results(ctx.layout, methods, settings, budgets)
    if not found:
        ctx.log("interventions: no FL results found under fl/ (run scripts/localize.py first); skipped")
        return {}
    summaries, stats, neg_records = [], [], []
    t0 = time.perf_counter()
    for i, (setting, stem, rec) in enumerate(found):
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
            "median_diff", "statistic", "p", "p_holm", "cliffs_delta", "magnitude", "note"]
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


def _states_for(layout: RunStore, model, split: str, tag: str, log):
    """States of ``split`` made by ``model``: the untagged cache if it is this model's, else ``{split}.{tag}``
    (made now with one predict pass if missing)."""
    from lightning_modules.runs import cache_states
    from localization.cache import CacheError, load_states, read_metadata
    from localization.ffn import model_fingerprint

    h = model_fingerprint(model)
    for path in (layout.states(split), layout.states(split, tag)):
        try:
            if path.is_file() and read_metadata(path).get("model_hash") == h:
                return load_states(path, expected_hash=h), path
        except CacheError:
            pass
    log(f"checkpoint benchmark: caching {split} states of the {tag} model")
    cache_states(layout, model, [split], tag=tag, trainer_kwargs={"enable_progress_bar": False})
    path = layout.states(split, tag)
    return load_states(path, expected_hash=h), path


def _bench_key(method: str, options, seed: int, states_hash: str, what) -> str:
    """The identity of one benchmark row: the method and all its options, seed, the states and the ground truth."""
    from pipeline.localize import resolved_options

    return identity_key({"method": method, "options": resolved_options(method, options), "seed": seed,
                         "states": states_hash, "what": what})


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


def _checkpoint(ctx: _Ctx, methods, settings, fractions, pos_fraction, split, batch_size, seed,
                training_splits, method_opts, ckpt_epoch: int | None = None) -> dict[str, pd.DataFrame]:
    from lightning_modules.runs import load_classifier
    from localization.ffn import last_ffn_head, model_fingerprint
    from localization.misclf import analyze

    layout = ctx.layout
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
    w_prev, w_next = load_ffn_weights(layout.ffn_weights(e - 1)), load_ffn_weights(layout.ffn_weights(e))
    gt = weight_change_ground_truth(w_prev, w_next, e, pos_fraction)
    model_prev = load_classifier(layout.checkpoint(e - 1))
    head_prev = head_at_epoch(last_ffn_head(model_prev), w_prev, check_tol=1e-5).eval()
    tag = f"epoch={e - 1:03d}"
    states, spath = _states_for(layout, model_prev, split, tag, ctx.log)
    spath_hash = layout.file_hash(spath)
    info = analyze(states.label, states.pred, states.index, num_classes=states.logits.shape[1], split=split)
    names = [s for s in info["settings"] if settings is None or s in settings]
    ctx.log(f"checkpoint benchmark: ground truth |W({e}) - W({e - 1})|, top {fraction_label(pos_fraction)} = "
            f"{gt.info['n_pos']} of {gt.info['total']} weights; FL on the epoch {e - 1} model "
            f"({split}: {len(states)} inputs, accuracy {info['accuracy']:.3f}); settings {names}")
    rows, errors = [], []
    d = ctx.out / "checkpoint" / f"epoch={e:03d}"
    t0 = time.perf_counter()
    todo = [(s, m) for s in names for m in methods]
    for i, (setting, method) in enumerate(todo):
        opts = dict((method_opts or {}).get(method) or {})
        p = d / setting / f"{method}-{_bench_key(method, opts, seed, spath_hash, gt.info)}.json"
        if ctx.done(p):
            rows.append(read_json(p))
            continue
        x, y, is_neg, extra, desc = setting_rows(states, info["settings"][setting], method, seed)
        fl_inputs = {"split": split, "setting": setting, "states": layout.rel(spath),
                     "model_hash": model_fingerprint(model_prev), "i_neg": desc["i_neg"], "i_pos": desc["i_pos"]}
        try:
            row = evaluate_method_on_checkpoint(head_prev, x, y, is_neg, method, gt, fl_inputs, fractions, seed,
                                                batch_size, {**opts, **extra}, localize_with_trainer,
                                                training_splits)
        except Exception as ex:  # recorded, not written: retried on the next run
            errors.append({"setting": setting, "method": method, "error": f"{type(ex).__name__}: {ex}"})
            ctx.log(f"checkpoint benchmark: {method} on {setting} failed: {errors[-1]['error']}")
            continue
        row["setting"] = setting
        ctx.write_json(p, row)
        rows.append(row)
        if (i + 1) % 20 == 0:
            ctx.log(f"checkpoint benchmark: {i + 1}/{len(todo)} ({time.perf_counter() - t0:.1f} s)")
    df = pd.DataFrame(rows)
    if errors:
        df = pd.concat([df, pd.DataFrame(errors)], ignore_index=True)
    if "error" not in df.columns:
        df["error"] = ""
    df["error"] = df["error"].fillna("")
    ctx.write_text(ctx.out / "checkpoint_benchmark.csv", df.to_csv(index=False))
    meta = {"epoch": e, "epoch_prev": e - 1, "ground_truth": {**gt.info, "pos_fraction": pos_fraction,
                                                              "source": [str(layout.ffn_weights(e - 1)),
                                                                         str(layout.ffn_weights(e))]},
            "fl_inputs": {"split": split, "states": str(spath), "n": len(states), "settings": names,
                          "i_neg": "the setting's misclassified inputs of the epoch e-1 model",
                          "i_pos": "all correctly classified inputs of the split"},
            "circular": is_circular(split, training_splits), "training_splits": list(training_splits),
            "circularity_note": "ground truth = the training update of epoch e on the training split; the FL "
                                f"inputs come from {split!r}" + (" (the same data: circular)"
                                                                 if is_circular(split, training_splits) else
                                                                 " (disjoint from training)"),
            "provenance": provenance(model_hash_prev=model_fingerprint(model_prev))}
    ctx.write_json(ctx.out / "checkpoint_benchmark_meta.json", meta)
    lab = fraction_label(pos_fraction)
    st = _vs_expectation(df, ["AP", f"P@{lab}", f"overlap@{lab}", "spearman"], "setting", "checkpoint")
    if len(st):
        write_stats_table(st, ctx.out / "stats" / "checkpoint_vs_random",
                          caption=f"Checkpoint benchmark (epoch {e - 1} -> {e}): each method vs random's exact "
                                  "expectation, paired by setting")
    ok = df[df["error"] == ""]
    ctx.scalars(ok, fractions, "checkpoint", ("P", "R", "overlap"))
    if ctx.figures and len(ok):
        for metric in ("P", "R", "overlap"):
            ctx.figure(figs.ranking_curves(ok, fractions, metric, f"checkpoint benchmark {e - 1}->{e}: {metric}@K "
                                                                  "(mean over settings)"),
                       f"checkpoint_{metric}_at_k")
    return {"checkpoint": df, "checkpoint_stats": st}


# ---------------------------------------------------------------------------------------------- injected faults
def _injected(ctx: _Ctx, head, states, methods, seeds, fractions, batch_size, min_changed_frac, min_changed,
              method_opts) -> dict[str, pd.DataFrame]:
    states_hash = ctx.layout.file_hash(ctx.layout.states("repair"))
    x, label = states.x, states.label
    grad = None
    rows = []
    t0 = time.perf_counter()
    for si, seed in enumerate(seeds):
        d = ctx.out / "injected" / f"seed={seed}"
        name = {m: f"{m}-{_bench_key(m, (method_opts or {}).get(m) or {}, seed, states_hash, {'injected': 1})}.json"
                for m in methods}
        todo = [m for m in methods if not ctx.done(d / name[m])]
        rows.extend(read_json(d / name[m]) for m in methods if m not in todo)
        if not todo:
            continue
        if grad is None:
            grad = loss_gradient(head, x, label, batch_size=max(1024, batch_size))
        try:
            fault = inject_faults(head, x, label, seed, min_changed_frac, min_changed, grad=grad)
        except InjectionError as ex:
            ctx.log(f"injected faults: seed {seed}: {ex}")
            rows.append({"seed": seed, "method": "", "error": f"InjectionError: {ex}"})
            continue
        ctx.write_json(d / "fault.json", {**fault_facts(fault, head), **fault.info,
                                             "original": fault.original.tolist(), "values": fault.values.tolist(),
                                             "changed": torch.nonzero(fault.changed).view(-1).tolist()})
        ctx.log(f"injected faults: seed {seed}: {len(fault.weights)} weights perturbed, {fault.n_changed} of "
                f"{len(x)} predictions changed")
        for method in todo:
            try:
                row = evaluate_method_on_fault(fault, head, x, label, method, fractions, batch_size,
                                               (method_opts or {}).get(method), localize_with_trainer)
            except Exception as ex:
                ctx.log(f"injected faults: {method} on seed {seed} failed: {type(ex).__name__}: {ex}")
                rows.append({**fault_facts(fault, head), "method": method, "error": f"{type(ex).__name__}: {ex}"})
                continue
            ctx.write_json(d / name[method], row)
            rows.append(row)
        ctx.log(f"injected faults: seed {seed} done ({si + 1}/{len(seeds)}, {time.perf_counter() - t0:.1f} s)")
    df = pd.DataFrame(rows)
    if "error" not in df.columns:
        df["error"] = ""
    df["error"] = df["error"].fillna("")
    ctx.write_text(ctx.out / "injected_benchmark.csv", df.to_csv(index=False))
    st = _vs_expectation(df, ["AP", "R_precision", "R@1%", "R@5%"], "seed", "injected faults")
    if len(st):
        write_stats_table(st, ctx.out / "stats" / "injected_vs_random",
                          caption="Injected-fault benchmark: each method vs random's exact expectation, paired by "
                                  "seed")
    ok = df[df["error"] == ""]
    ctx.scalars(ok, fractions, "injected", ("P", "R"))
    if ctx.figures and len(ok):
        ctx.figure(figs.ranking_curves(ok, fractions, "R", "injected faults: R@K (mean over seeds)"),
                   "injected_R_at_k")
    return {"injected": df, "injected_stats": st}


# ----------------------------------------------------------------------------------------------------- headline
def headline_table(results: dict[str, pd.DataFrame], pos_fraction: float = 0.01) -> pd.DataFrame:
    """Per method: P@1% (and AP) on the checkpoint benchmark (mean over settings) and on the injected-fault
    benchmark (mean over seeds, with R@1%), each beside random's exact expectation."""
    lab = fraction_label(pos_fraction)
    parts = []
    for key, name, extra in (("checkpoint", "ckpt", []), ("injected", "inj", [f"R@{lab}"])):
        df = results.get(key)
        if df is None or not len(df) or f"P@{lab}" not in df.columns:
            continue
        ok = df[df["error"].fillna("") == ""]
        cols = [f"P@{lab}", f"rand_P@{lab}", *extra, *[f"rand_{c}" for c in extra], "AP", "rand_AP"]
        g = ok.groupby("method", sort=False)[cols].mean()
        g.columns = [f"{name}_{c}" for c in cols]
        g[f"{name}_n"] = ok.groupby("method", sort=False).size()
        parts.append(g)
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, axis=1).reset_index().rename(columns={"index": "method"})


# ---------------------------------------------------------------------------------------------------------- main
def run_evaluation(run_dir: str | Path, methods: Iterable[str] | None = None, quick: bool = False,
                   parts: Iterable[str] = PARTS, settings: Iterable[str] | None = None,
                   budgets: Iterable[int | str] | None = None, modes: Iterable[str] = MODES, where: str = "post",
                   n_random: int | None = None, inject_seeds: Iterable[int] | None = None,
                   ckpt_settings: Iterable[str] | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   pos_fraction: float = 0.01, split: str = "repair", batch_size: int = 512, seed: int = 0,
                   training_splits: Sequence[str] = ("train",), min_changed_frac: float = 0.001,
                   min_changed: int = 2, method_opts: dict[str, dict] | None = None,
                   figure_settings: Iterable[str] = FIGURE_SETTINGS, figures: bool = True,
                   tensorboard: bool = True, overwrite: bool = False, num_threads: int | str | None = "auto",
                   log: Callable[[str], None] | None = None, ckpt_epoch: int | None = None
                   ) -> dict[str, pd.DataFrame]:
    """Run the FL evaluation of a run directory and return its tables (DataFrames by name: interventions_summary,
    interventions_stats, checkpoint, checkpoint_stats, injected, injected_stats, headline).

    ``methods``: for the interventions, which FL results to use (by method name; default every result on disk);
    for the benchmarks, which methods to run (default every registered method; quick: :data:`QUICK_METHODS`).
    ``quick``: a smoke run (1 random draw, 1 injection seed, only the ``all`` setting in the checkpoint
    benchmark, interventions only on the ``all`` setting).
    ``num_threads``: torch's intra-op threads while this runs (restored after): ``"auto"`` uses 1 thread when the
    cached activations are small (N x d_ff < 4M, e.g. the digits ViT: thousands of tiny ops, where thread
    start-up dominates and a loaded machine makes it 10-40x slower), else leaves the setting alone; ``None``:
    leave it alone.
    """
    from localization.base import registered_localizers

    log = log or _log_default
    layout = run_dir if isinstance(run_dir, RunStore) else RunStore(run_dir)
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
    n_random = n_random if n_random is not None else (1 if quick else 2)
    inject_seeds = list(inject_seeds) if inject_seeds is not None else ([0] if quick else [0, 1, 2])
    ckpt_settings = list(ckpt_settings) if ckpt_settings is not None else (["all"] if quick else None)
    settings = list(settings) if settings is not None else (["all"] if quick else None)
    out = layout.fl_eval_dir
    writer = None
    if tensorboard and figures and (overwrite or not (out / "headline.csv").is_file()) and layout.writes():
        from torch.utils.tensorboard import SummaryWriter  # a rerun that finds every output adds no event file

        writer = SummaryWriter(str(layout.tensorboard / "fl_eval"))
    ctx = _Ctx(layout, out, log, overwrite, writer, figures)
    results: dict[str, pd.DataFrame] = {}
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    try:
        _, epoch, head, states = _load_final(layout, split)
        log(f"FL evaluation of {layout.root} (epoch {epoch} model, {split}: {len(states)} inputs)")
        if num_threads == "auto":
            if len(states) * head.d_ff < 4_000_000:
                torch.set_num_threads(1)
        elif num_threads is not None:
            torch.set_num_threads(int(num_threads))
        if "interventions" in parts:
            results.update(_interventions(ctx, head, states, _misclf(layout), methods, settings, budgets,
                                          list(modes), where, n_random, seed, batch_size, set(figure_settings)))
        if "checkpoint" in parts:
            results.update(_checkpoint(ctx, bench_methods, ckpt_settings, fractions, pos_fraction, split,
                                       batch_size, seed, training_splits, method_opts, ckpt_epoch))
        if "injected" in parts:
            results.update(_injected(ctx, head, states, bench_methods, inject_seeds, fractions, batch_size,
                                     min_changed_frac, min_changed, method_opts))
        head_df = headline_table(results, pos_fraction)
        if len(head_df):
            results["headline"] = head_df
            ctx.write_text(out / "headline.csv", head_df.to_csv(index=False))
            md = to_markdown(head_df)
            ctx.write_text(out / "headline.md", md)
            if writer is not None:
                writer.add_text("fl_eval/headline", md)
            log(f"FL benchmarks, P@{fraction_label(pos_fraction)} against random's exact expectation:\n{md}")
        log(f"FL evaluation done in {time.perf_counter() - t0:.1f} s; outputs in {out}")
    finally:
        torch.set_num_threads(threads_before)
        if writer is not None:
            writer.close()
    return results
