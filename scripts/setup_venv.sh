#!/usr/bin/env bash
# Create ./.venv (if missing) and install the toolkit with its pinned dependencies and test extras.
# setup.cfg gives the compatible ranges, constraints.txt the tested versions (torch 2.14.1 / torchvision 0.29.1: timm needs that torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[tests]" -c constraints.txt
