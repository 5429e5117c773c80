"""ADE20K semantic segmentation: the 12 configs, their data pipelines, mmtwins.SegTTAModel, and real
training / resuming / single-scale and multi-scale (TTA) evaluation through the Runner and tools."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmengine.utils import import_modules_from_strings
from PIL import Image

from ade_toy import (REPO, load_config, make_ade_toy, miou_from_maps, read_label_maps,
                     tiny_seg_config)
from probes import norm_and_peg_params, weight_decay_split
from mmtwins.apis.runner import build_runner
from mmtwins.apis.test import build_test_cfg, make_output_dirs, parse_args

FRAMEWORKS = {'fpn': ('80k', 80000), 'upernet': ('160k', 160000)}
# The paper's Table 2, "Param (M)" as printed: Semantic FPN, UperNet.
PAPER_PARAMS = {
    ('pcpvt', 's'): ('28.4', '54.6'), ('pcpvt', 'b'): ('48.1', '74.3'),
    ('pcpvt', 'l'): ('65.3', '91.5'), ('svt', 's'): ('28.3', '54.4'),
    ('svt', 'b'): ('60.4', '88.5'), ('svt', 'l'): ('103.7', '133'),
}
CONFIGS = [f'{fw}_twins_{v}_{s}_{FRAMEWORKS[fw][0]}_ade20k.py'
           for fw in FRAMEWORKS for (v, s) in PAPER_PARAMS]
FPN = 'fpn_twins_svt_s_80k_ade20k.py'
UPERNET = 'upernet_twins_pcpvt_s_160k_ade20k.py'
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _load(name: str) -> Config:
    cfg = load_config(name)
    import_modules_from_strings(cfg.custom_imports['imports'])
    init_default_scope(cfg.default_scope)
    return cfg


def _build_model(cfg: Config):
    from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


# ----------------------------------------------------------------------------------- configs
@pytest.fixture
def no_random_init(monkeypatch):
    """Build models without drawing their random initial weights (shapes are all that count)."""
    for fn in ('uniform_', 'normal_', 'trunc_normal_', 'kaiming_uniform_', 'kaiming_normal_'):
        monkeypatch.setattr(torch.nn.init, fn, lambda tensor, *args, **kwargs: tensor)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_model_of_the_papers_size(name, no_random_init):
    fw, _, variant, size = name.split('_')[:4]
    cfg = _load(name)
    model = _build_model(cfg)
    backbone = model.backbone
    assert type(backbone).__name__ == variant.upper()
    assert type(backbone).__module__.startswith('mmtwins.')
    assert backbone.arch_settings == type(backbone).arch_zoo[size]
    assert model.decode_head.num_classes == 150
    assert type(model.decode_head).__name__ == {'fpn': 'FPNHead', 'upernet': 'UPerHead'}[fw]
    if fw == 'upernet':
        assert type(model.auxiliary_head).__name__ == 'FCNHead'
        assert model.auxiliary_head.in_channels == backbone.embed_dims[2]
    # The ImageNet checkpoint of this very variant, from the one shared place.
    assert cfg.model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint=cfg.twins_imagenet[f'{variant}_{size}'])
    # Table 2 counts the backbone with its (unused) ImageNet classifier, Linear(C4, 1000): ours
    # plus that head agrees to within one unit of the last digit the paper prints.
    params = sum(p.numel() for p in model.parameters()) / 1e6
    classifier = (backbone.embed_dims[-1] * 1000 + 1000) / 1e6
    paper = PAPER_PARAMS[(variant, size)][fw == 'upernet']
    unit = 0.1 if '.' in paper else 1.
    assert abs(params + classifier - float(paper)) < unit, (params, classifier, paper)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_hyper_parameters_follow_the_paper(name):
    fw, size = name.split('_')[0], name.split('_')[3]
    cfg = load_config(name)
    iters = FRAMEWORKS[fw][1]
    assert cfg.train_cfg.max_iters == iters
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW'
    assert (opt.lr, opt.weight_decay) == {'fpn': (1e-4, 5e-4), 'upernet': (6e-5, 0.01)}[fw]
    if fw == 'fpn':  # poly decay to zero (mmseg's port keeps eta_min=1e-4 = lr: a constant lr)
        assert cfg.param_scheduler == [dict(type='PolyLR', eta_min=0., power=0.9, begin=0,
                                            end=iters, by_epoch=False)]
    else:  # 1500 iterations of linear warm-up, then linear decay to zero
        assert cfg.param_scheduler == [
            dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
            dict(type='PolyLR', eta_min=0., power=1.0, begin=1500, end=iters, by_epoch=False)]
    drop_path = 0.4 if (fw, size) == ('fpn', 'l') else 0.2
    assert cfg.model.backbone.drop_path_rate == drop_path
    assert cfg.tta_model.type == 'mmtwins.SegTTAModel'
    roots = {cfg[k].dataset.data_root for k in ('train_dataloader', 'val_dataloader',
                                                'test_dataloader')}
    assert roots == {cfg.data_root}
    assert 'mmtwins.segmentation' in cfg.custom_imports.imports


@pytest.mark.parametrize('name', [FPN, UPERNET])
def test_weight_decay_as_the_papers_settings(name):
    """The PVT setting (Semantic FPN) decays every parameter; the Swin setting (UperNet) exempts
    the position encodings and LayerNorms."""
    cfg = _load(name)
    model = _build_model(cfg)
    exempt, decayed = weight_decay_split(model, build_optim_wrapper(model, cfg.optim_wrapper))
    if name == FPN:
        assert not exempt
        return
    assert exempt == norm_and_peg_params(model)  # the backbone's LayerNorms and PEGs
    assert len({n for n in exempt if '.pos_block.' in n}) == 2 * 4  # PEG conv weight, bias x 4
    kinds = {n.split('.')[1] for n in exempt}  # patch_embeds, blocks, pos_block, stage_norms
    assert kinds == {'patch_embeds', 'blocks', 'pos_block'}  # PCPVT: no stage norms
    assert any(n.startswith('decode_head.') for n in decayed)


# ----------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    return make_ade_toy(tmp_path_factory.mktemp('ade'))


def _dataset(cfg: Config, data_root: Path, pipeline, annotated: bool = True):
    from mmseg.registry import DATASETS
    ds_cfg = cfg.test_dataloader.dataset.copy()
    ds_cfg.update(data_root=str(data_root), pipeline=pipeline)
    if not annotated:
        ds_cfg.data_prefix = dict(img_path=ds_cfg.data_prefix.img_path)
    ds = DATASETS.build(ds_cfg)
    images = list((data_root / ds_cfg.data_prefix.img_path).glob('*.jpg'))
    assert len(ds) == len(images) > 0  # the tests below loop over every sample
    return ds


def test_train_pipeline_crops_512_and_reduces_zero_label(ade_root):
    cfg = _load(FPN)
    ds = _dataset(cfg, ade_root, cfg.train_dataloader.dataset.pipeline)
    for i in range(len(ds)):
        out = ds[i]
        img, gt = out['inputs'], out['data_samples'].gt_sem_seg.data
        assert img.shape[0] == 3 and max(img.shape[1:]) <= 512 and gt.shape[1:] == img.shape[1:]
        # Toy classes 1, 3, 5 become 0, 2, 4; "other" (0) becomes ignore (255).
        assert set(gt.unique().tolist()) <= {0, 2, 4, 255}


@pytest.mark.parametrize('annotated', [True, False], ids=['annotated', 'no-annotations'])
def test_test_pipeline_single_scale_2048x512(ade_root, annotated):
    cfg = _load(FPN)
    ds = _dataset(cfg, ade_root, cfg.test_pipeline, annotated)
    labels = read_label_maps(ade_root)
    for i in range(len(ds)):
        sample = ds[i]['data_samples']
        assert min(sample.img_shape) == 512
        stem = Path(sample.img_path).stem
        if annotated:
            assert sample.gt_sem_seg.data.shape[1:] == labels[stem].shape
        else:
            assert not hasattr(sample, 'gt_sem_seg')


@pytest.mark.parametrize('annotated', [True, False], ids=['annotated', 'no-annotations'])
def test_tta_pipeline_views_are_ratios_of_2048x512_with_flip(ade_root, annotated):
    cfg = _load(FPN)
    ds = _dataset(cfg, ade_root, cfg.tta_pipeline, annotated)
    labels = read_label_maps(ade_root)
    for i in range(len(ds)):
        out = ds[i]
        assert len(out['inputs']) == len(out['data_samples']) == 12
        metas = [s.metainfo for s in out['data_samples']]
        h, w = metas[0]['ori_shape']
        # keep_ratio resize into (2048 r, 512 r): the short side becomes 512 r for every image
        # less elongated than 4:1 (ADE20K's and these), whatever its original size.
        short = sorted(min(m['img_shape']) for m in metas)
        assert short == sorted(2 * [round(512 * r) for r in TTA_RATIOS])
        assert [m['flip'] for m in metas] == [False, True] * 6
        stem = Path(metas[0]['img_path']).stem
        for s in out['data_samples']:
            if annotated:  # ground truth at the original size, zero label reduced
                gt = s.gt_sem_seg.data[0].numpy()
                assert gt.shape == (h, w) == labels[stem].shape
                assert np.array_equal(gt, (labels[stem].astype(np.int64) - 1) % 256)
            else:
                assert not hasattr(s, 'gt_sem_seg') and 'seg_map_path' not in s.metainfo


# ----------------------------------------------------------------------------------- SegTTAModel
class _StubSegmentor(torch.nn.Module):
    def __init__(self, out_channels: int, threshold: float = 0.3):
        super().__init__()
        self.out_channels = out_channels
        self.decode_head = torch.nn.Module()
        self.decode_head.threshold = threshold

    def test_step(self, data):
        raise AssertionError('merge_preds only')


def _view(logits: torch.Tensor, flip: bool, gt=None):
    from mmseg.structures import SegDataSample
    s = SegDataSample(metainfo=dict(img_path='a/ADE_val_1.jpg', ori_shape=logits.shape[1:],
                                    img_shape=(7, 9), scale_factor=(2., 2.), flip=flip,
                                    flip_direction='horizontal' if flip else None,
                                    reduce_zero_label=True))
    s.seg_logits = PixelData(data=logits)
    if gt is not None:
        s.gt_sem_seg = PixelData(data=gt)
    return s


@pytest.mark.parametrize('with_gt', [True, False])
def test_seg_tta_model_averages_probabilities_and_keeps_original_meta(with_gt):
    from mmtwins.segmentation import SegTTAModel
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 5, generator=g) * 3 for _ in range(6)]
    gt = torch.randint(0, 4, (1, 3, 5), generator=g) if with_gt else None
    tta = SegTTAModel(module=_StubSegmentor(out_channels=4))
    merged, = tta.merge_preds([[_view(v, i % 2 == 1, gt) for i, v in enumerate(views)]])
    expected = torch.stack(views).softmax(dim=1).mean(dim=0).argmax(dim=0, keepdim=True)
    assert merged.pred_sem_seg.data.shape == (1, 3, 5)
    assert torch.equal(merged.pred_sem_seg.data, expected)
    assert merged.metainfo == dict(img_path='a/ADE_val_1.jpg', ori_shape=(3, 5),
                                   reduce_zero_label=True)
    assert hasattr(merged, 'gt_sem_seg') == with_gt
    if with_gt:
        assert torch.equal(merged.gt_sem_seg.data, gt)
    assert not hasattr(merged, 'seg_logits')


def test_seg_tta_model_averages_probabilities_not_logits():
    from mmtwins.segmentation import SegTTAModel
    # Two views sure of class 0, one surer of class 1. Mean logits (2.67, 3): class 1; mean
    # probabilities (0.65, 0.35): class 0, mmseg's choice too (it sums softmax outputs).
    views = [torch.tensor([4., 0.]).view(2, 1, 1)] * 2 + [torch.tensor([0., 9.]).view(2, 1, 1)]
    assert torch.stack(views).mean(dim=0).argmax() == 1
    tta = SegTTAModel(module=_StubSegmentor(out_channels=2))
    merged, = tta.merge_preds([[_view(v, False) for v in views]])
    assert merged.pred_sem_seg.data.tolist() == [[[0]]]


def test_seg_tta_model_binary_head_thresholds_the_mean_probability_once():
    from mmtwins.segmentation import SegTTAModel
    # mmseg stores sigmoid probabilities for a binary head: mean 0.275 < 0.3 is background.
    # (Another sigmoid, as mmseg 1.2.2's SegTTAModel applies, would give 0.57: foreground.)
    probs = [torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 0.35)]
    tta = SegTTAModel(module=_StubSegmentor(out_channels=1, threshold=0.3))
    merged, = tta.merge_preds([[_view(p, False) for p in probs]])
    assert merged.pred_sem_seg.data.shape == (1, 2, 2)
    assert merged.pred_sem_seg.data.sum() == 0


# ----------------------------------------------------------------------------------- training
def _loss_history(runner) -> List[float]:
    return runner.message_hub.get_scalar('train/loss').data[0].tolist()


def _train_and_resume(name: str, data_root: Path, work_dir: Path) -> dict:
    """Train 4 iterations, then resume from the checkpoint and train to 6."""
    cfg = tiny_seg_config(name, data_root, work_dir, max_iters=4)
    cfg.experiment_name = f'{name}_train'
    runner = build_runner(cfg)
    runner.train()
    first = dict(losses=_loss_history(runner),
                 val_miou=runner.message_hub.get_scalar('val/mIoU').current(),
                 checkpoint=work_dir / 'iter_4.pth')
    cfg.dump(work_dir / 'tiny.py')

    cfg = tiny_seg_config(name, data_root, work_dir, max_iters=6)
    cfg.update(resume=True, load_from=str(first['checkpoint']), experiment_name=f'{name}_resume')
    runner = build_runner(cfg)
    runner.train()
    adam_steps = {float(state['step']) for state in runner.optim_wrapper.optimizer.state.values()}
    return dict(first=first, resumed_losses=_loss_history(runner), resumed_iter=runner.iter,
                adam_steps=adam_steps, config=work_dir / 'tiny.py',
                checkpoint=work_dir / 'iter_6.pth')


@pytest.fixture(scope='module')
def trained(ade_root, tmp_path_factory):
    runs = {}

    def get(name: str) -> dict:
        if name not in runs:
            runs[name] = _train_and_resume(name, ade_root, tmp_path_factory.mktemp(name[:-3]))
        return runs[name]
    return get


def _run_test(config: Path, checkpoint: Path, work_dir: Path, *options: str):
    """``tools/test.py CONFIG CHECKPOINT OPTIONS`` in this process (its own functions), with
    the backbone's input shapes recorded: returns (shapes, metrics)."""
    args = parse_args([str(config), str(checkpoint), '--work-dir', str(work_dir), *options])
    cfg = build_test_cfg(args)
    cfg.experiment_name = f'test_{work_dir.name}'
    runner = build_runner(cfg)
    model = runner.model.module if '--tta' in options else runner.model
    shapes = []
    model.backbone.register_forward_pre_hook(lambda m, x: shapes.append(tuple(x[0].shape[2:])))
    metrics = runner.test()
    return shapes, metrics


