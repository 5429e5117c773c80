"""Bad input, tried systematically: property-based backbone inputs and broken configs.

Every backbone input either gives outputs of the documented shapes (finite for finite input) or
one clear ``TypeError``/``ValueError`` naming the problem; every broken config is reported by
:func:`mmtwins.engine.preflight_check` before anything is built, naming the key and file, with a
suggestion where one exists.
"""
import copy
import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_SVT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mmengine.config import Config

from mmtwins.apis import train as train_api
from mmtwins.engine import ConfigError, preflight_check
from mmtwins.engine.preflight import check_data, check_model, train_dataloaders
from mmtwins.models import SVT

REPO = Path(__file__).resolve().parents[1]
with torch.random.fork_rng():  # the same weights whichever module imports first
    torch.manual_seed(0)
    MODEL = SVT(arch=TINY_SVT).eval()
STRIDES = (4, 8, 16, 32)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
          torch.bool]
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def backbone_inputs(draw):
    """(x, spec): a batch of 1-3, 1-4 channels, sides 1-300, any dtype, maybe one non-finite
    pixel, maybe a non-contiguous layout."""
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([3, 3, 3, 1, 4]))
    # Mostly sizes the backbone accepts, with every residue modulo the LSA windows.
    h, w = (draw(st.one_of(st.integers(29, 300), st.integers(1, 300))) for _ in range(2))
    dtype = draw(st.sampled_from(DTYPES[:1] * 4 + DTYPES[1:]))
    bad = draw(st.sampled_from([None, None, float('nan'), float('inf'), float('-inf')]))
    layout = draw(st.sampled_from(['contiguous', 'channels_last', 'transposed', 'strided']))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    base = {'transposed': (b, c, w, h), 'strided': (b, c, h, 2 * w)}.get(layout, (b, c, h, w))
    x = torch.randn(base, generator=gen) * 50
    if layout == 'transposed':
        x = x.transpose(2, 3)
    elif layout == 'strided':
        x = x[..., ::2]
    elif layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    bad_image = None
    if bad is not None:
        bad_image = draw(st.integers(0, b - 1))
        x[bad_image, 0, draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = bad
    x = x.to(dtype)
    return x, dict(b=b, c=c, h=h, w=w, dtype=dtype, bad_image=bad_image, layout=layout)


@PROPERTY
@given(backbone_inputs())
def test_backbone_input_gives_documented_outputs_or_one_clear_error(case):
    x, spec = case
    h, w = spec['h'], spec['w']
    if spec['dtype'] != torch.float32:
        expected = (TypeError, 'floating-point' if not x.is_floating_point() else
                    str(spec['dtype']))
    elif spec['c'] != 3:
        expected = (ValueError, f"3 input channels, got {spec['c']}")
    elif min(h, w) < MODEL.min_input_size:
        expected = (ValueError, f'{h}x{w} is too small.*>= {MODEL.min_input_size}')
    else:
        expected = None
    event('rejected: ' + expected[0].__name__ if expected else 'accepted')
    if expected is not None:
        with pytest.raises(expected[0], match=expected[1]):
            MODEL(x)
        return

    with torch.no_grad():
        outs = MODEL(x)
    assert [tuple(o.shape) for o in outs] == [
        (spec['b'], d, math.ceil(h / s), math.ceil(w / s))
        for d, s in zip(TINY_SVT['embed_dims'], STRIDES)
    ]
    finite = [i for i in range(spec['b']) if i != spec['bad_image']]
    for o in outs:
        assert torch.isfinite(o[finite]).all()  # a bad image never contaminates the others
    if spec['layout'] != 'contiguous' and spec['bad_image'] is None:
        with torch.no_grad():
            ref = MODEL(x.contiguous())
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('x,error,match', [
    ([[1.0]], TypeError, 'expects a torch.Tensor'),
    (torch.zeros(3, 64, 64), ValueError, r'4-D \(B, C, H, W\) tensor, got shape \(3, 64, 64\)'),
    (torch.zeros(0, 3, 64, 64), ValueError, 'empty batch'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.complex64), TypeError, 'floating-point'),
])
def test_other_bad_inputs_name_the_problem(x, error, match):
    with pytest.raises(error, match=match):
        MODEL(x)


def test_matching_dtypes_and_autocast_are_accepted():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        double = SVT(arch=TINY_SVT).double().eval()
        assert double(x.double())[0].dtype == torch.float64
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = MODEL(x.bfloat16())
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


# --------------------------------------------------------------------------- configs
@functools.lru_cache(maxsize=None)
def _seg_config() -> Config:
    return Config.fromfile(str(REPO / 'configs' / 'fpn_twins_svt_s_80k_ade20k.py'))


def seg_config(**model_overrides) -> Config:
    cfg = copy.deepcopy(_seg_config())
    cfg.model.backbone.update(model_overrides)
    return cfg


def with_data_root(cfg: Config, root: str) -> Config:
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    return cfg


