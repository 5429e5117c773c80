"""One loader for every Twins checkpoint layout, proven numerically against the peers."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from mmengine.logging import HistoryBuffer

from mmtwins.analysis.peers import randomize_parameters_
from mmtwins.checkpoint import (CheckpointError, UnsafeCheckpointError, allow_mmengine_checkpoints,
                                convert_checkpoint, convert_state_dict, detect_layout,
                                load_twins_checkpoint, read_checkpoint)
from mmtwins.engine import checkpoint_problem
from mmtwins.models import PCPVT, SVT

from conftest import TINY_SVT

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [(PCPVT, 'small'), (PCPVT, 'base'), (PCPVT, 'large'),
            (SVT, 'small'), (SVT, 'base'), (SVT, 'large')]


def _classifier_backbone(cls, arch, **kw):
    return cls(arch=arch, norm_after_stage=[False, False, False, True], **kw).eval()


def _timm(cls, arch):
    """The timm model with every parameter distinct (no constant biases or norm weights)."""
    model = timm.create_model(f'twins_{cls.__name__.lower()}_{arch}', pretrained=False)
    return randomize_parameters_(model).eval()


@pytest.mark.parametrize('cls,arch', VARIANTS, ids=[f'{c.__name__}-{a}' for c, a in VARIANTS])
def test_timm_weights_give_timm_stage_outputs(cls, arch):
    peer = _timm(cls, arch)
    model = _classifier_backbone(cls, arch)
    report = load_twins_checkpoint(model, {'model': peer.state_dict()})  # authors' wrapping
    assert report.layout == 'authors' and report.variant == f'{cls.__name__}-{arch}'
    assert not report.missing and not report.unexpected and not report.expected_missing
    assert report.head == ['head.bias', 'head.weight']
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outs = model(x)
        ref = peer.forward_intermediates(x, intermediates_only=True)[:3]
        ref.append(peer.forward_features(x).transpose(1, 2).reshape(outs[3].shape))
    assert len(outs) == len(ref) == 4
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.shape == r.shape
        assert (o - r).abs().max().item() <= 1e-4, f'stage {i}'


def _peer_cfg(cls, arch):
    """mmseg's constructor arguments for the variant (mmseg spells window sizes `windiow_sizes`)."""
    s = cls.arch_zoo[arch]
    cfg = {k: s[k] for k in ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios')}
    if cls is SVT:
        cfg['windiow_sizes'] = s['window_sizes']
    return dict(cfg, qkv_bias=True, norm_after_stage=cls is SVT)


def _peer(peer_name, cls, arch='small'):
    if peer_name == 'mmseg':
        from mmseg.models.backbones import twins
        return getattr(twins, cls.__name__)(**_peer_cfg(cls, arch))
    from mmpretrain.models.backbones import twins
    s = cls.arch_zoo[arch]
    spec = {k: s[k] for k in ('embed_dims', 'num_heads', 'mlp_ratios', 'depths', 'sr_ratios')}
    spec.update(patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2])
    if cls is SVT:
        spec['window_sizes'] = s['window_sizes']
    return getattr(twins, cls.__name__)(arch=spec, out_indices=(0, 1, 2, 3), qkv_bias=True,
                                        norm_after_stage=cls is SVT)


@pytest.mark.parametrize('peer_name', ['mmseg', 'mmpretrain'])
@pytest.mark.parametrize('cls', [PCPVT, SVT])
def test_mmseg_and_mmpretrain_weights_give_their_stage_outputs(peer_name, cls):
    peer = _peer(peer_name, cls).eval()
    peer.init_weights()
    sd = randomize_parameters_(peer).state_dict()
    assert detect_layout(sd) == peer_name
    model = cls(arch='small').eval()
    report = load_twins_checkpoint(model, sd)
    assert report.variant == f'{cls.__name__}-small'
    assert not report.missing and not report.unexpected and not report.expected_missing
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outs, refs = model(x), peer(x)
    assert len(outs) == len(refs) == 4
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert (o - r).abs().max().item() <= 1e-4, f'stage {i}'