@pytest.mark.parametrize('name', [FPN, UPERNET], ids=['fpn', 'upernet'])
def test_train_checkpoint_resume(trained, name):
    run = trained(name)
    losses = run['first']['losses']
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses  # the same batch every iteration
    assert run['first']['checkpoint'].is_file()
    assert 0 <= run['first']['val_miou'] <= 100
    # Resumed at iteration 4: the loss history restored, two more iterations, AdamW's state
    # carried over (6 steps).
    assert run['resumed_iter'] == 6 and len(run['resumed_losses']) == 6
    assert run['resumed_losses'][:4] == losses
    assert all(math.isfinite(v) for v in run['resumed_losses'])
    assert run['adam_steps'] == {6.0}
    assert run['checkpoint'].is_file()


@pytest.mark.parametrize('name', [FPN, UPERNET], ids=['fpn', 'upernet'])
def test_single_scale_and_tta_miou(trained, ade_root, tmp_path, name):
    run = trained(name)
    shapes, single = _run_test(run['config'], run['checkpoint'], tmp_path / 'ss',
                               '--out', str(tmp_path / 'maps'))
    # The reported mIoU is the one recomputed from the saved maps and the annotation PNGs.
    labels = read_label_maps(ade_root)
    assert _maps(tmp_path / 'maps').keys() == labels.keys()
    assert miou_from_maps(tmp_path / 'maps', labels) == pytest.approx(single['mIoU'], abs=0.01)
    # Single scale: each of the 3 images once, short side 512 / 8 = 64; sides that are not
    # multiples of 32 go through as they are.
    assert sorted(min(s) for s in shapes) == [64] * 3
    assert any(side % 32 for s in shapes for side in s)

    shapes, tta = _run_test(run['config'], run['checkpoint'], tmp_path / 'tta', '--tta')
    assert 0 <= tta['mIoU'] <= 100
    # 6 scales x 2 flips per image; short sides (512 / 8) x 0.5 .. 1.75.
    assert len(shapes) == 3 * 12
    assert sorted(min(s) for s in shapes) == sorted(6 * [round(64 * r) for r in TTA_RATIOS])


