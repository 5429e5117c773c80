"""The ``mmtwins`` scope's data-transform registry, a child of MMEngine's root ``TRANSFORMS``.

A config of any default scope reaches a transform registered here with the scoped name, e.g.
``dict(type='mmtwins.LoadOptionalAnnotations')``, once ``mmtwins.segmentation`` is imported
(``custom_imports``).
"""
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='mmtwins',
                      locations=['mmtwins.segmentation'])
