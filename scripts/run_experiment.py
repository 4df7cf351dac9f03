"""Run a whole published experiment from one config (configs/experiment/*.yaml): train, cache, misclassification
settings, FL, FL evaluation, repair, tables, adequacy, in data-flow order. Resumable (every step skips what the run
store holds) and shardable over GPUs / nodes.

    python scripts/run_experiment.py --config configs/experiment/exp_repair_4_digits.yaml
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --print_config
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only prepare    # once
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only work --shard 3/8
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only final      # after all

Steps: train cache misclf localize evaluate_fl repair aggregate adequacy; phases: prepare (train cache misclf),
work (localize repair adequacy: the sharded ones), final (evaluate_fl aggregate). ``--only`` takes one or more of
them (``--only prepare work`` or ``--only prepare,work``). The step blocks take the step functions' keyword names
(pipeline/experiment.py); null means the function's default. A case that cannot run (a method that needs two
I_neg inputs on a setting with one) is recorded once as not applicable and counted, not a failure. A run stopped
by SIGTERM / SIGINT exits non-zero and prints the command that resumes it.
"""
from typing import Any, Dict, List, Optional, Union

import _cli
from _cli import Budget


def build_parser():
    p = _cli.make_parser(__doc__)
    p.add_argument("--name", type=str, default="", help="the experiment's name (e.g. exp_repair_4)")
    p.add_argument("--description", type=str, default="", help="what it reproduces (free text)")
    p.add_argument("--variant", type=str, default="corrected",
                   help="'published' (the published code's options) or 'corrected' (this toolkit's defaults)")
    p.add_argument("--compat", type=List[str], default=[],
                   help="the published-code options this variant switches on, as 'step.option=value' (documentation; "
                        "each must be set in the config)")
    p.add_argument("--datasets", type=Dict[str, Dict[str, Any]], default={},
                   help="name -> {run_dir, train: {configs, args, epochs} or null (already trained), adequacy: "
                        "overrides of the adequacy config for this data set}")
    p.add_argument("--steps", type=List[str], default=[],
                   help="the experiment's steps / phases in data-flow order (empty: every step)")
    p.add_argument("--cache.splits", type=List[str], default=["repair", "test"], help="splits to cache")
    p.add_argument("--cache.accelerator", type=Optional[str], default=None, help="Trainer accelerator (null: cpu)")
    p.add_argument("--cache.devices", type=Optional[int], default=None, help="Trainer devices (null: 1)")
    p.add_argument("--misclf.split", type=str, default="repair", help="the split the settings come from")
    p.add_argument("--misclf.ranks", type=int, default=3, help="ranks per setting kind")
    p.add_argument("--misclf.seed", type=int, default=0, help="seed of the stratified I_pos sample")
    p.add_argument("--misclf.pos_fraction", type=float, default=0.05, help="share of the split in the I_pos sample")
    p.add_argument("--misclf.tie_order", type=str, default="pred_true",
                   help="equal src_tgt counts ordered by (pred, true) (published) or (true, pred)")
    p.add_argument("--misclf.no_true_input", type=str, default="skip",
                   help="a label with no true input: 'skip' or 'recall_zero' (published)")
    p.add_argument("--misclf.kinds", type=List[str], default=["src_tgt", "tgt_fp", "tgt_fn", "all"],
                   help="setting kinds to build (src_tgt tgt_fp tgt_fn tgt all)")
    p.add_argument("--localize.methods", type=Optional[List[str]], default=None,
                   help="FL methods (null: every registered method)")
    p.add_argument("--localize.settings", type=Optional[List[str]], default=None,
                   help="settings (null: every available setting)")
    p.add_argument("--localize.budgets", type=List[Budget], default=_cli.DEFAULT_BUDGETS,
                   help="budgets: weights, 'avg' (N_avg) or 'front'")
    p.add_argument("--localize.seed", type=int, default=0, help="FL seed")
    p.add_argument("--localize.batch_size", type=int, default=512, help="FL loader batch size")
    _cli.add_method_options(p, "FL method -> its options (python scripts/localize.py --list --verbose)",
                            "--localize.method_options")
    p.add_argument("--localize.accelerator", type=Optional[str], default=None, help="Trainer accelerator")
    p.add_argument("--localize.devices", type=Optional[int], default=None, help="Trainer devices (ddp when > 1)")
    p.add_argument("--evaluate_fl", type=Dict[str, Any], default={},
                   help="keyword options of pipeline.evaluate_fl.run_evaluation (parts, methods, settings, budgets, "
                        "modes, where, n_random, inject_seeds, ckpt_settings, ckpt_epoch, pos_fraction, split, "
                        "batch_size, method_options (also: method_opts), figures)")
    p.add_argument("--repair.sweeps", type=List[Dict[str, Any]], default=[],
                   help="repair sweeps, each {name, repair, methods, settings, budgets, reps, seed, repair_options, "
                        "fl_options} (python scripts/repair_sweep.py --list --verbose)")
    p.add_argument("--repair.fl_batch_size", type=int, default=512, help="FL loader batch size inside the sweep")
    p.add_argument("--repair.accelerator", type=str, default="cpu", help="accelerator of the repair fits")
    p.add_argument("--repair.tensorboard", type=bool, default=True, help="log each repair run to TensorBoard")
    p.add_argument("--repair.on_error", type=str, default="continue",
                   help="a failed run: 'continue' (reported, retried next time) or 'raise'")
    p.add_argument("--adequacy.rqs", type=List[str], default=["rq1", "rq2", "rq3", "rq4", "rq5"],
                   help="DeepImportance research questions to run")
    p.add_argument("--adequacy.configs", type=List[str], default=["configs/adequacy/default.yaml"],
                   help="adequacy YAML configs, merged in order")
    p.add_argument("--adequacy.overrides", type=Dict[str, Any], default={},
                   help="merged over the adequacy configs (e.g. idc: {round_centroids: 2})")
    p.add_argument("--adequacy.use_run_checkpoint", type=bool, default=True,
                   help="test the run's last checkpoint (else the adequacy config's model)")
    p.add_argument("--only", type=str, nargs="+", default=None,
                   help="run only these steps / phases of the experiment: prepare, work, final or step names, "
                        "space- or comma-separated (null: the config's steps)")
    p.add_argument("--shard", type=str, default="0/1",
                   help="k/n: this process runs every n-th task of the sharded steps from k (0-based)")
    p.add_argument("--root", type=Optional[str], default=None,
                   help="folder that relative paths in the config start from (null: the current directory)")
    return p