# ----------------------------------------------------------------------------------- --out
def _no_annotation_config(config: Path, out: Path, output_dir: Path) -> Path:
    """The README's recipe for a test set without annotations, applied to ``config``."""
    out.write_text(f"_base_ = '{config}'\n"
                   "test_dataloader = dict(dataset=dict(\n"
                   "    data_prefix=dict(_delete_=True, img_path='images/validation')))\n"
                   f"test_evaluator = dict(format_only=True, output_dir='{output_dir}')\n")
    return out


def _maps(directory: Path) -> Dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted(directory.glob('*.png'))}


def test_tta_out_with_and_without_annotations(trained, ade_root, tmp_path):
    run = trained(FPN)
    labels = read_label_maps(ade_root)
    # With annotations: mIoU and the prediction maps, in ADE's labels (1..150), original sizes.
    _, metrics = _run_test(run['config'], run['checkpoint'], tmp_path / 'a', '--tta',
                           '--out', str(tmp_path / 'maps_gt'))
    maps = _maps(tmp_path / 'maps_gt')
    assert maps.keys() == labels.keys()
    for stem, pred in maps.items():
        assert pred.shape == labels[stem].shape and pred.min() >= 1 and pred.max() <= 150
    assert miou_from_maps(tmp_path / 'maps_gt', labels) == pytest.approx(metrics['mIoU'],
                                                                          abs=0.01)
    # Without annotations (format_only): --tta writes to the config's output_dir, --tta --out
    # to DIR; both give the same maps as the annotated run.
    cfg = _no_annotation_config(run['config'], tmp_path / 'no_gt.py', tmp_path / 'maps_cfg')
    _, metrics = _run_test(cfg, run['checkpoint'], tmp_path / 'b', '--tta')
    assert metrics == {}
    _run_test(cfg, run['checkpoint'], tmp_path / 'c', '--tta', '--out', str(tmp_path / 'maps_out'))
    for directory in ('maps_cfg', 'maps_out'):
        other = _maps(tmp_path / directory)
        assert other.keys() == maps.keys()
        assert all(np.array_equal(other[k], maps[k]) for k in maps)


