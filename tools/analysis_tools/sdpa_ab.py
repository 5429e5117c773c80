"""A/B of the attention kernel in one process: mmtwins' step with ``scaled_dot_product_attention``
dispatching as usual (a fused kernel) against its math path (``softmax(q k^T / sqrt(d)) v`` as
separate operators) in GSA, LSA or both, switched step by step in alternating order.

    python tools/analysis_tools/sdpa_ab.py --device cuda --batch 16 --where gsa   # GSA only
    python tools/analysis_tools/sdpa_ab.py --device cuda --batch 16 --amp --where all
    python tools/analysis_tools/sdpa_ab.py --mode infer --where all             # + mmtwins' own
    python tools/analysis_tools/sdpa_ab.py --calls --mode train --amp           # per call

The kernel is chosen when the forward runs, and the backward follows it. Both arms always call
``scaled_dot_product_attention``; on a CPU where mmtwins' own choice
(:func:`mmtwins.models.layers.attention.attend`) runs its compiled kernel instead (forward and
backward), a third arm, ``mmtwins``, runs that choice. Prints the median step time (ms) of each
arm after 5 untimed steps, and on a GPU each arm's peak memory in its first step (the math path
keeps the attention weights for backward).

``--calls`` times the attention calls alone instead: each distinct call of one forward of the
model (its q, k, v and mask as the layers pass them), forward and backward (``--mode train``,
a random output gradient) or forward alone, mmtwins' choice against PyTorch's fused kernel.
"""
import argparse
import contextlib
import sys
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmtwins.analysis.ab import (add_step_args, alternate, combined, format_arms, patched,
                                 run_variants)
from mmtwins.analysis.benchmark import autocast_context
from mmtwins.analysis.peers import build_impl
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


def recorded_calls(model: nn.Module, x: torch.Tensor, amp: bool) -> Dict[tuple, list]:
    """The distinct attention calls of one training-mode forward of ``model`` on ``x``, keyed
    by q, k, v and mask's shapes and strides and q's dtype: ``[q, k, v, mask, count]``, the
    tensors detached copies in the layouts the layers passed."""
    calls: Dict[tuple, list] = {}
    attend = attention.attend

    def spy(q, k, v, mask=None, dropout_p=0.):
        key = tuple((tuple(t.shape), t.stride()) if t is not None else None
                    for t in (q, k, v, mask)) + (q.dtype, )
        if key in calls:
            calls[key][-1] += 1
        else:  # q, k, v copied in their layouts (the mask is not written to)
            calls[key] = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)
                          for t in (q, k, v)] + [mask, 1]
        return attend(q, k, v, mask, dropout_p)

    model.train()
    with patched(attention, 'attend', spy)(), torch.no_grad(), \
            autocast_context(x.device, amp)[0]:
        model(x)
    return calls


def call_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              mode: str) -> Callable[[], None]:
    """One attention call: forward and backward at a random output gradient (``'train'``),
    or the forward without gradients (``'infer'``)."""
    q, k, v = (t.detach().requires_grad_(mode == 'train') for t in (q, k, v))
    grad = torch.randn(q.shape, dtype=q.dtype)

    def train():
        torch.autograd.backward(attention.attend(q, k, v, mask), grad)
        q.grad = k.grad = v.grad = None

    def infer():
        with torch.inference_mode():
            attention.attend(q, k, v, mask)

    return train if mode == 'train' else infer


def time_calls(args: argparse.Namespace, log=print) -> None:
    """Per distinct attention call of each of ``args.variants``: mmtwins' choice against
    PyTorch's fused kernel, alternating call by call; and the sums over the forward's calls."""
    arms = {'pytorch': kernel_only, 'mmtwins': contextlib.nullcontext}
    for variant in args.variants:
        family, arch = variant.split('-')
        torch.manual_seed(0)
        model = build_impl('mmtwins', family, arch)
        x = torch.randn(args.batch, 3, args.size, args.size)
        totals = dict.fromkeys(arms, 0.)
        for q, k, v, mask, count in recorded_calls(model, x, args.amp).values():
            res = alternate(call_step(q, k, v, mask, args.mode), arms, args.steps,
                            torch.device('cpu'))
            for name in arms:
                totals[name] += count * res[name]['median_ms']
            log(f'{variant} {args.mode} {str(q.dtype)[6:]} q {tuple(q.shape)} k {tuple(k.shape)}'
                f' mask {None if mask is None else tuple(mask.shape)} x{count}: '
                f'{format_arms(res)}')
        log(f'{variant} {args.mode} {"amp" if args.amp else "fp32"} {args.size}x{args.size} '
            f'batch {args.batch}, all calls of a forward: '
            + ', '.join(f'{name} {ms:.1f} ms' for name, ms in totals.items())
            + f' ({totals["mmtwins"] / totals["pytorch"]:.2f}x pytorch\'s time)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--where', choices=list(WHERE), default='gsa',
                   help='the attention that takes the math path in the second arm')
    p.add_argument('--calls', action='store_true',
                   help="time each attention call alone: mmtwins' choice against PyTorch's "
                        'fused kernel (CPU)')
    return add_step_args(p).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.calls:
        if args.device != 'cpu':
            raise SystemExit('--calls compares the CPU kernels: use --device cpu')
        return time_calls(args)
    arms = {'fused': kernel_only, f'math-{args.where}': math_arm(WHERE[args.where])}
    if attention.NATIVE_ATTENTION and args.device == 'cpu':
        arms['mmtwins'] = contextlib.nullcontext
    run_variants(args, arms)


if __name__ == '__main__':
    sys.exit(main())
