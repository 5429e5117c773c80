"""Build an mmengine Runner from a config of any OpenMMLab scope, on GPUs or on CPUs only.

Two gaps of mmengine 0.10.7 with the torch this project pins are closed here, for every entry
point (``tools/train.py``, ``tools/test.py``, tests):

* torch >= 2.6 loads checkpoints with ``weights_only=True``; mmengine's training checkpoints also
  pickle its message hub (``HistoryBuffer``) and numpy scalars/arrays, so ``--resume`` and
  ``load_from`` fail. :func:`build_runner` calls
  :func:`mmtwins.checkpoint.allow_mmengine_checkpoints`, which allow-lists exactly those classes
  and makes ``HistoryBuffer`` pickle without the ``getattr`` calls its default pickling needs.
* ``--launcher pytorch`` without a GPU: mmengine always calls ``torch.cuda.set_device`` and wraps
  the model in DDP with ``device_ids=[LOCAL_RANK]``. :func:`setup_cpu_distributed` initialises a
  gloo process group first (mmengine then skips its own), wraps with ``device_ids=None`` and
  turns the heads' SyncBN (GPU-only) into BN. On a machine with GPUs that torch cannot use
  (a driver too old for its CUDA) it raises instead of training on the CPUs.

And the entry points destroy the process group their run created (:func:`owned_process_group`).
"""
import contextlib
import datetime
import gc
import glob
import logging
import os
import traceback
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict
from mmengine.device import is_mlu_available, is_musa_available, is_npu_available
from mmengine.logging import print_log
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner

from mmtwins.checkpoint import allow_mmengine_checkpoints
from mmtwins.engine import ConfigError

NVIDIA_DEVICES = '/dev/nvidia[0-9]*'  # one device file per GPU the driver found


def on_cpus_distributed(cfg: Config) -> bool:
    """Whether ``cfg``'s run is a distributed one without an accelerator for it: a launcher
    other than ``none``, no GPU, NPU, MLU or MUSA device (mmengine's launchers set those up),
    and no process group yet."""
    return (cfg.get('launcher', 'none') != 'none' and not accelerator_available()
            and not dist.is_initialized())


def check_launcher(cfg: Config) -> None:
    """Refuse a distributed run this machine cannot start, before anything is built.

    Raises:
        ConfigError: the machine has NVIDIA GPUs that torch cannot use
            (:func:`gpus_torch_cannot_use`), or, without an accelerator, a launcher other than
            ``pytorch``.
    """
    if not on_cpus_distributed(cfg):
        return
    launcher = cfg.launcher
    unusable = gpus_torch_cannot_use()
    if unusable:
        raise ConfigError(
            f'--launcher {launcher}: this machine has NVIDIA GPUs ({unusable}), but torch '
            f'{torch.__version__} (CUDA {torch.version.cuda}) cannot use them: '
            'torch.cuda.is_available() is False, most often because the driver is older than '
            f'CUDA {torch.version.cuda} needs (nvidia-smi shows its version), or because this '
            "job may not open the devices (a scheduler's CPU-only allocation). Install a torch "
            'build for this driver, or set CUDA_VISIBLE_DEVICES= to run on the CPUs.')
    if launcher != 'pytorch':
        raise ConfigError(f'--launcher {launcher} needs GPUs, and this machine has none. On CPUs '
                          'use tools/dist_train.sh / tools/dist_test.sh (--launcher pytorch, '
                          'the gloo backend) or run single-process with --launcher none.')


