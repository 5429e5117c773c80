"""mmtwins against timm, mmsegmentation and mmpretrain: same weights, same outputs, then speed and
memory side by side in one run.

    python tools/analysis_tools/compare_peers.py                       # PCPVT-S and SVT-S, all cases
    python tools/analysis_tools/compare_peers.py --variants all --out peers.json
    python tools/analysis_tools/compare_peers.py --short               # agreement + one quick timing (CI)

Cases: inference at 224x224 batch 8 and 512x512 batch 2, one training step at 512x512 batch 2
(fp32), bf16-autocast inference (mmtwins against its own fp32), and on request (--cases coco) a
training step at 800x1344 batch 1.
"""
import argparse
import json
import platform

import torch

from mmtwins.analysis import peers as P

SMALL = ['pcpvt-small', 'svt-small']
# name: (mode, input shape, bf16 autocast); autocast cases compare mmtwins with its own fp32.
CASES = {
    'infer224': ('infer', (8, 3, 224, 224), False),
    'infer512': ('infer', (2, 3, 512, 512), False),
    'train512': ('train', (2, 3, 512, 512), False),
    'amp512': ('infer', (2, 3, 512, 512), True),
    'coco': ('train', (1, 3, 800, 1344), False),
}
ALL = [f'{f}-{a}' for f in ('pcpvt', 'svt') for a in ('small', 'base', 'large')]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variants', nargs='+', default=SMALL,
                   help="e.g. svt-small pcpvt-base, or 'all' (default: the two small variants)")
    p.add_argument('--peers', nargs='+', default=None, help='default: every installed peer')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES)[:4],
                   help='cases to run (default: all but coco, the 800x1344 training step)')
    p.add_argument('--no-memory', action='store_true', help='skip the fresh-process peak RSS runs')
    p.add_argument('--short', action='store_true',
                   help='agreement with every peer and one small timed case only (for CI)')
    p.add_argument('--out', help='write the results as JSON here')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    variants = ALL if args.variants == ['all'] else args.variants
    peers = args.peers or P.available_peers()
    kw = dict(peers=peers, device=args.device, warmup=args.warmup, repeats=args.repeats,
              memory=not args.no_memory)
    ceiling = P.matmul_gflops(args.device)
    print(f'{platform.processor() or platform.machine()}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, device {args.device}; dense fp32 matmul '
          f'{ceiling:.0f} GFLOP/s; peers: {", ".join(peers)}')
    results = []
    for v in variants:
        family, arch = v.split('-')
        if args.short:
            results.append(P.compare_case(family, arch, 'infer', (1, 3, 224, 224),
                                          **dict(kw, warmup=0, repeats=1, memory=False)))
            continue
        for case in args.cases:
            mode, shape, amp = CASES[case]
            results.append(P.compare_case(family, arch, mode, shape, amp=amp,
                                          **dict(kw, peers=[]) if amp else kw))
    if args.out:
        with open(args.out, 'w') as f:
            f.write(P.to_json(results, dict(matmul_gflops=ceiling, device=args.device,
                                            peers=peers)))
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
