"""``tools/deployment/pytorch2onnx.py``: export a config's model to ONNX and check it.

    python tools/deployment/pytorch2onnx.py CONFIG [CHECKPOINT] --shape H W [--dynamic]
        [--backbone-only] [--seg-output logits|labels] [--verify [H W ...]]
        [--output-file FILE] [--cfg-options k=v ...]
"""
import argparse
import math
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

from mmengine.config import DictAction

from mmtwins.checkpoint import CheckpointError
from mmtwins.cli import cli_errors
from mmtwins.engine.fileio import move_into_place, temp_file_beside
from .export import export_onnx
from .verify import non_default_domain_ops, require_checkers, verify_onnx
from .wrappers import ExportModule, build_export_module, load_model

TOLERANCE = 1e-4
#: Largest fraction of differing labels accepted for integer outputs (segmentation labels): an
#: argmax may flip where two classes' logits tie to within float rounding.
LABEL_TOLERANCE = 1e-3
#: Lowest opset torch's exporter takes ``scaled_dot_product_attention`` to.
MIN_OPSET = 14


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a Twins backbone, segmentor or detector to ONNX')
    parser.add_argument('config', help='config file (a model config of any OpenMMLab scope)')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint (default: random weights)')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='example input height and width (with --dynamic the graph takes any '
                        "size the backbone does: H, W >= its min_input_size, 29 for Twins)")
    parser.add_argument('--batch', type=int, default=1, help='example batch size')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width')
    parser.add_argument('--backbone-only', action='store_true', help='export model.backbone')
    parser.add_argument('--seg-output', choices=['logits', 'labels'], default='logits',
                        help='segmentors: class logits (B, K, H, W) or labels (B, H, W)')
    parser.add_argument('--opset', type=int, default=17,
                        help=f'ONNX opset, >= {MIN_OPSET} (scaled_dot_product_attention)')
    parser.add_argument('--output-file', help='default: work_dirs/onnx/CONFIG_NAME.onnx')
    parser.add_argument(
        '--verify', type=int, nargs='*', metavar='SIZE',
        help='compare ONNX Runtime with PyTorch at the export shape and at these H W pairs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.verify and len(args.verify) % 2:
        parser.error('--verify takes pairs of H W')
    if args.opset < MIN_OPSET:
        parser.error(f'--opset {args.opset}: the attention (scaled_dot_product_attention) '
                     f'exports from opset {MIN_OPSET} on')
    if args.verify and not args.dynamic:
        parser.error('--verify H W pairs need --dynamic: a static graph only takes the --shape '
                     'size (plain --verify checks that one)')
    return args


def verify_sizes(args: argparse.Namespace) -> List[Tuple[int, int, int]]:
    """(B, H, W) inputs to verify: the export shape, and the ``--verify`` sizes (which need
    ``--dynamic``) with batch 1 and 2 in turn."""
    extra = args.verify or []
    pairs = [tuple(args.shape)] + [tuple(extra[i:i + 2]) for i in range(0, len(extra), 2)]
    return [(args.batch, *pairs[0])] + [(1 + i % 2, h, w) for i, (h, w) in enumerate(pairs[1:])]


def unverified_path(out: str) -> str:
    """Where an export that failed ``--verify`` is kept: ``NAME.unverified.onnx`` beside
    ``out`` (``NAME.onnx``)."""
    root, ext = osp.splitext(out)
    return f'{root}.unverified{ext or ".onnx"}'


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Export (and optionally verify); returns the ONNX file's path.

    The graph is written to a temporary file beside the output, scanned and verified there,
    and only then moved to the output path: an interrupted export or a failed check never
    leaves a file under that name, and an earlier file there stays as it was. A graph that
    fails ``--verify`` is kept as ``NAME.unverified.onnx`` to inspect (one left by an earlier
    export is removed once a new file is written).

    Raises:
        SystemExit: sizes too small for the backbone, ``--verify`` failed, or a missing config
            or checkpoint, a checkpoint that does not fit, an output path that is a directory
            (``pytorch2onnx.py: error: ...``, before the model is built where it can be).
    """
    args = parse_args(argv)
    require_checkers(runtime=args.verify is not None)
    with cli_errors('pytorch2onnx.py', (FileNotFoundError, IsADirectoryError, CheckpointError)):
        return export(args)


def export(args: argparse.Namespace) -> str:
    """The export of :func:`main` for its parsed ``args``; returns the ONNX file's path."""
    print(f'building the model of {args.config}'
          + (f' and loading {args.checkpoint}' if args.checkpoint else ' (random weights)')
          + ' ...', flush=True)
    model = load_model(args.config, args.checkpoint, args.cfg_options, args.backbone_only)
    module = build_export_module(model, args.backbone_only, args.seg_output)
    sizes = verify_sizes(args)
    small = [f'{h}x{w}' for _, h, w in sizes if min(h, w) < module.min_input_size]
    if small:  # said before the export, not after it
        raise SystemExit(f'{", ".join(small)}: too small for the backbone, which needs '
                         f'H, W >= {module.min_input_size}')
    out = args.output_file or osp.join(
        'work_dirs', 'onnx', osp.splitext(osp.basename(args.config))[0] + '.onnx')
    with temp_file_beside(out) as tmp:  # creates the output's directory
        print(f'tracing the {module.kind} on a {args.batch}x{module.in_channels}x'
              f'{args.shape[0]}x{args.shape[1]} example and exporting it ...', flush=True)
        names = export_onnx(module, tmp, args.shape, args.batch, args.dynamic, args.opset)
        print(f'exported the {module.kind} (outputs: {", ".join(names)}; input "images": '
              'normalised images as after the data_preprocessor)')
        custom = non_default_domain_ops(tmp)
        if custom:
            print(f'WARNING: operators outside the default ONNX domain: {sorted(custom)}')
        if args.verify is not None:
            _verify_or_keep_aside(tmp, out, module, sizes)
        move_into_place(tmp, out)
    print(f'wrote {out}')
    stale = unverified_path(out)
    if osp.exists(stale):  # it would be taken for this export's
        os.remove(stale)
        print(f'removed {stale}, an earlier export that failed --verify')
    return out


def _verify_or_keep_aside(tmp: str, out: str, module: ExportModule,
                          sizes: List[Tuple[int, int, int]]) -> None:
    """:func:`check_agreement` of the graph in ``tmp`` at ``sizes``; on failure the graph is
    moved to :func:`unverified_path` and ``out`` is left as it was.

    Raises:
        SystemExit: the check failed (ONNX Runtime differs, gives other shapes or cannot run
            the graph), saying where the graph was kept.
    """
    try:
        check_agreement(verify_onnx(tmp, module, sizes, verbose=True))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure fails the verification
        reason = e.code if isinstance(e, SystemExit) else f'{type(e).__name__}: {e}'
        aside = unverified_path(out)
        move_into_place(tmp, aside)
        before = 'the earlier file there is unchanged' if osp.exists(out) else 'nothing written'
        raise SystemExit(f'{reason}\nverification failed: the export is kept as {aside} to '
                         f'inspect, not written to {out} ({before})') from None


def check_agreement(results: List[dict]) -> None:
    """Print :func:`verify_onnx`'s results; exit with an error past :data:`TOLERANCE` (float
    outputs; a NaN or infinite difference fails too) or :data:`LABEL_TOLERANCE` (integer
    outputs)."""
    worst = worst_labels = 0.
    for res in results:
        for name, o in res['outputs'].items():
            if 'max_abs_diff' in o:
                print(f'  {res["size"]} {name} {tuple(o["shape"])}: max abs diff '
                      f'{o["max_abs_diff"]:g}')
                diff = o['max_abs_diff']
                worst = diff if math.isnan(diff) or diff > worst else worst  # max() drops NaN
            else:
                frac = o['mismatches'] / max(1, math.prod(o['shape']))
                print(f'  {res["size"]} {name} {tuple(o["shape"])}: {o["mismatches"]} labels '
                      f'differ ({frac:.2e} of them)')
                worst_labels = max(worst_labels, frac)
    if not worst <= TOLERANCE:
        raise SystemExit(f'ONNX Runtime differs from PyTorch by {worst:g} > {TOLERANCE}')
    if worst_labels > LABEL_TOLERANCE:
        raise SystemExit(f'ONNX Runtime gives other labels than PyTorch for {worst_labels:.2e} '
                         f'of the pixels > {LABEL_TOLERANCE}')
    print(f'ONNX Runtime matches PyTorch (max abs diff {worst:g} <= {TOLERANCE}; differing '
          f'labels {worst_labels:.2e} <= {LABEL_TOLERANCE})')
