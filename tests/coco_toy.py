"""A tiny COCO-format instance data set and tiny detection configs built on the real ones.

:func:`make_coco_toy` draws images with filled rectangles ('box') and filled octagons ('blob') on
a plain background and writes ``annotations.json`` (boxes, areas, polygon masks) next to
``images/``. :func:`write_tiny_det_config` writes a config that inherits one of the repository's
detection configs and only shrinks it: a tiny Twins backbone loaded from a generated checkpoint
through the config's ``init_cfg``, narrow heads, the toy data at 128x96, no augmentation, a
constant lr, a few epochs.
"""
import contextlib
import io
import json
import math
import os.path as osp
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from PIL import Image, ImageDraw

from conftest import TINY_PCPVT, TINY_SVT

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('box', 'blob')
IMG_W, IMG_H = 128, 96


def _octagon(cx: float, cy: float, r: float) -> List[float]:
    angles = [math.pi * (k + .5) / 4 for k in range(8)]
    return [round(v, 1) for a in angles for v in (cx + r * math.cos(a), cy + r * math.sin(a))]


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> List[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _polygon_area(poly: List[float]) -> float:
    xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def make_coco_toy(root: Path, num_images: int = 4, seed: int = 0) -> Dict[str, str]:
    """Write ``num_images`` 128x96 PNGs with one object of each class and their COCO annotations.

    Returns:
        dict: ``data_root`` (with a trailing slash), ``ann_file`` (relative to it) and
        ``img_prefix``.
    """
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for img_id in range(1, num_images + 1):
        img = Image.new('RGB', (IMG_W, IMG_H), (110, 120, 130))
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.integers(4, 40), rng.integers(4, 30)
        w, h = rng.integers(30, 50), rng.integers(25, 45)
        cx, cy, r = rng.integers(90, 110), rng.integers(30, 66), rng.integers(14, 18)
        objects = [
            (1, _rectangle(float(x0), float(y0), float(x0 + w), float(y0 + h)), (230, 40, 40)),
            (2, _octagon(float(cx), float(cy), float(r)), (40, 40, 230)),
        ]
        for cat_id, poly, colour in objects:
            draw.polygon(poly, fill=colour)
            xs, ys = poly[0::2], poly[1::2]
            annotations.append(dict(
                id=len(annotations) + 1, image_id=img_id, category_id=cat_id, iscrowd=0,
                bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                area=_polygon_area(poly), segmentation=[poly]))
        file_name = f'{img_id:04d}.png'
        img.save(root / 'images' / file_name)
        images.append(dict(id=img_id, file_name=file_name, width=IMG_W, height=IMG_H))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    with open(root / 'annotations.json', 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return dict(data_root=f'{root}/', ann_file='annotations.json', img_prefix='images/')


def save_tiny_backbone(path: Path, arch: dict, kind: str) -> Dict[str, torch.Tensor]:
    """Save a tiny Twins backbone as the authors' files do (``{'model': state_dict}``); returns
    the state dict. Every parameter is randomised after ``init_weights`` (which leaves each norm
    weight and bias constant), so a loader that swapped two of them would show."""
    from mmtwins.analysis.peers import randomize_parameters_
    from mmtwins.models import PCPVT, SVT
    backbone = {'PCPVT': PCPVT, 'SVT': SVT}[kind](arch=arch)
    backbone.init_weights()
    state = randomize_parameters_(backbone).state_dict()
    torch.save({'model': state}, path)
    return state


# Narrow heads for 2 classes; every box kept at test time (the barely trained detectors score
# below mmdet's 0.05 threshold, and the COCO metric needs predictions).
_HEADS = {
    'retinanet': """
    bbox_head=dict(num_classes=2, in_channels=32, feat_channels=32, stacked_convs=2),
    test_cfg=dict(score_thr=0.)""",
    'mask_rcnn': """
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=2),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=2)),
    test_cfg=dict(rcnn=dict(score_thr=0.))""",
}


def write_tiny_det_config(tmp: Path, base_config: str, data: Dict[str, str], max_epochs: int = 4,
                          batch_size: int = 2) -> Tuple[Path, Dict[str, torch.Tensor]]:
    """A config inheriting ``configs/<base_config>`` with everything made tiny (see module doc).

    Returns:
        tuple: the config path and the state dict of the backbone checkpoint its ``init_cfg``
        names.
    """
    method = 'mask_rcnn' if base_config.startswith('mask_rcnn') else 'retinanet'
    kind = 'SVT' if '_svt_' in base_config else 'PCPVT'
    arch = TINY_SVT if kind == 'SVT' else TINY_PCPVT
    ckpt = tmp / f'tiny_{kind.lower()}_imagenet.pth'
    state = save_tiny_backbone(ckpt, arch, kind)
    with_mask = ', with_mask=True' if method == 'mask_rcnn' else ''
    text = f"""_base_ = '{osp.join(REPO, 'configs', base_config)}'
model = dict(
    backbone=dict(arch=dict(_delete_=True, **{arch!r}), drop_path_rate=0.,
                  init_cfg=dict(checkpoint='{ckpt}')),
    neck=dict(in_channels={[int(c) for c in arch['embed_dims']]}, out_channels=32),{_HEADS[method]})

data_root = '{data['data_root']}'
metainfo = dict(classes={CLASSES!r})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True{with_mask}),
    dict(type='Resize', scale=({IMG_W}, {IMG_H}), keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({IMG_W}, {IMG_H}), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
dataset = dict(data_root=data_root, ann_file='{data['ann_file']}', serialize_data=False,
               data_prefix=dict(img='{data['img_prefix']}'), metainfo=metainfo)
train_dataloader = dict(batch_size={batch_size}, num_workers=0, persistent_workers=False,
                        dataset=dict(dataset, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + '{data['ann_file']}')
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = []
train_cfg = dict(max_epochs={max_epochs}, val_interval={max_epochs})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={max_epochs}))
randomness = dict(seed=0)
"""
    path = tmp / f'tiny_{osp.splitext(base_config)[0]}.py'
    path.write_text(text)
    return path, state


def load_tiny_config(path: Path) -> Config:
    """Load a tiny config without yapf-formatting its dumps: mmengine pretty-prints the whole
    config at every Runner start and checkpoint, about 1.5 s of CPU each time here.
    (``Config.fromfile`` drops its own ``format_python_code`` argument for ``.py`` files.)"""
    cfg = Config.fromfile(str(path))
    return Config(cfg.to_dict(), filename=cfg.filename, format_python_code=False)


def coco_stats(ann_file, preds: Sequence[dict], classes: Sequence[str] = CLASSES,
               iou_type: str = 'bbox') -> List[float]:
    """COCO AP of dumped mmdet predictions (``tools/test.py --out`` / ``DumpDetResults``),
    recomputed with pycocotools alone: label ``i`` is the annotation file's category named
    ``classes[i]``, boxes go from (x0, y0, x1, y1) to COCO's (x, y, w, h), masks are the dumped
    RLEs. pycocotools' default parameters (COCO's 100 detections per image). Returns
    ``COCOeval.stats``: AP, AP50, AP75, AP small, medium, large, then the 6 ARs."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        gt = COCO(str(ann_file))
        category = {c['name']: c['id'] for c in gt.loadCats(gt.getCatIds())}
        dets = []
        for pred in preds:
            inst = pred['pred_instances']
            boxes, scores = inst['bboxes'].tolist(), inst['scores'].tolist()
            for i, label in enumerate(inst['labels'].tolist()):
                det = dict(image_id=pred['img_id'], category_id=category[classes[label]],
                           score=scores[i])
                if iou_type == 'bbox':
                    x0, y0, x1, y1 = boxes[i]
                    det['bbox'] = [x0, y0, x1 - x0, y1 - y0]
                else:
                    rle = dict(inst['masks'][i])
                    if isinstance(rle['counts'], bytes):
                        rle['counts'] = rle['counts'].decode()
                    det['segmentation'] = rle
                dets.append(det)
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]
