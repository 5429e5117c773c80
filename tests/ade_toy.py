"""A tiny ADE20K-layout data set and tiny segmentation configs derived from the real ones.

:func:`make_ade_toy` writes ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (ADE20K's label convention: 0 = "other", ignored after
``reduce_zero_label``; 1..150 = the classes). Every image shows up to three ADE classes as flat
colours plus noise, so a few iterations already lower the loss. Several validation images have
sides that are not multiples of 32.

:func:`tiny_seg_config` loads one of the repository's segmentation configs and only shrinks it:
a tiny Twins backbone without pretrained weights, narrow heads with plain BN (gloo has no SyncBN
on CPU), the toy data, train crops of 64x64 from a fixed resize (no random augmentation, so every
iteration sees the same batch), test scales divided by 8 (the TTA pipeline keeps its structure:
six ratios x two flips), a constant lr and a few iterations.
"""
import copy
import functools
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from mmengine.config import Config
from PIL import Image

from conftest import TINY_PCPVT, TINY_SVT

REPO = Path(__file__).resolve().parents[1]
# ADE20K class index (1-based, as in the annotation PNGs) -> colour. 1 wall, 3 sky, 5 tree.
COLOURS = {1: (150, 150, 150), 3: (70, 130, 230), 5: (40, 160, 40)}
TRAIN_SIZES = ((96, 128), (128, 96))  # (H, W)
VAL_SIZES = ((96, 128), (75, 97), (100, 67))  # two of them are not multiples of 32
TEST_SCALE_DIVISOR = 8  # 2048x512 -> 256x64
CROP = (64, 64)


def _draw(h: int, w: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 RGB image and its (H, W) uint8 ADE label map."""
    label = np.full((h, w), 1, np.uint8)  # wall
    label[:h // 3] = 3  # sky on top
    y0, x0 = rng.integers(h // 3, h // 2), rng.integers(0, w // 2)
    label[y0:y0 + h // 3, x0:x0 + w // 3] = 5  # a tree
    label[-3:] = 0  # a strip of "other" (ignored)
    img = np.zeros((h, w, 3), np.float32)
    for cls, colour in COLOURS.items():
        img[label == cls] = colour
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_ade_toy(root: Path, seed: int = 0) -> Path:
    """Write the toy ADE20K under ``root``; returns its ``ADEChallengeData2016`` directory."""
    rng = np.random.default_rng(seed)
    data_root = root / 'ADEChallengeData2016'
    for split, tag, sizes in (('training', 'train', TRAIN_SIZES),
                              ('validation', 'val', VAL_SIZES)):
        (data_root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (data_root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes, start=1):
            img, label = _draw(h, w, rng)
            name = f'ADE_{tag}_{i:08d}'
            Image.fromarray(img).save(data_root / 'images' / split / f'{name}.jpg', quality=95)
            Image.fromarray(label).save(data_root / 'annotations' / split / f'{name}.png')
    return data_root


def read_label_maps(data_root: Path, split: str = 'validation') -> Dict[str, np.ndarray]:
    """Annotation PNGs of ``split`` by file stem, (H, W) uint8 with ADE's 0..150 labels."""
    return {p.stem: np.array(Image.open(p))
            for p in sorted((data_root / 'annotations' / split).glob('*.png'))}


def miou_from_maps(pred_dir: Path, labels: Dict[str, np.ndarray]) -> float:
    """mIoU (%) of ADE-convention prediction PNGs (``pred_dir/STEM.png``, as mmseg's
    ``tools/test.py --out`` writes them after ``reduce_zero_label``: 1..150) against the
    annotation PNGs ``labels`` (0 ignored), over the classes present in either."""
    inter, union = np.zeros(151), np.zeros(151)
    for stem, gt in labels.items():
        pred = np.array(Image.open(pred_dir / f'{stem}.png')).astype(np.int64)
        valid = gt > 0
        p, g = pred[valid], gt[valid].astype(np.int64)
        inter += np.bincount(g[p == g], minlength=151)
        union += np.bincount(p, minlength=151) + np.bincount(g, minlength=151) \
            - np.bincount(g[p == g], minlength=151)
    present = union > 0
    return float((inter[present] / union[present]).mean() * 100)


@functools.lru_cache(maxsize=None)
def _load_config(name: str) -> Config:
    return Config.fromfile(REPO / 'configs' / name)


def load_config(name: str) -> Config:
    """A fresh copy of ``configs/<name>`` (each file is parsed once per test session)."""
    return copy.deepcopy(_load_config(name))


def _scaled(scale: Sequence[int]) -> Tuple[int, int]:
    return tuple(int(s) // TEST_SCALE_DIVISOR for s in scale)


def _shrink_resizes(pipeline: List[dict]) -> None:
    """Divide every Resize scale of a test / TTA pipeline by TEST_SCALE_DIVISOR, in place."""
    for step in pipeline:
        if step['type'] == 'Resize':
            step['scale'] = _scaled(step['scale'])
        elif step['type'] == 'TestTimeAug':
            for group in step['transforms']:
                _shrink_resizes(group)


def tiny_seg_config(name: str, data_root: Path, work_dir: Path, max_iters: int = 4,
                    lr: float = 1e-3) -> Config:
    """The repository config ``configs/<name>`` shrunk for CPU tests (see the module doc)."""
    cfg = load_config(name)
    arch = TINY_SVT if cfg.model.backbone.type == 'mmtwins.SVT' else TINY_PCPVT
    dims = arch['embed_dims']
    bn = dict(type='BN', requires_grad=True)
    model = cfg.model
    model.data_preprocessor.size = CROP
    model.backbone.update(arch=arch, init_cfg=None)
    if 'neck' in model:  # Semantic FPN
        model.neck.update(in_channels=dims, out_channels=16)
        model.decode_head.update(in_channels=[16] * 4, channels=16, norm_cfg=bn)
    else:  # UperNet + auxiliary FCN head
        model.decode_head.update(in_channels=dims, channels=16, norm_cfg=bn)
        model.auxiliary_head.update(in_channels=dims[2], channels=16, norm_cfg=bn)

    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='Resize', scale=CROP, keep_ratio=False),
        dict(type='PackSegInputs')
    ]
    _shrink_resizes(cfg.test_pipeline)
    _shrink_resizes(cfg.tta_pipeline)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(num_workers=0, persistent_workers=False)
        cfg[loader].dataset.data_root = str(data_root)
    cfg.val_dataloader.dataset.pipeline = cfg.test_pipeline
    cfg.test_dataloader.dataset.pipeline = cfg.test_pipeline

    cfg.optim_wrapper.optimizer.lr = lr
    cfg.param_scheduler = None
    cfg.train_cfg.update(max_iters=max_iters, val_interval=max_iters)
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = 1
    cfg.randomness = dict(seed=0)
    cfg.work_dir = str(work_dir)
    return cfg