def make_ade_dirs(root: Path) -> str:
    for kind in ('images', 'annotations'):
        for split in ('training', 'validation'):
            (root / kind / split).mkdir(parents=True)
    return str(root)


@pytest.mark.parametrize('override,message', [
    (dict(type='mmtwins.SVTT'), r"model.backbone.type: 'mmtwins.SVTT' is not a registered model "
     r".*did you mean 'mmtwins.SVT'\? If it comes from a plugin"),
    (dict(type='mmtwins.Zzzzzzzzzzzzzz'), r"'mmtwins.Zzzzzzzzzzzzzz' is not a registered model "
     r"in scope '\w+'\. If it comes from a plugin"),  # no suggestion: the sentence ends
    (dict(arch='smal'), r"model.backbone.arch: SVT has no arch 'smal'; did you mean 'small'\?"),
    (dict(drop_path_rat=0.1), r"model.backbone.drop_path_rat: SVT has no argument "
     r"'drop_path_rat'; did you mean 'drop_path_rate'\?"),
])
def test_model_mistakes_are_named_with_a_suggestion(override, message, tmp_path):
    cfg = with_data_root(seg_config(**override), make_ade_dirs(tmp_path / 'ade'))
    with pytest.raises(ConfigError, match=message):
        preflight_check(cfg)


@pytest.mark.parametrize('arch', ['Small', 'S', 'base', TINY_SVT])
def test_archs_the_backbone_takes_pass_the_check(arch):
    """The zoo's keys in any case and its short names, as the backbone takes them, and
    custom dicts."""
    SVT(arch=arch)
    assert check_model(seg_config(arch=arch, init_cfg=None)) == []


def test_missing_pretrained_checkpoint_is_named_with_the_fix(tmp_path):
    cfg = with_data_root(seg_config(), make_ade_dirs(tmp_path / 'ade'))
    with pytest.raises(ConfigError, match=re.escape(
            "model.backbone.init_cfg.checkpoint: file 'checkpoints/twins/alt_gvt_small.pth' "
            'does not exist (point it at the weights with --cfg-options '
            'model.backbone.init_cfg.checkpoint=PATH, or train from scratch with --cfg-options '
            'model.backbone.init_cfg=None;')):
        preflight_check(cfg)
    listed = seg_config(init_cfg=[dict(type='Normal', layer='Linear'),
                                  dict(type='Pretrained', checkpoint=str(tmp_path / 'no.pth'))])
    [problem] = check_model(listed)
    assert problem.startswith(f"model.backbone.init_cfg[1].checkpoint: file "
                              f"'{tmp_path / 'no.pth'}' does not exist")
    assert 'train from scratch with --cfg-options model.backbone.init_cfg[1]=None' in problem
    for fine in (None, dict(type='Pretrained', checkpoint='https://example.org/svt_s.pth')):
        assert check_model(seg_config(init_cfg=fine)) == []


def test_mmseg_model_pretrained_is_named_with_the_fix():
    cfg = seg_config(init_cfg=None)
    cfg.model.pretrained = 'svt_s.pth'
    assert check_model(cfg) == [
        "model.pretrained: SVT has no 'pretrained' argument, to which mmseg passes it; load the "
        "weights with model.backbone.init_cfg=dict(type='Pretrained', checkpoint='svt_s.pth') "
        'and set model.pretrained=None']


def test_missing_data_root_is_named_with_the_fix():
    cfg = with_data_root(seg_config(init_cfg=None), '/nonexistent/ADEChallengeData2016')
    with pytest.raises(ConfigError) as err:
        preflight_check(cfg)
    msg = str(err.value)
    assert msg.startswith('config ') and '3 problems' in msg  # train, val, test loaders
    assert ("train_dataloader.dataset.data_root: directory '/nonexistent/ADEChallengeData2016' "
            'does not exist (set it in the config or with --cfg-options '
            'train_dataloader.dataset.data_root=/path/to/data)') in msg


def test_missing_image_directory_is_named(tmp_path):
    root = make_ade_dirs(tmp_path / 'ade')
    (tmp_path / 'ade' / 'images' / 'validation').rmdir()
    cfg = with_data_root(seg_config(), root)
    with pytest.raises(ConfigError, match=r"val_dataloader.dataset.data_prefix.img_path: "
                       r"directory '.*images/validation' does not exist"):
        preflight_check(cfg)


def test_a_correct_config_passes(tmp_path):
    weights = tmp_path / 'svt_s.pth'
    weights.touch()
    cfg = with_data_root(seg_config(init_cfg=dict(type='Pretrained', checkpoint=str(weights))),
                         make_ade_dirs(tmp_path / 'ade'))
    # No problem found by either half of the check, and nothing raised or returned.
    assert check_model(cfg) == [] and check_data(cfg) == []
    assert preflight_check(cfg) is None
    # The data half did look at this root: one directory removed is one named problem.
    (tmp_path / 'ade' / 'annotations' / 'training').rmdir()
    problems = check_data(cfg)
    assert len(problems) == 1 and 'annotations/training' in problems[0], problems


