"""Inference throughput (images/s) and peak memory of a config's model or backbone.

    python tools/analysis_tools/benchmark.py CONFIG [--part backbone|model] [--batch-size 8]
        [--shape H W] [--warmup 3] [--repeats 10] [--amp [--amp-dtype fp16|bf16]]
        [--device cpu|cuda]

The paper's Table 1 throughput is the classifier at 224x224, batch 192 on one V100, fp32.
Throughput is the median over the timed passes; on CPU the memory is the process's peak RSS.
A line is printed as each pass ends; Ctrl-C during the timed passes reports the median of those
that finished, then exits with status 1.
"""
import argparse

import torch
from mmengine.config import DictAction

from mmtwins.analysis import (PARTS, benchmark, build_model, default_input_shape, load_config,
                              runnable)
from mmtwins.analysis.benchmark import AMP_DTYPES, BenchmarkInterrupted
from mmtwins.apis.config import warn_if_cpu_amp_is_emulated


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='config file')
    p.add_argument('--part', choices=PARTS, default='model',
                   help='time the whole network in tensor mode (default) or its backbone')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help="input height and width (default: the paper's size for the task)")
    p.add_argument('--warmup', type=int, default=3, help='untimed passes first')
    p.add_argument('--repeats', type=int, default=10, help='timed passes (median reported)')
    p.add_argument('--amp', action='store_true',
                   help='autocast: fp16 on GPU, bf16 on CPU (or --amp-dtype)')
    p.add_argument('--amp-dtype', choices=list(AMP_DTYPES), help='the autocast dtype of --amp')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, e.g. model.backbone.arch=base')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.amp_dtype and not args.amp:
        raise SystemExit('--amp-dtype is the dtype of --amp: give both')
    if args.amp and args.device == 'cpu' and AMP_DTYPES.get(args.amp_dtype) != torch.float16:
        warn_if_cpu_amp_is_emulated()
    model = build_model(load_config(args.config, args.cfg_options))
    shape = args.shape or default_input_shape(model)
    module, inputs = runnable(model, args.part, shape, args.batch_size, args.device)
    try:
        result = benchmark(module, inputs, warmup=args.warmup, repeats=args.repeats,
                           amp=args.amp, amp_dtype=AMP_DTYPES.get(args.amp_dtype))
    except BenchmarkInterrupted as e:
        print(f'{args.config} ({args.part}): {e.result.summary()}')
        raise SystemExit(f'{e}: the figures above are of those')
    print(f'{args.config} ({args.part}): {result.summary()}')


if __name__ == '__main__':
    main()
