#!/usr/bin/env bash
# GPU figures in one command (<= 8 minutes on one GPU): the DE repair at ViT-B/16 shapes (every placement, every
# budget, 50 generations, population 100: benchmarks/repair_speed.py), the exp-repair-4 grid on a sample of 27
# runs (benchmarks/repair_grid.py --limit 27, extrapolated), and every FL method on 10k inputs
# (benchmarks/fl_speed.py). Targets: <= 0.5 s per 50-generation repair run; FL within 3x of one head
# forward+backward (IG within 3 m x).
#
#   bash benchmarks/gpu_repair.sh                 # on a GPU machine (writes gpu_results/ or $OUT)
#   bash benchmarks/gpu_repair.sh --device cpu    # smoke run on the CPU: tiny sizes, checks the script works
#
# Each step has its own time limit, so one slow step cannot eat the others' time; the tables go to
# $OUT (or ./gpu_results) as text files and to stdout.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:-cuda}; fi
RES=${OUT:-gpu_results}
mkdir -p "$RES"
echo "device=$DEVICE python=$PY results=$RES"
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
if [ "$DEVICE" = "cpu" ]; then
  # smoke: tiny shapes, a few generations, a 9-run grid sample of 2 generations, FL --quick on 2 methods
  timeout 300 $PY benchmarks/repair_speed.py --device cpu --budgets 236 --placements random clustered fl:ours \
    --generations 2 --d 768 2>&1 | tee "$RES/repair_speed.txt" | grep -v Warning | tail -8
  timeout 300 $PY benchmarks/repair_grid.py --device cpu --limit 9 --generations 2 --procs 2 2>&1 \
    | tee "$RES/repair_grid.txt" | tail -4
  timeout 300 $PY benchmarks/fl_speed.py --device cpu --quick --methods grad_loss ours 2>&1 \
    | tee "$RES/fl_speed.txt" | tail -6
  exit 0
fi
timeout 200 $PY benchmarks/repair_speed.py --device cuda 2>&1 | tee "$RES/repair_speed.txt" | grep -v Warning | tail -22
timeout 90 $PY benchmarks/repair_grid.py --device cuda --limit 27 2>&1 | tee "$RES/repair_grid.txt" | tail -16
timeout 180 $PY benchmarks/fl_speed.py --device cuda --n 10000 2>&1 | tee "$RES/fl_speed.txt" | tail -32
