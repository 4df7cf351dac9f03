"""The main job: the experiment configs/experiment/main_job_mnist.yaml run by the experiment runner (this script is
a short form of scripts/run_experiment.py; every option of that script works here too).

On the embedded MNIST testbed (docs/testbed.md; no download): pretrain a small ViT, fine-tune it 2 epochs with
per-epoch checkpoints, test it; cache its CLS states; the layer study; the misclassification settings; every FL
method at budgets 0.1 / 0.5 / 1 %% of the last FFN and N_avg; the FL evaluation; a repair sweep; the cross-validated
repair (repairability@N); the coverage table; the report (report/report.md, report.html). Every step skips what is
already on disk, so an interrupted job resumes where it stopped.

    python scripts/main_job.py                                 # outputs/mnist
    python scripts/main_job.py --quick --run_dir /tmp/smoke    # + configs/experiment/main_job_mnist_quick.yaml
    python scripts/main_job.py --testbed digits                # + main_job_digits.yaml: outputs/digits
    python scripts/main_job.py --print_config                  # the experiment as it would run
    # the same as: python scripts/run_experiment.py --config configs/experiment/main_job_mnist.yaml [...]
"""
from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

ROOT = _bootstrap.ROOT
CONFIG = "configs/experiment/main_job_mnist.yaml"
#: overlays given after the main config (a later --config replaces what it names)
OVERLAYS = {"quick": "configs/experiment/main_job_mnist_quick.yaml",
            "digits": "configs/experiment/main_job_digits.yaml"}
SKIPPABLE = ("evaluate_fl", "repair", "crossval", "coverage")


def runner_args(argv: list[str] | None = None) -> list[str]:
    """The scripts/run_experiment.py command line this main-job command line stands for."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False, add_help=False)
    p.add_argument("--testbed", choices=("mnist", "digits"), default="mnist",
                   help="mnist: pretrain + 2-epoch fine-tune (default); digits: a 4-block ViT, 40 epochs from scratch")
    p.add_argument("--quick", action="store_true", help="the smoke run (main_job_mnist_quick.yaml)")
    p.add_argument("--skip", nargs="+", default=[], choices=SKIPPABLE, help="steps to leave out")
    a, rest = p.parse_known_args(argv)
    if a.quick and a.testbed == "digits":
        p.error("--quick is the MNIST testbed's smoke run; for the digits ViT give run_experiment.py your own overlay")
    out = ["--config", f"{ROOT}/{CONFIG}"]
    if a.quick:
        out += ["--config", f"{ROOT}/{OVERLAYS['quick']}"]
    if a.testbed == "digits":
        out += ["--config", f"{ROOT}/{OVERLAYS['digits']}"]
    if a.skip:
        import yaml

        steps = yaml.safe_load(open(f"{ROOT}/{CONFIG}"))["steps"]
        out += ["--only", *[s for s in steps if s not in a.skip]]
    return [*out, "--root", str(ROOT), *rest]


def main(argv: list[str] | None = None) -> int:
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print("usage: main_job.py [--testbed {mnist,digits}] [--quick] [--skip STEP [STEP ...]] "
              "[run_experiment.py options]\n")
        print(__doc__.replace("%%", "%"))
        print("main-job options: --testbed {mnist,digits}  --quick  --skip STEP [STEP ...] "
              f"(of {', '.join(SKIPPABLE)}); every other option is run_experiment.py's (its --help lists them)")
        return 0
    import run_experiment

    return run_experiment.main(runner_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
