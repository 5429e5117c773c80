"""Run a trained detector or segmentor on image files or folders (``tools/infer.py``).

The config's ``default_scope`` picks the inferencer: mmdet's ``DetInferencer`` for detectors
(``mmdet``), mmseg's ``MMSegInferencer`` for segmentors (``mmseg``). For every input image
``NAME.EXT`` it writes, under ``OUT_DIR``:

* ``vis/NAME.png``: the predictions drawn on the image (boxes scoring above the threshold with their
  class and score; or the class colours blended half-and-half with the image);
* ``pred/NAME.json`` (detection): every predicted box, ``bboxes`` as ``[x1, y1, x2, y2]`` in the
  input image's pixels, ``labels`` (class indices), ``scores`` and ``classes`` (the class names
  of the checkpoint's data set);
* ``pred/NAME.png`` (segmentation): the (H, W) map of class indices at the input's size (8-bit;
  16-bit for more than 256 classes): the model's classes from 0, so with ADE20K's
  ``reduce_zero_label`` class ``i`` is the data set's label ``i + 1``, the value
  ``tools/test.py --out`` writes.
"""
import argparse
import io
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.config import Config, DictAction
from mmengine.utils import mkdir_or_exist
from PIL import Image

from mmtwins.apis import allow_mmengine_checkpoints
from mmtwins.checkpoint import CheckpointError, check_checkpoint_file, fitting_state_dict
from mmtwins.cli import cli_errors
from mmtwins.engine import ConfigError
from mmtwins.engine.fileio import atomic_write

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
CHUNK = 16  # images per inferencer call: the drawn images of one call are held in memory


class InputError(ValueError):
    """Inputs that cannot be processed as asked (their outputs would overwrite each other)."""


