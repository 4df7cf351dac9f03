"""Run FL methods x settings x budgets on a trained run (resumable: existing results are skipped).

    python scripts/localize.py --run_dir outputs/digits --methods ours arachne_w bl random --budgets 236 472 944 avg
    python scripts/localize.py --list     # the registered methods
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from pipeline.localize import run_localization
from localization.artifacts import RunLayout
from localization.base import UnknownMethodError, get_localizer, registered_localizers


def budget(v: str):
    return v if v in ("avg", "front") else int(v)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="outputs/digits")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--settings", nargs="+", default=None, help="default: every available setting")
    p.add_argument("--budgets", nargs="+", type=budget, default=[236, 472, 944, "avg"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("--verbose", action="store_true", help="with --list: each method's summary, metadata, options")
    a = p.parse_args()
    if a.list:
        from localization.base import FL_METHODS

        print(FL_METHODS.listing(verbose=a.verbose))
        sys.exit(0)
    try:
        for m in a.methods or []:
            get_localizer(m)
    except UnknownMethodError as e:
        sys.exit(str(e))
    kw = {"accelerator": a.accelerator, "devices": a.devices}
    if a.devices > 1:
        kw["strategy"] = "ddp"
    rows = run_localization(RunLayout(a.run_dir), a.methods, a.settings, a.budgets, seed=a.seed,
                            batch_size=a.batch_size, trainer_kwargs=kw)
    from core.io import is_rank_zero

    for r in rows if is_rank_zero() else []:
        print(f"{r['method']:18s} {r['setting']:12s} budgets={r['budgets']:18s} {r.get('wall_s', '')!s:>8} s "
              f"{r['status']}")
