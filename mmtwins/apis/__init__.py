"""Entry points behind ``tools/train.py`` and ``tools/test.py`` and the Runner they build."""
from .runner import (allow_mmengine_checkpoints, build_runner, owned_process_group,
                     setup_cpu_distributed)
from .test import apply_tta

__all__ = [
    'allow_mmengine_checkpoints', 'apply_tta', 'build_runner', 'owned_process_group',
    'setup_cpu_distributed'
]
