#!/usr/bin/env bash
# Training on a Slurm cluster: srun starts one task per GPU (GPUS in all, GPUS_PER_NODE per node).
#
#   GPUS=16 tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]
# Environment: GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun options),
# PYTHON (default: the activated environment's, else the checkout's .venv, see launch_python.sh).
set -euo pipefail
if [ $# -lt 4 ] || [[ $4 == -* ]]; then
    echo "usage: $(basename "$0") PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py options]" >&2
    exit 2
fi

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
TOOLS=$(cd "$(dirname "$0")" && pwd)
# sbatch runs a copy of this script from its spool directory: the tools are then those of the
# directory the job was submitted from.
if [[ ! -f $TOOLS/launch_python.sh ]]; then
    TOOLS=$(cd "${SLURM_SUBMIT_DIR:-.}/tools" 2> /dev/null && pwd) || {
        echo "$(basename "$0"): no tools/ in ${SLURM_SUBMIT_DIR:-$PWD}: submit the job from the" \
             "mmtwins checkout" >&2
        exit 2
    }
fi
# shellcheck source=tools/launch_python.sh
source "$TOOLS/launch_python.sh"

# shellcheck disable=SC2086  # SRUN_ARGS holds several options
PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PYTHON" -u "$TOOLS/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "${@:5}"
