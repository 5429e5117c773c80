#!/usr/bin/env bash
# Distributed testing with torchrun, one process per GPU (gloo on CPUs when there is no GPU).
#
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options, e.g. --tta --out FILE]
# Multi-node and interpreter: NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON as in dist_train.sh.
set -euo pipefail
if [ $# -lt 3 ] || [[ ! $3 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $(basename "$0") CONFIG CHECKPOINT GPUS [tools/test.py options]" >&2
    exit 2
fi

CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/launch_python.sh
source "$TOOLS/launch_python.sh"

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
