"""Importing this package registers mmtwins' models in the ``mmtwins`` scope."""
import torch
from mmengine.utils import digit_version

#: ``torch.compiler.is_exporting`` (:func:`.layers.graph.is_exporting`) is new in torch 2.7.
MIN_TORCH = '2.7.0'


def check_torch_version(version: str) -> None:
    """Raise ImportError for a torch older than :data:`MIN_TORCH` (setup.py leaves torch's
    version to the user, so that pip never replaces a build their mmcv ops were compiled for)."""
    if digit_version(version) < digit_version(MIN_TORCH):
        raise ImportError(f'mmtwins needs torch >= {MIN_TORCH} (torch.compiler.is_exporting), '
                          f'found torch {version}')


check_torch_version(torch.__version__)

from .backbones import PCPVT, SVT, Twins  # noqa: E402

__all__ = ['PCPVT', 'SVT', 'Twins', 'check_torch_version']
