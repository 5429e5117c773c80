"""A/B of mmtwins' model code against a git revision's, in one process: one model, whose layer
and backbone classes switch between the working tree's methods and the revision's step by step,
in alternating order.

    python tools/analysis_tools/revision_ab.py --against HEAD~1               # training 512x512 b2
    python tools/analysis_tools/revision_ab.py --against HEAD~1 --mode infer --size 224 --batch 8
    python tools/analysis_tools/revision_ab.py --against 2c49855 \
        --files mmtwins/models/layers/embed.py

The model is built by the working tree (the revision's ``__init__`` is not run), so the revision
must have the same parameters. Prints the median step time (ms) of each, after 5 untimed steps,
and on a GPU each one's peak memory in its first step.
"""
import argparse
import contextlib
import sys

from mmtwins.analysis.ab import add_step_args, revision_arm, run_variants
from mmtwins.analysis.peers import CHECKOUT

MODEL_FILES = sorted(str(p.relative_to(CHECKOUT))
                     for p in (CHECKOUT / 'mmtwins' / 'models').rglob('*.py')
                     if p.name != '__init__.py')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--against', required=True, help='a git revision')
    p.add_argument('--files', nargs='+', default=MODEL_FILES,
                   help='modules to take from the revision (default: all of mmtwins/models)')
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_variants(args, {'working tree': contextlib.nullcontext,
                        args.against: revision_arm(args.against, args.files)})


if __name__ == '__main__':
    sys.exit(main())
