"""mmtwins against timm, mmsegmentation and mmpretrain: same weights, same outputs, then speed and
memory side by side in one run.

    T=tools/analysis_tools/compare_peers.py
    python $T                                    # PCPVT-S and SVT-S, default cases
    python $T --variants all --out peers.json --markdown peers.md
    python $T --cases coco                       # 800x1344 training, with_cp too
    python $T --short                            # agreement + one quick timing (CI)
    python $T --cases train512 --kernels         # + time by kernel category
    python $T --cases train512 --rounds 5        # 5 sets of fresh processes
    python $T --cases train512 --keep-freed-memory    # no page faults
    python $T --device cuda --cases amp-infer512 amp-train512
    python $T --device cuda --cases train512 --batch 16

Cases: inference at 224x224 batch 8 and 512x512 batch 2, one training step at 512x512 batch 2
(fp32), autocast inference (mmtwins against its own fp32) and, on request, autocast inference
and training at 512x512 against the peers under autocast too (amp-infer512, amp-train512) and a
training step at 800x1344 batch 1 (coco) with mmtwins also run with ``with_cp=True`` (one process
at a time: five side by side would not fit in 24 GiB). Autocast is fp16 on a GPU and bf16 on a
CPU unless --amp-dtype says otherwise. Every implementation runs in its own worker process; see
mmtwins/analysis/peers.py.
"""
import argparse

import torch

from mmtwins.analysis import peers as P
from mmtwins.analysis.benchmark import AMP_DTYPES
from mmtwins.cli import at_least


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    P.add_variants_argument(p, allow_all=True)
    p.add_argument('--peers', nargs='+', choices=list(P.PEERS), default=None,
                   help='default: every installed peer')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=at_least(0), default=5,
                   help='untimed steps per implementation, which measure the peak memory of '
                   'the first and of all of them; the heap of a training process takes a few '
                   'steps to settle (measured: the '
                   "peers' first 3-4 training steps at 512x512 are slower than the later ones)")
    p.add_argument('--repeats', type=at_least(1), default=8,
                   help='timed steps per implementation (a multiple of 4 gives each of four '
                   'implementations every turn position equally often)')
    p.add_argument('--rounds', type=at_least(1), default=1,
                   help='run every case this many times, each with fresh worker processes, and '
                   "report the median of the rounds and the speed-up's spread over them: a "
                   "process's speed depends on its memory allocator's state, which differs "
                   'from one process to the next')
    p.add_argument('--cases', nargs='+', choices=list(P.CASES), default=list(P.DEFAULT_CASES),
                   help=f'cases to run (default: {" ".join(P.DEFAULT_CASES)})')
    p.add_argument('--batch', type=int,
                   help="every case's batch size instead of its own (e.g. 16 to load a GPU)")
    p.add_argument('--amp-dtype', choices=list(AMP_DTYPES),
                   help='autocast dtype of the amp cases (default: fp16 on GPU, bf16 on CPU)')
    p.add_argument('--no-memory', action='store_true', help='do not report memory')
    p.add_argument('--keep-freed-memory', action='store_true',
                   help="run every implementation's worker with glibc's malloc keeping freed "
                   'memory in the heap (GLIBC_TUNABLES, see peers.KEEP_FREED_MEMORY): no step '
                   'pays page faults for memory an earlier one freed')
    p.add_argument('--kernels', action='store_true',
                   help='after the timings, profile one more step of every implementation: '
                   'its time by operator category (matmul, fused attention, convolution, '
                   'copies, GELU, LayerNorm, other) and the GFLOP/s of its matmuls (on a GPU: '
                   'kernel time)')
    p.add_argument('--short', action='store_true',
                   help='agreement with every peer and one small timed case only (for CI)')
    p.add_argument('--out', help='write the results as JSON here (rewritten after every case, '
                   'so an interrupted run keeps the cases it finished)')
    p.add_argument('--markdown', help='write the results as a Markdown table here (likewise)')
    args = p.parse_args(argv)
    if 'all' in args.variants and len(args.variants) > 1:
        p.error("--variants: 'all' stands alone (it is every variant)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.keep_freed_memory:
        P.keep_freed_memory()  # before the workers spawn: glibc reads it at process start
    peers = list(dict.fromkeys(args.peers)) if args.peers else P.available_peers()
    kw = dict(peers=peers, device=args.device, warmup=args.warmup, repeats=args.repeats,
              rounds=args.rounds,
              memory=not args.no_memory, kernels=args.kernels,
              amp_dtype=AMP_DTYPES.get(args.amp_dtype))
    machine, code = P.machine_info(args.device), P.code_version()
    print(', '.join(f'{k} {v}' for k, v in machine.items()) + f'; peers: {", ".join(peers)}')
    if code:
        print(f'mmtwins at {code["commit"][:12]}'
              + (' with uncommitted changes to mmtwins/' if code['dirty'] else ''))
    variants = P.ALL_VARIANTS if args.variants == ['all'] else args.variants
    jobs = P.plan(variants, args.cases, kw, batch=args.batch, short=args.short)
    ran = dict(vars(args))
    if args.short:  # what plan() runs instead of the cases and counts given
        short = dict(P.SHORT)
        ran.update(cases=['infer224'], batch=P.SHORT_SHAPE[0],
                   no_memory=not short.pop('memory'), **short)
    P.run_plan(jobs, dict(machine=machine, code=code, peers=peers, args=ran),
               out=args.out, markdown=args.markdown,
               targets=args.device == 'cpu' and not args.short)
    for path in filter(None, [args.out, args.markdown]):
        print(f'wrote {path}')


if __name__ == '__main__':
    main()
