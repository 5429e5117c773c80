"""A/B of mmtwins' model code against a git revision's, in one process: one model, whose layer
and backbone classes switch between the working tree's methods and the revision's step by step,
in alternating order.

    python tools/analysis_tools/revision_ab.py --against HEAD~1               # training 512x512 b2
    python tools/analysis_tools/revision_ab.py --against HEAD~1 --mode infer --size 224 --batch 8
    python tools/analysis_tools/revision_ab.py --against 2c49855 \
        --files mmtwins/models/layers/embed.py

The model is built by the working tree (the revision's ``__init__`` is not run), so the revision
must have the same parameters. Prints the median step time (ms) of each, after 5 untimed steps,
and on a GPU each one's peak memory in its first step. By default every module of
mmtwins/models is taken from the revision, but for those it does not have yet (named in a note:
both arms run the working tree's); a file given with --files must be in the revision.
"""
import argparse
import contextlib
import sys

from mmtwins.analysis.ab import add_step_args, missing_at, revision_arm, run_variants
from mmtwins.analysis.peers import CHECKOUT

MODEL_FILES = sorted(str(p.relative_to(CHECKOUT))
                     for p in (CHECKOUT / 'mmtwins' / 'models').rglob('*.py')
                     if p.name != '__init__.py')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--against', required=True, help='a git revision')
    p.add_argument('--files', nargs='+',
                   help='modules to take from the revision (default: all of mmtwins/models that '
                   'the revision has)')
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    files = args.files or MODEL_FILES
    try:
        missing = missing_at(args.against, files)
    except ValueError as e:  # git's message: an unknown revision, or no git checkout here
        raise SystemExit(f'--against {args.against}: {e}')
    if missing and args.files:
        raise SystemExit(f'--files: not in revision {args.against}: {", ".join(missing)}; give '
                         'only files that the revision has')
    if missing:
        print(f'not in revision {args.against}, so run as in the working tree by both arms: '
              f'{", ".join(missing)}', file=sys.stderr)  # stdout: one line per variant
    run_variants(args, {'working tree': contextlib.nullcontext,
                        args.against: revision_arm(args.against,
                                                   [f for f in files if f not in missing])})


if __name__ == '__main__':
    sys.exit(main())
