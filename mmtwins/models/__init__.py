"""Importing this package registers mmtwins' models in the ``mmtwins`` scope."""
from .backbones import PCPVT, SVT, Twins

__all__ = ['PCPVT', 'SVT', 'Twins']
