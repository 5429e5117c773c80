"""A small ImageFolder-style data set (``split/class_name/image.png``) and a classifier config
that trains on it: the real ImageNet config with a tiny backbone and 64-pixel crops."""
import os
from typing import Sequence

import numpy as np
from conftest import TINY_PCPVT, TINY_SVT
from mmengine.config import Config
from PIL import Image

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def make_imagefolder(root: str,
                     num_classes: int = 3,
                     per_class: Sequence[int] = (4, 2),
                     splits: Sequence[str] = ('train', 'val'),
                     size: int = 80,
                     seed: int = 0) -> str:
    """Create ``root/{split}/class_{k}/{i}.png`` and return ``root``.

    Each class has its own mean colour with per-pixel noise, so the classes are learnable;
    ``per_class[s]`` images of ``size`` x ``size`` pixels per class go to ``splits[s]``.
    """
    if len(per_class) != len(splits):
        raise ValueError(f'{len(per_class)} image counts for {len(splits)} splits')
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(num_classes, 3))
    for split, count in zip(splits, per_class):
        for k in range(num_classes):
            folder = os.path.join(root, split, f'class_{k}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-30, 31, size=(size, size, 3))
                pixels = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return root


def tiny_classifier_config(data_root: str, work_dir: str, family: str = 'svt',
                           num_classes: int = 3, max_epochs: int = 1) -> Config:
    """``configs/twins_{family}_s_in1k.py`` (its whole recipe: RandAugment, Mixup/CutMix,
    label smoothing, AdamW with the decay exemptions, clipping, warm-up + cosine) with a tiny
    arch, 64-pixel crops, batch 4 and the ImageFolder data under ``data_root``."""
    arch = {'svt': TINY_SVT, 'pcpvt': TINY_PCPVT}[family]
    cfg = Config.fromfile(os.path.join(CONFIGS, f'twins_{family}_s_in1k.py'))
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.arch = arch
    cfg.model.head.update(in_channels=arch['embed_dims'][-1], num_classes=num_classes)
    cfg.data_preprocessor.num_classes = num_classes
    for step in cfg.train_pipeline:
        if step.type == 'RandomResizedCrop':
            step.scale = 64
    for step in cfg.test_pipeline:
        if step.type == 'ResizeEdge':
            step.scale = 73
        elif step.type == 'CenterCrop':
            step.crop_size = 64
    for loader, split, pipeline in ((cfg.train_dataloader, 'train', cfg.train_pipeline),
                                    (cfg.val_dataloader, 'val', cfg.test_pipeline)):
        loader.update(batch_size=4, num_workers=0, persistent_workers=False, pin_memory=False)
        loader.dataset = dict(type='CustomDataset', data_root=str(data_root), data_prefix=split,
                              pipeline=pipeline)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = cfg.test_evaluator = dict(type='Accuracy', topk=(1, ))
    cfg.train_cfg.max_epochs = max_epochs
    cfg.default_hooks.logger.interval = 1
    return cfg
