"""mmtwins' registries: children of MMEngine's root registries, all under the scope ``mmtwins``.

A config of any default scope (mmdet, mmseg, mmpretrain) reaches mmtwins' modules with the scoped
name, e.g. ``backbone=dict(type='mmtwins.SVT', arch='small')``,
``tta_model=dict(type='mmtwins.SegTTAModel')`` or
``custom_hooks=[dict(type='mmtwins.NonFiniteLossHook')]``, together with
``custom_imports=dict(imports=['mmtwins.models'], allow_failed_imports=False)``. The scoped names
never collide with mmseg's and mmpretrain's own ``PCPVT``/``SVT``. Each registry imports the
modules in its ``locations`` the first time a name is looked up in it.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmtwins',
                  locations=['mmtwins.models', 'mmtwins.segmentation'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='mmtwins',
                      locations=['mmtwins.segmentation'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmtwins', locations=['mmtwins.engine'])
