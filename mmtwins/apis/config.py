"""Command-line options shared by ``tools/train.py`` and ``tools/test.py``, as in mmdet/mmseg."""
import argparse
import logging
import os
import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``."""
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and metrics '
                        '(default: the config\'s work_dir, else ./work_dirs/CONFIG_NAME)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs merged into the config, e.g. '
        'model.backbone.init_cfg.checkpoint=PATH train_dataloader.batch_size=4; '
        'a list is written key="[a,b]" or key=a,b (quotes needed, no spaces)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher (tools/dist_*.sh pass pytorch)')
    # torch.distributed.launch passes --local-rank; torchrun sets the LOCAL_RANK variable.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the launcher, ``--cfg-options`` and work dir applied.

    The work dir is, by priority: ``--work-dir``, the config's ``work_dir``,
    ``./work_dirs/<config file name>``.
    """
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    work_dir: Optional[str] = args.work_dir or cfg.get('work_dir')
    cfg.work_dir = work_dir or osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_amp_is_emulated() -> bool:
    """True where autocast would run on a CPU without native bf16 (AVX512-BF16 or AMX).

    There, bf16 matrix multiplications and convolutions are emulated through conversions, and
    autocast is several times slower than fp32 (measured: docs/benchmarks_history.md).
    """
    return not torch.cuda.is_available() and not cpu_has_native_bf16()


def warn_if_cpu_amp_is_emulated() -> None:
    """Log a warning before an ``--amp`` run that :func:`cpu_amp_is_emulated` would slow down."""
    if cpu_amp_is_emulated():
        print_log('--amp on a CPU without native bf16 support (no AVX512-BF16/AMX, CPU '
                  f'capability {torch.backends.cpu.get_cpu_capability()}): bf16 autocast is '
                  'emulated here and runs slower than fp32. Leave out --amp on this machine.',
                  logger='current', level=logging.WARNING)
