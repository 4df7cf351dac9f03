"""Run FL methods x settings x budgets on a trained run (resumable: existing results are skipped; a case that cannot
run is recorded once as not applicable).

    python scripts/localize.py --run_dir outputs/digits --methods ours arachne_w bl random --budgets 33 164 328 avg
    python scripts/localize.py --run_dir outputs/digits --block 0     # block 0's FFN (after cache_states.py --block 0)
    python scripts/localize.py --run_dir outputs/digits --block 0 --token_statistic mean  # rank by the token mean
    python scripts/localize.py --config my_fl.yaml --print_config     # the merged config
    python scripts/localize.py --list [--verbose]                     # the registered methods
"""
from typing import List, Optional

import _cli
from _cli import Budget


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dir", type=str, default="outputs/digits", help="the trained run directory")
    p.add_argument("--methods", type=str, nargs="+", default=None, help="FL methods (null: every registered method)")
    p.add_argument("--settings", type=str, nargs="+", default=None, help="settings (null: every available setting)")
    p.add_argument("--budgets", type=Budget, nargs="+", default=_cli.DEFAULT_BUDGETS,
                   help="weights, 'avg' (N_avg, the mean size of BL's front) or 'front'")
    _cli.add_method_options(p, "FL method -> its options, e.g. '{ig: {times_activation: false}}' (see --list "
                               "--verbose)")
    p.add_argument("--block", type=int, default=-1,
                   help="transformer block whose FFN is localized (0 the first, -1 the last); a block other than the "
                        "last of a CLS-pooled model needs its token cache: scripts/cache_states.py --block")
    p.add_argument("--token_statistic", type=str, default="readout",
                   help="a token head's per-input statistic over tokens: readout (the tokens the classifier reads), "
                        "cls or mean; recorded in the FL identities; the last block of a class-token model takes "
                        "readout or cls only")
    p.add_argument("--seed", type=int, default=0, help="FL seed (random methods)")
    p.add_argument("--batch_size", type=int, default=512, help="loader batch size of the FL pass")
    p.add_argument("--accelerator", type=str, default="cpu", help="Trainer accelerator")
    p.add_argument("--devices", type=int, default=1, help="Trainer devices (ddp when > 1)")
    _cli.add_progress(p, "one over (method, setting)", "the same")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("--verbose", action="store_true", help="with --list: each method's summary, metadata, options")
    return p


@_cli.guard("localize")
def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _cli.quiet()
    from vitfl.localization.base import FL_METHODS

    if a.list:
        print(FL_METHODS.listing(verbose=a.verbose))
        return 0
    from vitfl.core.io import is_rank_zero
    from vitfl.core.runstore import RunStore
    from vitfl.localization.ranking import BudgetError
    from vitfl.pipeline.experiment import summarize_rows
    from vitfl.pipeline.experiment import check_fl_options
    from vitfl.pipeline.localize import check_budgets, run_localization

    try:
        FL_METHODS.check(list(a.methods or []) + list(a.method_options))
        for m, o in a.method_options.items():
            check_fl_options(m, o)
        check_budgets(a.budgets)
        if a.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {a.devices}")
        from vitfl.localization.ffn import TOKEN_STATISTICS

        if a.token_statistic not in TOKEN_STATISTICS:
            raise ValueError(f"--token_statistic {a.token_statistic!r}: expected one of {list(TOKEN_STATISTICS)}")
    except (KeyError, ValueError, BudgetError) as e:
        p.error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    kw = {"accelerator": a.accelerator, "devices": a.devices, "enable_progress_bar": False,
          "enable_model_summary": False}
    if a.devices > 1:
        kw["strategy"] = "ddp"
    store = RunStore(a.run_dir)
    before = store.not_applicable()
    rows = run_localization(store, a.methods, a.settings, a.budgets, seed=a.seed, batch_size=a.batch_size,
                            trainer_kwargs=kw, method_options=a.method_options, progress=a.progress != "none",
                            block=a.block, token_statistic=a.token_statistic)
    if not is_rank_zero():
        return 0
    for r in rows:
        if not r["status"].startswith("not applicable"):  # those: counted below, the new ones named once
            print(f"{r['method']:18s} {r['setting']:12s} budgets={r['budgets']:18s} {r.get('wall_s', '')!s:>8} s "
                  f"{r['status']}")
    new = {k: v for k, v in store.not_applicable().items() if k not in before}
    for why in new.values():
        print(f"not applicable (recorded, not retried): {why}")
    c = summarize_rows(rows)
    print(f"localize: {c['done']} done, {c['skipped']} skipped (in the store), {c['not applicable']} not applicable"
          f" ({len(new)} new), {c['error']} failed")
    return 1 if c["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
