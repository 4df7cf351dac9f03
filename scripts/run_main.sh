#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install into ./.venv, then run everything end to end:
# the experiment configs/experiment/main_job_mnist.yaml through the experiment runner. Arguments go to the runner
# (e.g. --print_config, --run_dir DIR, --config configs/experiment/main_job_mnist_quick.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python scripts/run_experiment.py --config configs/experiment/main_job_mnist.yaml "$@"
