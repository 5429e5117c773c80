"""Training robustness for any OpenMMLab 3.x runner: crash-safe checkpoints, test metrics
written once in distributed runs, a NaN/inf loss guard and a config check that runs before
anything is built.

Importing this package registers the hooks in the ``mmtwins`` scope (``mmtwins.*`` in configs,
with ``custom_imports=dict(imports=['mmtwins.models', 'mmtwins.engine'])``) and the
``atomic_local`` file backend.
"""
from .checkpoint_hook import AtomicCheckpointHook, checkpoint_problem, newest_intact_checkpoint
from .fileio import AtomicLocalBackend, atomic_file, atomic_torch_save, atomic_write
from .logger_hook import AtomicLoggerHook
from .loss_guard import NonFiniteLossHook
from .preflight import ConfigError, preflight_check, train_dataloaders
from mmtwins.registry import HOOKS

__all__ = [
    'AtomicCheckpointHook', 'AtomicLocalBackend', 'AtomicLoggerHook', 'ConfigError', 'HOOKS',
    'NonFiniteLossHook', 'atomic_file', 'atomic_torch_save', 'atomic_write',
    'checkpoint_problem', 'newest_intact_checkpoint', 'preflight_check', 'train_dataloaders'
]
