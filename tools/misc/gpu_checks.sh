#!/usr/bin/env bash
# The GPU checks behind docs/benchmarks_history.md ("On a GPU") in one bounded run, most wanted
# first: the MLP A/B, the training step against the peers (fp32 and fp16 autocast) at batch 2,
# the attention-kernel A/B and the peers at batch 16 (where the GPU, not the host, sets the
# pace), the CUDA tests, the COCO-size training step, bf16 autocast. Steps run in that order,
# each capped so the whole run ends within SECONDS; a step that would get under 20 s is
# skipped. After every step the logs, JSON and Markdown written so far are packed into
# OUTDIR/gpu_checks.tar.gz, so a run cut short keeps what it measured (compare_peers.py also
# rewrites its JSON after every case).
#
#   bash tools/misc/gpu_checks.sh OUTDIR [SECONDS]          # default 540 s
#
# The stack must import (a project venv, or tools/misc/offline_stack.sh's PYTHONPATH).
# DEVICE=cpu runs the same steps on the CPU (a dry run of this script; slow).
set -uo pipefail

out=${1:?usage: $0 OUTDIR [SECONDS]}
budget=${2:-540}
py=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"
peers=(tools/analysis_tools/compare_peers.py --device "${DEVICE:-cuda}")

step() {  # NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less if the budget ends)
    local name=$1 cap=$2 start=$SECONDS rc
    shift 2
    local left=$((budget - SECONDS - 10))
    ((cap > left)) && cap=$left
    if ((cap < 20)); then
        echo "[gpu_checks] $name: skipped, ${left} s left"
        return
    fi
    echo "[gpu_checks] $name: up to ${cap} s: $*"
    timeout -k 5 "$cap" "$@" >"$work/$name.log" 2>&1
    rc=$?
    echo "[gpu_checks] $name: exit $rc after $((SECONDS - start)) s"
    grep -E '^ *(pcpvt|svt)-|passed|failed|skipped|error|Error' "$work/$name.log" | tail -n 25
    # replaced whole: a kill during tar leaves the previous step's archive intact
    tar -czf "$out/.gpu_checks.tar.gz.tmp" -C "$work" . \
        && mv "$out/.gpu_checks.tar.gz.tmp" "$out/gpu_checks.tar.gz"
}

ab=(--device "${DEVICE:-cuda}" --steps 25)
step env 60 bash -c "nvidia-smi; $py -c 'import torch, mmseg, mmpretrain, timm, mmtwins;
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), timm.__version__)'"
step mlp_ab 45 "$py" tools/analysis_tools/mlp_ab.py "${ab[@]}"
step peers 150 "$py" "${peers[@]}" --cases train512 amp-train512 --warmup 10 --repeats 20 \
    --out "$work/peers_cuda.json" --markdown "$work/peers_cuda.md"
step sdpa_ab 70 "$py" tools/analysis_tools/sdpa_ab.py "${ab[@]}" --batch 16 --where gsa
step peers_b16 120 "$py" "${peers[@]}" --cases train512 --batch 16 --warmup 5 --repeats 10 \
    --out "$work/peers_b16_cuda.json" --markdown "$work/peers_b16_cuda.md"
step test_cuda 110 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step coco 90 "$py" "${peers[@]}" --cases coco --warmup 2 --repeats 3 \
    --out "$work/coco_cuda.json" --markdown "$work/coco_cuda.md"
step bf16 90 "$py" "${peers[@]}" --cases amp-train512 --amp-dtype bf16 --warmup 10 \
    --repeats 20 --out "$work/bf16_cuda.json" --markdown "$work/bf16_cuda.md"
echo "[gpu_checks] done in ${SECONDS} s; results in $out/gpu_checks.tar.gz"
