"""ImageNet classifiers: the recipe, agreement with timm, training, transfer to dense models."""
import glob
import math
import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_PCPVT, TINY_SVT
from imagefolder import make_imagefolder, tiny_classifier_config
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner, load_checkpoint

from mmtwins.analysis import plot_logs
from mmtwins.analysis.peers import randomize_parameters_
from mmtwins.checkpoint import CheckpointError
from mmtwins.classification import classifier_state_dict
from mmtwins.apis import test as test_tool
from mmtwins.classification.convert import main as convert_main
from mmtwins.models import PCPVT, SVT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
VARIANTS = [(f, s) for f in ('pcpvt', 'svt') for s in ('s', 'b', 'l')]
DROP_PATH = {'s': 0.2, 'b': 0.3, 'l': 0.5}
ARCH = {'s': 'small', 'b': 'base', 'l': 'large'}


def _config(family, size):
    return Config.fromfile(os.path.join(CONFIGS, f'twins_{family}_{size}_in1k.py'))


def _build(cfg):
    init_default_scope('mmpretrain')
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('family,size', VARIANTS)
def test_config_is_the_papers_recipe(family, size):
    cfg = _config(family, size)
    backbone, head = cfg.model.backbone, cfg.model.head
    cls = {'pcpvt': PCPVT, 'svt': SVT}[family]
    assert backbone.type == f'mmtwins.{cls.__name__}' and backbone.arch == ARCH[size]
    assert backbone.drop_path_rate == DROP_PATH[size]
    assert backbone.out_indices == (3, )
    assert backbone.norm_after_stage == [False, False, False, True]
    assert head.in_channels == cls.arch_zoo[ARCH[size]]['embed_dims'][-1]
    assert head.num_classes == 1000 and cfg.model.neck.type == 'GlobalAveragePooling'
    assert head.loss == dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')
    augments = [(a.type, a.alpha) for a in cfg.model.train_cfg.augments]
    assert augments == [('Mixup', 0.8), ('CutMix', 1.0)]
    steps = {t.type: t for t in cfg.train_pipeline}
    assert steps['RandomErasing'].erase_prob == 0.25 and 'RandAugment' in steps
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == 'AdamW' and opt.optimizer.lr == 1e-3
    assert opt.optimizer.weight_decay == 0.05 and opt.clip_grad == dict(max_norm=5.0)
    assert cfg.train_cfg.max_epochs == 300
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == 3  # not 300 checkpoints on disk
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 1024
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.end, cosine.type, cosine.begin, cosine.end,
            cosine.eta_min) == ('LinearLR', 5, 'CosineAnnealingLR', 5, 300, 0.)


def test_no_weight_decay_on_norms_biases_and_position_encodings():
    cfg = _config('svt', 's')
    cfg.model.backbone.arch = TINY_SVT
    cfg.model.head.in_channels = TINY_SVT['embed_dims'][-1]
    model = _build(cfg)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    exempt = [n for n, p in model.named_parameters() if decay[id(p)] == 0]
    assert any('pos_block' in n for n in exempt)
    assert any('.norm1.' in n for n in exempt) and any('stage_norms' in n for n in exempt)
    for name, p in model.named_parameters():
        no_decay = 'pos_block' in name or name.endswith('.bias') or p.ndim == 1
        assert decay[id(p)] == (0. if no_decay else 0.05), name


@pytest.mark.parametrize('family,timm_name', [('svt', 'twins_svt_small'),
                                              ('pcpvt', 'twins_pcpvt_small')])
