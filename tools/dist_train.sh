#!/usr/bin/env bash
# Distributed training with torchrun, one process per GPU (per CPU worker on a machine without
# GPUs, where the gloo backend is used automatically).
#
#   tools/dist_train.sh CONFIG GPUS [tools/train.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.1.1 PORT=29500 tools/dist_train.sh CONFIG 8   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.1.1 PORT=29500 tools/dist_train.sh CONFIG 8   # node 1
# PYTHON selects the interpreter (default: the checkout's .venv/bin/python if there, else python).
set -euo pipefail

CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS=$(cd "$(dirname "$0")" && pwd)
VENV_PYTHON="$TOOLS/../.venv/bin/python"  # what `make setup` installed
PYTHON=${PYTHON:-$([ -x "$VENV_PYTHON" ] && echo "$VENV_PYTHON" || echo python)}

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}"
