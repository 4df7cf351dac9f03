"""Repair sweep: FL method x setting x budget x repetition x dataset (run directories), one result per run in the
run store, resumable (existing results are skipped), shardable; then tables, figures and statistics.

    python scripts/repair_sweep.py --run_dirs c100=outputs/c100_vit_b16 tiny=outputs/tiny_imagenet_vit_b16 \\
        --methods ours arachne_w random --budgets 236 472 944 --reps 5 --shard 3/8
    python scripts/repair_sweep.py --run_dir outputs/digits --repair_options '{generations: 100, fitness: reptran}'
    python scripts/repair_sweep.py --run_dir outputs/digits --block 0   # block 0's FFN (after --block 0 caching + FL)
    python scripts/repair_sweep.py --run_dirs outputs/c100_vit_b16 --aggregate_only   # tables + figures + statistics
    python scripts/repair_sweep.py --list [--verbose]                                # the registered repair methods

A whole published experiment is one command instead: scripts/run_experiment.py --config configs/experiment/...
"""
from typing import Any, Dict, List, Optional, Union

import _cli
from _cli import Budget


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dirs", "--run_dir", type=str, nargs="+", default=["outputs/digits"],
                   help="run directories, 'name=path' or path (name = folder name); --run_dir (as the other scripts "
                        "spell it) is the same option")
    p.add_argument("--methods", type=str, nargs="+", default=["ours", "arachne_w", "random"], help="FL methods")
    p.add_argument("--settings", type=str, nargs="+", default=None, help="settings (null: every available setting)")
    p.add_argument("--budgets", type=Budget, nargs="+", default=_cli.DEFAULT_BUDGETS,
                   help="weights, 'avg' (N_avg) or 'front' (methods that select their own set always get 'front')")
    p.add_argument("--reps", type=int, default=5, help="repetitions per (setting, method, budget)")
    p.add_argument("--seed", type=int, default=0, help="run seed = seed + repetition")
    p.add_argument("--shard", type=str, default="0/1", help="k/n: this process runs every n-th run from k (0-based)")
    p.add_argument("--repair", type=str, default="de", help="repair method (--list)")
    p.add_argument("--block", type=int, default=-1,
                   help="transformer block whose FFN is repaired (0 the first, -1 the last); a block other than the "
                        "last of a CLS-pooled model needs its token caches of the repair and test splits "
                        "(scripts/cache_states.py --block) and uses that block's FL results (scripts/localize.py "
                        "--block); 'lp' refuses such a block")
    p.add_argument("--repair_options", type=Dict[str, Any], default={},
                   help="options of the repair method, e.g. '{generations: 50, fitness: reptran}' (--list --verbose)")
    p.add_argument("--generations", type=Optional[int], default=None,
                   help="DE: max generations (50 RepTran, 100 Arachne); same as repair_options.generations")
    p.add_argument("--pop_size", type=Optional[int], default=None, help="DE: population; repair_options.pop_size")
    p.add_argument("--update", type=Optional[str], default=None,
                   help="DE: 'deferred' or 'immediate' (published); repair_options.update")
    p.add_argument("--evaluator", type=Optional[str], default=None,
                   help="DE fitness evaluator: 'sparse', 'full' or 'loop'; repair_options.evaluator")
    p.add_argument("--option", type=str, nargs="+", default=[],
                   help="repair options as key=value (YAML-typed), e.g. --option fitness=reptran cr=0.5; an option "
                        "given twice (here and as its flag, or in --repair_options) is an error")
    p.add_argument("--fl_options", type=Dict[str, Dict[str, Any]], default={},
                   help="FL method -> its options (scripts/localize.py --list --verbose)")
    p.add_argument("--fl_batch_size", type=int, default=512, help="loader batch size of the FL pass")
    p.add_argument("--accelerator", type=str, default="cpu", help="accelerator of the repair fits")
    p.add_argument("--workers", type=Union[int, str], default=1,
                   help="processes on this machine, each one sub-shard of --shard (auto: the cores, at most 4)")
    p.add_argument("--no_tensorboard", action="store_true",
                   help="do not log the runs to TensorBoard (default: each run with its hparams and final metrics)")
    _cli.add_progress(p, "one over the sweep's runs", "also the Trainer's bar inside each run")
    p.add_argument("--on_error", type=str, default="continue",
                   help="a failed run: 'continue' (reported, retried next time) or 'raise'")
    p.add_argument("--aggregate", action="store_true", help="aggregate after the sweep")
    p.add_argument("--aggregate_only", action="store_true", help="only aggregate what is in the stores")
    p.add_argument("--summary_dir", type=Optional[str], default=None,
                   help="where the tables go (null: <first run_dir>/repair/summary)")
    p.add_argument("--include_stale", action="store_true",
                   help="aggregate also results made from other inputs than the run's current model, state caches "
                        "and settings (default: left out and counted), labelled in runs.csv's 'stale' column")
    p.add_argument("--list", action="store_true", help="list the registered repair methods and exit")
    p.add_argument("--verbose", action="store_true", help="with --list: each method's summary and options")
    return p


