"""Misclassification analysis of a run's repair split: confusion pairs, worst precision / recall labels, the 9
settings (src_tgt, tgt_fp, tgt_fn x rank 1-3) plus `all` (and, with --kinds ... tgt or --published, the published
`tgt` setting), with their I_neg / I_pos -> misclf/misclf_info.json (options recorded under "options") and
misclf/confusion.png|pdf.

    python scripts/analyze_misclf.py --run_dir outputs/digits
    python scripts/analyze_misclf.py --run_dir outputs/digits --published   # every published rule (see
                                                                            # docs/compat_settings.md)
"""
from typing import List, Optional

import _cli

#: localization.misclf.DEFAULT_KINDS, spelled out so that --help imports no torch (tests/test_cli_vocabulary.py
#: checks they agree)
DEFAULT_KINDS = ("src_tgt", "tgt_fp", "tgt_fn", "all")


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dir", type=str, default="outputs/digits", help="the run directory (states cached)")
    p.add_argument("--split", type=str, default="repair", help="the split the settings come from")
    p.add_argument("--ranks", type=int, default=3, help="ranks per setting kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified I_pos sample")
    p.add_argument("--pos_fraction", type=float, default=0.05, help="share of the split in the I_pos sample")
    p.add_argument("--tie_order", type=str, default="pred_true",
                   help="equal src_tgt counts ordered by (pred, true) label ('pred_true', published) or (true, pred)")
    p.add_argument("--no_true_input", type=Optional[str], default=None,
                   help="a label with no true input: 'skip' (left out of tgt_fn, reported) or 'recall_zero' (ranked "
                        "with recall 0, as published); null: 'skip', or 'recall_zero' with --published")
    p.add_argument("--kinds", type=str, nargs="+", default=None,
                   help=f"setting kinds to build; null: {' '.join(DEFAULT_KINDS)} (with --published also tgt)")
    p.add_argument("--published", action="store_true",
                   help="the published rules: --no_true_input recall_zero and every kind including tgt "
                        "(explicit --no_true_input / --kinds win)")
    return p


@_cli.guard("analyze_misclf")
def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _cli.quiet()
    from vitfl.core.runstore import RunStore
    from vitfl.localization.misclf import ALL_KINDS, DEFAULT_KINDS, NO_TRUE_INPUT_RULES, TIE_ORDERS
    from vitfl.pipeline.misclf import step_misclf

    no_true_input = a.no_true_input or ("recall_zero" if a.published else "skip")
    kinds = a.kinds or (ALL_KINDS if a.published else DEFAULT_KINDS)
    for name, value, choices in (("tie_order", [a.tie_order], TIE_ORDERS),
                                 ("no_true_input", [no_true_input], NO_TRUE_INPUT_RULES),
                                 ("kinds", kinds, ALL_KINDS)):
        bad = [v for v in value if v not in choices]
        if bad:
            p.error(f"--{name}: {bad} not in {list(choices)}")
    if a.ranks < 1:
        p.error(f"--ranks must be >= 1, got {a.ranks}")
    info = step_misclf(RunStore(a.run_dir), split=a.split, ranks=a.ranks, seed=a.seed, pos_fraction=a.pos_fraction,
                       tie_order=a.tie_order, no_true_input=no_true_input, kinds=tuple(kinds))
    print(f"{a.split} split: {info['n']} inputs, accuracy {info['accuracy']:.4f}; options {info['options']}")
    for name, s in info["settings"].items():
        print(f"  {name:12s} |I_neg| = {s['n_neg']:5d}")
    for name, why in info["skipped"].items():
        print(f"  {name:12s} skipped: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