def test_imagenet_checkpoint_into_dense_svt_reports_stage_norms_as_expected_missing():
    peer = _timm(SVT, 'small')
    model = SVT(arch='small')  # dense: a norm after every stage
    report = load_twins_checkpoint(model, peer.state_dict())
    assert sorted({k.rsplit('.', 1)[0] for k in report.expected_missing}) == \
        ['stage_norms.0', 'stage_norms.1', 'stage_norms.2']
    assert 'stage_norms.3.weight' in report.loaded and not report.missing
    assert 'stage_norms.0.weight' in report.summary()
    # the last stage's norm is the classifier's final norm, and the report says so
    assert report.final_norm == ['stage_norms.3.bias', 'stage_norms.3.weight']
    assert torch.equal(model.stage_norms['3'].weight, peer.state_dict()['norm.weight'])
    assert ("loaded from the ImageNet classifier's final norm (norm.*, after the last stage): "
            'stage_norms.3.bias, stage_norms.3.weight') in report.summary()


def test_prefix_found_automatically_and_given(tmp_path):
    src = SVT(arch=TINY_SVT)
    ckpt = {'state_dict': {f'backbone.{k}': v for k, v in src.state_dict().items()},
            'meta': {}}
    ckpt['state_dict']['decode_head.conv.weight'] = torch.zeros(1)
    for prefix in (None, 'backbone.'):
        model = SVT(arch=TINY_SVT)
        report = load_twins_checkpoint(model, ckpt, prefix=prefix)
        assert not report.missing and not report.unexpected
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     src.state_dict().values()))


def test_keep_head_without_a_head_under_the_prefix_fails(tmp_path):
    """A whole mmpretrain classifier: its head (head.fc.*) lies outside the backbone prefix."""
    peer = _peer('mmpretrain', SVT)
    sd = {f'backbone.{k}': v for k, v in peer.state_dict().items()}
    sd.update({'head.fc.weight': torch.zeros(10, 512), 'head.fc.bias': torch.zeros(10)})
    src, dst = tmp_path / 'classifier.pth', tmp_path / 'out.pth'
    torch.save({'state_dict': sd, 'meta': {}}, src)
    with pytest.raises(CheckpointError, match=r"--keep-head: .* has no ImageNet head \(head\.\*\) "
                       r"under the prefix 'backbone\.'"):
        convert_checkpoint(str(src), str(dst), keep_head=True)
    assert not dst.exists()
    out, meta = convert_checkpoint(str(src), str(dst))
    assert meta['prefix'] == 'backbone.' and meta['kept_head'] == [] and out


def test_init_cfg_pretrained_loads_any_layout(tmp_path):
    """A whole mmseg segmentor's checkpoint (``backbone.`` keys beside the heads') through
    ``init_cfg``, the prefix given without its final dot as mmengine allows: the stage maps are
    the peer's."""
    peer = randomize_parameters_(_peer('mmseg', SVT)).eval()
    path = tmp_path / 'mmseg_svt_s.pth'
    torch.save({'state_dict': {**{f'backbone.{k}': v for k, v in peer.state_dict().items()},
                               'decode_head.conv_seg.weight': torch.ones(2, 8, 1, 1)}}, path)
    model = SVT(arch='small', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                            prefix='backbone')).eval()
    model.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for i, (o, r) in enumerate(zip(model(x), peer(x))):
            assert (o - r).abs().max().item() <= 1e-4, f'stage {i}'


def test_converter_cli_round_trip(tmp_path):
    peer = _timm(SVT, 'small')
    src, dst = tmp_path / 'authors.pth', tmp_path / 'mmtwins.pth'
    torch.save({'model': peer.state_dict()}, src)
    res = subprocess.run([sys.executable, str(ROOT / 'tools/model_converters/twins2mmtwins.py'),
                          str(src), str(dst)], capture_output=True, text=True, check=True)
    assert 'SVT-small in the authors layout' in res.stdout
    out = torch.load(dst, weights_only=True)
    assert out['meta']['variant'] == 'SVT-small' and 'head.weight' not in out['state_dict']
    model = _classifier_backbone(SVT, 'small')
    report = load_twins_checkpoint(model, str(dst))
    assert not report.missing and not report.unexpected
    backbone, _ = convert_state_dict(peer.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())

    convert_checkpoint(str(src), str(dst), keep_head=True)
    out = torch.load(dst, weights_only=True)
    assert out['meta']['kept_head'] == ['head.bias', 'head.weight']
    assert torch.equal(out['state_dict']['head.weight'], peer.state_dict()['head.weight'])
    with pytest.raises(CheckpointError):  # not a Twins checkpoint: dst is left as it was
        torch.save({'model': {'fc.weight': torch.ones(1)}}, src)
        convert_checkpoint(str(src), str(dst))
    assert torch.load(dst, weights_only=True)['meta']['kept_head'] == ['head.bias', 'head.weight']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['authors.pth', 'mmtwins.pth']


