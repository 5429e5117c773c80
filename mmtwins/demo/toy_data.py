"""A deterministic toy data set in the two formats the real configs read: COCO and ADE20K.

Every image shows 1-3 coloured shapes (rectangle, circle, triangle; each class has its own hue
family, jittered) on a textured background (a two-colour gradient, stripes and noise). The same
scenes are written twice::

    OUT/coco/annotations/instances_train.json   COCO instances: boxes (x, y, w, h), polygon
    OUT/coco/annotations/instances_val.json     masks, areas; category ids 1 rectangle, 2 circle,
                                                3 triangle
    OUT/coco/train/000001.jpg ...               the images (file_name in the JSON)
    OUT/coco/val/000001.jpg ...
    OUT/ade/ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
    OUT/ade/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...
    OUT/ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png ...
    OUT/ade/ADEChallengeData2016/annotations/validation/ADE_val_00000001.png ...
                                                single-channel label maps in ADE20K's convention:
                                                0 other (ignored; unused here), 1 background,
                                                2 rectangle, 3 circle, 4 triangle

Image ``i`` of a split is drawn from its own random stream (seed, split, i): the data do not
depend on the number of images asked for, so a smaller set is a prefix of a larger one and the
validation images never depend on the training set. Training and validation images are
different draws (a held-out split).

A toy set may be written over by another (a smaller one leaves none of a larger one's images).
Each layout root holds a ``.mmtwins_toy_data`` marker; the writer refuses an ADE20K layout with
files but no marker (a real ADE20K, whose names the toy set shares) and any folder under OUT
that is a symbolic link (e.g. ``data/ade/ADEChallengeData2016`` linked to the real data set).
"""
import argparse
import colorsys
import json
import math
import os
import os.path as osp
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.utils import mkdir_or_exist, track_iter_progress
from PIL import Image, ImageDraw

from mmtwins.cli import at_least
from mmtwins.engine.fileio import atomic_write

CLASSES = ('rectangle', 'circle', 'triangle')
# The class colours' hue families (degrees): red, green, blue; each shape jitters its hue +-15.
HUES = (0., 120., 225.)
SEG_CLASSES = ('background', ) + CLASSES  # label map values 1, 2, ... (0: other, ignored)
SPLITS = {'train': ('training', 0), 'val': ('validation', 1)}  # name -> (ADE folder, seed part)
# The COCO layout under its data root (what the configs under configs/demo/ read).
COCO_ANN_FILE = 'annotations/instances_{split}.json'
COCO_IMG_DIR = '{split}/'
MIN_SIZE = 32  # the smallest image side (pixels) the shapes are drawn at
#: The file that marks a layout root (``OUT/coco``, ``OUT/ade/ADEChallengeData2016``) as a toy
#: data set's, which a new toy set may overwrite.
MARKER = '.mmtwins_toy_data'


@dataclass
class Shape:
    """One object: ``label`` (0-based index into CLASSES) and its polygon ``[x0, y0, x1, ...]``."""
    label: int
    polygon: List[float]

    @property
    def bbox(self) -> List[float]:
        """``[x, y, w, h]`` of the polygon (COCO's box)."""
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]

    @property
    def area(self) -> float:
        """Polygon area (shoelace formula)."""
        xs, ys = np.array(self.polygon[0::2]), np.array(self.polygon[1::2])
        return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