# ----------------------------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()))
    proc = subprocess.run(['bash', str(REPO / 'tools' / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_every_process_makes_the_maps_folder_before_testing(tmp_path):
    """mmseg's IoUMetric makes its output_dir in the main process only: in a distributed test
    another process could save its first map before the folder exists."""
    cfg = Config(dict(test_evaluator=[dict(type='IoUMetric', output_dir=str(tmp_path / 'a' / 'b')),
                                      dict(type='IoUMetric')]))
    make_output_dirs(cfg)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*')) == ['a', 'a/b']
    make_output_dirs(Config(dict(test_evaluator=dict(type='IoUMetric'))))  # none asked for


def test_dist_train_and_dist_test_two_cpu_processes(ade_root, tmp_path):
    cfg = tiny_seg_config(FPN, ade_root, tmp_path / 'work', max_iters=2)
    cfg.dump(tmp_path / 'tiny.py')
    _launch('dist_train.sh', str(tmp_path / 'tiny.py'), '2')
    checkpoint = tmp_path / 'work' / 'iter_2.pth'
    assert checkpoint.is_file()
    # Multi-scale + flip evaluation on 2 processes, each writing the maps of its images.
    _launch('dist_test.sh', str(tmp_path / 'tiny.py'), str(checkpoint), '2', '--tta', '--out',
            str(tmp_path / 'maps'), '--work-dir', str(tmp_path / 'test'))
    logs = list((tmp_path / 'test').glob('*/*.json'))
    assert len(logs) == 1
    metrics = json.loads(logs[0].read_text().splitlines()[-1])
    labels = read_label_maps(ade_root)
    assert miou_from_maps(tmp_path / 'maps', labels) == pytest.approx(metrics['mIoU'], abs=0.01)
