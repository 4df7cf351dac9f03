"""(Re)build a run's report: aggregate its repair results (tables, figures, statistics under repair/summary; on by
default), then write report/report.md and report/report.html (vitfl.pipeline.report.write_report: the FL headline and
statistics, the repair summary, confusion matrices, adequacy, the cases recorded as not applicable).

    python scripts/report.py --run_dir outputs/digits
    python scripts/report.py --run_dir outputs/digits --aggregate false     # the report of what is already tabulated

scripts/run_experiment.py writes the report after its final steps; this script rebuilds it after step-by-step
work (scripts/localize.py, evaluate_fl.py, repair_sweep.py) or after more results arrived.
"""
from typing import List, Optional

import _cli


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dir", type=str, default="outputs/digits", help="the run directory")
    p.add_argument("--aggregate", type=bool, default=True,
                   help="tabulate the run's repair results first (repair/summary), as repair_sweep.py --aggregate_only")
    p.add_argument("--include_stale", action="store_true",
                   help="aggregate also repair results made from other inputs than the run's current model, state "
                        "caches and settings (default: left out and counted)")
    return p


@_cli.guard("report")
def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _cli.quiet()
    from vitfl.core.runstore import RunStore
    from vitfl.pipeline.report import check_report, write_report

    store = RunStore(a.run_dir)
    if not store.root.is_dir():
        p.error(f"--run_dir {a.run_dir} is not a directory")
    if a.aggregate and store.list_results("repair_result"):
        from vitfl.pipeline.repair import aggregate

        agg = aggregate({store.root.name: store.root}, None, include_stale=a.include_stale)
        if agg.get("stale_note"):
            print(f"aggregate: {agg['stale_note']}")
        print(f"aggregate: {agg['n_runs']} repair runs tabulated into {agg['summary_dir']}")
    md = write_report(store)
    print(f"report: {md}")
    print(f"report: {md.with_suffix('.html')}")
    for problem in check_report(md):
        print(f"report: warning: {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