@dataclass
class Scene:
    """An (H, W, 3) uint8 RGB ``image``, its (H, W) uint8 ADE ``label_map`` and its ``shapes``."""
    image: np.ndarray
    label_map: np.ndarray
    shapes: List[Shape]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360.) / 360., s, v), np.float32) * 255


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: a gradient between two greyish colours, stripes and noise."""
    c0, c1 = (_hsv(rng.uniform(0, 360), rng.uniform(0, .3), rng.uniform(.3, .9)) for _ in '01')
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(theta) + yy * math.sin(theta))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    phi = rng.uniform(0, 2 * math.pi)
    freq = rng.uniform(3, 12)  # stripes per image side
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)))
    return img + rng.uniform(8, 30) * stripes[..., None]


def _polygon(rng: np.random.Generator, label: int, cx: float, cy: float, r: float) -> List[float]:
    """Polygon of class ``label`` centred at (cx, cy) within radius ``r``."""
    if label == 0:  # rectangle, axis-aligned, aspect ratio 0.5-2
        aspect = math.exp(rng.uniform(-.69, .69))
        half_w = r * min(1., aspect) * .95
        half_h = r * min(1., 1 / aspect) * .95
        pts = [(cx - half_w, cy - half_h), (cx + half_w, cy - half_h), (cx + half_w, cy + half_h),
               (cx - half_w, cy + half_h)]
    elif label == 1:  # circle
        pts = [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32))
               for k in range(32)]
    else:  # equilateral triangle, any rotation
        a = rng.uniform(0, 2 * math.pi)
        angles = [a + 2 * math.pi * k / 3 for k in range(3)]
        pts = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in angles]
    return [round(float(v), 1) for p in pts for v in p]


def draw_scene(rng: np.random.Generator, size: int) -> Scene:
    """One toy image of ``size`` x ``size`` pixels with 1-3 non-overlapping shapes whose radius
    is 10-25% of the side (boxes of about 20% to 50% of the side)."""
    img = _background(rng, size)
    shapes: List[Shape] = []
    circles: List[Tuple[float, float, float]] = []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(20):  # rejection sampling of a free spot
            r = rng.uniform(.10, .25) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in circles):
                break
        else:
            continue
        circles.append((cx, cy, r))
        label = int(rng.integers(len(CLASSES)))
        shapes.append(Shape(label, _polygon(rng, label, cx, cy, r)))

    canvas = Image.fromarray(np.zeros((size, size), np.uint8))
    label_map = Image.fromarray(np.ones((size, size), np.uint8))  # 1 = background
    for index, shape in enumerate(shapes, start=1):
        ImageDraw.Draw(canvas).polygon(shape.polygon, fill=index)
        ImageDraw.Draw(label_map).polygon(shape.polygon, fill=shape.label + 2)
    owner = np.asarray(canvas)
    for index, shape in enumerate(shapes, start=1):
        colour = _hsv(HUES[shape.label] + rng.uniform(-15, 15), rng.uniform(.55, .95),
                      rng.uniform(.55, .95))
        shade = 1 + .15 * rng.standard_normal()  # some shapes a little darker or lighter
        img[owner == index] = colour * shade
    img += rng.normal(0, 6, img.shape)
    return Scene(np.clip(img, 0, 255).astype(np.uint8), np.asarray(label_map), shapes)


def _coco_dict(shapes: Sequence[List[Shape]], file_names: Sequence[str], size: int) -> dict:
    """COCO instances of images ``file_names`` of side ``size`` showing ``shapes``."""
    images, annotations = [], []
    for img_id, (objects, file_name) in enumerate(zip(shapes, file_names), start=1):
        images.append(dict(id=img_id, file_name=file_name, width=size, height=size))
        for shape in objects:
            annotations.append(
                dict(id=len(annotations) + 1, image_id=img_id, category_id=shape.label + 1,
                     bbox=shape.bbox, area=shape.area, segmentation=[shape.polygon], iscrowd=0))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories)


def toy_data_paths(out_dir: str) -> Dict[str, str]:
    """Where :func:`make_toy_data` writes: ``coco`` (its data root, with a trailing slash as
    mmdet's configs write it) and ``ade`` (the ``ADEChallengeData2016`` directory)."""
    return dict(coco=osp.join(out_dir, 'coco', ''),
                ade=osp.join(out_dir, 'ade', 'ADEChallengeData2016'))


def _layout_folders(paths: Dict[str, str]) -> List[str]:
    """Every folder :func:`make_toy_data` writes into, given :func:`toy_data_paths`."""
    folders = [paths['coco'], paths['ade']]
    for split, (ade_split, _) in SPLITS.items():
        folders += [osp.dirname(osp.join(paths['coco'], COCO_ANN_FILE.format(split=split))),
                    osp.join(paths['coco'], COCO_IMG_DIR.format(split=split)),
                    osp.join(paths['ade'], 'images', ade_split),
                    osp.join(paths['ade'], 'annotations', ade_split)]
    return folders


def _check_no_links(out_dir: str, folders: Sequence[str]) -> None:
    """Refuse to write through a symbolic link between ``out_dir`` and any of ``folders``.

    The README links the real data sets into ``data/`` (``data/coco``,
    ``data/ade/ADEChallengeData2016``): written through such a link, the toy set would
    overwrite and delete files of the real one (``OUT`` itself may be a link).

    Raises:
        FileExistsError: naming the link and where it leads.
    """
    out_dir = osp.abspath(out_dir)
    for folder in folders:
        path = out_dir
        for part in osp.relpath(osp.abspath(folder), out_dir).split(os.sep):
            path = osp.join(path, part)
            if osp.islink(path):
                raise FileExistsError(
                    f'{path} is a symbolic link (to {os.readlink(path)}): the toy data writer '
                    'does not write through links, which may lead to a real data set. Write the '
                    'toy data to another directory (make_toy_data.py --out, demo.py --data-dir), '
                    'or remove the link if the toy set is to take its place')


def _check_not_a_real_ade20k(out_dir: str, paths: Dict[str, str]) -> None:
    """Refuse to write where the ADE20K layout holds files this writer did not make.

    The toy ADE20K layout has the real data set's directory and file names, so a real copy at
    ``OUT/ade/ADEChallengeData2016`` (as under ``data/``) would have its images overwritten and
    those numbered above the toy count deleted. A toy ADE20K layout is known by the
    :data:`MARKER` file in its root (written before any image); one written before the
    markers went into the layout roots, by the marker in ``out_dir`` or the toy classes in its
    COCO annotation file, where the COCO root has no marker either.

    Raises:
        FileExistsError: the ADE20K layout holds files, and is no toy set.
    """
    ade_root = paths['ade']
    if osp.exists(osp.join(ade_root, MARKER)):
        return
    if not osp.exists(osp.join(paths['coco'], MARKER)) and (
            osp.exists(osp.join(out_dir, MARKER)) or _has_toy_coco_annotations(out_dir)):
        return
    for sub in ('images', 'annotations'):
        for split, _ in SPLITS.values():
            folder = osp.join(ade_root, sub, split)
            if osp.isdir(folder) and os.listdir(folder):
                raise FileExistsError(
                    f'{folder} holds files that the toy data writer did not make (no {MARKER} '
                    f'in {ade_root}): a real ADE20K copy would lose images to the toy set. '
                    'Write the toy data to another directory')


def _has_toy_coco_annotations(out_dir: str) -> bool:
    path = osp.join(out_dir, 'coco', COCO_ANN_FILE.format(split='train'))
    try:
        with open(path) as f:
            categories = json.load(f)['categories']
        return [c['name'] for c in categories] == list(CLASSES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_numbered_above(folder: str, pattern: str, count: int) -> None:
    """Delete the files of ``folder`` whose names match ``pattern`` with a number (its group)
    above ``count``: what an earlier, larger toy set left there. Other files stay."""
    for name in os.listdir(folder):
        match = re.fullmatch(pattern, name)
        if match and int(match.group(1)) > count:
            os.remove(osp.join(folder, name))


def make_toy_data(out_dir: str, num_train: int = 400, num_val: int = 100, size: int = 128,
                  seed: int = 0) -> Dict[str, str]:
    """Write the toy data set under ``out_dir`` in both layouts (see the module doc).

    Args:
        out_dir: the root of both layouts (``coco/`` and ``ade/`` are created in it).
        num_train, num_val: images per split (the same scenes in both layouts).
        size: side of the square images in pixels (at least 32).
        seed: the data set's seed.

    Returns:
        dict: as :func:`toy_data_paths`.

    Raises:
        ValueError: a size or count out of range.
        FileExistsError: a folder to write is reached through a symbolic link, or the ADE20K
            layout holds files of no toy set (see :func:`_check_not_a_real_ade20k`); nothing is
            written then.
    """
    if size < MIN_SIZE:
        raise ValueError(f'size must be at least {MIN_SIZE} pixels, got {size}')
    if num_train < 1 or num_val < 1:
        raise ValueError(f'both splits need images, got num_train={num_train}, num_val={num_val}')
    paths = toy_data_paths(out_dir)
    _check_no_links(out_dir, _layout_folders(paths))
    _check_not_a_real_ade20k(out_dir, paths)
    for root in (paths['coco'], paths['ade']):
        mkdir_or_exist(root)
        with open(osp.join(root, MARKER), 'w') as f:
            f.write('written by mmtwins.demo.toy_data: a toy data set, safe to overwrite\n')
    if osp.exists(osp.join(out_dir, MARKER)):  # where earlier versions kept the marker
        os.remove(osp.join(out_dir, MARKER))
    counts = {'train': num_train, 'val': num_val}
    jobs = [(split, i) for split in SPLITS for i in range(1, counts[split] + 1)]
    shapes: Dict[str, List[List[Shape]]] = {split: [] for split in SPLITS}
    for split, (ade_split, _) in SPLITS.items():
        mkdir_or_exist(osp.dirname(osp.join(paths['coco'], COCO_ANN_FILE.format(split=split))))
        # mmseg lists every image of a split folder: a larger earlier set's are removed.
        for folder, pattern in (
                (osp.join(paths['coco'], COCO_IMG_DIR.format(split=split)), r'(\d{6})\.jpg'),
                (osp.join(paths['ade'], 'images', ade_split), rf'ADE_{split}_(\d{{8}})\.jpg'),
                (osp.join(paths['ade'], 'annotations', ade_split), rf'ADE_{split}_(\d{{8}})\.png')):
            mkdir_or_exist(folder)
            _remove_numbered_above(folder, pattern, counts[split])
    print(f'writing {num_train} + {num_val} toy images ({size}x{size}) to {out_dir}')
    for split, i in track_iter_progress(jobs):
        ade_split, split_seed = SPLITS[split]
        scene = draw_scene(np.random.default_rng([seed, split_seed, i]), size)
        shapes[split].append(scene.shapes)
        image = Image.fromarray(scene.image)
        image.save(osp.join(paths['coco'], COCO_IMG_DIR.format(split=split), f'{i:06d}.jpg'),
                   quality=95)
        ade_name = f'ADE_{split}_{i:08d}'
        image.save(osp.join(paths['ade'], 'images', ade_split, f'{ade_name}.jpg'), quality=95)
        Image.fromarray(scene.label_map).save(
            osp.join(paths['ade'], 'annotations', ade_split, f'{ade_name}.png'))
    for split in SPLITS:
        names = [f'{i:06d}.jpg' for i in range(1, counts[split] + 1)]
        # the index of the split's images: never half a file, whatever stops the run
        atomic_write(osp.join(paths['coco'], COCO_ANN_FILE.format(split=split)),
                     json.dumps(_coco_dict(shapes[split], names, size)))
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write a small deterministic data set of coloured shapes in the COCO '
        'instances layout and the ADE20K (ADEChallengeData2016) layout, to check a set-up or '
        'run configs/demo/ without downloading anything.',
        epilog='layout and conventions:\n' + __doc__.split('\n', 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='data/toy',
                        help='root of both layouts, OUT above (default: %(default)s, where the '
                        'configs under configs/demo/ look)')
    parser.add_argument('--num-train', type=at_least(1), default=400,
                        help='default: %(default)s')
    parser.add_argument('--num-val', type=at_least(1), default=100, help='default: %(default)s')
    parser.add_argument('--size', type=at_least(MIN_SIZE), default=128,
                        help='image side in pixels (default: %(default)s; configs/demo/ train '
                        'at 128)')
    parser.add_argument('--seed', type=at_least(0), default=0, help='default: %(default)s')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    args = parse_args(argv)
    paths = make_toy_data(args.out, args.num_train, args.num_val, args.size, args.seed)
    print(f'COCO layout: {paths["coco"]}\nADE20K layout: {paths["ade"]}')
    return paths