def test_converted_timm_classifier_gives_timm_logits(family, timm_name, tmp_path):
    """timm's weights (the authors' layout, head kept) -> converter CLI -> same logits."""
    # Every parameter randomised: timm's init leaves norm weights and biases constant.
    peer = randomize_parameters_(timm.create_model(timm_name, pretrained=False)).eval()
    src, dst = tmp_path / 'authors.pth', tmp_path / 'mmpretrain.pth'
    torch.save({'model': peer.state_dict()}, src)  # wrapped as in the authors' release
    convert_main([str(src), str(dst)])
    model = _build(_config(family, 's')).eval()
    load_checkpoint(model, str(dst), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(x, mode='tensor'), peer(x)
    assert ours.shape == theirs.shape == (2, 1000)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_mmpretrain_twins_classifier_converts_with_its_head():
    """mmpretrain 1.x's own Twins classifier (``backbone.stages...``, ``head.fc.*``)."""
    spec = {k: TINY_SVT[k] for k in ('embed_dims', 'num_heads', 'mlp_ratios', 'depths',
                                     'sr_ratios', 'window_sizes')}
    spec.update(patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2])
    init_default_scope('mmpretrain')
    peer = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='SVT', arch=spec, out_indices=(3, ), qkv_bias=True,
                      norm_after_stage=[False, False, False, True]),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=64))).eval()
    peer.init_weights()
    randomize_parameters_(peer)  # no constant norm weight or bias left to hide a swap
    cfg = _config('svt', 's')
    cfg.model.backbone.arch = TINY_SVT
    cfg.model.head.update(in_channels=64, num_classes=10)
    model = _build(cfg).eval()
    model.load_state_dict(classifier_state_dict({'state_dict': peer.state_dict()}), strict=True)
    x = torch.randn(2, 3, 224, 224)  # whole LSA windows at every stage
    with torch.no_grad():
        diff = (model(x, mode='tensor') - peer(x, mode='tensor')).abs().max().item()
    assert diff <= 1e-4


def test_converter_refuses_a_checkpoint_without_head():
    backbone = SVT(arch=TINY_SVT, out_indices=(3, ), norm_after_stage=[False] * 3 + [True])
    with pytest.raises(CheckpointError, match='no ImageNet head'):
        classifier_state_dict(backbone.state_dict())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Train the tiny SVT classifier for one epoch (3 iterations) through the Runner."""
    root = tmp_path_factory.mktemp('cls')
    data = make_imagefolder(str(root / 'data'), num_classes=3, per_class=(4, 2))
    runner = Runner.from_cfg(tiny_classifier_config(data, root / 'work'))
    runner.train()
    loss = runner.message_hub.get_scalar('train/loss').current()
    metrics = runner.test()
    return dict(work_dir=root / 'work', loss=loss, metrics=metrics, iters=runner.iter,
                top1=_top1_by_folder(runner))


def _top1_by_folder(runner):
    """(top-1 in %, images): the trained model's argmax logit on each held-out image against the
    class of its folder (``class_K`` holds class K), not the data set's or metric's labels."""
    model = runner.model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in runner.test_dataloader:
            data = model.data_preprocessor(batch, False)
            logits = model(data['inputs'], mode='tensor')
            truth = [int(Path(s.img_path).parent.name.split('_')[1])
                     for s in data['data_samples']]
            correct += (logits.argmax(dim=1) == torch.tensor(truth)).sum().item()
            total += len(truth)
    return 100 * correct / total, total


def test_train_and_evaluate_top1(trained):
    assert trained['iters'] == 3  # 12 images / batch 4
    assert math.isfinite(trained['loss'])
    top1 = trained['metrics']['accuracy/top1']
    ours, images = trained['top1']
    assert images == 6  # 3 classes x 2 held-out images
    assert top1 == pytest.approx(ours, abs=1e-4)
    # Every trainable parameter took the 3 optimiser steps.
    ckpt = torch.load(trained['work_dir'] / 'epoch_1.pth', map_location='cpu', weights_only=False)
    state = ckpt['optimizer']['state']
    assert len(state) == len(ckpt['state_dict'])
    assert {s['step'].item() for s in state.values()} == {3}
    pngs = plot_logs([str(trained['work_dir'])], str(trained['work_dir'] / 'plots'))
    names = sorted(os.path.basename(p) for p in pngs)
    assert names == ['accuracy_top1.png', 'loss.png', 'lr.png']


def test_tta_averages_the_scores_of_each_image_and_its_flip(trained, tmp_path):
    """tools/test.py --tta on a classifier config without tta_model/tta_pipeline (as the
    ImageNet configs): mmpretrain's default, checked against the scores computed by hand."""
    work = trained['work_dir']
    weights = torch.load(work / 'epoch_1.pth', weights_only=False)['state_dict']
    torch.save({'state_dict': weights, 'meta': {}}, tmp_path / 'model.pth')
    cfg = tiny_classifier_config(work.parent / 'data', tmp_path / 'tta')
    cfg.dump(tmp_path / 'cls.py')
    argv = [str(tmp_path / 'cls.py'), str(tmp_path / 'model.pth'), '--tta']
    tta = test_tool.build_test_cfg(test_tool.parse_args(argv))
    assert tta.model.type == 'mmpretrain.AverageClsScoreTTA'
    assert tta.model.module.type == 'ImageClassifier'
    last = tta.test_dataloader.dataset.pipeline[-1]
    assert last.type == 'TestTimeAug' and [t.prob for t in last.transforms[0]] == [1., 0.]
    metrics = test_tool.main(argv)
    runner = Runner.from_cfg(cfg)
    model = runner.model.eval()
    model.load_state_dict(weights)
    correct = total = 0
    with torch.no_grad():
        for batch in runner.test_dataloader:
            data = model.data_preprocessor(batch, False)
            x = data['inputs']
            scores = sum(model(v, mode='tensor').softmax(1) for v in (x, x.flip(-1))) / 2
            truth = torch.tensor([s.gt_label.item() for s in data['data_samples']])
            correct += (scores.argmax(1) == truth).sum().item()
            total += len(truth)
    assert total == 6
    assert metrics['accuracy/top1'] == pytest.approx(100 * correct / total, abs=1e-4)


