"""``tools/test.py --show / --show-dir / --wait-time / --interval``: the config's visualization
hook is turned on as each codebase's own ``tools/test.py`` does, and ``--show-dir`` writes one
painted image per test image where that codebase's hook writes them."""
import argparse
import os
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils import import_modules_from_strings

from ade_toy import make_ade_toy, tiny_seg_config
from coco_toy import REPO, load_tiny_config, make_coco_toy, write_tiny_det_config
from imagefolder import make_imagefolder, tiny_classifier_config
from mmtwins.apis.test import build_test_cfg, main, parse_args, trigger_visualization_hook
from mmtwins.engine import ConfigError

DET = 'retinanet_twins_pcpvt_s_1x.py'
SEG = 'fpn_twins_pcpvt_s_80k_ade20k.py'
CLS = 'twins_svt_s_in1k.py'


def _random_checkpoint(cfg: Config, path: Path) -> str:
    """Save the randomly initialised model of ``cfg`` as an mmengine checkpoint."""
    import_modules_from_strings(cfg.custom_imports['imports'])
    init_default_scope(cfg.default_scope)
    torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, path)
    return str(path)


def _test(config: Path, checkpoint: str, work_dir: Path, *options: str) -> dict:
    """``tools/test.py`` in this process. The visualizer gets a name of its own: mmengine keeps
    one visualizer per name and class for the whole process, and would reuse an earlier test's
    (with its save_dir) under the configs' shared name 'visualizer'."""
    return main([str(config), checkpoint, '--work-dir', str(work_dir), *options,
                 '--cfg-options', f'visualizer.name=show_{work_dir.parent.name}'])


@pytest.mark.usefixtures('one_torch_thread')
def test_det_show_dir_writes_under_work_dir_timestamp(tmp_path):
    data = make_coco_toy(tmp_path / 'coco', num_images=2)
    path, _ = write_tiny_det_config(tmp_path, DET, data)
    ckpt = _random_checkpoint(load_tiny_config(path), tmp_path / 'random.pth')
    metrics = _test(path, ckpt, tmp_path / 'work', '--show-dir', 'painted')
    assert 'coco/bbox_mAP' in metrics
    # mmdet: a relative --show-dir lies in the run's log directory, WORK_DIR/TIMESTAMP.
    (show_dir, ) = (tmp_path / 'work').glob('*/painted')
    assert sorted(p.name for p in show_dir.iterdir()) == ['0001.png', '0002.png']


@pytest.mark.usefixtures('one_torch_thread')
def test_seg_show_dir_writes_through_the_visualizer(tmp_path):
    data_root = make_ade_toy(tmp_path / 'ade')
    cfg = tiny_seg_config(SEG, data_root, tmp_path / 'work')
    # No training images: mmseg's hook reads runner.iter, which must not build the train loop.
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_training_data')
    cfg.dump(tmp_path / 'tiny.py')
    ckpt = _random_checkpoint(cfg, tmp_path / 'random.pth')
    # The hook draws every `interval`-th test batch (50 in mmseg's configs): 1 for all 3 images.
    metrics = _test(tmp_path / 'tiny.py', ckpt, tmp_path / 'work', '--show-dir',
                    str(tmp_path / 'painted'), '--interval', '1')
    assert 'mIoU' in metrics
    # mmseg: the visualizer's save_dir; LocalVisBackend writes NAME_STEP.png to vis_data/vis_image.
    images = sorted(p.name for p in (tmp_path / 'painted' / 'vis_data' / 'vis_image').iterdir())
    assert images == [f'test_ADE_val_{i:08d}.jpg_0.png' for i in (1, 2, 3)]


@pytest.mark.usefixtures('one_torch_thread')
def test_cls_show_dir_writes_every_interval_th_sample(tmp_path):
    data = make_imagefolder(str(tmp_path / 'data'), per_class=(1, 2))
    # mmpretrain names an image by its file name only: make the 6 validation names unique.
    for image in (tmp_path / 'data' / 'val').glob('*/*.png'):
        image.rename(image.with_name(f'{image.parent.name}_{image.name}'))
    cfg = tiny_classifier_config(data, tmp_path / 'work')
    cfg.dump(tmp_path / 'tiny.py')
    ckpt = _random_checkpoint(cfg, tmp_path / 'random.pth')
    metrics = _test(tmp_path / 'tiny.py', ckpt, tmp_path / 'work', '--show-dir',
                    str(tmp_path / 'painted'))
    assert 'accuracy/top1' in metrics
    names = [f'class_{k}_{i}.png_0.png' for k in range(3) for i in range(2)]
    assert sorted(os.listdir(tmp_path / 'painted')) == names  # --interval 1 by default
    _test(tmp_path / 'tiny.py', ckpt, tmp_path / 'work2', '--show-dir',
          str(tmp_path / 'every_2nd'), '--interval', '2')
    assert sorted(os.listdir(tmp_path / 'every_2nd')) == names[::2]  # samples 0, 2, 4


def _cfg(config: str, *options: str) -> Config:
    return build_test_cfg(parse_args([str(REPO / 'configs' / config), 'ckpt.pth', *options]))


def test_show_sets_show_and_wait_time_per_scope():
    det = _cfg(DET, '--show', '--wait-time', '0.5').default_hooks.visualization
    assert (det.draw, det.show, det.wait_time, det.get('test_out_dir')) == (True, True, .5, None)
    det = _cfg(DET, '--show-dir', 'out').default_hooks.visualization
    assert (det.draw, det.get('show', False), det.test_out_dir) == (True, False, 'out')

    seg = _cfg(SEG, '--show', '--wait-time', '0.5')
    hook = seg.default_hooks.visualization
    assert (hook.draw, hook.show, hook.wait_time) == (True, True, .5)
    assert 'save_dir' not in seg.visualizer and 'interval' not in hook
    assert _cfg(SEG, '--show-dir', 'out').visualizer.save_dir == 'out'

    hook = _cfg(CLS, '--show').default_hooks.visualization
    assert (hook.enable, hook.show, hook.wait_time, hook.out_dir, hook.interval) == \
        (True, True, 2, None, 1)
    hook = _cfg(CLS, '--show-dir', 'out', '--interval', '3').default_hooks.visualization
    assert (hook.enable, hook.show, hook.out_dir, hook.interval) == (True, False, 'out', 3)

    untouched = _cfg(DET).default_hooks.visualization
    assert 'draw' not in untouched and 'show' not in untouched
    assert _cfg(CLS).default_hooks.visualization.enable is False


def test_config_without_visualization_hook_is_refused():
    args = argparse.Namespace(show=False, show_dir='out', wait_time=2., interval=None)
    cfg = Config(dict(default_scope='mmdet', default_hooks=dict(logger=dict(type='LoggerHook'))))
    with pytest.raises(ConfigError, match="visualization=dict.type='DetVisualizationHook'"):
        trigger_visualization_hook(cfg, args)
    with pytest.raises(ValueError, match='mmdet, mmseg and mmpretrain'):
        trigger_visualization_hook(Config(dict(default_scope='mmengine')), args)
    with pytest.raises(ValueError, match='--interval'):
        _cfg(DET, '--show-dir', 'out', '--interval', '2')
    for option in ('--show', '--show-dir=out'):  # its hook would fail on the augmented views
        with pytest.raises(ValueError, match='mmpretrain.*without --tta'):
            _cfg(CLS, option, '--tta')
