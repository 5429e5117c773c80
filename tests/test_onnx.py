"""ONNX export with dynamic batch/height/width, checked in ONNX Runtime against PyTorch.

One export per model serves every size. The sizes cover each LSA padding case of the tiny SVT
(windows of 7 tokens; stage s has ceil(H / 2**(s+2)) x ceil(W / 2**(s+2)) tokens):

* 224x224: 56x56 tokens, whole windows at every stage (the export example: the eager path
  would pad nothing, so a graph that followed it could not pad any other size);
* 200x224: 50x56, bottom padding only; 224x256: 56x64, right padding only;
* 97x131: 25x33, both sides (and odd sizes that PatchEmbed pads);
* 800x1344: 200x336 tokens, the COCO-like case with bottom padding only.
"""
import re
from pathlib import Path

import onnx
import pytest
import torch
from conftest import TINY_PCPVT, TINY_SVT
from mmengine.config import Config

from mmtwins.analysis.peers import randomize_parameters_
from mmtwins.checkpoint import CheckpointError
from mmtwins.deployment import (build_export_module, export_onnx, load_model,
                                non_default_domain_ops, verify_onnx)
from mmtwins.deployment.pytorch2onnx import check_agreement
from mmtwins.deployment.pytorch2onnx import main as pytorch2onnx
from mmtwins.models import PCPVT, SVT

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
PAD_CASES = [(1, 224, 224), (2, 200, 224), (1, 224, 256), (3, 97, 131)]


