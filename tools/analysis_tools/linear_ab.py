"""A/B of the linears' kernels in one process: mmtwins' step with its CPU linears through oneDNN
(the default, see mmtwins/models/layers/linear.py) against the same step with them through
``F.linear`` and ``torch.mm`` (in fp32 PyTorch's BLAS, MKL in the official wheels; in bf16
oneDNN's matrix products), switched step by step in alternating order.

    python tools/analysis_tools/linear_ab.py --variants svt pcpvt --size 512 --batch 2
    python tools/analysis_tools/linear_ab.py --mode infer --size 224 --batch 8
    python tools/analysis_tools/linear_ab.py --mode infer --amp      # bf16 autocast

Prints the median step time (ms) of each arm after 5 untimed steps. Where the route is not taken
(a GPU, bf16 on a CPU without native bf16 or with AMX, one thread, a CPU other than x86-64) both
arms run the same code.
"""
import argparse
import contextlib
import sys

from mmtwins.analysis.ab import add_step_args, patched, run_variants
from mmtwins.models.layers import linear


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_variants(args, {'onednn': contextlib.nullcontext,
                        'blas': patched(linear, 'USE_ONEDNN', False)})


if __name__ == '__main__':
    sys.exit(main())