@pytest.mark.parametrize('tool', ['twins2mmtwins.py', 'twins2mmpretrain.py'])
def test_converter_cli_errors_are_one_line(tmp_path, tool):
    """A missing or foreign source and a destination that is a directory are reported as one
    line naming the problem, exit status 1, no traceback; nothing is written."""
    def convert(src, dst):
        return subprocess.run([sys.executable, str(ROOT / 'tools/model_converters' / tool),
                               str(src), str(dst)], capture_output=True, text=True)

    foreign = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'fc.weight': torch.ones(1)}}, foreign)
    peer = _timm(SVT, 'small')
    src = tmp_path / 'authors.pth'
    torch.save({'model': peer.state_dict()}, src)
    for source, dst, message in [(tmp_path / 'missing.pth', tmp_path / 'out.pth', 'not found'),
                                 (foreign, tmp_path / 'out.pth', 'Twins'),
                                 (src, tmp_path, 'is a directory: name the file to write')]:
        res = convert(source, dst)
        assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
        [line] = res.stderr.strip().splitlines()
        assert line.startswith(f'{tool}: error: ') and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['authors.pth', 'resnet.pth']


# ------------------------------------------------------------------ bad checkpoints
def test_missing_file():
    with pytest.raises(FileNotFoundError, match='checkpoint file not found: /no/such.pth'):
        load_twins_checkpoint(SVT(arch=TINY_SVT), '/no/such.pth')


class _Payload:
    """Unpickles by calling ``os.makedirs(marker)``: stands for code a malicious file runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker, )


def test_a_mmengine_training_checkpoint_is_read_weights_only(tmp_path, monkeypatch):
    """Message hub (HistoryBuffer) and numpy values beside the weights, as mmengine saves them
    from a process that built its Runner through mmtwins, load without the environment's
    override."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    allow_mmengine_checkpoints()  # as build_runner does before the run saves anything
    path = tmp_path / 'epoch_1.pth'
    src = randomize_parameters_(SVT(arch=TINY_SVT))
    buffer = HistoryBuffer()
    buffer.update(0.5)
    torch.save({'state_dict': src.state_dict(), 'message_hub': {'loss': buffer},
                'meta': {'seed': np.int64(7), 'mean': np.zeros(3)}}, path)
    ckpt = read_checkpoint(str(path))
    assert ckpt['meta']['seed'] == 7 and ckpt['message_hub']['loss'].current() == 0.5
    model = SVT(arch=TINY_SVT)
    load_twins_checkpoint(model, path, strict=True)  # a pathlib.Path as well as a str
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_a_checkpoint_pickling_other_objects_is_refused_unless_trusted(tmp_path, monkeypatch):
    """Unpickling could run code: such a file is refused, naming the object and the way to
    load a file one trusts; with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 it is read in full."""
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _Payload(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match='TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1') as e:
        read_checkpoint(str(evil))
    assert 'GLOBAL os.makedirs' in str(e.value)
    with pytest.raises(UnsafeCheckpointError):
        load_twins_checkpoint(SVT(arch=TINY_SVT), evil)
    assert not marker.exists()

    path = tmp_path / 'epoch_1.pth'
    src = SVT(arch=TINY_SVT)
    torch.save({'state_dict': src.state_dict(), 'meta': argparse.Namespace(epoch=1)}, path)
    with pytest.raises(UnsafeCheckpointError, match='argparse.Namespace'):
        read_checkpoint(str(path))
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.warns(UserWarning, match='TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'):
        assert read_checkpoint(str(path))['meta'].epoch == 1
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
    assert 'Please use' not in str(e.value)  # torch's allow-listing advice is left out
    torch.save({'state_dict': {}, 'o': np.array([1, 'a'], dtype=object)}, path)
    with pytest.raises(UnsafeCheckpointError, match='ObjectDType'):  # object arrays too
        read_checkpoint(str(path))