def dims(value_info):
    """A graph input's or output's declared shape: ints and symbolic names."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def max_diff(results):
    return max(o['max_abs_diff'] for r in results for o in r['outputs'].values())


@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)], ids=['SVT', 'PCPVT'])
def test_backbone_one_dynamic_export_matches_pytorch_at_every_size(cls, arch, tmp_path):
    module = build_export_module(cls(arch=arch))
    path = str(tmp_path / 'backbone.onnx')
    names = export_onnx(module, path, shape=(224, 224), batch=1)
    assert names == ['feat0', 'feat1', 'feat2', 'feat3']
    assert non_default_domain_ops(path) == set()
    graph = onnx.load(path).graph
    assert graph.input[0].name == 'images'
    assert dims(graph.input[0]) == ['batch', 3, 'height', 'width']
    for out, channels in zip(graph.output, arch['embed_dims']):
        assert dims(out) == ['batch', channels, f'{out.name}_height', f'{out.name}_width']

    sizes = PAD_CASES + ([(1, 800, 1344)] if cls is SVT else [])
    results = verify_onnx(path, module, sizes)
    other = build_export_module(cls(arch=arch))  # the check is not vacuous: other weights fail
    assert max_diff(verify_onnx(path, other, PAD_CASES[:1])) > 1e-2
    for (b, h, w), res in zip(sizes, results):
        for i, (name, out) in enumerate(res['outputs'].items()):
            stride = 4 * 2**i
            assert out['shape'] == (b, arch['embed_dims'][i], -(-h // stride), -(-w // stride))
    assert max_diff(results) <= TOL


def tiny_model_config(name: str) -> Config:
    """``configs/<name>`` with the tiny arch of its family and narrow necks/heads."""
    cfg = Config.fromfile(str(REPO / 'configs' / name))
    model = cfg.model
    arch = TINY_SVT if model.backbone.type == 'mmtwins.SVT' else TINY_PCPVT
    dims = arch['embed_dims']
    model.backbone.update(arch=arch, init_cfg=None)
    bn = dict(type='BN', requires_grad=True)
    if 'decode_head' in model:  # mmseg
        if 'neck' in model:  # Semantic FPN
            model.neck.update(in_channels=dims, out_channels=16)
            model.decode_head.update(in_channels=[16] * 4, channels=16, norm_cfg=bn)
        else:  # UperNet
            model.decode_head.update(in_channels=dims, channels=16, norm_cfg=bn)
            model.auxiliary_head.update(in_channels=dims[2], channels=16, norm_cfg=bn)
    else:  # mmdet
        model.neck.update(in_channels=dims, out_channels=16)
        head = model.get('bbox_head') or model.rpn_head
        head.update(in_channels=16, feat_channels=16)
    return cfg


def test_segmentor_logits_and_labels_via_the_tool(tmp_path, capsys):
    cfg = tiny_model_config('fpn_twins_svt_s_80k_ade20k.py')
    cfg_file = str(tmp_path / 'fpn_tiny.py')
    cfg.dump(cfg_file)
    out = pytorch2onnx([cfg_file, '--shape', '64', '96', '--dynamic', '--output-file',
                        str(tmp_path / 'seg.onnx'), '--verify', '56', '56', '97', '131'])
    log = capsys.readouterr().out
    assert 'exported the segmentor' in log and 'seg_logits' in log
    assert 'ONNX Runtime matches PyTorch' in log
    assert non_default_domain_ops(out) == set()
    assert dims(onnx.load(out).graph.output[0]) == [
        'batch', 150, 'seg_logits_height', 'seg_logits_width']

    # The exported computation is mmseg's own whole-image inference.
    torch.manual_seed(0)
    model = load_model(cfg_file)
    images = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = model.encode_decode(images, [dict(img_shape=(97, 131))] * 2)
        module = build_export_module(model)
        torch.testing.assert_close(module(images)[0], expected, rtol=0, atol=1e-6)

    # The label map: mmseg's prediction (the argmax of its logits); one export, compared pixel
    # by pixel, and a model of other weights differs in some pixels.
    module = build_export_module(model, seg_output='labels')
    with torch.no_grad():
        torch.testing.assert_close(module(images)[0], expected.argmax(dim=1), rtol=0, atol=0)
    path = str(tmp_path / 'labels.onnx')
    assert export_onnx(module, path, (64, 96)) == ['seg_labels']
    assert dims(onnx.load(path).graph.output[0]) == [
        'batch', 'seg_labels_height', 'seg_labels_width']
    [res] = verify_onnx(path, module, [(2, 97, 131)])
    assert res['outputs']['seg_labels'] == dict(shape=(2, 97, 131), mismatches=0)
    other = build_export_module(randomize_parameters_(load_model(cfg_file), seed=1),
                                seg_output='labels')
    [res] = verify_onnx(path, other, [(2, 97, 131)])
    assert res['outputs']['seg_labels']['mismatches'] > 0


def test_upernet_pyramid_pooling_exports_with_dynamic_sizes(tmp_path):
    """UperNet's adaptive pooling has no dynamic-size ONNX export; the wrapper swaps in an
    equivalent of the same values (checked against mmseg's own inference first)."""
    torch.manual_seed(0)
    model = load_model(tiny_model_config('upernet_twins_pcpvt_s_160k_ade20k.py'))
    images = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = model.encode_decode(images, [dict(img_shape=(97, 131))] * 2)
        module = build_export_module(model)
        torch.testing.assert_close(module(images)[0], expected, rtol=0, atol=1e-5)
    path = str(tmp_path / 'upernet.onnx')
    export_onnx(module, path, (64, 96))
    assert non_default_domain_ops(path) == set()
    results = verify_onnx(path, module, [(2, 97, 131), (1, 200, 224)])
    shapes = [r['outputs']['seg_logits']['shape'] for r in results]
    assert shapes == [(2, 150, 97, 131), (1, 150, 200, 224)]
    assert max_diff(results) <= TOL
    assert dims(onnx.load(path).graph.output[0]) == [
        'batch', 150, 'seg_logits_height', 'seg_logits_width']


def test_segmentor_checkpoint_is_loaded_strictly(tmp_path):
    cfg = tiny_model_config('fpn_twins_svt_s_80k_ade20k.py')
    cfg_file = str(tmp_path / 'fpn_tiny.py')
    cfg.dump(cfg_file)
    model = randomize_parameters_(load_model(cfg_file))  # no tensor a fresh build could match
    ckpt = tmp_path / 'model.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    loaded = load_model(cfg_file, str(ckpt)).state_dict()
    fresh = load_model(cfg_file).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    assert not any(torch.equal(fresh[k], v) for k, v in model.named_parameters())
    torch.save({'state_dict': {k: v for k, v in model.state_dict().items()
                               if not k.startswith('decode_head')}}, ckpt)
    with pytest.raises(ValueError, match=r'does not fit .* missing key\(s\)'):
        load_model(cfg_file, str(ckpt))
    torch.save({'state_dict': dict(model.state_dict(), **{'extra.weight': torch.ones(1)})}, ckpt)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) \['extra\.weight'\]"):
        load_model(cfg_file, str(ckpt))
    other_classes = model.state_dict()  # a checkpoint of a head with one more class
    other_classes['decode_head.conv_seg.weight'] = torch.cat(
        [other_classes['decode_head.conv_seg.weight']] * 2)[:model.decode_head.num_classes + 1]
    torch.save({'state_dict': other_classes}, ckpt)
    with pytest.raises(CheckpointError, match=r'1 of another shape .*conv_seg\.weight \(151, '):
        load_model(cfg_file, str(ckpt))

    # --backbone-only: the backbone of that checkpoint, or a backbone checkpoint of its own
    want = model.backbone.state_dict()
    backbone_ckpt = tmp_path / 'backbone.pth'
    torch.save({'state_dict': want}, backbone_ckpt)
    for path in (ckpt, backbone_ckpt):
        got = load_model(cfg_file, str(path), backbone_only=True).backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    with pytest.raises(CheckpointError, match=r'does not fit .* It may be the checkpoint of '
                       'another config, or of a backbone alone'):
        load_model(cfg_file, str(backbone_ckpt))  # the whole model needs its whole checkpoint


