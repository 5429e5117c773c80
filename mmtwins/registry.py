"""mmtwins' registries: children of MMEngine's root registries, under the scope ``mmtwins``.

A config of any default scope (mmdet, mmseg, mmpretrain) reaches mmtwins' modules with the scoped
name, e.g. ``backbone=dict(type='mmtwins.SVT', arch='small')`` together with
``custom_imports=dict(imports=['mmtwins.models'], allow_failed_imports=False)``. The scoped name
never collides with mmseg's and mmpretrain's own ``PCPVT``/``SVT``.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmtwins', locations=['mmtwins.models'])