def _assert_backbone_loaded(backbone, classifier_sd):
    # No constant tensor (as init_weights leaves norms and biases) that a swapped key would match.
    assert all(v.unique().numel() > 1 for v in classifier_sd.values() if v.numel() > 1)
    own = backbone.state_dict()
    shared = [k for k in own if f'backbone.{k}' in classifier_sd]
    # only a dense SVT's stage-end norms 0-2 are new (trained from scratch)
    assert {k for k in own if k not in shared} == {
        f'stage_norms.{i}.{p}' for i in range(3) for p in ('weight', 'bias')
        if f'stage_norms.{i}.{p}' in own}
    for k in shared:
        assert torch.equal(own[k], classifier_sd[f'backbone.{k}']), k


def _dense_configs(family):
    names = []
    for pattern in ('retinanet_twins_{}_s_1x', 'mask_rcnn_twins_{}_s_1x',
                    'fpn_twins_{}_s_80k_ade20k', 'upernet_twins_{}_s_160k_ade20k'):
        names += glob.glob(os.path.join(CONFIGS, pattern.format(family) + '.py'))
    assert len(names) == 4, f'dense {family} configs missing: {names}'
    return names


@pytest.mark.parametrize('family', ['svt', 'pcpvt'])
def test_classifier_checkpoint_loads_into_dense_configs(family, trained, tmp_path):
    """A classifier checkpoint initialises the backbone of every detection/segmentation config."""
    ckpt = str(tmp_path / f'{family}_cls.pth')
    if family == 'svt':  # the trained checkpoint, every parameter then randomised
        saved = torch.load(trained['work_dir'] / 'epoch_1.pth', map_location='cpu',
                           weights_only=False)
        model = _build(tiny_classifier_config(tmp_path, tmp_path, 'svt'))
        model.load_state_dict(saved['state_dict'])
        saved['state_dict'] = randomize_parameters_(model).state_dict()
        torch.save(saved, ckpt)
    else:  # a randomised PCPVT classifier saved in the same mmengine format
        cfg = tiny_classifier_config(tmp_path, tmp_path, 'pcpvt')
        model = randomize_parameters_(_build(cfg))
        torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    sd = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict']
    arch = {'svt': TINY_SVT, 'pcpvt': TINY_PCPVT}[family]
    for path in _dense_configs(family):
        backbone_cfg = Config.fromfile(path).model.backbone
        backbone_cfg.update(arch=arch)
        backbone_cfg.init_cfg.update(checkpoint=ckpt, prefix='backbone.')
        backbone = MODELS.build(backbone_cfg)
        backbone.init_weights()
        _assert_backbone_loaded(backbone, sd)
