#!/usr/bin/env bash
# The ViT-B/16 rehearsal on one GPU (bf16-mixed, a larger CIFAR-100 fixture): the same path as the slow CPU test
# tests/test_vit_b_rehearsal.py (fit 2 epochs -> cache -> misclf -> every FL method on 4,718,592 weights ->
# checkpoint benchmark -> DE / masked fine-tuning repair at 236 / 472 / 944 -> coverage), printing each step's
# wall time and peak memory (RSS and GPU) and writing them to $OUT_DIR/rehearsal_{hf,timm}.csv.
#
#   bash benchmarks/gpu_rehearsal.sh                 # GPU: 2,000 train + 1,000 test images, bf16-mixed (<= 8 min
#                                                    # on one H200-class GPU)
#   bash benchmarks/gpu_rehearsal.sh --smoke         # CPU, 200 + 100 images (10 classes), fp32: proves the command works
#   OUT_DIR=/some/dir bash benchmarks/gpu_rehearsal.sh
# It first measures the FFN head of a non-last block of ViT-B/16 (benchmarks/ffn_block_cost.py, on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT_DIR=${OUT_DIR:-outputs/gpu_rehearsal}
mkdir -p "$OUT_DIR"

if [ "${1:-}" = "--smoke" ]; then
  export REHEARSAL_ACCELERATOR=cpu REHEARSAL_PRECISION=32-true REHEARSAL_CLASSES=10 \
         REHEARSAL_TRAIN_PER_CLASS=20 REHEARSAL_TEST_PER_CLASS=10 REHEARSAL_TRAIN_BATCHES=2 REHEARSAL_BATCH=8 REHEARSAL_BACKBONES=${REHEARSAL_BACKBONES:-hf} \
         REHEARSAL_FL_METHODS=${REHEARSAL_FL_METHODS:-random,grad_loss,arachne_w,ours,bl} \
         REHEARSAL_DE_GENERATIONS=2 REHEARSAL_DE_POP=10
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --smoke on a CPU')"
  export REHEARSAL_ACCELERATOR=gpu REHEARSAL_PRECISION=bf16-mixed REHEARSAL_CLASSES=100 REHEARSAL_TRAIN_PER_CLASS=20 \
         REHEARSAL_TEST_PER_CLASS=10 REHEARSAL_TRAIN_BATCHES=${REHEARSAL_TRAIN_BATCHES:-63} REHEARSAL_BATCH=32 \
         REHEARSAL_BACKBONES=${REHEARSAL_BACKBONES:-hf,timm} REHEARSAL_DE_GENERATIONS=${REHEARSAL_DE_GENERATIONS:-50} \
         REHEARSAL_DE_POP=100 REHEARSAL_OPTIMIZERS=${REHEARSAL_OPTIMIZERS:-recorded,sgd}
fi
export REHEARSAL_OUT="$OUT_DIR"
# a non-last block of ViT-B/16: the block-addressed FFN head (exactness, forward / backward cost per input, token
# cache sizes) for the last block (CLS head), the middle block and block 0
if [ "${1:-}" = "--smoke" ]; then
  "$PY" benchmarks/ffn_block_cost.py --batch 2 --repeats 1 --dim 64 --depth 4 --heads 4 --img 32 --patch 8 \
    | tee "$OUT_DIR/ffn_block_cost.md"
else
  "$PY" benchmarks/ffn_block_cost.py --device cuda --batch 64 --repeats 5 | tee "$OUT_DIR/ffn_block_cost.md"
fi
"$PY" -m pytest -q -s -m slow tests/test_vit_b_rehearsal.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/rehearsal.log"
echo
echo "per-step times and peak memory:"
for f in "$OUT_DIR"/rehearsal_*.csv; do [ -f "$f" ] && column -s, -t < "$f"; done
