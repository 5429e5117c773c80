"""Parameters and FLOPs (multiply-accumulates, attention matmuls included) of a config's model.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H W] [--part model|backbone]
                                             [--table DEPTH] [--cfg-options k=v ...]

Works for classifier, detector and segmentor configs. The default input is the size at which the
paper reports each kind of model: 224x224 (ImageNet), 600x800 (COCO), 512x512 (ADE20K).
"""
import argparse

from mmengine.config import DictAction

from mmtwins.analysis import (PARTS, build_model, count_complexity, default_input_shape,
                              load_config, runnable)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='config file')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help="input height and width (default: the paper's size for the task)")
    p.add_argument('--part', choices=PARTS, default='model',
                   help='measure the whole network (default) or its backbone alone')
    p.add_argument('--table', type=int, default=0, metavar='DEPTH',
                   help='also print the per-module table down to this depth')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, e.g. model.backbone.arch=base')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = build_model(load_config(args.config, args.cfg_options))
    shape = args.shape or default_input_shape(model)
    module, inputs = runnable(model, args.part, shape)
    c = count_complexity(module, inputs, table_depth=args.table)
    if c.table:
        print(c.table)
    print(f'config: {args.config} ({args.part})')
    print(f'input shape: {tuple(inputs.shape)}')
    print(f'FLOPs: {c.flops / 1e9:.3f} G multiply-accumulates '
          f'(attention matmuls {c.attention_flops / 1e9:.3f} G)')
    print(f'params: {c.params / 1e6:.3f} M')
    if c.uncounted_ops:
        ops = ', '.join(sorted(c.uncounted_ops))
        print(f'not counted (element-wise / no handle): {ops}')


if __name__ == '__main__':
    main()
