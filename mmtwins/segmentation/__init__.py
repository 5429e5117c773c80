"""Semantic segmentation with mmseg 1.x: importing this package registers, in the ``mmtwins``
scope, :class:`SegTTAModel` (``MODELS``) and :class:`LoadOptionalAnnotations` (``TRANSFORMS``)."""
from mmtwins.registry import TRANSFORMS
from .transforms import LoadOptionalAnnotations
from .tta import SegTTAModel

__all__ = ['LoadOptionalAnnotations', 'SegTTAModel', 'TRANSFORMS']
