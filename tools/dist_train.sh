#!/usr/bin/env bash
# Distributed training with torchrun, one process per GPU (per CPU worker on a machine without
# GPUs, where the gloo backend is used automatically).
#
#   tools/dist_train.sh CONFIG GPUS [tools/train.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.1.1 PORT=29500 tools/dist_train.sh CONFIG 8   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.1.1 PORT=29500 tools/dist_train.sh CONFIG 8   # node 1
# PYTHON selects the interpreter (default: the activated environment's, else the checkout's
# .venv/bin/python, else python; see launch_python.sh).
set -euo pipefail
if [ $# -lt 2 ] || [[ ! $2 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $(basename "$0") CONFIG GPUS [tools/train.py options]" >&2
    exit 2
fi

CONFIG=$1
GPUS=$2
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
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}"
