"""`type='mmtwins.X'` resolves to mmtwins' backbones from configs of every OpenMMLab scope."""
import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.utils import import_modules_from_strings

import mmtwins.models as ours
from mmtwins.registry import MODELS

from conftest import TINY_SVT


def test_own_child_registry_with_scope():
    from mmengine.registry import MODELS as ROOT
    assert MODELS.scope == 'mmtwins' and MODELS.parent is ROOT
    assert MODELS.get('SVT') is ours.SVT and MODELS.get('PCPVT') is ours.PCPVT


@pytest.mark.parametrize('scope,registry_module', [
    ('mmdet', 'mmdet.registry'), ('mmseg', 'mmseg.registry'), ('mmpretrain', 'mmpretrain.registry')
])
@pytest.mark.parametrize('name', ['SVT', 'PCPVT'])
def test_scoped_name_resolves_to_mmtwins_from_other_scopes(scope, registry_module, name):
    peer_models = import_modules_from_strings(registry_module).MODELS
    import_modules_from_strings(f'{scope}.models')  # register the peer's own PCPVT/SVT where any
    with DefaultScope.overwrite_default_scope(scope):
        model = peer_models.build(dict(type=f'mmtwins.{name}', arch=TINY_SVT))
        assert type(model) is getattr(ours, name)
        if scope in ('mmseg', 'mmpretrain'):
            # The unscoped name still means the peer's own class: nothing collides.
            peer_cls = peer_models.get(name)
            assert peer_cls is not None and peer_cls is not getattr(ours, name)


def test_mmseg_config_with_custom_imports_builds_mmtwins_backbone():
    cfg = Config(dict(
        default_scope='mmseg',
        custom_imports=dict(imports=['mmtwins.models'], allow_failed_imports=False),
        model=dict(
            type='EncoderDecoder',
            backbone=dict(type='mmtwins.SVT', arch=TINY_SVT),
            decode_head=dict(type='FPNHead', in_channels=[16, 32, 32, 64], in_index=[0, 1, 2, 3],
                             feature_strides=[4, 8, 16, 32], channels=16, num_classes=3,
                             norm_cfg=dict(type='BN', requires_grad=True)),
            neck=dict(type='FPN', in_channels=[16, 32, 32, 64], out_channels=16, num_outs=4))))
    import_modules_from_strings(cfg.custom_imports['imports'])
    from mmseg.registry import MODELS as SEG_MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        seg = SEG_MODELS.build(cfg.model)
    assert type(seg.backbone) is ours.SVT


def test_a_torch_older_than_2_7_is_named_at_import():
    from mmtwins.models import check_torch_version
    for version in ('2.7.0', '2.13.0+cu130', '2.8.0a0+git1234'):
        check_torch_version(version)
    with pytest.raises(ImportError, match=r'mmtwins needs torch >= 2\.7\.0 .*found torch 2\.6\.0'):
        check_torch_version('2.6.0+cpu')