def setup_cpu_distributed(cfg: Config) -> bool:
    """Prepare a distributed run on CPUs only: gloo process group and a CPU DDP wrapper.

    Does nothing (returns False) unless :func:`on_cpus_distributed`. Only ``--launcher
    pytorch`` (``torchrun``, as ``tools/dist_train.sh`` uses) is supported on CPUs; its
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) is read by
    ``init_process_group``.

    Returns:
        bool: True if this call initialised the gloo process group.

    Raises:
        ConfigError: as :func:`check_launcher`, which the tools run before building anything.
    """
    check_launcher(cfg)
    if not on_cpus_distributed(cfg):
        return False
    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())
    timeout = dist_cfg.get('timeout')  # seconds, as mmengine's init_dist takes it
    dist.init_process_group(backend='gloo', **({} if timeout is None else dict(
        timeout=datetime.timedelta(seconds=timeout))))
    dist_cfg['backend'] = 'gloo'
    if _sync_bn_to_bn(cfg.model):
        print_log('no GPU: SyncBN (GPU-only in torch) replaced by BN in the model config',
                  logger='current', level=logging.WARNING)
    if cfg.get('sync_bn') is not None:
        print_log(f'no GPU: sync_bn={cfg.sync_bn!r} (SyncBN is GPU-only in torch) ignored',
                  logger='current', level=logging.WARNING)
        cfg.sync_bn = None
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel',
            device_ids=None,
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper['device_ids'] = None
    print_log(f'no GPU: rank {dist.get_rank()}/{dist.get_world_size()} runs on CPU with gloo '
              f'(LOCAL_RANK={os.environ.get("LOCAL_RANK")})', logger='current')
    return True


def accelerator_available() -> bool:
    """Whether a GPU, NPU, MLU or MUSA device is available: the devices mmengine's launchers
    and ``AmpOptimWrapper`` support."""
    return (torch.cuda.is_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


def gpus_torch_cannot_use() -> Optional[str]:
    """The NVIDIA device files of this machine if a CUDA build of torch cannot use its GPUs
    (``torch.cuda.is_available()`` is False), else None; also None where
    ``CUDA_VISIBLE_DEVICES`` hides them on purpose (empty or -1), or torch is a CPU-only build.

    A distributed run there would otherwise fall back to CPUs without a word (mmengine's own
    launcher fails on ``torch.cuda.set_device`` instead).
    """
    hidden = os.environ.get('CUDA_VISIBLE_DEVICES', 'unset').strip() in ('', '-1')
    if hidden or not torch.backends.cuda.is_built() or torch.cuda.is_available():
        return None
    return ', '.join(sorted(glob.glob(NVIDIA_DEVICES))) or None


def _sync_bn_to_bn(cfg) -> bool:
    """Turn every ``norm_cfg``-style ``type='SyncBN'`` in a (nested) config into ``'BN'``."""
    found = False
    if isinstance(cfg, dict):
        if cfg.get('type') == 'SyncBN':
            cfg['type'], found = 'BN', True
        for value in cfg.values():
            found |= _sync_bn_to_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            found |= _sync_bn_to_bn(value)
    return found


@contextlib.contextmanager
def owned_process_group():
    """Destroy the default process group at the end of the block if it was created inside it
    (by :func:`setup_cpu_distributed` or by mmengine's launcher set-up), also on an error.

    A process that exits with a gloo group alive can abort ("terminate called without an active
    exception", SIGABRT): gloo's threads still hold work when the interpreter shuts down. One
    rank of a 2-process CPU run did so after training had finished (torch 2.13). Destroying the
    group only unregisters it while a DDP model's reducer still holds it, and mmengine's runner,
    which holds the model, sits in reference cycles (its loops point back at it) that only the
    garbage collector frees: so they are collected first, and the group ends here, not during
    interpreter shutdown.

    On an error the local variables of the traceback's frames are cleared first (a frame that
    raised inside ``runner.train()`` still holds the runner), so a failed run frees them too. The
    code inside the block should hold its runner in a function of its own, whose frame is gone
    when the block ends, not in a variable of the frame the block is in.
    """
    existed = dist.is_available() and dist.is_initialized()
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if not existed and dist.is_available() and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def build_runner(cfg: Config) -> Runner:
    """The Runner of ``cfg`` (``runner_type`` honoured), ready for ``train()``/``test()``."""
    allow_mmengine_checkpoints()
    setup_cpu_distributed(cfg)
    if 'runner_type' in cfg:  # looked up in the config's scope first, as its own tools do
        init_default_scope(cfg.get('default_scope') or 'mmengine')
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
