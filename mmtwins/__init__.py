"""mmtwins: Twins-PCPVT and Twins-SVT backbones for the OpenMMLab 3.x ecosystem."""
from .version import __version__

__all__ = ['__version__']