#: the flags that set one repair option each (DE's)
OPTION_FLAGS = ("generations", "pop_size", "update", "evaluator")


def repair_options(a, argv: Optional[List[str]]) -> Dict[str, Any]:
    """The repair options of the command line: ``--repair_options`` (a config's or the flag's), ``--option
    key=value`` and the option flags (``--generations`` ...). A config's ``repair_options`` is overridden by the
    flags; an option given twice *on the command line* (``--generations 2 --option generations=3``, or
    ``--repair_options '{generations: 3}' --generations 2``) is an error naming both."""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else list(argv)
    given_dict = any(x == "--repair_options" or x.startswith("--repair_options=") for x in args)
    sources: Dict[str, str] = {}
    opts = dict(a.repair_options)
    for k in opts:
        sources[k] = f"--repair_options {k}={opts[k]!r}" if given_dict else ""

    def put(key: str, value: Any, source: str) -> None:
        if sources.get(key):  # "" = a config's value, which a flag overrides
            raise ValueError(f"repair option {key!r} is given twice: {sources[key]} and {source}; give it once")
        sources[key] = source
        opts[key] = value

    for item in a.option:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(val)
        except yaml.YAMLError:
            value = val
        put(key, value, f"--option {item}")
    flat = a.as_dict()  # (Namespace.update is a method: read "update" from the dict)
    for k in OPTION_FLAGS:
        if flat[k] is not None:
            put(k, flat[k], f"--{k} {flat[k]}")
    return opts


@_cli.guard("repair_sweep")
def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _cli.quiet()
    from vitfl.lightning_modules.repair import REPAIRS

    if a.list:
        print(REPAIRS.listing(verbose=a.verbose))
        return 0
    from vitfl.localization.base import FL_METHODS
    from vitfl.localization.ranking import BudgetError
    from vitfl.pipeline.experiment import summarize_rows
    from vitfl.pipeline.experiment import check_fl_options
    from vitfl.pipeline.localize import check_budgets
    from vitfl.pipeline.repair import aggregate, parse_shard, resolved_repair_options, run_sweep
    try:
        opts = repair_options(a, argv)
        REPAIRS.check([a.repair])
        FL_METHODS.check(list(a.methods) + list(a.fl_options))
        opts = REPAIRS.check_options(a.repair, opts)  # names, types and ranges, once, before any work
        resolved_repair_options(a.repair, opts)
        fl_options = {m: check_fl_options(m, o) for m, o in a.fl_options.items()}
        check_budgets(a.budgets)
        shard = parse_shard(a.shard)
        if a.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {a.reps}")
        if a.on_error not in ("continue", "raise"):
            raise ValueError(f"--on_error must be 'continue' or 'raise', got {a.on_error!r}")
        from vitfl.pipeline.parallel import resolve_workers

        resolve_workers(a.workers)
    except (KeyError, ValueError, BudgetError) as e:
        p.error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    if not a.aggregate_only:
        rows = run_sweep(a.run_dirs, a.methods, a.settings, a.budgets, a.reps, shard=shard, repair=a.repair,
                         repair_options=opts, seed=a.seed, fl_options=fl_options, fl_batch_size=a.fl_batch_size,
                         logger=not a.no_tensorboard, progress=a.progress != "none", progress_bar=a.progress == "all",
                         accelerator=a.accelerator, on_error=a.on_error, workers=a.workers, block=a.block)
        c = summarize_rows(rows)
        print(f"shard {shard[0]}/{shard[1]}: {c['done']} done, {c['skipped']} skipped (in the store), "
              f"{c['not applicable']} not applicable, {c['error']} failed")
        for r in rows:
            if r["status"].startswith("error"):
                print(f"  {r['dataset']} {r['setting']} {r['label']} n={r['budget']} rep={r['rep']}: {r['status']}")
        if c["error"]:
            return 1
    if a.aggregate or a.aggregate_only:
        agg = aggregate(a.run_dirs, a.summary_dir, include_stale=a.include_stale)
        if agg.get("stale_note"):
            print(f"aggregate: {agg['stale_note']}")
        print(f"{agg['n_runs']} runs aggregated into {agg['summary_dir']}")
        if agg.get("markdown"):
            print(agg["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
