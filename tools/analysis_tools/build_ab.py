"""A/B of mmtwins' compiled kernels (``mmtwins._ext``) against another build of them, in one
process: one model, whose layers call this checkout's build or the other one step by step, in
alternating order. The Python code is this checkout's in both arms (``revision_ab.py`` swaps a
revision's Python code instead).

    git clone -q . /tmp/old && git -C /tmp/old checkout -q HEAD~1
    (cd /tmp/old && "$OLDPWD/.venv/bin/python" setup.py -q build_ext --inplace)
    python tools/analysis_tools/build_ab.py --against /tmp/old/mmtwins         # training 512x512 b2
    python tools/analysis_tools/build_ab.py --against /tmp/old/mmtwins --mode infer --amp

The other build must have the functions and arguments this checkout's Python code calls. Prints
the median step time (ms) of each, after 5 untimed steps, and the median ratio of their times
in paired steps.
"""
import argparse
import contextlib
import sys

from mmtwins.analysis.ab import add_step_args, extension_arm, load_extension, run_variants


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--against', required=True,
                   help="the other build: its mmtwins/ folder, or its _ext*.so file")
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        other = extension_arm(load_extension(args.against))
    except (OSError, ImportError, ValueError) as e:
        raise SystemExit(f'--against {args.against}: {e}')
    run_variants(args, {'this build': contextlib.nullcontext, args.against: other})


if __name__ == '__main__':
    sys.exit(main())