#: the steps and phases ``--only`` takes (pipeline.experiment.STEPS / PHASES; tests/test_cli_vocabulary.py checks)
STEPS = ("train", "cache", "misclf", "localize", "evaluate_fl", "repair", "aggregate", "adequacy")
PHASES = ("prepare", "work", "final")


def experiment_dict(ns) -> Dict[str, Any]:
    """The experiment part of a parsed namespace (without the run-time options). The evaluate_fl block's method
    options are ``method_options`` as in the other blocks; ``method_opts`` (run_evaluation's keyword) is read as
    the same key."""
    d = ns.as_dict()
    for k in ("config", "__path__", "only", "shard", "root", "debug"):
        d.pop(k, None)
    ev = d.get("evaluate_fl")
    if isinstance(ev, dict) and "method_options" in ev:
        if ev.get("method_opts") not in (None, {}):
            raise ValueError("evaluate_fl: give method_options or method_opts (the same key), not both")
        ev = dict(ev)
        ev["method_opts"] = ev.pop("method_options")
        d["evaluate_fl"] = ev
    return d


def only_steps(only: Optional[List[str]]) -> Optional[List[str]]:
    """``--only``'s steps / phases, comma-separated items split; ValueError naming an unknown one."""
    if only is None:
        return None
    out = [s.strip() for item in only for s in str(item).split(",") if s.strip()]
    for s in out:
        if s not in STEPS and s not in PHASES:
            hint = _cli.suggestion(s, list(STEPS + PHASES))
            raise ValueError(f"--only {s}: not a step or phase" + (f"; did you mean {hint}?" if hint else "")
                             + f" (phases: {' '.join(PHASES)}; steps: {' '.join(STEPS)})")
    if not out:
        raise ValueError("--only: give at least one step or phase")
    return out


@_cli.guard("run_experiment")
def main(argv=None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    _cli.quiet()
    from pipeline.experiment import ExperimentConfigError, check_experiment, run_experiment
    from pipeline.repair import parse_shard

    try:
        cfg = experiment_dict(ns)
        only = only_steps(ns.only)
        parse_shard(ns.shard)
        check_experiment(cfg)
    except (ExperimentConfigError, ValueError, KeyError) as e:
        p.error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    out = run_experiment(cfg, steps=only, shard=ns.shard, root=ns.root)
    if out.get("aggregate", {}).get("markdown"):
        print(out["aggregate"]["markdown"])
    failed = sum(r.get("error", 0) for r in out["summary"])
    print(f"experiment {cfg['name']}: " + "; ".join(
        f"{r['step']} [{r['dataset']}] {r.get('done', 0)} done / {r.get('skipped', 0)} skipped / "
        f"{r.get('not applicable', 0)} n/a" + (f" / {r['error']} failed" if r.get("error") else "")
        for r in out["summary"]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
