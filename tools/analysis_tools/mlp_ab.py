"""A/B of the blocks' MLP path in one process: mmtwins' training (or inference) step with its
chunked MLP function against another MLP forward, switched step by step in alternating order.

    python tools/analysis_tools/mlp_ab.py                        # against the plain composition
    python tools/analysis_tools/mlp_ab.py --device cuda --amp    # the same under fp16 autocast
    python tools/analysis_tools/mlp_ab.py --against HEAD~1 --size 64   # against an earlier commit

``--against plain`` (default) runs ``fc2(gelu(fc1(norm(x))))`` through autograd, which keeps the
normalised tokens and ``gelu(h)`` for backward; a git revision runs that revision's
``mmtwins/models/layers/mlp.py``. Prints the median step time (ms) of each, after 5 warm-up
steps, and each one's peak memory in its first step (on a GPU; peak RSS is not separable here).
"""
import argparse
import contextlib
import sys

from mmtwins.analysis.ab import add_step_args, patched, revision_arm, run_variants
from mmtwins.models.layers import mlp as M


def plain(self, x, norm=None):
    """The MLP as autograd would run it unchanged."""
    return self.fc2(self.act(self.fc1(x if norm is None else norm(x))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--against', default='plain', help="'plain' or a git revision")
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    other = (patched(M.Mlp, 'forward', plain) if args.against == 'plain' else
             revision_arm(args.against, ['mmtwins/models/layers/mlp.py']))
    run_variants(args, {'mmtwins': contextlib.nullcontext,
                        args.against: other})


if __name__ == '__main__':
    sys.exit(main())
