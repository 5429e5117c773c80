"""A/B of the attention kernel in one process: mmtwins' step with ``scaled_dot_product_attention``
dispatching as usual (a fused kernel) against its math path (``softmax(q k^T / sqrt(d)) v`` as
separate operators) in GSA, LSA or both, switched step by step in alternating order.

    python tools/analysis_tools/sdpa_ab.py --device cuda --batch 16 --where gsa   # GSA only
    python tools/analysis_tools/sdpa_ab.py --device cuda --batch 16 --amp --where all
    python tools/analysis_tools/sdpa_ab.py --mode infer --where all             # + mmtwins' own

The kernel is chosen when the forward runs, and the backward follows it. Both arms always call
``scaled_dot_product_attention``; on a CPU where mmtwins' own choice
(:func:`mmtwins.models.layers.attention.attend`) runs its compiled kernel instead (the forward;
the backward is PyTorch's fused one), a third arm, ``mmtwins``, runs that choice. Prints the
median step time (ms) of each arm after 5 untimed steps, and on a GPU each arm's peak memory in
its first step (the math path keeps the attention weights for backward).
"""
import argparse
import contextlib
import sys

from torch.nn.attention import SDPBackend, sdpa_kernel

from mmtwins.analysis.ab import add_step_args, combined, patched, run_variants
from mmtwins.models.layers import GlobalSubsampledAttention, LocallyGroupedAttention, attention

WHERE = {'gsa': (GlobalSubsampledAttention, ), 'lsa': (LocallyGroupedAttention, ),
         'all': (GlobalSubsampledAttention, LocallyGroupedAttention)}


def math_forward(forward):
    """``forward`` with ``scaled_dot_product_attention`` restricted to the math path."""

    def wrapped(self, *args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return forward(self, *args, **kwargs)

    return wrapped


#: mmtwins' compiled attention kernel switched off: every attention calls PyTorch's.
kernel_only = patched(attention, 'NATIVE_ATTENTION', False)


def math_arm(classes):
    """An arm running the attention of ``classes`` through the math path."""
    return combined([kernel_only]
                    + [patched(cls, 'forward', math_forward(cls.forward)) for cls in classes])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--where', choices=list(WHERE), default='gsa',
                   help='the attention that takes the math path in the second arm')
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    arms = {'fused': kernel_only, f'math-{args.where}': math_arm(WHERE[args.where])}
    if attention.NATIVE_ATTENTION and args.device == 'cpu':
        arms['mmtwins'] = contextlib.nullcontext
    run_variants(args, arms)


if __name__ == '__main__':
    sys.exit(main())
