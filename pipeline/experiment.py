"""The experiment runner: one published experiment (a YAML under ``configs/experiment/``) from training to tables,
calling the step functions of :mod:`pipeline` in data-flow order.

An experiment config names its data sets (one run directory each, with how to train it), the steps to run and the
options of each step (the step functions' own keyword names). Every step skips what the run store already holds,
so a rerun resumes where the last one stopped and a finished experiment reruns in seconds. A case that cannot run
(e.g. a V-score method on a setting with one input) is recorded once in the store as "not applicable"
(:meth:`vitfl.core.runstore.RunStore.mark_not_applicable`); later runs count it and do not print it again.

Phases and sharding (``shard=(k, n)``; ``scripts/run_experiment.py --shard k/n``):

==============  =============================================  ==========================================
phase           steps                                          with ``n > 1`` shards
==============  =============================================  ==========================================
prepare         ``train``, ``cache``, ``testbed``, ``misclf``  not sharded: run them first
work            ``localize``, ``repair``, ``adequacy``         shard k runs every n-th task of a fixed order
final           ``evaluate_fl``, ``crossval``, ``aggregate``,  not sharded: run once every shard is done
                ``coverage``
==============  =============================================  ==========================================

A layer study: a top-level ``blocks: [0, 1, -1]`` (a list of ints: transformer blocks, 0 the first, -1 the last)
runs the per-block steps (``cache``, ``localize``, ``evaluate_fl``, ``repair``, ``crossval``) once per block,
passing ``block=`` to each step function (-1: the last block, today's files and identities), and the ``aggregate``
step adds the per-block table (:func:`block_table`: RR / BR and repairability@N per data set, block and FL method,
``repair/summary/<name>_<variant>/by_block.{csv,md}`` and ``rr_by_block.png|pdf``). Without ``blocks`` every step
runs as before (``cache.block`` / ``localize.block`` still name one block for FL alone).

``train`` fits (optionally after pretraining and exporting a backbone) and tests (:mod:`vitfl.pipeline.train`);
``testbed`` writes the layer study and checkpoint diagnostics (:mod:`vitfl.pipeline.testbed`); ``crossval`` is the
cross-validated repair (:func:`vitfl.pipeline.crossval.step_crossval`); ``coverage`` the coverage table, clean vs
adversarial (:func:`vitfl.pipeline.adequacy.step_coverage`). The main job is the experiment
``configs/experiment/main_job_mnist.yaml``.

With one shard (the default) every step of ``steps`` runs in order. A shard never waits for another: the grid of
every step is deterministic, so n processes on n GPUs or nodes split it with no coordination, and a crashed shard
rerun finishes exactly what is missing.

Nothing here reads argv or picks an output folder; the config does (``datasets.<name>.run_dir``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from vitfl.core.quiet import quiet  # the one list of known warnings (``quiet``: part of this module's API)
from vitfl.core.runstore import RunStore

__all__ = ["STEPS", "PHASES", "BLOCK_STEPS", "ExperimentConfigError", "quiet", "check_experiment", "check_fl_options",
           "run_experiment", "experiment_results", "experiment_blocks", "block_table", "block_markdown",
           "write_block_summary", "step_options", "summarize_rows"]

STEPS = ("train", "cache", "testbed", "misclf", "localize", "evaluate_fl", "repair", "adequacy", "crossval",
         "aggregate", "coverage")
PHASES = {"prepare": ("train", "cache", "testbed", "misclf"), "work": ("localize", "repair", "adequacy"),
          "final": ("evaluate_fl", "crossval", "aggregate", "coverage")}
SHARDED = PHASES["work"]
#: the steps a top-level ``blocks`` list runs once per transformer block (each gets ``block=``)
BLOCK_STEPS = ("cache", "localize", "evaluate_fl", "repair", "crossval")

#: the keys of each step's block (the step function's keyword names; ``accelerator`` / ``devices`` go to its Trainer)
STEP_KEYS = {
    "cache": {"splits", "block", "accelerator", "devices"},
    "misclf": {"split", "ranks", "seed", "pos_fraction", "tie_order", "no_true_input", "kinds"},
    "localize": {"methods", "settings", "budgets", "seed", "batch_size", "method_options", "block", "token_statistic",
                 "accelerator", "devices"},
    "evaluate_fl": {"parts", "methods", "settings", "budgets", "modes", "where", "n_random", "inject_seeds",
                    "ckpt_settings", "ckpt_epoch", "pos_fraction", "split", "batch_size", "seed", "method_opts",
                    "figures", "tensorboard", "strengths", "comparisons", "k_rounding", "optimizers", "replay",
                    "include_stale", "quick"},
    "repair": {"sweeps", "fl_batch_size", "accelerator", "tensorboard", "on_error", "workers"},
    "sweep": {"name", "repair", "methods", "settings", "budgets", "reps", "seed", "repair_options", "fl_options"},
    "adequacy": {"rqs", "configs", "overrides", "use_run_checkpoint"},
    "dataset": {"run_dir", "train", "adequacy"},
    "train": {"configs", "args", "epochs", "test", "pretrain"},
    "pretrain": {"configs", "args", "epochs"},
    "testbed": set(),
    "crossval": {"methods", "settings", "budgets", "reps", "repairs", "workers"},
    "coverage": {"quick", "attack", "n_train", "n_clean", "batch_size"},
}


class ExperimentConfigError(ValueError):
    """An experiment config names an unknown step, option, method or value."""


#: the shape of every value of an experiment config (null is always allowed: the step function's default), checked
#: before anything else so that ``budgets: 9`` or ``methods: random`` is an error naming the key and the type, not a
#: TypeError from deep inside a step
_STR, _INT, _NUM, _BOOL, _MAP = "a string", "an int", "a number", "true or false", "a mapping"
_LSTR, _LINT, _LBUDGET, _LANY = "a list of strings", "a list of ints", "a list of budgets (ints, avg, front)", "a list"
_DEVICES = "an int, 'auto' or a list of device ids"
_WORKERS = "an int or 'auto'"
SHAPES: dict[str, dict[str, str]] = {
    "": {"name": _STR, "description": _STR, "variant": _STR, "compat": _LSTR, "datasets": _MAP, "steps": _LSTR,
         "blocks": _LINT},
    "dataset": {"run_dir": _STR, "train": _MAP, "adequacy": _MAP},
    "train": {"configs": _LSTR, "args": _LANY, "epochs": _INT, "test": _BOOL, "pretrain": _MAP},
    "pretrain": {"configs": _LSTR, "args": _LANY, "epochs": _INT},
    "cache": {"splits": _LSTR, "block": _INT, "accelerator": _STR, "devices": _DEVICES},
    "misclf": {"split": _STR, "ranks": _INT, "seed": _INT, "pos_fraction": _NUM, "tie_order": _STR,
               "no_true_input": _STR, "kinds": _LSTR},
    "localize": {"methods": _LSTR, "settings": _LSTR, "budgets": _LBUDGET, "seed": _INT, "batch_size": _INT,
                 "method_options": "a mapping of FL method -> its options", "block": _INT, "token_statistic": _STR,
                 "accelerator": _STR, "devices": _DEVICES},
    "evaluate_fl": {"parts": _LSTR, "methods": _LSTR, "settings": _LSTR, "budgets": _LBUDGET, "modes": _LSTR,
                    "where": _STR, "n_random": _INT, "inject_seeds": _LINT, "ckpt_settings": _LSTR, "ckpt_epoch": _INT,
                    "pos_fraction": _NUM, "split": _STR, "batch_size": _INT, "seed": _INT,
                    "method_opts": "a mapping of FL method -> its options", "figures": _BOOL, "tensorboard": _BOOL,
                    "strengths": "a list of strengths (ints, numbers or 'published')", "comparisons": _LSTR,
                    "k_rounding": _STR, "optimizers": _LSTR, "replay": _MAP, "include_stale": _BOOL, "quick": _BOOL},
    "repair": {"sweeps": "a list of sweep mappings", "fl_batch_size": _INT, "accelerator": _STR,
               "tensorboard": _BOOL, "on_error": _STR, "workers": _WORKERS},
    "sweep": {"name": _STR, "repair": _STR, "methods": _LSTR, "settings": _LSTR, "budgets": _LBUDGET,
              "reps": "an int or a list of ints", "seed": _INT, "repair_options": _MAP,
              "fl_options": "a mapping of FL method -> its options"},
    "adequacy": {"rqs": _LSTR, "configs": _LSTR, "overrides": _MAP, "use_run_checkpoint": _BOOL},
    "testbed": {},
    "crossval": {"methods": _LSTR, "settings": _LSTR, "budgets": _LBUDGET, "reps": _INT,
                 "repairs": "a list of {repair, repair_options, logger} mappings", "workers": _WORKERS},
    "coverage": {"quick": _BOOL, "attack": _STR, "n_train": _INT, "n_clean": _INT, "batch_size": _INT},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fits(value: Any, shape: str) -> bool:
    from collections.abc import Mapping as _M

    if shape == _STR:
        return isinstance(value, str)
    if shape == _INT:
        return _is_int(value)
    if shape == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if shape == _BOOL:
        return isinstance(value, bool)
    if shape == _LSTR:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if shape == _LINT:
        return isinstance(value, list) and all(_is_int(v) for v in value)
    if shape == _LBUDGET:
        return isinstance(value, list) and all(_is_int(v) or isinstance(v, str) for v in value)
    if shape.startswith("a list"):
        return isinstance(value, list) and (not shape.startswith(("a list of sweep", "a list of {"))
                                            or all(isinstance(v, _M) for v in value))
    if shape == _WORKERS:
        return _is_int(value) or value == "auto"
    if shape == _DEVICES:
        return _is_int(value) or isinstance(value, (str, list))
    if shape == "an int or a list of ints":
        return _is_int(value) or (isinstance(value, list) and all(_is_int(v) for v in value))
    if shape == "a mapping of FL method -> its options":
        return isinstance(value, _M) and all(isinstance(o, _M) or o is None for o in value.values())
    return isinstance(value, _M)  # _MAP


def check_shapes(block: Any, kind: str, where: str) -> None:
    """Every value of ``block`` (a step's options, a data set, a sweep) of its expected shape (:data:`SHAPES`);
    :class:`ExperimentConfigError` naming the key, the expected type and the value otherwise."""
    from collections.abc import Mapping as _M

    if block is None:
        return
    if not isinstance(block, _M):
        raise ExperimentConfigError(f"{where or 'the config'} must be a mapping, got {type(block).__name__} "
                                    f"{block!r}")
    for key, shape in SHAPES[kind].items():
        value = block.get(key)
        if value is not None and not _fits(value, shape):
            hint = f" (e.g. {key}: [{value}])" if shape.startswith("a list") and not isinstance(value, list) else ""
            raise ExperimentConfigError(f"{(where + '.') if where else ''}{key} must be {shape}, got "
                                        f"{type(value).__name__} {value!r}{hint}")


# ------------------------------------------------------------------------------------------------ checking
def _unknown(block: Mapping[str, Any] | None, allowed: set[str], where: str) -> None:
    bad = sorted(set(block or {}) - allowed)
    if bad:
        raise ExperimentConfigError(f"{where}: unknown option(s) {bad}; expected some of {sorted(allowed)}")


def step_options(cfg: Mapping[str, Any], step: str) -> dict[str, Any]:
    """The block of ``step`` without null values (null = the step function's default)."""
    return {k: v for k, v in dict(cfg.get(step) or {}).items() if v is not None}


def _expand_steps(steps: Iterable[str]) -> list[str]:
    out: list[str] = []
    for s in steps:
        if s in PHASES:
            out += PHASES[s]
        elif s in STEPS:
            out.append(s)
        else:
            raise ExperimentConfigError(f"unknown step {s!r}; steps: {list(STEPS)}, phases: {list(PHASES)}")
    return [s for s in STEPS if s in out]  # data-flow order, once each


def _check_budgets(budgets, where: str) -> None:
    from vitfl.localization.ranking import BudgetError
    from vitfl.pipeline.localize import check_budgets

    if budgets is None:
        return
    try:
        check_budgets(budgets)
    except BudgetError as e:
        raise ExperimentConfigError(f"{where}: {e}") from None


def check_fl_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """An FL method's options checked by the one options rule (:meth:`vitfl.core.registry.Registry.check_options`, as
    the API's ``vitfl.pipeline.localize.resolved_options``): its constructor's own keyword options (not what it passes on
    with ``**kwargs``), of their types and declared ranges; returns them normalised. Raises
    :class:`vitfl.core.registry.OptionError` (a ValueError) naming the method and the option."""
    from vitfl.localization.base import FL_METHODS

    FL_METHODS.check([method])
    return FL_METHODS.check_options(method, options)


def check_experiment(cfg: Mapping[str, Any]) -> list[str]:
    """Check every name in an experiment config before any work: steps, step options, FL methods and their
    options, repair methods and their options, misclassification options, budgets, shards. Returns the steps to
    run (in data-flow order); raises :class:`ExperimentConfigError` naming what is wrong."""
    from vitfl.lightning_modules.repair import REPAIRS
    from vitfl.localization.base import FL_METHODS
    from vitfl.localization.misclf import ALL_KINDS, NO_TRUE_INPUT_RULES, TIE_ORDERS
    from vitfl.pipeline.localize import resolved_options
    from vitfl.pipeline.repair import resolved_repair_options

    check_shapes(cfg, "", "")
    if not cfg.get("name"):
        raise ExperimentConfigError("the experiment has no name")
    if cfg.get("variant") not in ("published", "corrected"):
        raise ExperimentConfigError(f"variant must be 'published' or 'corrected', got {cfg.get('variant')!r}")
    for entry in cfg.get("compat") or []:
        key, sep, _ = str(entry).partition("=")
        node: Any = cfg
        for part in key.split("."):
            if isinstance(node, list):  # repair.sweeps.<sweep name>
                node = next((x for x in node if isinstance(x, Mapping) and x.get("name") == part), None)
            else:
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                break
        if not sep or node is None:
            raise ExperimentConfigError(f"compat entry {entry!r}: expected 'step.option=value' naming an option "
                                        "the config sets")
    datasets = cfg.get("datasets") or {}
    if not datasets:
        raise ExperimentConfigError("no datasets: give datasets.<name>.run_dir")
    for name, d in datasets.items():
        check_shapes(d, "dataset", f"datasets.{name}")
        check_shapes((d or {}).get("train"), "train", f"datasets.{name}.train")
        _unknown(d, STEP_KEYS["dataset"], f"datasets.{name}")
        if not (d or {}).get("run_dir"):
            raise ExperimentConfigError(f"datasets.{name}: no run_dir")
        if (d or {}).get("train"):
            _unknown(d["train"], STEP_KEYS["train"], f"datasets.{name}.train")
            blocks = [(d["train"], f"datasets.{name}.train")]
            if d["train"].get("pretrain"):
                check_shapes(d["train"]["pretrain"], "pretrain", f"datasets.{name}.train.pretrain")
                _unknown(d["train"]["pretrain"], STEP_KEYS["pretrain"], f"datasets.{name}.train.pretrain")
                blocks.append((d["train"]["pretrain"], f"datasets.{name}.train.pretrain"))
            for block, where in blocks:
                ep = block.get("epochs")
                if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
                    raise ExperimentConfigError(f"{where}.epochs must be an int >= 1, got {ep!r}")
    steps = _expand_steps(cfg.get("steps") or STEPS)

    def fl_methods(names, where):
        try:
            return FL_METHODS.check(list(names))
        except KeyError as e:
            raise ExperimentConfigError(f"{where}: {e}") from None

    def fl_options(opts, where):
        for m, o in dict(opts or {}).items():
            fl_methods([m], where)
            try:
                check_fl_options(m, o)
                resolved_options(m, o)
            except ValueError as e:
                raise ExperimentConfigError(f"{where}: {e}") from None

    for step in ("cache", "misclf", "localize", "evaluate_fl", "repair", "adequacy", "crossval", "coverage"):
        check_shapes(cfg.get(step), step, step)
        _unknown(cfg.get(step), STEP_KEYS[step], step)
    for i, sw in enumerate((cfg.get("repair") or {}).get("sweeps") or []):
        check_shapes(sw, "sweep", f"repair.sweeps[{i}]")
    m = step_options(cfg, "misclf")
    for key, choices in (("tie_order", TIE_ORDERS), ("no_true_input", NO_TRUE_INPUT_RULES)):
        if key in m and m[key] not in choices:
            raise ExperimentConfigError(f"misclf.{key}: {m[key]!r} is not one of {list(choices)}")
    bad_kinds = [k for k in m.get("kinds", ()) if k not in ALL_KINDS]
    if bad_kinds:
        raise ExperimentConfigError(f"misclf.kinds: unknown kind(s) {bad_kinds}; expected some of {list(ALL_KINDS)}")
    blocks = cfg.get("blocks")
    if blocks is not None:
        if not blocks:
            raise ExperimentConfigError("blocks must be a non-empty list of ints (transformer blocks, 0 the first, -1 "
                                        "the last), got []; leave it out for the last block alone")
        dup = sorted({b for b in blocks if blocks.count(b) > 1})
        if dup:
            raise ExperimentConfigError(f"blocks: {dup} given more than once in {blocks}")
        both = [f"{st}.block" for st in ("cache", "localize") if step_options(cfg, st).get("block") is not None]
        if both:
            raise ExperimentConfigError(f"give either blocks (every per-block step: {', '.join(BLOCK_STEPS)}) or "
                                        f"{' / '.join(both)} (one block, FL alone), not both")
    loc = step_options(cfg, "localize")
    stat = loc.get("token_statistic")
    if stat is not None:
        from vitfl.localization.ffn import TOKEN_STATISTICS

        if stat not in TOKEN_STATISTICS:
            raise ExperimentConfigError(f"localize.token_statistic: {stat!r} is not one of {list(TOKEN_STATISTICS)}")
        later = [st for st in ("evaluate_fl", "repair", "crossval") if st in steps]
        if stat != "readout" and later:
            raise ExperimentConfigError(
                f"localize.token_statistic={stat!r} with steps {later}: those steps build the head with the default "
                "statistic ('readout') and would not find FL results made with another; run the FL-only study "
                "in a config of its own (steps up to localize)")
    if "methods" in loc:
        fl_methods(loc["methods"], "localize.methods")
    fl_options(loc.get("method_options"), "localize.method_options")
    _check_budgets(loc.get("budgets"), "localize.budgets")
    ev = step_options(cfg, "evaluate_fl")
    if "methods" in ev:
        fl_methods(ev["methods"], "evaluate_fl.methods")
    fl_options(ev.get("method_opts"), "evaluate_fl.method_opts")
    from vitfl.pipeline.evaluate_fl import PARTS

    bad_parts = [p for p in ev.get("parts", ()) if p not in PARTS]
    if bad_parts:
        raise ExperimentConfigError(f"evaluate_fl.parts: unknown part(s) {bad_parts}; expected some of {list(PARTS)}")
    rep = step_options(cfg, "repair")
    for i, sw in enumerate(rep.get("sweeps") or []):
        where = f"repair.sweeps[{i}]"
        _unknown(sw, STEP_KEYS["sweep"], where)
        fl_methods(sw.get("methods") or [], f"{where}.methods")
        try:
            REPAIRS.check([sw.get("repair", "de")])
            resolved_repair_options(sw.get("repair", "de"), sw.get("repair_options"))
        except (KeyError, ValueError) as e:
            raise ExperimentConfigError(f"{where}: {e}") from None
        fl_options(sw.get("fl_options"), f"{where}.fl_options")
        _check_budgets(sw.get("budgets"), f"{where}.budgets")
        reps = sw.get("reps", 5)
        if isinstance(reps, int) and reps < 1:
            raise ExperimentConfigError(f"{where}.reps must be >= 1, got {reps}")
    cv = step_options(cfg, "crossval")
    if "methods" in cv:
        fl_methods(cv["methods"], "crossval.methods")
    _check_budgets(cv.get("budgets"), "crossval.budgets")
    for i, r in enumerate(cv.get("repairs") or []):
        where = f"crossval.repairs[{i}]"
        _unknown(r, {"repair", "repair_options", "logger"}, where)
        try:
            REPAIRS.check([r.get("repair", "de")])
            resolved_repair_options(r.get("repair", "de"), r.get("repair_options"))
        except (KeyError, ValueError) as e:
            raise ExperimentConfigError(f"{where}: {e}") from None
    ad = step_options(cfg, "adequacy")
    from vitfl.pipeline.adequacy import RQS

    bad_rqs = [r for r in ad.get("rqs", ()) if r not in RQS]
    if bad_rqs:
        raise ExperimentConfigError(f"adequacy.rqs: unknown {bad_rqs}; expected some of {list(RQS)}")
    return steps


# ------------------------------------------------------------------------------------------------ summaries
def _status(row: Mapping[str, Any]) -> str:
    s = str(row.get("status", ""))
    if s.startswith(("exists", "claimed elsewhere")):
        return "skipped"
    if s.startswith("not applicable"):
        return "not applicable"
    if s.startswith("error"):
        return "error"
    return "done"


def summarize_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Counts of done / skipped (already in the store) / not applicable / error rows of a step."""
    out = {"done": 0, "skipped": 0, "not applicable": 0, "error": 0}
    for r in rows:
        out[_status(r)] += 1
    return out


class _Log:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.summary: list[dict[str, Any]] = []

    def step(self, step: str, dataset: str, counts: Mapping[str, int], seconds: float, new_na: Mapping[str, str],
             errors: Sequence[str] = ()) -> None:
        known_na = counts.get("not applicable", 0) - len(new_na)
        parts = [f"{counts.get('done', 0)} done", f"{counts.get('skipped', 0)} skipped (in the store)"]
        if counts.get("not applicable"):
            parts.append(f"{counts['not applicable']} not applicable"
                         + (f" ({known_na} known)" if known_na > 0 and new_na else ""))
        if counts.get("error"):
            parts.append(f"{counts['error']} failed")
        self.log(f"{step} [{dataset}]: " + ", ".join(parts) + f" ({seconds:.1f} s)")
        groups: dict[str, int] = {}
        for why in new_na.values():  # repair runs share their FL case's reason: one line per reason
            reason = why.split("): ", 1)[1] if why.startswith("repair ") and "): " in why else why
            groups[reason] = groups.get(reason, 0) + 1
        for reason, k in groups.items():
            self.log(f"  not applicable (recorded, not retried){f' x{k}' if k > 1 else ''}: {reason}")
        for e in errors[:10]:
            self.log(f"  failed: {e}")
        if len(errors) > 10:
            self.log(f"  ... and {len(errors) - 10} more failures")
        self.summary.append({"step": step, "dataset": dataset, **dict(counts), "seconds": round(seconds, 2),
                             "new_not_applicable": len(new_na)})


def _na_diff(store: RunStore, before: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in store.not_applicable().items() if k not in before}


# ------------------------------------------------------------------------------------------------ the steps
def _trainer_kwargs(block: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False}
    if block.get("accelerator"):
        kw["accelerator"] = block["accelerator"]
    if block.get("devices"):
        kw["devices"] = block["devices"]
        if isinstance(block["devices"], int) and block["devices"] > 1:
            kw["strategy"] = "ddp"
    return kw


def _cache(store: RunStore, opts: Mapping[str, Any], blocks: Sequence[int] | None = None) -> dict[str, int]:
    """The last block's cache (the CLS cache of a CLS-pooled model: misclf and the rest read it), and the token cache
    of every other block named: ``blocks`` (a layer study), else ``cache.block``."""
    from vitfl.pipeline.cache import step_cache

    splits = list(opts.get("splits", ("repair", "test")))
    out = step_cache(store, splits, trainer_kwargs=_trainer_kwargs(opts))  # the CLS cache: misclf and the rest
    others = [b for b in (blocks if blocks is not None else [opts.get("block", -1)]) if b != -1]
    for b in others:  # and the token cache of each other block (`blocks`, or the one `cache.block` names)
        more = step_cache(store, splits, trainer_kwargs=_trainer_kwargs(opts), block=b)
        out = {k: out[k] + more[k] for k in out}
    return out


def experiment_blocks(cfg: Mapping[str, Any]) -> list[int] | None:
    """The transformer blocks of a layer study (the config's top-level ``blocks``), or None: the config names none,
    and every step runs once, as before ``blocks`` existed (no ``block=`` passed to the step functions)."""
    blocks = cfg.get("blocks")
    return None if blocks is None else [int(b) for b in blocks]


def _label(step: str, block: int | None) -> str:
    """A step's name in the log and the summary: ``localize (block 0)`` in a layer study, else the step."""
    return step if block is None else f"{step} (block {block})"


def _misclf(store: RunStore, opts: Mapping[str, Any]) -> dict[str, int]:
    from vitfl.pipeline.misclf import ensure_misclf

    return ensure_misclf(store, **opts)


def _localize(stores: Mapping[str, RunStore], opts: Mapping[str, Any], shard: tuple[int, int], log: _Log,
              block: int | None = None) -> None:
    from vitfl.localization.base import FL_METHODS
    from vitfl.pipeline.context import load_misclf
    from vitfl.pipeline.localize import run_localization, status_table

    kw = {k: v for k, v in opts.items() if k not in ("accelerator", "devices")}
    if block is not None:  # a layer study: this block (check_experiment refuses localize.block beside blocks)
        kw["block"] = block
    methods = FL_METHODS.check(kw.pop("methods", None) or FL_METHODS.names())
    k, n = shard
    for name, store in stores.items():
        t0 = time.perf_counter()
        before = store.not_applicable()
        info = load_misclf(store)
        avail, skipped = info["settings"], info.get("skipped", {})
        wanted = list(kw.get("settings") or avail)
        unknown = [s for s in wanted if s not in avail and s not in skipped]
        if unknown:
            raise ExperimentConfigError(f"localize.settings: {unknown} are neither made nor skipped by the "
                                        f"misclassification analysis of {store.root}; available: {sorted(avail)}")
        rows: list[dict[str, Any]] = []
        for s in wanted:  # a setting the analysis could not build: not applicable for every method, recorded once
            if s not in avail:
                store.mark_not_applicable(f"misclf/{s}", f"setting {s}: {skipped[s]}")
                rows += [{"method": m, "setting": s, "status": f"not applicable: {skipped[s]}"} for m in methods]
        settings = [s for s in wanted if s in avail]
        pairs = [(m, s) for m in methods for s in settings][k::n]
        for m in dict.fromkeys(m for m, _ in pairs):
            if not settings:
                break
            rows += run_localization(store, methods=[m], trainer_kwargs=_trainer_kwargs(opts), progress=True,
                                     **{**kw, "settings": [s for mm, s in pairs if mm == m]})
        errors = [f"{r['method']} on {r['setting']}: {r['status']}" for r in rows if _status(r) == "error"]
        log.step(_label("localize", block), name, summarize_rows(rows), time.perf_counter() - t0,
                 _na_diff(store, before), errors)
        if rows:
            log.log(status_table(rows))


def _evaluate(store: RunStore, name: str, opts: Mapping[str, Any], log: _Log, block: int | None = None) -> None:
    from vitfl.pipeline.evaluate_fl import run_evaluation

    kw = dict(opts)
    if block is not None:
        kw["block"] = block
    want_epoch = kw.pop("ckpt_epoch", None)
    if want_epoch is not None:  # the checkpoint benchmark's epoch pair is a config value, checked before work
        eps = store.ffn_weight_epochs()
        if want_epoch not in eps or want_epoch - 1 not in eps or not store.checkpoint(want_epoch - 1).is_file():
            raise ExperimentConfigError(
                f"evaluate_fl.ckpt_epoch={want_epoch}: the run needs the last-FFN weights of epochs {want_epoch - 1} "
                f"and {want_epoch} and the epoch {want_epoch - 1} checkpoint; it has weights for epochs {eps}")
        kw["ckpt_epoch"] = want_epoch
    t0 = time.perf_counter()
    messages: list[str] = []
    before = store.not_applicable()
    res = run_evaluation(store, log=messages.append, **kw)
    failed = [m for m in messages if "failed" in m and "not applicable" not in m]
    na = len(res.get("not_applicable", ()))  # cases that cannot run (recorded, new and known): counted, not failed
    log.step(_label("evaluate_fl", block), name, {"done": 1, "not applicable": na, "error": len(failed)},
             time.perf_counter() - t0, _na_diff(store, before), failed)


def _sweep_rows_na(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> None:
    """Record repair tasks that cannot run (their setting was not made, or FL could not run) once in the store."""
    for r in rows:
        if _status(r) == "not applicable" and r.get("run_dir") and Path(r["run_dir"]) == store.root:
            key = f"repair/{r['setting']}/{r['label']}/n{r.get('budget_n', r['budget'])}/rep{r['rep']}"
            why = str(r["status"]).removeprefix("not applicable: ")
            store.mark_not_applicable(key, f"repair {r['label']} on {r['setting']} (budget {r['budget']}, rep "
                                           f"{r['rep']}): {why}")


def _repair(stores: Mapping[str, RunStore], opts: Mapping[str, Any], shard: tuple[int, int], log: _Log,
            block: int | None = None) -> None:
    from vitfl.pipeline.repair import run_sweep

    run_dirs = {name: s.root for name, s in stores.items()}
    for i, sw in enumerate(opts.get("sweeps") or []):
        sw = {k: v for k, v in sw.items() if v is not None}
        label = sw.pop("name", None) or f"{sw.get('repair', 'de')}#{i}"
        if block is not None:
            sw["block"] = block
        t0 = time.perf_counter()
        before = {n: s.not_applicable() for n, s in stores.items()}
        rows = run_sweep(run_dirs, shard=shard, logger=bool(opts.get("tensorboard", True)), progress=True,
                         fl_batch_size=opts.get("fl_batch_size", 512), accelerator=opts.get("accelerator", "cpu"),
                         on_error=opts.get("on_error", "continue"), workers=opts.get("workers", 1), **sw)
        for name, store in stores.items():
            mine = [r for r in rows if r["dataset"] == name]
            _sweep_rows_na(store, mine)
            errors = [f"{r['label']} {r['setting']} n={r['budget']} rep={r['rep']}: {r['status']}" for r in mine
                      if _status(r) == "error"]
            log.step(_label(f"repair {label}", block), name, summarize_rows(mine), time.perf_counter() - t0,
                     _na_diff(store, before[name]), errors)


def _crossval(store: RunStore, name: str, opts: Mapping[str, Any], log: _Log, block: int | None = None) -> None:
    from vitfl.pipeline.crossval import step_crossval

    t0 = time.perf_counter()
    before = store.not_applicable()
    rows = step_crossval(store, log=log.log, **opts, **({} if block is None else {"block": block}))
    errors = [f"{r['label']} {r['setting']} n={r['budget']} rep={r['rep']}: {r['status']}" for r in rows
              if _status(r) == "error"]
    log.step(_label("crossval", block), name, summarize_rows(rows), time.perf_counter() - t0, _na_diff(store, before),
             errors)


def experiment_results(cfg: Mapping[str, Any], store: RunStore) -> list[dict[str, Any]]:
    """The repair results in ``store`` that this experiment's sweeps made (FL method, repair method and its resolved
    options, setting, budget, repetition all match), out of whatever else the run directory holds."""
    from vitfl.pipeline.repair import resolved_repair_options

    sweeps = []
    for sw in (cfg.get("repair") or {}).get("sweeps") or []:
        repair = sw.get("repair") or "de"
        reps = sw.get("reps", 5)
        sweeps.append({"repair": repair, "methods": set(sw.get("methods") or ()),
                       "settings": None if sw.get("settings") is None else set(sw["settings"]),
                       "budgets": None if sw.get("budgets") is None else {str(b) for b in sw["budgets"]} | {"front"},
                       "reps": set(range(reps)) if isinstance(reps, int) else set(reps), "seed": sw.get("seed", 0),
                       "options": resolved_repair_options(repair, sw.get("repair_options"))})
    out = []
    for r in store.list_results("repair_result"):
        ident = r.get("identity") or {}
        for sw in sweeps:
            if (r.get("repair") == sw["repair"] and r.get("method") in sw["methods"]
                    and (sw["settings"] is None or r.get("setting") in sw["settings"])
                    and (sw["budgets"] is None or str(r.get("budget")) in sw["budgets"])
                    and r.get("rep") in sw["reps"] and ident.get("seed") == sw["seed"] + r.get("rep", 0)
                    and ident.get("repair_options") == sw["options"]):
                out.append(r)
                break
    return out


def _aggregate(cfg: Mapping[str, Any], stores: Mapping[str, RunStore], log: _Log) -> dict[str, Any]:
    from vitfl.pipeline.repair import aggregate

    t0 = time.perf_counter()
    first = next(iter(stores.values()))
    tag = f"{cfg['name']}_{cfg.get('variant') or 'run'}"
    summary_dir = first.path("repair_summary", name=tag)
    mine = {n: experiment_results(cfg, s) for n, s in stores.items()}
    keys = {r["key"] for rs in mine.values() for r in rs}  # this experiment's results, not others in the runs
    agg = aggregate({name: s.root for name, s in stores.items()}, summary_dir, keys=keys)
    by_block = None
    if experiment_blocks(cfg) is not None:  # a layer study: the per-block table beside the experiment's summary
        by_block = write_block_summary(stores, summary_dir, keys=keys,
                                       with_crossval="crossval" in _expand_steps(cfg.get("steps") or STEPS))
    log.step("aggregate", ", ".join(stores), {"done": 1}, time.perf_counter() - t0, {})
    if agg.get("stale_note"):
        log.log(f"  {agg['stale_note']}")
    log.log(f"  {sum(len(v) for v in mine.values())} repair results of this experiment"
            + (f" ({agg.get('n_runs', 0)} tabulated)" if agg.get("n_runs") is not None else "")
            + f" -> {agg.get('summary_dir', summary_dir)}")
    out = {k: v for k, v in agg.items() if k in ("n_runs", "summary_dir", "files", "markdown")}
    if by_block is not None:
        log.log(f"  per block -> {first.summary_file('by_block', summary_dir, 'md')}")
        out["by_block"] = by_block["markdown"]
        out["files"] = list(out.get("files") or []) + by_block["files"]
    return out


# ------------------------------------------------------------------------------------------------ per block
#: what a per-block row pools: the experiment's repair sweeps (test fold of the run) or the cross-validated repair
#: (the held-out folds); the LP optimiser's cross-validated RR is repairability@N
BLOCK_SOURCES = {"repair": "repair sweep, test fold (held out)",
                 "crossval": "cross-validated repair, the k held-out test folds"}


def _block_number(value: Any, num_blocks: int | None) -> int:
    """A result's block as a non-negative index when the model's number of blocks is known (-1 -> n - 1), else as
    recorded; a result without one (no ``block`` column, or an empty cell: made before block addressing, or on the
    last block of a CLS-pooled model) is the last block."""
    try:
        b = int(value)
    except (TypeError, ValueError):
        b = -1
    if value != value:  # NaN
        b = -1
    if num_blocks is not None and b < 0:
        b += int(num_blocks)
    return b


def _block_label(b: int, num_blocks: int | None) -> str:
    if num_blocks is None:
        return "-1 (last)" if b == -1 else str(b)
    return f"{b} (last)" if b == num_blocks - 1 else str(b)


def block_table(runs, crossval=None, num_blocks: Mapping[str, int | None] | None = None,
                confidence: float = 0.95):
    """The per-block table of a layer study: one row per (data set, source, repair method, FL method, budget,
    block) with pooled counts and rates (sum fixed / sum targets, sum broken / sum correct) and their Wilson
    intervals (:func:`vitfl.evaluation.intervals.pooled_rate`, as the repair tables).

    ``runs``: :func:`vitfl.pipeline.repair.collect_results` rows (the experiment's repair sweeps, source
    ``repair``); ``crossval``: :func:`vitfl.pipeline.crossval.collect_crossval` rows with their ``dataset`` (source
    ``crossval``; its ``lp`` rows are repairability@N). A ``block`` column groups the rows; without it (or where it
    is empty) a row is the last block. ``num_blocks`` (data set -> the model's number of blocks) turns -1 into the
    last block's index, so -1 and n - 1 are one block. A cell with no target has ``rr`` NaN (``n_targets`` 0: said
    as "n/a (no targets)", never 0); ``runs_without_target`` counts its runs that had none."""
    import pandas as pd

    from vitfl.evaluation.intervals import pooled_rate
    from vitfl.pipeline.repair import _budget_order, _method_order

    parts = []
    for source, df in (("repair", runs), ("crossval", crossval)):
        if df is None or not len(df):
            continue
        df = df.copy()
        if "block" not in df.columns:
            df["block"] = -1
        df["block"] = [_block_number(v, (num_blocks or {}).get(d)) for v, d in zip(df["block"], df["dataset"])]
        df["source"] = source
        parts.append(df)
    cols = ["dataset", "source", "repair", "fl_method", "budget", "block", "block_label", "metric", "n_weights",
            "runs", "runs_without_target", "n_targets", "n_fixed", "rr", "rr_lo", "rr_hi", "n_correct", "n_broken",
            "br", "br_lo", "br_hi"]
    if not parts:
        return pd.DataFrame(columns=cols)
    df = pd.concat(parts, ignore_index=True)
    df["budget"] = df["budget"].astype(str)
    rows = []
    for (dataset, source, repair, method, budget, block), g in df.groupby(
            ["dataset", "source", "repair", "fl_method", "budget", "block"], sort=False):
        rr = pooled_rate(g["n_fixed"].to_numpy(), g["n_targets"].to_numpy(), confidence)
        br = pooled_rate(g["n_broken"].to_numpy(), g["n_correct_before"].to_numpy(), confidence)
        nan = float("nan")
        rows.append({"dataset": dataset, "source": source, "repair": repair, "fl_method": method, "budget": budget,
                     "block": int(block), "block_label": _block_label(int(block), (num_blocks or {}).get(dataset)),
                     "metric": "repairability@N" if source == "crossval" and repair == "lp" else "RR / BR",
                     "n_weights": float(g["n_weights"].mean()) if "n_weights" in g else nan, "runs": len(g),
                     "runs_without_target": int((g["n_targets"] == 0).sum()),
                     "n_targets": rr.n, "n_fixed": rr.k, "rr": nan if rr.rate is None else rr.rate,
                     "rr_lo": nan if rr.lo is None else rr.lo, "rr_hi": nan if rr.hi is None else rr.hi,
                     "n_correct": br.n, "n_broken": br.k, "br": nan if br.rate is None else br.rate,
                     "br_lo": nan if br.lo is None else br.lo, "br_hi": nan if br.hi is None else br.hi})
    out = pd.DataFrame(rows, columns=cols)
    m_order = {m: i for i, m in enumerate(_method_order(out["fl_method"]))}
    b_order = {b: i for i, b in enumerate(_budget_order(out["budget"]))}
    out = out.assign(_s=out["source"].map({"repair": 0, "crossval": 1}), _m=out["fl_method"].map(m_order),
                     _b=out["budget"].map(b_order))
    return (out.sort_values(["dataset", "_s", "repair", "_b", "_m", "block"], kind="stable")
            .drop(columns=["_s", "_m", "_b"]).reset_index(drop=True))


def _rate_text(rate: float, lo: float, hi: float, k: int, n: int, none: str) -> str:
    if not n or rate != rate:
        return f"n/a ({none})"
    return f"{rate:.3f} [{lo:.3f}, {hi:.3f}] ({k}/{n})"


def block_markdown(table) -> str:
    """:func:`block_table` as Markdown: one table per source (the repair sweeps; the cross-validated repair, whose
    ``lp`` rows are repairability@N), each after a line stating its split and n."""
    import pandas as pd

    from vitfl.evaluation.stats import to_markdown

    if table is None or not len(table):
        return "No repair results of this experiment to tabulate per block.\n"
    out = []
    for source, t in table.groupby("source", sort=False):
        n_runs, n_t, n_c = int(t["runs"].sum()), int(t["n_targets"].sum()), int(t["n_correct"].sum())
        k_none = int(t["runs_without_target"].sum())
        what = ("RR / BR per block" if source == "repair" else
                "Repairability@N (the `lp` rows: the LP optimiser's held-out RR on each FL method's weights) and the "
                "cross-validated RR / BR per block")
        out.append(f"**{what}** — split: {BLOCK_SOURCES[source]}; n: {n_runs} runs, {n_t} targets, {n_c} correct "
                   f"inputs (per row in the table); {k_none} of {n_runs} runs had no target (their cells pool the "
                   "others; a cell with none at all is n/a, not 0); pooled, Wilson 95% CI.")
        out.append("")
        rate_col = ("RR (Wilson 95% CI, fixed/targets)" if source == "repair" else
                    "RR or repairability@N (Wilson 95% CI, fixed/targets)")  # lp rows: repairability@N
        rows = []
        for r in t.to_dict("records"):
            rows.append({"dataset": r["dataset"], "repair": r["repair"], "FL method": r["fl_method"],
                         "budget": r["budget"],
                         "N": "-" if r["n_weights"] != r["n_weights"] else f"{r['n_weights']:.0f}",
                         "block": r["block_label"], "runs": int(r["runs"]),
                         rate_col: _rate_text(r["rr"], r["rr_lo"], r["rr_hi"], r["n_fixed"], r["n_targets"],
                                              "no targets"),
                         "runs without a target": f"{r['runs_without_target']} of {int(r['runs'])}",
                         "BR (Wilson 95% CI, broken/correct)": _rate_text(r["br"], r["br_lo"], r["br_hi"],
                                                                          r["n_broken"], r["n_correct"],
                                                                          "no correct inputs")})
        df = pd.DataFrame(rows)
        out.append(to_markdown(df).rstrip("\n"))
        out.append("")
        if source != "repair":  # blocks the cross-validated repair reached but LP did not: say so, not a blank
            cells = {(r["dataset"], r["block_label"]) for r in t.to_dict("records")}
            with_lp = {(r["dataset"], r["block_label"]) for r in t.to_dict("records") if r["repair"] == "lp"}
            if with_lp and cells - with_lp:
                missing = ", ".join(f"{d} block {b}" for d, b in sorted(cells - with_lp))
                out.append(f"Repairability@N (`lp`) is not applicable on {missing}: the LP optimiser needs the "
                           "logits as LayerNorm -> Linear of the block's output, which holds on the last block of a "
                           "class-token model only (elsewhere the located weights reach the logits through later "
                           "blocks or the token pooling); those blocks have the DE rows only.")
                out.append("")
    return "\n".join(out)


def block_figure(table, title: str = ""):
    """RR (or repairability@N) per block and FL method with Wilson 95% intervals: one panel per (data set, source,
    repair method, budget); a cell with no target is marked "n/a" at 0, never drawn as a rate of 0."""
    import numpy as np

    from vitfl.core import style

    if table is None or not len(table):
        return style.nothing_to_plot(f"no repair results per block{' (' + title + ')' if title else ''}")
    panels = list(table.groupby(["dataset", "source", "repair", "budget"], sort=False))
    methods = list(dict.fromkeys(table["fl_method"]))
    styles = style.method_styles(methods)
    fig, axes = style.facet_grid(len(panels), panel_width=2.3, panel_height=1.7, sharex=False, sharey=True)
    for ax, ((dataset, source, repair, budget), t) in zip(axes, panels):
        blocks = sorted(set(t["block"]), key=lambda b: (b < 0, b))
        labels = [t.loc[t["block"] == b, "block_label"].iloc[0] for b in blocks]
        x0 = np.arange(len(blocks), dtype=float)
        width = 0.6 / max(1, len(methods))
        for i, m in enumerate(methods):
            sub = t[t["fl_method"] == m].set_index("block")
            if not len(sub):
                continue
            mid = np.array([sub["rr"].get(b, np.nan) for b in blocks], dtype=float)
            lo = np.array([sub["rr_lo"].get(b, np.nan) for b in blocks], dtype=float)
            hi = np.array([sub["rr_hi"].get(b, np.nan) for b in blocks], dtype=float)
            x = x0 + (i - (len(methods) - 1) / 2) * width
            err = np.vstack([np.where(np.isnan(lo), 0, mid - lo), np.where(np.isnan(hi), 0, hi - mid)])
            ax.errorbar(x, mid, yerr=err, capsize=1.5, elinewidth=0.7, **styles[m].point())
            for xi, v, b in zip(x, mid, blocks):
                if np.isnan(v) and b in sub.index:
                    ax.text(xi, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=5)
        ax.set_xticks(x0, labels)
        ax.set_xlim(-0.5, len(blocks) - 0.5)
        ax.set_ylim(-0.03, 1.03)  # a rate of 0 (a cell with targets and none fixed) stays visible
        ax.set_xlabel("block")
        what = "repairability@N" if source == "crossval" and repair == "lp" else f"RR ({repair})"
        where = "test fold" if source == "repair" else "held-out folds"
        n = int(t["runs"].sum())
        ax.set_title(f"{dataset}: {what}, N = {budget}\n{where}, {n} runs", fontsize=6)
    style.legend_outside(fig, [styles[m].handle("point") for m in methods], methods)
    style.suptitle(fig, (f"{title}: " if title else "") + "RR per block and FL method (pooled, Wilson 95% CI)")
    return fig


def write_block_summary(stores: Mapping[str, RunStore], summary_dir: Path, keys: Iterable[str] | None = None,
                        with_crossval: bool = True) -> dict[str, Any]:
    """The per-block table of a layer study (:func:`block_table`) from the current repair results of ``stores`` (the
    experiment's own: ``keys``) and, with ``with_crossval``, the cross-validated repair of each run, written beside
    the experiment's repair summary (``summary_dir``, inside the first store): ``by_block.csv``, ``by_block.md``
    and ``rr_by_block.png|pdf`` (:data:`vitfl.core.runstore.SUMMARY_FILES`). Returns ``{"table", "markdown",
    "files"}``."""
    import pandas as pd

    from vitfl.evaluation import figures as figs
    from vitfl.pipeline.repair import collect_results

    first = next(iter(stores.values()))
    runs = collect_results({n: s.root for n, s in stores.items()})
    if keys is not None and len(runs):
        runs = runs[runs["key"].isin(set(keys))].reset_index(drop=True)
    cv_parts = []
    if with_crossval:
        from vitfl.pipeline.crossval import collect_crossval

        for name, store in stores.items():
            cv = collect_crossval(store)
            if len(cv):
                cv_parts.append(cv.assign(dataset=name))
    cv = pd.concat(cv_parts, ignore_index=True) if cv_parts else None
    n_blocks = {name: _num_blocks(store) for name, store in stores.items()}
    table = block_table(runs, cv, n_blocks)
    md = block_markdown(table)
    files = [first.write_text(first.summary_file("by_block", summary_dir, "csv"), table.to_csv(index=False)),
             first.write_text(first.summary_file("by_block", summary_dir, "md"),
                              "# Repair per transformer block (layer study)\n\n" + md)]
    fig = block_figure(table, ", ".join(stores))
    files += figs.save_figure(fig, first.summary_file("by_block_figure", summary_dir), writer=first.save_figure)
    return {"table": table, "markdown": md, "files": [str(f) for f in files]}


def _num_blocks(store: RunStore) -> int | None:
    """The number of transformer blocks of the run's model (None when it cannot be loaded or told)."""
    try:
        from vitfl.lightning_modules.runs import load_run

        return load_run(store).head.num_blocks
    except Exception:  # noqa: BLE001 - only labels depend on it: -1 stays "-1 (last)"
        return None


def _save_config(cfg: Mapping[str, Any], stores: Mapping[str, RunStore]) -> None:
    """The experiment config as run, into each run's report folder (the report states which config made it)."""
    import yaml

    if not RunStore.writes():
        return
    for store in stores.values():  # run directories relative to this run (nothing absolute is stored in a run)
        datasets = {n: {**(d or {}), "run_dir": os.path.relpath(s.root, store.root)}
                    for (n, d), s in zip(cfg["datasets"].items(), stores.values())}
        text = yaml.safe_dump({**dict(cfg), "datasets": datasets}, sort_keys=False)
        store.write_text(store.path("report", name=f"experiments/{cfg['name']}_{cfg.get('variant') or 'run'}.yaml"),
                         text)


def _adequacy(store: RunStore, name: str, tag: str, opts: Mapping[str, Any], ds_over: Mapping[str, Any] | None,
              shard: tuple[int, int], root: Path, log: _Log) -> None:
    """The adequacy RQs of this experiment into ``adequacy/<tag>/`` (``tag``: the experiment's name and variant), so
    experiments that share a run directory (a published config and its corrected twin) keep their own tables."""
    from vitfl.pipeline.adequacy import RQS, _merge, build_config, run_rq

    configs = [p if Path(p).is_absolute() else root / p for p in opts.get("configs") or
               ["configs/adequacy/default.yaml"]]
    cfg = _merge(build_config(configs), dict(opts.get("overrides") or {}))
    cfg = _merge(cfg, dict(ds_over or {}))
    if opts.get("use_run_checkpoint", True):
        eps = store.checkpoint_epochs()
        if not eps:
            raise FileNotFoundError(f"adequacy: {store.root} has no checkpoint to test")
        cfg = _merge(cfg, {"model": {"checkpoint": str(store.checkpoint(eps[-1]))}})
    rqs = list(opts.get("rqs") or RQS)
    k, n = shard
    counts = {"done": 0, "skipped": 0}
    t0 = time.perf_counter()
    for rq in rqs[k::n]:
        ckpt = cfg["model"].get("checkpoint")
        ident = {"kind": "adequacy_rq", "rq": rq, "config": {**cfg, "model": {**cfg["model"], "checkpoint": None}},
                 "checkpoint": store.file_hash(ckpt) if ckpt else None}
        marker = store.path("adequacy_marker", name=tag, rq=rq)
        if store.read_result(marker, ident) is not None:
            counts["skipped"] += 1
            continue
        out = run_rq(rq, cfg, store.path("adequacy", name=tag), progress=True)  # one folder per experiment
        store.write_result(marker, ident, {"kind": "adequacy_rq", "rq": rq,
                                           "paths": [store.rel(p) for p in out["paths"]]})
        counts["done"] += 1
    log.step("adequacy", name, counts, time.perf_counter() - t0, {})


# ------------------------------------------------------------------------------------------------ the runner
def run_experiment(cfg: Mapping[str, Any], steps: Iterable[str] | None = None,
                   shard: str | tuple[int, int] | None = None, root: str | Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run an experiment config (a mapping as ``scripts/run_experiment.py --print_config`` prints it).

    ``steps``: steps or phases to run (default: the config's ``steps``, else all, in data-flow order); ``shard``:
    ``"k/n"`` or (k, n); ``root``: the folder relative config paths (training and adequacy configs) are read
    from (default: the current directory). Returns ``{"steps", "summary", "aggregate"}``; ``summary`` holds one
    row per step and data set with the counts of done / skipped / not applicable / failed tasks."""
    from vitfl.pipeline.repair import parse_shard

    quiet()
    k, n = parse_shard(shard)
    todo = check_experiment(cfg)
    if steps is not None:  # a selection of the experiment's own steps (phases: the part of them in that phase)
        steps = list(steps)
        extra = [s for s in steps if s in STEPS and s not in todo]
        if extra:
            raise ExperimentConfigError(f"steps {extra} are not steps of experiment {cfg['name']} ({todo})")
        asked = _expand_steps(steps)
        todo = [s for s in todo if s in asked]
    if n > 1:
        not_sharded = [s for s in todo if s not in SHARDED]
        if not_sharded:
            raise ExperimentConfigError(
                f"steps {not_sharded} are not sharded: run them once without --shard (prepare: {PHASES['prepare']}"
                f" before the shards, final: {PHASES['final']} after all of them); with --shard k/n give "
                f"--steps work (or some of {list(SHARDED)})")
    root = Path(root or os.getcwd())
    stores = {name: RunStore(Path(d["run_dir"]) if Path(d["run_dir"]).is_absolute() else root / d["run_dir"])
              for name, d in cfg["datasets"].items()}
    L = _Log(log)
    out: dict[str, Any] = {"steps": todo, "summary": L.summary}
    log(f"experiment {cfg['name']} ({cfg.get('variant', '')}): steps {', '.join(todo)}"
        + (f"; shard {k}/{n}" if n > 1 else ""))
    _save_config(cfg, stores)
    from vitfl.pipeline.parallel import set_step

    blocks = experiment_blocks(cfg)
    per_block: list[int | None] = [None] if blocks is None else list(blocks)  # None: no block= (as before blocks)
    if blocks is not None:
        mine = [s for s in BLOCK_STEPS if s in todo]
        log(f"layer study: blocks {blocks}" + (f" (steps {', '.join(mine)} once per block)" if mine else ""))
    for step in todo:
        set_step(f"{step}" + (f" (shard {k}/{n})" if n > 1 else ""))  # named by an interrupted run's message
        t0 = time.perf_counter()
        if step == "train":
            from vitfl.pipeline.train import train

            for name, store in stores.items():
                c = train(store, cfg["datasets"][name].get("train"), root, log)
                L.step("train", name, c, time.perf_counter() - t0, {})
        elif step == "testbed":
            from vitfl.pipeline.testbed import step_testbed

            for name, store in stores.items():
                L.step("testbed", name, step_testbed(store, log), time.perf_counter() - t0, {})
        elif step == "cache":
            for name, store in stores.items():
                L.step("cache", name, _cache(store, step_options(cfg, "cache"), blocks), time.perf_counter() - t0, {})
        elif step == "misclf":
            for name, store in stores.items():
                L.step("misclf", name, _misclf(store, step_options(cfg, "misclf")), time.perf_counter() - t0, {})
        elif step == "localize":
            for b in per_block:
                _localize(stores, step_options(cfg, "localize"), (k, n), L, b)
        elif step == "evaluate_fl":
            for b in per_block:
                for name, store in stores.items():
                    _evaluate(store, name, step_options(cfg, "evaluate_fl"), L, b)
        elif step == "repair":
            for b in per_block:
                _repair(stores, step_options(cfg, "repair"), (k, n), L, b)
        elif step == "crossval":
            for b in per_block:
                for name, store in stores.items():
                    _crossval(store, name, step_options(cfg, "crossval"), L, b)
        elif step == "aggregate":
            out["aggregate"] = _aggregate(cfg, stores, L)
        elif step == "coverage":
            from vitfl.pipeline.adequacy import step_coverage

            for name, store in stores.items():
                step_coverage(store, **step_options(cfg, "coverage"))
                L.step("coverage", name, {"done": 1}, time.perf_counter() - t0, {})
        elif step == "adequacy":
            for name, store in stores.items():
                _adequacy(store, name, f"{cfg['name']}_{cfg.get('variant') or 'run'}", step_options(cfg, "adequacy"),
                          cfg["datasets"][name].get("adequacy"), (k, n), root, L)
    if n == 1 and any(s in todo for s in PHASES["final"]):  # one report per run, after the final steps
        from vitfl.pipeline.report import write_report

        set_step("report")
        out["reports"] = {}
        for name, store in stores.items():
            path = write_report(store, {"experiment": cfg["name"], "variant": cfg.get("variant"),
                                        "compat": list(cfg.get("compat") or [])})
            out["reports"][name] = str(path)
            log(f"report ({name}): {path}")
    set_step(None)
    return out
