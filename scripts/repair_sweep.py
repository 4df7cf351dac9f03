"""Repair sweep: FL method x setting x budget x repetition x dataset (run directories), one JSON per run,
resumable (existing results are skipped), shardable; then tables, figures and statistics.

    python scripts/repair_sweep.py --run_dirs c100=outputs/c100 tiny=outputs/tiny_imagenet \\
        --methods ours arachne_w random --budgets 236 472 944 avg --reps 5 --shard 3/8
    python scripts/repair_sweep.py --run_dirs outputs/c100 --aggregate_only      # tables + figures + statistics
    python scripts/repair_sweep.py --list                                        # the registered repair methods

Repair options: --generations, --pop_size, --update, --evaluator, or any --option key=value (YAML-typed), e.g.
--option fitness=reptran --option lr=1e-4 (for --repair finetune). The logic is in lightning_modules/repair/sweep.py.
"""
import argparse
import sys

import _bootstrap  # noqa: F401
import yaml

from lightning_modules.repair import UnknownRepairError, get_repair, registered_repairs
from pipeline.repair import DEFAULT_BUDGETS, DEFAULT_METHODS, aggregate, parse_shard, run_sweep


def budget(v: str):
    return v if v in ("avg", "front") else int(v)


def option(v: str):
    key, sep, val = v.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {v!r}")
    return key, yaml.safe_load(val)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dirs", nargs="+", default=["outputs/digits"], help="run directories, 'name=path' or path")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="FL methods")
    p.add_argument("--settings", nargs="+", default=None, help="default: every available setting")
    p.add_argument("--budgets", nargs="+", type=budget, default=list(DEFAULT_BUDGETS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="run seed = seed + repetition")
    p.add_argument("--shard", default="0/1", help="k/n: this process runs every n-th run from k (0-based)")
    p.add_argument("--repair", default="de")
    p.add_argument("--generations", type=int, default=None, help="DE: max generations (50 RepTran, 100 Arachne)")
    p.add_argument("--pop_size", type=int, default=None)
    p.add_argument("--update", choices=["deferred", "immediate"], default=None)
    p.add_argument("--evaluator", choices=["sparse", "full", "loop"], default=None)
    p.add_argument("--option", type=option, action="append", default=[], help="key=value for the repair module")
    p.add_argument("--fl_batch_size", type=int, default=512)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--no_tensorboard", action="store_true")
    p.add_argument("--progress_bar", action="store_true", help="the Trainer's bar inside each run, too")
    p.add_argument("--on_error", choices=["continue", "raise"], default="continue")
    p.add_argument("--aggregate", action="store_true", help="aggregate after the sweep")
    p.add_argument("--aggregate_only", action="store_true")
    p.add_argument("--summary_dir", default=None, help="default: <first run_dir>/repair/summary")
    p.add_argument("--list", action="store_true", help="list the registered repair methods and exit")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(registered_repairs()))
        return 0
    try:
        get_repair(a.repair)
        shard = parse_shard(a.shard)
    except (UnknownRepairError, ValueError) as e:
        p.error(str(e))
    if not a.aggregate_only:
        opts = dict(a.option)
        for k in ("generations", "pop_size", "update", "evaluator"):
            if getattr(a, k) is not None:
                opts[k] = getattr(a, k)
        rows = run_sweep(a.run_dirs, a.methods, a.settings, a.budgets, a.reps, shard=shard, repair=a.repair,
                         repair_options=opts, seed=a.seed, fl_batch_size=a.fl_batch_size,
                         logger=not a.no_tensorboard, progress_bar=a.progress_bar, accelerator=a.accelerator,
                         on_error=a.on_error)
        counts = {}
        for r in rows:
            counts[r["status"].split(":")[0]] = counts.get(r["status"].split(":")[0], 0) + 1
        print(f"shard {shard[0]}/{shard[1]}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for r in rows:
            if r["status"].startswith(("error", "skipped")):
                print(f"  {r['dataset']} {r['setting']} {r['label']} n={r['budget']} rep={r['rep']}: {r['status']}")
        if any(r["status"].startswith("error") for r in rows):
            return 1
    if a.aggregate or a.aggregate_only:
        agg = aggregate(a.run_dirs, a.summary_dir)
        print(f"{agg['n_runs']} runs aggregated into {agg['summary_dir']}")
        if agg.get("markdown"):
            print(agg["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