def list_images(inputs: Sequence[str]) -> List[str]:
    """Image files of ``inputs`` (files, or folders searched recursively), in order.

    Raises:
        FileNotFoundError: an input is missing, or a folder holds no image.
        InputError: two images share a file name (their outputs would share one).
    """
    images = []
    for path in inputs:
        if osp.isdir(path):
            found = sorted(
                osp.join(root, name) for root, _, names in os.walk(path) for name in names
                if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(f'no image ({", ".join(IMAGE_SUFFIXES)}) under {path}')
            images += found
        elif osp.isfile(path):
            images.append(path)
        else:
            raise FileNotFoundError(f'no image file or folder at {path}')
    stems = [osp.splitext(osp.basename(p))[0] for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(f'several inputs share the file name(s) {duplicates}: their outputs '
                         'would overwrite each other; run them separately')
    return images


def _fit_checked(inferencer_cls: type, checkpoint: str) -> type:
    """``inferencer_cls`` (an mmengine inferencer) loading ``checkpoint`` only if it fits the
    model exactly: mmengine loads non-strictly, with warnings, and would leave the parts of
    the model that the checkpoint lacks randomly initialised."""

    class FitChecked(inferencer_cls):

        def _load_weights_to_model(self, model, ckpt, cfg):
            if ckpt is not None:  # raises CheckpointError before anything is loaded
                fitting_state_dict(model, ckpt, checkpoint)
            super()._load_weights_to_model(model, ckpt, cfg)

    FitChecked.__name__ = FitChecked.__qualname__ = f'FitChecked{inferencer_cls.__name__}'
    return FitChecked


def build_inferencer(config: str,
                     checkpoint: str,
                     device: Optional[str] = None,
                     cfg_options: Optional[dict] = None):
    """mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` for ``config`` (with
    ``cfg_options`` merged into it) and ``checkpoint``, which must fit the config's model.

    Returns:
        tuple: the task (``'det'`` or ``'seg'``) and the inferencer.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file (said before the model is built).
        CheckpointError: ``checkpoint`` does not fit the model (keys missing, unexpected or of
            another shape: the checkpoint of another config, say).
        ConfigError: the config is neither a detector's nor a segmentor's.
    """
    check_checkpoint_file(checkpoint)
    allow_mmengine_checkpoints()  # torch >= 2.6 loads with weights_only=True
    cfg = Config.fromfile(config)  # also imports the config's custom_imports (mmtwins.models)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        return 'det', _fit_checked(DetInferencer, checkpoint)(
            model=cfg, weights=checkpoint, device=device, scope=scope, show_progress=False)
    if scope == 'mmseg':
        from mmseg.apis import MMSegInferencer
        return 'seg', _fit_checked(MMSegInferencer, checkpoint)(
            model=cfg, weights=checkpoint, device=device, scope=scope)
    raise ConfigError(f'{config}: default_scope is {scope!r}; inference supports detectors '
                      "(default_scope='mmdet') and segmentors (default_scope='mmseg')")


def _save_det(pred: dict, classes: Sequence[str], out_file: str) -> None:
    atomic_write(out_file, json.dumps(dict(pred, classes=list(classes))))


def _save_png(array: np.ndarray, out_file: str) -> None:
    """``array`` as a PNG file, written atomically (never half a file under its name)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='PNG')
    atomic_write(out_file, buffer.getvalue())


def infer(config: str,
          checkpoint: str,
          inputs: Sequence[str],
          out_dir: str,
          device: Optional[str] = None,
          score_thr: float = 0.3,
          batch_size: int = 1,
          cfg_options: Optional[dict] = None) -> Dict[str, List[str]]:
    """Predict on every image of ``inputs`` and write the files of the module doc.

    Args:
        config, checkpoint: a trained model (a config of this project and its checkpoint).
        inputs: image files and/or folders.
        out_dir: where ``vis/`` and ``pred/`` go.
        device: e.g. ``'cpu'``, ``'cuda:0'``; default: a GPU if there is one.
        score_thr: only boxes scoring above this are drawn (all are saved); detection only.
        batch_size: images per forward pass.
        cfg_options: config overrides, e.g. ``{'model.test_cfg.score_thr': 0.}``.

    Returns:
        dict: the files written, ``vis`` and ``pred`` (one each per image, in input order).

    Raises:
        FileNotFoundError: an input or the checkpoint is missing (said before the model is
            built).
        InputError: two inputs share a file name (also said before).
        CheckpointError: the checkpoint does not fit the config's model.
        ConfigError: the config is neither a detector's nor a segmentor's.
    """
    images = list_images(inputs)
    task, inferencer = build_inferencer(config, checkpoint, device, cfg_options)
    classes = inferencer.model.dataset_meta['classes']
    dtype = np.uint8 if len(classes) <= 256 else np.uint16  # of the segmentation maps
    vis_dir, pred_dir = osp.join(out_dir, 'vis'), osp.join(out_dir, 'pred')
    mkdir_or_exist(vis_dir)
    mkdir_or_exist(pred_dir)
    written: Dict[str, List[str]] = dict(vis=[], pred=[])
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK]
        if task == 'det':
            results = inferencer(chunk, batch_size=batch_size, return_vis=True,
                                 no_save_vis=True, pred_score_thr=score_thr)
        else:
            results = inferencer(chunk, batch_size=batch_size, return_vis=True, opacity=0.5)
        preds, drawn = results['predictions'], results['visualization']
        if len(chunk) == 1 and task == 'seg':  # mmseg unwraps the lists of a single image
            preds, drawn = [preds], [drawn]
        for path, pred, vis in zip(chunk, preds, drawn):
            stem = osp.splitext(osp.basename(path))[0]
            written['vis'].append(osp.join(vis_dir, f'{stem}.png'))
            _save_png(vis, written['vis'][-1])
            if task == 'det':
                written['pred'].append(osp.join(pred_dir, f'{stem}.json'))
                _save_det(pred, classes, written['pred'][-1])
            else:
                written['pred'].append(osp.join(pred_dir, f'{stem}.png'))
                _save_png(np.asarray(pred, dtype), written['pred'][-1])
        print(f'{min(start + CHUNK, len(images))}/{len(images)} images done', flush=True)
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Run a trained detector or segmentor of this project on images: writes '
        'OUT_DIR/vis/NAME.png (predictions drawn) and OUT_DIR/pred/NAME.json (detection: boxes '
        'x1,y1,x2,y2, labels, scores, class names) or OUT_DIR/pred/NAME.png (segmentation: '
        'class index map).')
    parser.add_argument('config', help='the model\'s config (default_scope mmdet or mmseg)')
    parser.add_argument('checkpoint', help='the trained checkpoint')
    parser.add_argument('inputs', nargs='+', help='image files and/or folders of images')
    parser.add_argument('--out-dir', default='outputs/infer', help='where vis/ and pred/ go')
    parser.add_argument('--device', help='e.g. cpu, cuda:0 (default: a GPU if there is one)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw the boxes scoring above this (all are saved)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config settings, e.g. model.test_cfg.score_thr=0.01')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Run :func:`infer`; its refusals (the errors its docstring lists) exit with their
    message as one line."""
    args = parse_args(argv)
    with cli_errors('infer.py', (FileNotFoundError, InputError, CheckpointError, ConfigError)):
        written = infer(args.config, args.checkpoint, args.inputs, args.out_dir, args.device,
                        args.score_thr, args.batch_size, args.cfg_options)
    print(f'{len(written["vis"])} images: drawn in {osp.join(args.out_dir, "vis")}, '
          f'predictions in {osp.join(args.out_dir, "pred")}')
    return written
