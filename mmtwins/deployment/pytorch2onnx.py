"""``tools/deployment/pytorch2onnx.py``: export a config's model to ONNX and check it.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --shape H W [--dynamic]
        [--backbone-only] [--seg-output logits|labels] [--verify [H W ...]]
        [--output-file FILE] [--cfg-options k=v ...]
"""
import argparse
import os.path as osp
from typing import List, Optional, Sequence, Tuple

from mmengine.config import DictAction
from mmengine.utils import mkdir_or_exist

from .export import export_onnx
from .verify import non_default_domain_ops, verify_onnx
from .wrappers import build_export_module, load_model

TOLERANCE = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a Twins backbone, segmentor or detector to ONNX')
    parser.add_argument('config', help='config file (a model config of any OpenMMLab scope)')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint (default: random weights)')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='example input height and width (with --dynamic any size works)')
    parser.add_argument('--batch', type=int, default=1, help='example batch size')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width')
    parser.add_argument('--backbone-only', action='store_true', help='export model.backbone')
    parser.add_argument('--seg-output', choices=['logits', 'labels'], default='logits',
                        help='segmentors: class logits (B, K, H, W) or labels (B, H, W)')
    parser.add_argument('--opset', type=int, default=17)
    parser.add_argument('--output-file', help='default: work_dirs/onnx/CONFIG_NAME.onnx')
    parser.add_argument(
        '--verify', type=int, nargs='*', metavar='SIZE',
        help='compare ONNX Runtime with PyTorch at the export shape and at these H W pairs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.verify and len(args.verify) % 2:
        parser.error('--verify takes pairs of H W')
    return args


def verify_sizes(args: argparse.Namespace) -> List[Tuple[int, int, int]]:
    """(B, H, W) inputs to verify: the export shape, and with ``--dynamic`` the ``--verify``
    sizes, also with batch 1."""
    if not args.dynamic:
        return [(args.batch, *args.shape)]
    extra = args.verify or []
    pairs = [tuple(args.shape)] + [tuple(extra[i:i + 2]) for i in range(0, len(extra), 2)]
    return [(args.batch, *pairs[0])] + [(1 + i % 2, h, w) for i, (h, w) in enumerate(pairs[1:])]


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Export (and optionally verify); returns the ONNX file's path."""
    args = parse_args(argv)
    model = load_model(args.config, args.checkpoint, args.cfg_options)
    module = build_export_module(model, args.backbone_only, args.seg_output)
    out = args.output_file or osp.join(
        'work_dirs', 'onnx', osp.splitext(osp.basename(args.config))[0] + '.onnx')
    mkdir_or_exist(osp.dirname(osp.abspath(out)))
    names = export_onnx(module, out, args.shape, args.batch, args.dynamic, args.opset)
    print(f'exported the {module.kind} to {out} (outputs: {", ".join(names)}; input "images": '
          'normalised images as after the data_preprocessor)')
    custom = non_default_domain_ops(out)
    if custom:
        print(f'WARNING: operators outside the default ONNX domain: {sorted(custom)}')
    if args.verify is not None:
        worst = 0.
        for res in verify_onnx(out, module, verify_sizes(args)):
            for name, o in res['outputs'].items():
                err = o.get('max_abs_diff', o.get('mismatches'))
                print(f'  {res["size"]} {name} {tuple(o["shape"])}: '
                      f'{"max abs diff" if "max_abs_diff" in o else "mismatches"} {err:g}')
                worst = max(worst, o.get('max_abs_diff', 0.))
        if worst > TOLERANCE:
            raise SystemExit(f'ONNX Runtime differs from PyTorch by {worst:g} > {TOLERANCE}')
        print(f'ONNX Runtime matches PyTorch (max abs diff {worst:g} <= {TOLERANCE})')
    return out
