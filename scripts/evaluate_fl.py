"""Evaluate fault localization on a run (docs/methods.md section 5): interventions on every FL result, the
checkpoint benchmark and the injected-fault benchmark, with statistics, figures (PNG + PDF, TensorBoard) and a
headline table. Resumable: outputs already under <run_dir>/fl_eval are read back, not recomputed.

    python scripts/evaluate_fl.py --run_dir outputs/digits
    python scripts/evaluate_fl.py --run_dir outputs/digits --parts checkpoint injected --methods random grad_loss ours
    python scripts/evaluate_fl.py --run_dir outputs/digits --quick
    python scripts/evaluate_fl.py --run_dir outputs/digits --block 0   # block 0's FFN, into <run_dir>/fl_eval/block=0
"""
from typing import List, Optional

import _cli
from _cli import Budget

#: pipeline.evaluate_fl.PARTS and evaluation.interventions.MODES, spelled out so that --help imports no torch
#: (tests/test_cli_vocabulary.py checks they agree)
PARTS = ("interventions", "checkpoint", "injected")
MODES = ("zero", "double")


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--run_dir", type=str, default="outputs/digits", help="the run directory")
    p.add_argument("--parts", type=str, nargs="+", default=list(PARTS), help=f"parts to run, of {list(PARTS)}")
    p.add_argument("--methods", type=str, nargs="+", default=None,
                   help="FL methods (interventions: which results; benchmarks: which to run); null: all")
    p.add_argument("--settings", type=str, nargs="+", default=None, help="settings of the interventions (null: all)")
    p.add_argument("--budgets", type=Budget, nargs="+", default=None, help="FL result budgets (null: all)")
    p.add_argument("--ckpt_settings", type=str, nargs="+", default=None,
                   help="settings of the checkpoint benchmark (null: all)")
    p.add_argument("--modes", type=str, nargs="+", default=list(MODES), help=f"intervention modes, of {list(MODES)}")
    p.add_argument("--where", type=str, default="post",
                   help="neuron edits after GELU ('post', knowledge neurons) or before it ('pre', RepTran)")
    p.add_argument("--n_random", type=Optional[int], default=None,
                   help="random draws per FL result (null: 2; quick 1)")
    p.add_argument("--seeds", type=Optional[List[int]], default=None,
                   help="injected-fault seeds (null: [0, 1, 2]; quick [0])")
    p.add_argument("--pos_fraction", type=float, default=0.01, help="checkpoint ground truth: top fraction")
    p.add_argument("--comparisons", type=str, nargs="+", default=["corrected", "published_positional"],
                   help="checkpoint benchmark comparisons: corrected (the weights themselves) and/or "
                        "published_positional (exp-fl-5-7's sorted rank arrays, shown beside it)")
    p.add_argument("--k_rounding", type=str, default="round",
                   help="K and the positive count from a fraction: round, or floor (the published int(f N))")
    p.add_argument("--optimizers", type=str, nargs="+", default=["recorded", "sgd"],
                   help="checkpoint ground truths: the run's own epoch (recorded) and an SGD + momentum replay of it "
                        "from W(e-1) (sgd)")
    p.add_argument("--sgd_lr", type=float, default=0.02, help="the SGD replay's base learning rate")
    p.add_argument("--strengths", type=str, nargs="+", default=["30", "published"],
                   help="injected-fault strengths: a count of changed predictions (30), a share of the split (0.02), "
                        "or published (0.1 %%, at least 2)")
    _cli.add_method_options(p, "FL method -> its options for the benchmarks (scripts/localize.py --list --verbose)")
    p.add_argument("--split", type=str, default="repair", help="split the FL inputs come from")
    p.add_argument("--batch_size", type=int, default=512, help="loader batch size")
    p.add_argument("--no_figures", action="store_true", help="no figures (and no TensorBoard)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that exist")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 random draw, 1 seed, the 'all' setting only")
    p.add_argument("--block", type=int, default=-1,
                   help="transformer block whose FFN is evaluated (0 the first, -1 the last); a block other than the "
                        "last writes to <run_dir>/fl_eval/block=L and needs its token cache (scripts/cache_states.py "
                        "--block) and FL results (scripts/localize.py --block)")
    p.add_argument("--include_stale", action="store_true",
                   help="interventions: also evaluate FL results made from other inputs than the run's current "
                        "model, state cache and settings (default: left out and counted), labelled in a 'stale' "
                        "column")
    return p


@_cli.guard("evaluate_fl")
def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    _cli.quiet()
    from vitfl.core.runstore import RunStore
    from vitfl.evaluation.interventions import MODES
    from vitfl.localization.base import FL_METHODS
    from vitfl.pipeline.evaluate_fl import PARTS, run_evaluation
    from vitfl.pipeline.experiment import check_fl_options

    try:
        for name, given, allowed in (("parts", a.parts, PARTS), ("modes", a.modes, MODES)):
            bad = [v for v in given if v not in allowed]
            if bad:
                raise ValueError(f"--{name}: unknown {bad}; expected some of {list(allowed)}")
        if a.where not in ("post", "pre"):
            raise ValueError(f"--where must be 'post' or 'pre', got {a.where!r}")
        FL_METHODS.check(list(a.methods or []) + list(a.method_options))
        method_opts = {m: check_fl_options(m, o) for m, o in a.method_options.items()}
        if a.budgets is not None:
            from vitfl.pipeline.localize import check_budgets

            check_budgets(a.budgets)
        if a.n_random is not None and a.n_random < 1:
            raise ValueError(f"--n_random must be >= 1, got {a.n_random}")
        if not 0 < a.pos_fraction <= 1:
            raise ValueError(f"--pos_fraction must be in (0, 1], got {a.pos_fraction}")
        from vitfl.evaluation.injected_faults import strength_requirement
        from vitfl.evaluation.ranking_metrics import COMPARISONS, K_ROUNDINGS
        from vitfl.pipeline.evaluate_fl import OPTIMIZERS

        for name, given, allowed in (("comparisons", a.comparisons, COMPARISONS), ("optimizers", a.optimizers,
                                                                                   OPTIMIZERS),
                                     ("k_rounding", [a.k_rounding], K_ROUNDINGS)):
            bad = [v for v in given if v not in allowed]
            if bad:
                raise ValueError(f"--{name}: unknown {bad}; expected some of {list(allowed)}")
        for st in a.strengths:
            strength_requirement(st)
        if not a.sgd_lr > 0:
            raise ValueError(f"--sgd_lr must be > 0, got {a.sgd_lr}")
    except (KeyError, ValueError) as e:
        p.error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    run_evaluation(RunStore(a.run_dir), methods=a.methods, quick=a.quick, parts=a.parts, settings=a.settings,
                   budgets=a.budgets, modes=a.modes, where=a.where, n_random=a.n_random, inject_seeds=a.seeds,
                   ckpt_settings=a.ckpt_settings, pos_fraction=a.pos_fraction, split=a.split,
                   batch_size=a.batch_size, method_opts=method_opts or None, figures=not a.no_figures,
                   overwrite=a.overwrite, comparisons=a.comparisons, k_rounding=a.k_rounding,
                   optimizers=a.optimizers, replay={"sgd_lr": a.sgd_lr}, include_stale=a.include_stale,
                   block=a.block,
                   strengths=[s if s == "published" else (float(s) if "." in s else int(s)) for s in a.strengths])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