def coco_config(root: Path) -> Config:
    cfg = Config.fromfile(str(REPO / 'configs' / 'retinanet_twins_pcpvt_s_1x.py'))
    for split in ('train2017', 'val2017'):
        (root / split).mkdir(parents=True, exist_ok=True)
    (root / 'annotations').mkdir(exist_ok=True)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(root) + '/'
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = str(root / 'val.json')
    return cfg


def test_training_is_checked_without_the_test_data(tmp_path, monkeypatch):
    """As with mmdet's and mmseg's train.py, a test set not yet downloaded (COCO test-dev) does
    not stop training; validation data does, where ``val_cfg`` turns validation on."""
    root = tmp_path / 'coco'
    cfg = coco_config(root)
    cfg.model.backbone.init_cfg = None
    for split in ('train', 'val'):
        (root / 'annotations' / f'instances_{split}2017.json').write_text(
            json.dumps(dict(images=[], annotations=[], categories=[])))
    cfg.test_dataloader.dataset.ann_file = 'annotations/image_info_test-dev2017.json'
    assert train_dataloaders(cfg) == ('train_dataloader', 'val_dataloader')
    preflight_check(cfg, train_dataloaders(cfg))
    with pytest.raises(ConfigError, match=r'test_dataloader.dataset.ann_file: file .*test-dev'):
        preflight_check(cfg)  # all three, as for tools/test.py

    class Built(Exception):
        pass

    def build_runner(cfg):
        raise Built

    monkeypatch.setattr(train_api, 'build_runner', build_runner)
    cfg.dump(tmp_path / 'retinanet.py')
    with pytest.raises(Built):  # tools/train.py gets past its check to building the runner
        train_api.main([str(tmp_path / 'retinanet.py'), '--work-dir', str(tmp_path / 'w')])
    (root / 'val2017').rmdir()
    with pytest.raises(ConfigError, match=r'val_dataloader.dataset.data_prefix.img: directory'):
        preflight_check(cfg, train_dataloaders(cfg))
    cfg.val_cfg = dict()  # a ValLoop of the defaults: validation runs
    assert train_dataloaders(cfg) == ('train_dataloader', 'val_dataloader')
    cfg.val_cfg = None
    assert train_dataloaders(cfg) == ('train_dataloader', )
    preflight_check(cfg, train_dataloaders(cfg))


def test_coco_keys_are_asked_of_coco_detection_datasets_only(tmp_path):
    """mmdet's CocoCaptionDataset and mmpretrain's COCOCaption/COCORetrieval read JSON lists."""
    ann = tmp_path / 'captions.json'
    ann.write_text(json.dumps([dict(img_id=1, image='a.jpg', caption='a cat')]))
    for dataset_type in ('CocoCaptionDataset', 'mmpretrain.COCOCaption', 'COCORetrieval'):
        cfg = Config(dict(test_dataloader=dict(dataset=dict(type=dataset_type,
                                                             ann_file=str(ann)))))
        assert check_data(cfg) == [], dataset_type
    for dataset_type in ('CocoDataset', 'mmdet.CocoPanopticDataset', 'MyCocoDataset'):
        cfg = Config(dict(test_dataloader=dict(dataset=dict(type=dataset_type,
                                                            ann_file=str(ann)))))
        assert check_data(cfg) == [f"test_dataloader.dataset.ann_file: '{ann}' holds a JSON "
                                   "list, not the COCO object with keys ['images', "
                                   "'annotations', 'categories']"], dataset_type


def test_malformed_and_non_coco_annotation_files_are_named(tmp_path):
    root = tmp_path / 'coco'
    cfg = coco_config(root)
    train = root / 'annotations' / 'instances_train2017.json'
    train.write_text('{"images": [], "annotations": [\n  {"id": 1,}\n]}')
    (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps({'images': []}))
    with pytest.raises(ConfigError) as err:
        preflight_check(cfg)
    msg = str(err.value)
    assert (f"train_dataloader.dataset.ann_file: '{train}' is not valid JSON: Expecting "
            "property name enclosed in double quotes at line 2 column 12") in msg
    assert "lacks the COCO key(s) ['annotations', 'categories']" in msg


def test_an_unreadable_annotation_file_is_named_with_the_other_problems(tmp_path, monkeypatch):
    """A read error is one more problem in the list, not a traceback that hides the rest."""
    from mmtwins.engine import preflight
    root = tmp_path / 'coco'
    cfg = coco_config(root)
    train = root / 'annotations' / 'instances_train2017.json'
    train.write_text(json.dumps(dict(images=[], annotations=[], categories=[])))

    def deny(path, *args, **kwargs):
        if str(path) == str(train):
            raise PermissionError(13, 'Permission denied', str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(preflight, 'open', deny, raising=False)
    with pytest.raises(ConfigError) as err:
        preflight_check(cfg)
    msg = str(err.value)
    assert f"train_dataloader.dataset.ann_file: cannot read '{train}': Permission denied" in msg
    assert "instances_val2017.json' does not exist" in msg
