"""Convert Twins weights of any layout (authors/timm, mmseg 1.x, mmpretrain 1.x) to mmtwins'.

    python tools/model_converters/twins2mmtwins.py SRC DST [--prefix backbone.] [--keep-head]

DST holds ``{'state_dict': ..., 'meta': {...}}`` with the backbone's tensors in mmtwins' names,
ready for ``init_cfg=dict(type='Pretrained', checkpoint=DST)``. The renaming is the same code the
loader runs on any layout, so converting first is optional.
"""
import argparse
import os

import torch

from mmtwins.checkpoint import (convert_state_dict, describe_variant, detect_layout,
                                read_checkpoint, unwrap_state_dict)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('src', help='checkpoint to convert')
    p.add_argument('dst', help='where to write the mmtwins checkpoint')
    p.add_argument('--prefix', default=None,
                   help="take only keys under this prefix, e.g. 'backbone.' (found "
                   'automatically for whole-model checkpoints)')
    p.add_argument('--keep-head', action='store_true',
                   help='keep the ImageNet head (head.weight/head.bias) in the output')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sd, prefix = unwrap_state_dict(read_checkpoint(args.src), args.prefix)
    layout = detect_layout(sd)
    backbone, head = convert_state_dict(sd, layout)
    variant = describe_variant(backbone)
    out = dict(backbone)
    if args.keep_head:
        out.update(head)
    meta = dict(source=os.path.abspath(args.src), layout=layout, variant=variant, prefix=prefix)
    tmp = f'{args.dst}.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': out, 'meta': meta}, tmp)
    os.replace(tmp, args.dst)  # never leaves a half-written DST behind
    print(f'{args.src}: {variant} in the {layout} layout -> {args.dst} '
          f'({len(backbone)} backbone tensors{", head kept" if args.keep_head and head else ""})')


if __name__ == '__main__':
    main()
