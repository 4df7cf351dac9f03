#!/bin/bash
# Example SLURM job for a whole published experiment with one command (scripts/run_experiment.py): a preparation
# job (train, cache, misclassification settings), an array of N shards of the same deterministic grid (localize,
# repair, adequacy), then one job for the shared steps (FL evaluation, tables). Every step skips what the run store
# already holds, so re-submitting after a crash / time-out finishes exactly what is missing.
#
#   EXP=configs/experiment/exp_repair_4.yaml
#   prep=$(sbatch --parsable --export=ALL,EXP=$EXP,PHASE=prepare --gres=gpu:4 scripts/slurm_repair_sweep.sh)
#   work=$(sbatch --parsable --dependency=afterok:$prep --array=0-15 --export=ALL,EXP=$EXP,PHASE=work \
#          scripts/slurm_repair_sweep.sh)                                             # 16 shards, 1 GPU each
#   sbatch --dependency=afterany:$work --export=ALL,EXP=$EXP,PHASE=final scripts/slurm_repair_sweep.sh
#
# A shard of the array runs `--only work --shard k/N` with k = its array index and N = the array size.
#
#SBATCH --job-name=vit-experiment
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --output=logs/experiment_%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source .venv/bin/activate
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-4}"

EXP=${EXP:-configs/experiment/exp_repair_4.yaml}
PHASE=${PHASE:-work}
EXTRA=${EXTRA:-}        # more --config files or flags, e.g. EXTRA="--config my_paths.yaml"

if [[ "$PHASE" != "work" ]]; then
    exec python scripts/run_experiment.py --config "$EXP" $EXTRA --only "$PHASE"
fi
K=$(( ${SLURM_ARRAY_TASK_ID:?run the work phase as an array job (sbatch --array=0-N)} - ${SLURM_ARRAY_TASK_MIN:-0} ))
N=${SLURM_ARRAY_TASK_COUNT:-$(( ${SLURM_ARRAY_TASK_MAX:-0} - ${SLURM_ARRAY_TASK_MIN:-0} + 1 ))}
exec python scripts/run_experiment.py --config "$EXP" $EXTRA --only work --shard "$K/$N"
