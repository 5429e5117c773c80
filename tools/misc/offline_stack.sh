#!/usr/bin/env bash
# The OpenMMLab stack for the peer comparison and the GPU tests on a machine that has torch (and
# a GPU) but no package index and no compiler time for mmcv's ops, such as the GPU machines
# lent to this project: every package involved is pure Python, so wheels downloaded elsewhere
# are unpacked into a folder put on PYTHONPATH, in front of that machine's own packages.
#
#   bash tools/misc/offline_stack.sh download WHEELDIR   # where pip reaches the index
#   bash tools/misc/offline_stack.sh install WHEELDIR SITE   # on the offline machine, then
#   export PYTHONPATH=SITE:$PWD
#
# mmcv's compiled ops are not built there (mmcv-lite instead): the backbones compared here never
# call them, but mmseg imports mmcv.ops at import time, so SITE/mmcv/_ext.py stands in for the
# compiled module: every op in it raises when called. Nothing else of the stack is changed.
set -euo pipefail
python=${PYTHON:-python3}

# Pinned as in requirements/constraints.txt (mmcv-lite: mmcv 2.1.0 without its compiled ops),
# and the pure-Python dependencies those packages import that a torch image lacks.
PACKAGES=(mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 timm==1.0.31
          addict yapf termcolor platformdirs ftfy mat4py model-index ordered-set
          importlib-metadata==8.7.0 zipp wcwidth)

usage() { echo "usage: $0 download WHEELDIR | install WHEELDIR SITE" >&2; exit 2; }
case ${1:-} in
download)
    [[ $# -eq 2 ]] || usage
    mkdir -p "$2"
    "$python" -m pip download --no-deps --only-binary :all: -d "$2" "${PACKAGES[@]}"
    ;;
install)
    [[ $# -eq 3 ]] || usage
    wheels=$2 site=$3
    "$python" -m pip install --no-deps --no-index --target "$site" "$wheels"/*.whl >/dev/null
    cat > "$site/mmcv/_ext.py" <<'EOF'
"""Stand-in for mmcv's compiled ops (not built on this machine): importable, raises if called."""


def __getattr__(name):
    def op(*args, **kwargs):
        raise RuntimeError(f'mmcv op {name!r} is not built on this machine (mmcv-lite)')
    return op
EOF
    "$python" -c 'import sys; sys.path.insert(0, sys.argv[1])
import mmseg.models, mmpretrain.models, timm' "$site"
    echo "offline stack ready in $site"
    ;;
*)
    usage
    ;;
esac
