"""Misclassification analysis of a run's repair split: confusion pairs, worst precision / recall labels, the 9
settings (src_tgt, tgt_fp, tgt_fn x rank 1-3) plus `all` (and, with --kinds ... tgt or --published, the published
`tgt` setting), with their I_neg / I_pos -> misclf/misclf_info.json (options recorded under "options") and
misclf/confusion.png|pdf.

    python scripts/analyze_misclf.py --run_dir outputs/digits
    python scripts/analyze_misclf.py --run_dir outputs/digits --published   # every published rule (see
                                                                            # docs/compat_settings.md)
"""
import argparse

import _bootstrap  # noqa: F401

from core.runstore import RunStore as RunLayout
from pipeline.misclf import step_misclf
from localization.misclf import ALL_KINDS, DEFAULT_KINDS, NO_TRUE_INPUT_RULES, TIE_ORDERS

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="outputs/digits")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie_order", choices=TIE_ORDERS, default="pred_true",
                   help="equal src_tgt counts ordered by (pred, true) label (published, default) or (true, pred)")
    p.add_argument("--no_true_input", choices=NO_TRUE_INPUT_RULES, default=None,
                   help="a label with no true input: 'skip' (default: left out of tgt_fn, reported) or "
                        "'recall_zero' (ranked with recall 0, as published)")
    p.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=None,
                   help=f"setting kinds to build (default: {' '.join(DEFAULT_KINDS)})")
    p.add_argument("--published", action="store_true",
                   help="the published rules: --no_true_input recall_zero and every kind including tgt "
                        "(explicit --no_true_input / --kinds win)")
    a = p.parse_args()
    no_true_input = a.no_true_input or ("recall_zero" if a.published else "skip")
    kinds = a.kinds or (ALL_KINDS if a.published else DEFAULT_KINDS)
    info = step_misclf(RunLayout(a.run_dir), ranks=a.ranks, seed=a.seed, tie_order=a.tie_order,
                       no_true_input=no_true_input, kinds=tuple(kinds))
    print(f"repair split: {info['n']} inputs, accuracy {info['accuracy']:.4f}; options {info['options']}")
    for name, s in info["settings"].items():
        print(f"  {name:12s} |I_neg| = {s['n_neg']:5d}")
    for name, why in info["skipped"].items():
        print(f"  {name:12s} skipped: {why}")
