"""``tools/train.py``: train with any OpenMMLab 3.x config (mmdet, mmseg, mmpretrain scopes).

The options behave as mmdet 3.3's ``tools/train.py``; the registry scope comes from the config's
``default_scope``, so the same script trains detectors, segmentors and classifiers.
"""
import argparse
import logging
from typing import Optional, Sequence

from mmengine.config import Config
from mmengine.logging import print_log

from mmtwins.cli import cli_errors
from mmtwins.engine import ConfigError, preflight_check, train_dataloaders
from .config import add_common_args, load_config
from .runner import accelerator_available, build_runner, check_launcher, owned_process_group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model of any OpenMMLab 3.x scope')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (AmpOptimWrapper; a dynamic loss scale '
                        'unless optim_wrapper.loss_scale is given)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the total batch (GPUs x batch per GPU) over '
                        'auto_scale_lr.base_batch_size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or without a path from the latest checkpoint in the '
        'work dir (model, optimizer, schedulers and iteration; the random generators are '
        're-seeded, not restored)')
    add_common_args(parser)
    return parser.parse_args(argv)


def build_train_cfg(args: argparse.Namespace) -> Config:
    """The training config of ``args``: ``load_config`` plus ``--amp``, ``--auto-scale-lr``,
    ``--resume``."""
    cfg = load_config(args)
    if args.amp:
        wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper_type == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in the config.', logger='current',
                      level=logging.WARNING)
        elif wrapper_type != 'OptimWrapper':
            raise ConfigError('--amp needs optim_wrapper.type OptimWrapper (it becomes '
                              f'AmpOptimWrapper), got {wrapper_type}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            # a loss scale given with --cfg-options (a number, a dict) stays
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'base_batch_size' not in (cfg.get('auto_scale_lr') or {}):
            raise ConfigError('--auto-scale-lr needs auto_scale_lr=dict(enable=False, '
                              'base_batch_size=N) in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def check_amp_device(cfg: Config) -> None:
    """Refuse AMP training on a machine where mmengine cannot build its ``AmpOptimWrapper``.

    MMEngine 0.10.7's ``AmpOptimWrapper`` asserts a GPU, NPU, MLU or MUSA device when it is
    constructed, and the Runner constructs it only in ``train()``, after building the model and
    the training data. This check fails at once instead, for ``--amp`` and for a config that
    sets the wrapper itself.

    Raises:
        ConfigError: ``optim_wrapper.type`` is ``AmpOptimWrapper`` and no such device exists.
    """
    wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if not isinstance(wrapper_type, str):
        wrapper_type = wrapper_type.__name__
    if wrapper_type.split('.')[-1] != 'AmpOptimWrapper':
        return
    if not accelerator_available():
        raise ConfigError('AMP training (--amp, or optim_wrapper.type AmpOptimWrapper) needs a '
                          "GPU, NPU, MLU or MUSA device: mmengine's AmpOptimWrapper has no CPU "
                          'mode, and this machine has none of them. Train without --amp here.')


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train. A refused config or option combination (:class:`~mmtwins.engine.ConfigError`:
    unknown types, misspelled arguments, missing data, options the config cannot take) exits
    with its message as one line, before anything is built."""
    args = parse_args(argv)
    with cli_errors('train.py', (ConfigError, )):
        cfg = build_train_cfg(args)
        check_launcher(cfg)
        check_amp_device(cfg)
        preflight_check(cfg, train_dataloaders(cfg))
    with owned_process_group():
        build_runner(cfg).train()