def test_a_missing_checkpoint_is_said_before_the_model_is_built(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError('the model was built')

    monkeypatch.setattr('mmtwins.deployment.wrappers.build_module', no_build)
    with pytest.raises(FileNotFoundError, match=r'^checkpoint file not found: .*missing\.pth '
                       r'\(no such file\)$'):
        load_model('any_config.py', str(tmp_path / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match=r'\(a directory, not a file\)$'):
        load_model('any_config.py', str(tmp_path))
    with pytest.raises(SystemExit, match=r'^pytorch2onnx.py: error: checkpoint file not found: '
                       r'.*missing\.pth \(no such file\)$'):  # the tool: one line
        pytorch2onnx(['any_config.py', str(tmp_path / 'missing.pth'), '--shape', '64', '64'])


def test_the_tool_writes_its_output_only_once_the_export_passed_its_checks(
        tmp_path, monkeypatch, capsys):
    """The graph goes to a temporary file; a failed --verify keeps it as NAME.unverified.onnx
    and an interrupted export leaves nothing, the earlier NAME.onnx unchanged in both cases."""
    from mmtwins.deployment import pytorch2onnx as tool
    cfg_file = str(tmp_path / 'fpn_tiny.py')
    tiny_model_config('fpn_twins_svt_s_80k_ade20k.py').dump(cfg_file)
    folder = tmp_path / 'onnx'
    folder.mkdir()
    out, aside = folder / 'svt.onnx', folder / 'svt.unverified.onnx'
    out.write_bytes(b'an earlier export')
    args = [cfg_file, '--backbone-only', '--shape', '64', '64', '--dynamic', '--output-file',
            str(out), '--verify', '64', '96']

    def off_by_half(*a, **kw):  # ONNX Runtime run for real, its result made to disagree
        results = verify_onnx(*a, **kw)
        results[-1]['outputs']['feat3']['max_abs_diff'] = 0.5
        return results

    monkeypatch.setattr(tool, 'verify_onnx', off_by_half)
    with pytest.raises(SystemExit, match=r'^ONNX Runtime differs from PyTorch by 0\.5 > 0\.0001\n'
                       r'verification failed: the export is kept as .*svt\.unverified\.onnx to '
                       r'inspect, not written to .*svt\.onnx \(the earlier file there is '
                       r'unchanged\)$'):
        pytorch2onnx(args)
    log = capsys.readouterr().out
    for line in (f'building the model of {cfg_file} (random weights) ...',
                 'tracing the backbone on a 1x3x64x64 example and exporting it ...',
                 'running ONNX Runtime and PyTorch on 1x3x64x64 ...',
                 'running ONNX Runtime and PyTorch on 1x3x64x96 ...'):
        assert line in log.splitlines()
    assert out.read_bytes() == b'an earlier export'
    assert [o.name for o in onnx.load(str(aside)).graph.output] == [f'feat{i}' for i in range(4)]
    assert sorted(p.name for p in folder.iterdir()) == [out.name, aside.name]

    def interrupted(module, path, *a, **kw):
        Path(path).write_bytes(b'half an export')
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, 'export_onnx', interrupted)
    with pytest.raises(KeyboardInterrupt):
        pytorch2onnx(args)
    assert out.read_bytes() == b'an earlier export'
    assert sorted(p.name for p in folder.iterdir()) == [out.name, aside.name]

    monkeypatch.undo()
    assert pytorch2onnx(args) == str(out)
    assert [o.name for o in onnx.load(str(out)).graph.output] == [f'feat{i}' for i in range(4)]
    assert [p.name for p in folder.iterdir()] == [out.name]  # the stale unverified file too
    log = capsys.readouterr().out
    assert f'wrote {out}' in log and f'removed {aside}, an earlier export' in log


def export_detector(name: str, tmp_path: Path, sizes):
    """Export the tiny ``configs/<name>`` detector at 64x96 and run it at ``sizes`` ((B, H, W)
    each) -> (config, output names, ONNX path, per-size results), checked within TOL."""
    cfg = tiny_model_config(name)
    torch.manual_seed(0)
    module = build_export_module(load_model(cfg))
    path = str(tmp_path / 'detector.onnx')
    names = export_onnx(module, path, (64, 96))
    results = verify_onnx(path, module, sizes)
    assert max_diff(results) <= TOL
    return cfg, names, path, results


def level_hw(h: int, w: int, stride: int) -> tuple:
    return -(-h // stride), -(-w // stride)


def test_detector_raw_head_outputs(tmp_path):
    sizes = [(1, 64, 96), (2, 97, 131), (1, 200, 336)]
    cfg, names, path, results = export_detector('retinanet_twins_pcpvt_s_1x.py', tmp_path, sizes)
    levels = range(5)  # FPN: stages 1-3 + 2 extra levels
    assert names == [f'{kind}_{i}' for kind in ('cls_scores', 'bbox_preds') for i in levels]
    assert non_default_domain_ops(path) == set()
    # the levels' sizes differ, so no two outputs may share a declared height or width
    spatial = [d for out in onnx.load(path).graph.output for d in dims(out)[2:]]
    assert len(set(spatial)) == len(spatial) == 2 * len(names)
    anchors = cfg.model.bbox_head.anchor_generator
    per_loc = len(anchors.ratios) * anchors.scales_per_octave
    num_classes = cfg.model.bbox_head.num_classes
    for (b, h, w), res in zip(sizes, results):
        for i in levels:
            hw = level_hw(h, w, 8 * 2**i)
            assert res['outputs'][f'cls_scores_{i}']['shape'] == (b, per_loc * num_classes, *hw)
            assert res['outputs'][f'bbox_preds_{i}']['shape'] == (b, per_loc * 4, *hw)


def test_two_stage_detector_exports_fpn_features_and_rpn_outputs(tmp_path):
    """Mask R-CNN: the FPN levels, which its RoI heads read, and the RPN's raw outputs, from
    which the caller decodes the proposals."""
    sizes = [(1, 64, 96), (2, 97, 131)]
    cfg, names, _, results = export_detector('mask_rcnn_twins_svt_s_1x.py', tmp_path, sizes)
    levels = range(5)  # FPN: stages 1-4 + 1 max-pooled level
    assert names == [f'feat{i}' for i in levels] + [
        f'{kind}_{i}' for kind in ('cls_scores', 'bbox_preds') for i in levels]
    anchors = cfg.model.rpn_head.anchor_generator
    per_loc = len(anchors.ratios) * len(anchors.scales)
    for (b, h, w), res in zip(sizes, results):
        outputs = res['outputs']
        for i in levels:
            hw = level_hw(h, w, 4 * 2**i)
            assert outputs[f'feat{i}']['shape'] == (b, 16, *hw)
            assert outputs[f'cls_scores_{i}']['shape'] == (b, per_loc, *hw)  # objectness
            assert outputs[f'bbox_preds_{i}']['shape'] == (b, per_loc * 4, *hw)


def test_export_rejects_a_too_small_example(tmp_path):
    with pytest.raises(ValueError, match='at least 29 pixels'):
        export_onnx(build_export_module(SVT(arch=TINY_SVT)), str(tmp_path / 'unused.onnx'),
                    (16, 64))
    assert not list(tmp_path.iterdir())


def test_verify_sizes_need_a_dynamic_export(capsys):
    with pytest.raises(SystemExit):
        pytorch2onnx(['cfg.py', '--shape', '64', '64', '--verify', '96', '96'])
    assert '--verify H W pairs need --dynamic' in capsys.readouterr().err


def test_opset_below_the_attentions_and_too_small_sizes_stop_the_tool_before_export(
        capsys, tmp_path):
    with pytest.raises(SystemExit):
        pytorch2onnx(['cfg.py', '--shape', '64', '64', '--opset', '13'])
    assert 'exports from opset 14 on' in capsys.readouterr().err
    cfg = tiny_model_config('retinanet_twins_pcpvt_s_1x.py')
    cfg_file = str(tmp_path / 'retinanet_tiny.py')
    cfg.dump(cfg_file)
    out = tmp_path / 'out.onnx'
    with pytest.raises(SystemExit, match=r'^28x96, 97x20: too small for the backbone, which '
                       r'needs H, W >= 29$'):
        pytorch2onnx([cfg_file, '--shape', '64', '96', '--dynamic', '--output-file', str(out),
                      '--verify', '28', '96', '64', '64', '97', '20'])
    assert not out.exists()


def test_a_nan_difference_fails_the_check():
    def diffs(*values):
        return [dict(size=(1, 64, 64), outputs={f'feat{i}': dict(shape=(1, 8, 4, 4),
                                                                max_abs_diff=v)
                                                for i, v in enumerate(values)})]

    check_agreement(diffs(1e-6, 2e-5))
    for values in [(float('nan'), 1e-6), (1e-6, float('nan')), (float('inf'), 1e-6)]:
        with pytest.raises(SystemExit, match='differs from PyTorch by (nan|inf)'):
            check_agreement(diffs(*values))


def test_label_mismatches_past_the_tolerance_fail_the_check(capsys):
    def labels(mismatches):
        return [dict(size=(1, 100, 100), outputs=dict(
            seg_labels=dict(shape=(1, 100, 100), mismatches=mismatches)))]

    check_agreement(labels(5))  # 5e-4 of the pixels: an argmax tie can flip
    assert '5 labels differ (5.00e-04 of them)' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='other labels than PyTorch for 2.00e-03 of the pixels'):
        check_agreement(labels(20))


def test_missing_checkers_stop_the_tool_before_the_export(monkeypatch, tmp_path):
    """Without onnxruntime, --verify stops with the install command before any model is loaded
    (the config does not exist); without onnx, so does a plain export."""
    import importlib.util
    find_spec = importlib.util.find_spec
    gone = set()
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name in gone else find_spec(name, *a))
    args = [str(tmp_path / 'missing.py'), '--shape', '64', '64']
    gone.add('onnxruntime')
    with pytest.raises(SystemExit, match=r'^onnxruntime not installed, needed to check the '
                       r'exported graph: pip install -e \.\[deploy\] \(or: pip install '
                       r'onnxruntime\)$'):
        pytorch2onnx(args + ['--verify'])
    with pytest.raises(SystemExit, match='^pytorch2onnx.py: error: .*missing.py'):
        pytorch2onnx(args)  # no --verify: onnxruntime is not needed, the config is
    gone.add('onnx')
    with pytest.raises(SystemExit, match='^onnx not installed'):
        pytorch2onnx(args)


