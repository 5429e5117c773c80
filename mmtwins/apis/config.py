"""Command-line options shared by ``tools/train.py`` and ``tools/test.py``, as in mmdet/mmseg."""
import argparse
import os
import os.path as osp
from typing import Optional

from mmengine.config import Config, DictAction


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
