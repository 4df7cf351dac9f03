"""Run a whole experiment from one config (configs/experiment/*.yaml): train, cache, layer study, misclassification
settings, FL, FL evaluation, repair, cross-validated repair, tables, adequacy, coverage, report, in data-flow order.
Resumable (every step skips what the run store holds) and shardable over GPUs / nodes. The main job is one of them.

    python scripts/run_experiment.py --config configs/experiment/main_job_mnist.yaml      # the main job
    python scripts/run_experiment.py --config configs/experiment/main_job_mnist.yaml \
        --config configs/experiment/main_job_mnist_quick.yaml --run_dir /tmp/smoke           # its smoke run
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4_digits.yaml
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --print_config
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only prepare    # once
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only work --shard 3/8
    python scripts/run_experiment.py --config configs/experiment/exp_repair_4.yaml --only final      # after all

Steps: train cache testbed misclf localize evaluate_fl repair adequacy crossval aggregate coverage; phases: prepare
(train cache testbed misclf), work (localize repair adequacy: the sharded ones), final (evaluate_fl crossval
aggregate coverage). ``--only`` takes one or more of them (``--only prepare work`` or ``--only prepare,work``).
A later ``--config`` overrides an earlier one (an overlay such as main_job_mnist_quick.yaml): options of the step
blocks one by one, the mappings ``datasets`` and ``evaluate_fl`` and every list as a whole. The step blocks take the step functions' keyword names
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
    p.add_argument("--blocks", type=Optional[List[int]], default=None,
                   help="a layer study: transformer blocks (0 the first, -1 the last); cache, localize, evaluate_fl, "
                        "repair and crossval run once per block and aggregate tabulates per block (null: the last "
                        "block alone, as without it)")
    p.add_argument("--cache.splits", type=List[str], default=["repair", "test"], help="splits to cache")
    p.add_argument("--cache.block", type=Optional[int], default=None,
                   help="also cache this block's token states (FL on one block; null: the last block's cache only)")
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
    p.add_argument("--localize.block", type=Optional[int], default=None,
                   help="the block whose FFN is localized (null: the last; needs cache.block the same)")
    p.add_argument("--localize.token_statistic", type=Optional[str], default=None,
                   help="a token head's per-input token statistic: readout, cls or mean (null: readout); not on the "
                        "last block of a class-token model, whose head reads the CLS token")
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
    p.add_argument("--repair.workers", type=Union[int, str], default=1,
                   help="processes on this machine ('auto': the cores, at most 4)")
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
    p.add_argument("--crossval.methods", type=List[str], default=["ours", "arachne_w", "random"],
                   help="FL methods of the cross-validated repair")
    p.add_argument("--crossval.settings", type=Optional[List[str]], default=None,
                   help="settings (null: every setting each fold has)")
    p.add_argument("--crossval.budgets", type=List[Budget], default=["0.5%"], help="budgets")
    p.add_argument("--crossval.reps", type=int, default=1, help="repetitions")
    p.add_argument("--crossval.repairs", type=List[Dict[str, Any]],
                   default=[{"repair": "de"}, {"repair": "lp", "logger": True}],
                   help="repair methods, each {repair, repair_options, logger}; with lp: repairability@N")
    p.add_argument("--crossval.workers", type=Union[int, str], default=1,
                   help="processes on this machine ('auto': the cores, at most 4)")
    p.add_argument("--coverage.quick", type=bool, default=False, help="samples of 300 training / 100 eval inputs")
    p.add_argument("--coverage.attack", type=str, default="fgsm", help="the adversarial attack (ART)")
    p.add_argument("--coverage.n_train", type=Optional[int], default=None, help="training inputs (null: all)")
    p.add_argument("--coverage.n_clean", type=Optional[int], default=None, help="evaluation inputs (null: all)")
    p.add_argument("--coverage.batch_size", type=int, default=128, help="the attack's batch size")
    p.add_argument("--reps", type=Optional[int], default=None,
                   help="repetitions of every repair sweep and of the cross-validated repair (a shorter run; null: the "
                        "config's)")
    p.add_argument("--generations", type=Optional[int], default=None,
                   help="generations of every DE search (sweeps and cross-validated repair; null: the config's)")
    p.add_argument("--run_dir", type=Optional[str], default=None,
                   help="the run directory of a one-data-set experiment (replaces datasets.<name>.run_dir; relative "
                        "to the current directory)")
    p.add_argument("--only", type=str, nargs="+", default=None,
                   help="run only these steps / phases of the experiment: prepare, work, final or step names, "
                        "space- or comma-separated (null: the config's steps)")
    p.add_argument("--shard", type=str, default="0/1",
                   help="k/n: this process runs every n-th task of the sharded steps from k (0-based)")
    p.add_argument("--root", type=Optional[str], default=None,
                   help="folder that relative paths in the config start from (null: the current directory)")
    return p


#: the steps and phases ``--only`` takes (vitfl.pipeline.experiment.STEPS / PHASES; tests/test_cli_vocabulary.py checks)
STEPS = ("train", "cache", "testbed", "misclf", "localize", "evaluate_fl", "repair", "adequacy", "crossval",
         "aggregate", "coverage")
PHASES = ("prepare", "work", "final")


def experiment_dict(ns) -> Dict[str, Any]:
    """The experiment part of a parsed namespace (without the run-time options). The evaluate_fl block's method
    options are ``method_options`` as in the other blocks; ``method_opts`` (run_evaluation's keyword) is read as
    the same key."""
    d = ns.as_dict()
    run_dir = d.pop("run_dir", None)
    shorter = {"reps": d.pop("reps", None), "generations": d.pop("generations", None)}
    for key, v in shorter.items():
        if v is not None and v < 1:
            raise ValueError(f"--{key} must be >= 1, got {v}")
    rep_block, cv = d.get("repair") or {}, d.get("crossval") or {}
    if shorter["reps"] is not None:  # a shorter run: its results have other identities, so they never mix
        rep_block["sweeps"] = [{**sw, "reps": shorter["reps"]} for sw in rep_block.get("sweeps") or []]
        cv["reps"] = shorter["reps"]
    if shorter["generations"] is not None:
        g = {"generations": shorter["generations"]}
        rep_block["sweeps"] = [{**sw, "repair_options": {**(sw.get("repair_options") or {}), **g}}
                               if sw.get("repair", "de") == "de" else sw for sw in rep_block.get("sweeps") or []]
        cv["repairs"] = [{**r, "repair_options": {**(r.get("repair_options") or {}), **g}}
                         if r.get("repair", "de") == "de" else r for r in cv.get("repairs") or []]
    for k in ("config", "__path__", "only", "shard", "root", "debug"):
        d.pop(k, None)
    if run_dir:  # one data set: its run directory from the command line, absolute (relative to the current folder)
        if len(d.get("datasets") or {}) != 1:
            raise ValueError(f"--run_dir needs an experiment with one data set; this one has "
                             f"{sorted(d.get('datasets') or {})}: set datasets.<name>.run_dir in the config")
        import os

        name = next(iter(d["datasets"]))
        d["datasets"] = {name: {**d["datasets"][name], "run_dir": os.path.abspath(run_dir)}}
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
    import sys

    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    show = [a for a in argv if a == "--print_config"]  # printed as it will run: after --run_dir / --reps / ...
    ns = p.parse_args([a for a in argv if a != "--print_config"])
    if show:
        import yaml

        try:
            cfg = experiment_dict(ns)
        except ValueError as e:
            p.error(str(e))
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    _cli.quiet()
    from vitfl.pipeline.experiment import ExperimentConfigError, check_experiment, run_experiment
    from vitfl.pipeline.repair import parse_shard

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