def test_the_tool_reports_a_misfit_checkpoint_or_a_folder_as_output_in_one_line(tmp_path):
    cfg_file = str(tmp_path / 'fpn_tiny.py')
    tiny_model_config('fpn_twins_svt_s_80k_ade20k.py').dump(cfg_file)
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': {'extra.weight': torch.ones(1)}}, ckpt)
    with pytest.raises(SystemExit, match=r'^pytorch2onnx\.py: error: checkpoint .*other\.pth '
                       'does not fit the model of the config'):
        pytorch2onnx([cfg_file, str(ckpt), '--shape', '64', '64'])
    with pytest.raises(SystemExit, match=rf'^pytorch2onnx\.py: error: {re.escape(str(tmp_path))} '
                       'is a directory: name the file to write'):
        pytorch2onnx([cfg_file, '--backbone-only', '--shape', '64', '64', '--output-file',
                      str(tmp_path)])


def test_a_failed_verify_with_no_earlier_output_says_nothing_was_written(tmp_path, monkeypatch):
    """An output named without .onnx, in a folder not there yet: the graph that failed is kept
    as NAME.unverified.onnx, and the message says that nothing was written."""
    from mmtwins.deployment import pytorch2onnx as tool
    cfg_file = str(tmp_path / 'fpn_tiny.py')
    tiny_model_config('fpn_twins_svt_s_80k_ade20k.py').dump(cfg_file)

    def runtime_fails(*args, **kwargs):
        raise RuntimeError('ONNX Runtime cannot run the graph')

    monkeypatch.setattr(tool, 'verify_onnx', runtime_fails)
    out = tmp_path / 'onnx' / 'svt'
    with pytest.raises(SystemExit, match=r'^RuntimeError: ONNX Runtime cannot run the graph\n'
                       r'verification failed: the export is kept as .*/onnx/svt\.unverified\.onnx '
                       r'to inspect, not written to .*/onnx/svt \(nothing written\)$'):
        pytorch2onnx([cfg_file, '--backbone-only', '--shape', '64', '64', '--output-file',
                      str(out), '--verify'])
    assert [p.name for p in out.parent.iterdir()] == ['svt.unverified.onnx']