def test_read_checkpoint_allow_lists_mmengine_objects_itself(tmp_path):
    """In a process that built no Runner (a converter, the ONNX export) as well."""
    path = tmp_path / 'c.pth'
    torch.save({'state_dict': {}, 'meta': {'seed': np.int64(7)}}, path)
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert read_checkpoint(str(path))['meta']['seed'] == 7
    finally:
        torch.serialization.add_safe_globals(allowed)


def test_damaged_files_are_bad_checkpoints_not_unsafe_ones(tmp_path):
    """Not a checkpoint at all, or a legacy-format file with a damaged pickle byte (which the
    weights-only loader reports in its own words): CheckpointError, not UnsafeCheckpointError,
    so the resume check calls it damaged."""
    path = tmp_path / 'a.pth'
    path.write_bytes(b'hello world')
    with pytest.raises(CheckpointError, match='truncated or not a PyTorch checkpoint'):
        read_checkpoint(str(path))
    torch.save({'w': torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='truncated') as e:
        read_checkpoint(str(path))
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert 'truncated' in checkpoint_problem(str(path))


def test_truncated_file(tmp_path):
    path = tmp_path / 'full.pth'
    torch.save(SVT(arch=TINY_SVT).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or not a PyTorch checkpoint'):
        load_twins_checkpoint(SVT(arch=TINY_SVT), str(path))


def test_other_variant_is_refused_and_nothing_is_loaded():
    model = SVT(arch='small')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match='SVT-base checkpoint that does not fit'):
        load_twins_checkpoint(model, _timm(SVT, 'base').state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_twins_checkpoint():
    with pytest.raises(CheckpointError, match='not a Twins checkpoint'):
        load_twins_checkpoint(SVT(arch=TINY_SVT), {'conv1.weight': torch.zeros(1)})


def test_strict_reports_by_name():
    sd = SVT(arch=TINY_SVT).state_dict()
    del sd['blocks.1.0.mlp.fc1.bias']
    with pytest.raises(CheckpointError,
                       match=r'MISSING from the checkpoint: blocks\.1\.0\.mlp\.fc1\.bias'):
        load_twins_checkpoint(SVT(arch=TINY_SVT), sd, strict=True)


def test_strict_refuses_unused_keys_by_name():
    sd = SVT(arch=TINY_SVT).state_dict()
    sd['blocks.1.0.attn.extra'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r'UNEXPECTED in the checkpoint \(not used\): '
                                              r'blocks\.1\.0\.attn\.extra'):
        load_twins_checkpoint(SVT(arch=TINY_SVT), sd, strict=True)


def test_ddp_module_prefix_is_stripped_and_an_unmatched_prefix_refused():
    """A state dict saved from a DistributedDataParallel model (``module.backbone.*``) loads
    as the detector's own; a prefix under which nothing lies is an error, not an empty load."""
    src = randomize_parameters_(SVT(arch=TINY_SVT))
    ckpt = {'state_dict': {f'module.backbone.{k}': v for k, v in src.state_dict().items()}}
    model = SVT(arch=TINY_SVT)
    report = load_twins_checkpoint(model, ckpt, prefix='backbone.', strict=True)
    assert len(report.loaded) == len(src.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(CheckpointError, match="no tensors under prefix 'neck.'"):
        load_twins_checkpoint(SVT(arch=TINY_SVT), ckpt, prefix='neck')


def test_authors_dense_svt_loads_its_per_stage_norms_not_the_classifier_norm():
    # The authors' detection/segmentation SVT keeps trained norms in norm_list.{i} and the
    # ImageNet classifier's unused norm beside them (whole-model checkpoint, backbone. prefix).
    src = SVT(arch=TINY_SVT)
    randomize_parameters_(src)
    sd = {re.sub(r'^stage_norms\.', 'norm_list.', k): v for k, v in src.state_dict().items()}
    sd.update({'norm.weight': torch.full((64, ), 7.), 'norm.bias': torch.zeros(64)})
    model = SVT(arch=TINY_SVT)
    report = load_twins_checkpoint(model, {'state_dict': {f'backbone.{k}': v
                                                          for k, v in sd.items()}}, strict=True)
    assert report.layout == 'authors' and report.head == ['norm.bias', 'norm.weight']
    assert not report.missing and not report.unexpected and not report.expected_missing
    assert not report.final_norm  # its own norm_list.3, not the classifier's norm
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_imagenet_checkpoint_into_plain_pcpvt_loads_strictly():
    # A default PCPVT has no stage-end norms: the classifier's final norm is not used.
    model = PCPVT(arch='small')
    report = load_twins_checkpoint(model, _timm(PCPVT, 'small').state_dict(), strict=True)
    assert report.unused_stage_norms == ['stage_norms.3.bias', 'stage_norms.3.weight']
    assert not report.missing and not report.unexpected
    assert 'no norm after those stages): stage_norms.3.bias' in report.summary()


def test_truncated_model_takes_the_first_stages():
    """Even under ``strict``: the stages the model does not build are reported apart."""
    src = SVT(arch=TINY_SVT)
    model = SVT(arch=TINY_SVT, out_indices=(0, 1))
    report = load_twins_checkpoint(model, src.state_dict(), strict=True)
    assert not report.missing and not report.unexpected
    assert {k.split('.')[0] + '.' + k.split('.')[1] for k in report.unbuilt_stages} == {
        f'{name}.{i}' for name in ('blocks', 'patch_embeds', 'pos_block', 'stage_norms')
        for i in (2, 3)}
    assert 'does not build stage(s) [2, 3]' in report.summary()
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_other_attention_with_the_same_shapes_is_refused_and_nothing_is_loaded():
    """An SVT checkpoint into a PCPVT of the same widths and depths: the GSA blocks' and the
    MLPs' tensors would all fit by name and shape, the LSA blocks' attention not at all."""
    arch = dict(TINY_SVT, window_sizes=[None] * 4)
    model = PCPVT(arch=arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match='blocks.0.0: locally-grouped attention in the '
                       'checkpoint, global sub-sampled attention with sub-sampling in the model'):
        load_twins_checkpoint(model, SVT(arch=TINY_SVT).state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('src_arch,dst_arch', [('base', 'small'), ('small', 'base')])
def test_same_widths_other_depths_is_refused_and_nothing_is_loaded(src_arch, dst_arch):
    # PCPVT-S and -B share their widths (only stage 3's depth differs): every shape matches.
    model = PCPVT(arch=dst_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError,
                       match=rf'PCPVT-{src_arch} checkpoint that does not fit(.|\n)*stage 2: '):
        load_twins_checkpoint(model, PCPVT(arch=src_arch).state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_url_is_left_to_the_loader_and_a_misfit_is_named_by_its_file():
    """check_checkpoint_file does not look for a URL on disk; fitting_state_dict names the
    checkpoint in every refusal and lists the first five keys of each kind found, then '...'."""
    from mmtwins.checkpoint import check_checkpoint_file, fitting_state_dict
    for url in ('https://example.org/svt_s.pth', 's3://bucket/run/iter_4.pth'):
        check_checkpoint_file(url)  # no network: nothing is fetched or checked
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(3)])  # 6 keys
    with pytest.raises(CheckpointError, match=r"^checkpoint /w/a\.pth: the checkpoint has no "
                       r"tensors under prefix ''$"):
        fitting_state_dict(model, {'state_dict': {}}, '/w/a.pth')
    with pytest.raises(CheckpointError, match=re.escape(
            "checkpoint /w/b.pth does not fit the model of the config: 6 missing key(s) "
            "['0.weight', '0.bias', '1.weight', '1.bias', '2.weight'] ..., 1 unexpected key(s) "
            "['other']. It may be")):
        fitting_state_dict(model, {'state_dict': {'other': torch.ones(1)}}, '/w/b.pth')
    with pytest.raises(CheckpointError, match=re.escape(
            "does not fit the model of the config: 1 of another shape (checkpoint vs model) "
            "['2.bias (2,) vs (1,)']. It may be")):
        fitting_state_dict(model, {**model.state_dict(), '2.bias': torch.ones(2)}, '/w/c.pth')
