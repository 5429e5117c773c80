#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned OpenMMLab stack.
#
#   bash tools/setup_env.sh            # venv in ./.venv
#   MMTWINS_VENV=/path bash tools/setup_env.sh
#
# mmcv 2.1.0 has no wheel for torch 2.13: it is built once from source with its compiled ops
# (about 12 minutes on 2 cores) and the wheel is cached in $MMTWINS_WHEEL_CACHE
# (default ~/.cache/mmtwins/wheels), outside the work tree, for every later set-up with the same
# torch version, kind of ops and Python: a folder per torch version and kind of ops (`cpu`, or,
# where mmcv's build compiles CUDA kernels because torch sees a GPU or FORCE_CUDA=1 is set, the
# CUDA version and the GPU architectures compiled for: TORCH_CUDA_ARCH_LIST, else those of the
# visible GPUs, as torch's extension build picks them), the Python's tag in the wheel's name.
# A stamp file makes a re-run that has nothing to do take a second.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMTWINS_VENV:-$root/.venv}
wheels=${MMTWINS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmtwins/wheels}
python=${PYTHON:-python3}
constraints=$root/requirements/constraints.txt
stamp=$venv/.mmtwins-setup

log() { printf '[setup_env] %s\n' "$*" >&2; }

want=$(cat "$constraints" "$root"/requirements/*.txt "$root/requirements.txt" "$root/setup.py" \
       "$root"/mmtwins/csrc/* "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
# mmtwins/.mim must hold the editable install's links: a wheel built in this checkout (`pip
# install .`, `setup.py bdist_wheel`) replaces them with copies, which mim would then serve stale
if [[ -f $stamp && $(cat "$stamp") == "$want" && -L $root/mmtwins/.mim/configs ]]; then
    exit 0
fi

# mmtwins needs Python >= 3.10 (setup.py's python_requires); an older one would only show as
# "no matching distribution" for the pinned torch, and its venv would be reused on every retry
too_old() {  # exit status 10 for an old Python: one that crashes is not taken for old
    "$1" -c 'import sys; sys.exit(10 if sys.version_info < (3, 10) else 0)' 2> /dev/null
    (( $? == 10 ))
}
if [[ -x $venv/bin/python ]] && too_old "$venv/bin/python"; then
    log "$venv holds Python $("$venv/bin/python" -V 2>&1 | cut -d' ' -f2), older than the"
    log "3.10 mmtwins needs: remove it (rm -rf $venv) and run this again with PYTHON=python3.10"
    log "or newer"
    exit 1
fi
if [[ ! -x $venv/bin/python ]]; then
    if ! command -v "$python" > /dev/null; then
        log "no $python on PATH: name a Python >= 3.10 with PYTHON=/path/to/python3"
        exit 1
    fi
    if too_old "$python"; then
        log "$python is Python $("$python" -V 2>&1 | cut -d' ' -f2); mmtwins needs 3.10 or newer:"
        log "name one with PYTHON=python3.10 (or newer, or its path)"
        exit 1
    fi
    log "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip --version > /dev/null 2>&1; then
    log "$venv has no pip (a virtual environment whose creation failed, e.g. without the"
    log "python3-venv package): remove it, or name another with MMTWINS_VENV, and run this again"
    exit 1
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, minus the "Location ... is ignored" line that a machine-wide pip.conf naming missing local
# indexes prints for every package
pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2); }

# pip itself first: constraints.txt keeps it below 25.3, whose editable install mim cannot find
pip install -q -c "$constraints" pip
log "installing build tools and torch (first time: a ~5 GB download)"
pip install -q -c "$constraints" 'setuptools' wheel ninja 'numpy' packaging
# not quiet, and straight to the terminal (pip draws its progress bar only there): the download
# progress is the only sign of life during the torch download
pip install -c "$constraints" torch torchvision

mmcv_version=$(sed -n 's/^mmcv==//p' "$constraints")
# The compiled ops hold torch's C++ ABI: a torch pin change must not reuse an older build. And
# mmcv compiles its CUDA kernels only where torch sees a GPU or FORCE_CUDA=1 is set, and only for
# the architectures of TORCH_CUDA_ARCH_LIST or of the visible GPUs: a wheel built without them, or
# for other GPUs, must not be reused on a GPU machine sharing the cache.
wheels=$wheels/torch-$("$venv/bin/python" -c 'import os, re, torch
ops = "cpu"
if torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1":
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(sorted(
        {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    if not arch:
        raise SystemExit("[setup_env] FORCE_CUDA=1 without a visible GPU: name the GPU "
                         "architectures to build for, e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0\"")
    ops = "cuda%s-sm%s" % (torch.version.cuda, re.sub(r"[^0-9A-Za-z.+]+", "_", arch))
print(torch.__version__.split("+")[0] + "-" + ops)')
py_tag=$("$venv/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
mmcv_wheel=$(ls "$wheels"/mmcv-"$mmcv_version"-"$py_tag"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z $mmcv_wheel ]]; then
    log "building mmcv $mmcv_version with ops from source into $wheels (about 12 minutes, once)"
    mkdir -p "$wheels"
    tmp=$(mktemp -d "$wheels/.build.XXXXXX")
    # the whole build output, kept if the build fails (one file per build: set-ups can share
    # the cache)
    build_log=$(mktemp "$wheels/mmcv-$mmcv_version-$py_tag-build-XXXXXX.log")
    # on the terminal: "compiling [i/n] FILE" for each source, and the lines that say how it ended
    progress='s#^ *(\[[0-9]+/[0-9]+\]) .* -c (-c )?[^ ]*/([^/ ]+\.(cpp|cu)) .*#  compiling \1 \3#p'
    outcome='/^(ERROR|error:|Created wheel)/p'
    # No build isolation: the build must compile against the torch installed above.
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip wheel -v --no-build-isolation --no-deps \
        -c "$constraints" "mmcv==$mmcv_version" -w "$tmp" 2>&1 | tee "$build_log" \
        | sed -nuE -e "$progress" -e "$outcome" >&2 || true
    built=$(ls "$tmp"/mmcv-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z $built ]]; then
        rm -rf "$tmp"
        log "mmcv build failed; its whole log: $build_log. The lines that name errors in it:"
        grep -E 'error|Error|FAILED|Killed' "$build_log" | tail -n 25 >&2 || true
        if grep -q 'Killed' "$build_log"; then
            log "a compiler was killed, most often for lack of memory: retry with MAX_JOBS=1"
        fi
        exit 1
    fi
    rm -f "$build_log"
    mv "$built" "$wheels/"   # atomic within one file system: no half-written wheel is ever cached
    rm -rf "$tmp"
    mmcv_wheel=$(ls "$wheels"/mmcv-"$mmcv_version"-"$py_tag"-*.whl | head -n1)
fi

log "installing mmcv, the OpenMMLab stack and mmtwins (editable)"
pip install -q -c "$constraints" "$mmcv_wheel"
pip install -q -c "$constraints" -r "$root/requirements.txt"
pip install -q -c "$constraints" --no-build-isolation --no-deps -e "$root"
"$venv/bin/python" -c 'import mmcv.ops, mmdet, mmseg, mmpretrain, mmtwins' \
    || { log "the installed stack does not import"; exit 1; }
echo "$want" > "$stamp"
log "ready: $venv"
