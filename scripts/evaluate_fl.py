"""Evaluate fault localization on a run (DESIGN.md section 5): interventions on every FL result, the checkpoint
benchmark and the injected-fault benchmark, with statistics, figures (PNG + PDF, TensorBoard) and a headline
table. Resumable: outputs already under <run_dir>/fl_eval are read back, not recomputed.

    python scripts/evaluate_fl.py --run_dir outputs/digits
    python scripts/evaluate_fl.py --run_dir outputs/digits --parts checkpoint injected --methods random grad_loss ours
    python scripts/evaluate_fl.py --run_dir outputs/digits --quick
"""
import argparse
import sys

import _bootstrap  # noqa: F401

from evaluation.interventions import MODES
from pipeline.evaluate_fl import PARTS, run_evaluation
from lightning_modules.runs import RunError
from localization.cache import CacheError


def budget(v: str):
    return v if not v.lstrip("-").isdigit() else int(v)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="outputs/digits")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--methods", nargs="+", default=None,
                   help="FL methods (interventions: which results; benchmarks: which to run); default: all")
    p.add_argument("--settings", nargs="+", default=None, help="settings for the interventions (default: all)")
    p.add_argument("--budgets", nargs="+", type=budget, default=None, help="FL result budgets (default: all)")
    p.add_argument("--ckpt_settings", nargs="+", default=None, help="settings for the checkpoint benchmark")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--where", choices=["post", "pre"], default="post",
                   help="neuron edits after GELU (knowledge neurons) or before it (RepTran)")
    p.add_argument("--n_random", type=int, default=None, help="random draws per FL result (default 2; quick 1)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="injected-fault seeds (default 0 1 2; quick 0)")
    p.add_argument("--pos_fraction", type=float, default=0.01, help="checkpoint ground truth: top fraction")
    p.add_argument("--split", default="repair")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--no_figures", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that exist")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 random draw, 1 seed, the 'all' setting only")
    a = p.parse_args()
    try:
        run_evaluation(a.run_dir, methods=a.methods, quick=a.quick, parts=a.parts, settings=a.settings,
                       budgets=a.budgets, modes=a.modes, where=a.where, n_random=a.n_random, inject_seeds=a.seeds,
                       ckpt_settings=a.ckpt_settings, pos_fraction=a.pos_fraction, split=a.split,
                       batch_size=a.batch_size, figures=not a.no_figures, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, RunError, CacheError) as e:
        sys.exit(f"evaluate_fl: {e}")
