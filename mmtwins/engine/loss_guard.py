"""Stop, or skip the step, when the training loss becomes NaN or infinite."""
import logging
import math
from typing import Optional

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.runner import EpochBasedTrainLoop

from mmtwins.registry import HOOKS


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Check the loss of every training step *before* it updates the parameters.

    MMEngine's ``CheckInvalidLossHook`` looks at the loss after the optimizer step, when NaN
    gradients have already reached the weights (and the next checkpoint). This hook guards
    ``optim_wrapper.update_params``: a NaN/inf loss never reaches ``backward``.

    In a distributed run the ranks agree through one all-reduce of a flag per step, so they
    all stop or all skip together (a rank skipping alone would leave the others waiting in
    DDP's gradient all-reduce).

    Args:
        skip (bool): False (default): raise ``FloatingPointError`` naming the iteration. True:
            log a warning naming the iteration, drop the step (its gradients are cleared) and
            go on. With gradient accumulation (``accumulative_counts > 1``) that also drops the
            gradients the earlier steps of its accumulation window added, and, as the skipped
            step is not counted, the window ends one iteration later.
        max_consecutive_skips (int): With ``skip``, raise anyway after this many non-finite
            steps in a row (the run has diverged).

    Example::

        custom_hooks = [dict(type='mmtwins.NonFiniteLossHook', skip=True)]
    """
    priority = 'VERY_HIGH'

    def __init__(self, skip: bool = False, max_consecutive_skips: int = 10):
        if max_consecutive_skips < 1:
            raise ValueError(f'max_consecutive_skips must be >= 1, got {max_consecutive_skips}')
        self.skip = skip
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skipped_iters = []
        self._wrapper: Optional[OptimWrapper] = None

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        if not isinstance(wrapper, OptimWrapper):
            raise TypeError(f'{type(self).__name__} guards an OptimWrapper (or a subclass such '
                            f'as AmpOptimWrapper), got {type(wrapper).__name__}')
        update_params = wrapper.update_params

        def guarded_update_params(loss: torch.Tensor, *args, **kwargs) -> None:
            if self._all_finite(loss):
                self.consecutive_skips = 0
                return update_params(loss, *args, **kwargs)
            self._on_non_finite(runner, loss)

        wrapper.update_params = guarded_update_params  # an instance attribute shadows the method
        self._wrapper = wrapper

    def after_train(self, runner) -> None:
        if self._wrapper is not None:
            del self._wrapper.update_params
            self._wrapper = None

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if get_world_size() > 1:
            all_reduce(bad, op='sum')
        return bad.item() == 0

    def _on_non_finite(self, runner, loss: torch.Tensor) -> None:
        value = loss.detach().float().sum().item()
        where = f'iteration {runner.iter + 1}'
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            where += f' (counted over all epochs; epoch {runner.epoch + 1})'
        own = str(value) if not math.isfinite(value) else f'{value} here, not on another rank'
        msg = f'the training loss is not finite at {where}: {own}'
        if not self.skip:
            raise FloatingPointError(
                f'{msg}. Training stopped before this step changed the parameters, so the '
                'weights and the last checkpoint are intact. Try a lower learning rate or '
                'gradient clipping (optim_wrapper.clip_grad=dict(max_norm=...)), check the data '
                'of this iteration, then continue with --resume; or add '
                "dict(type='mmtwins.NonFiniteLossHook', skip=True) to custom_hooks to skip "
                'such steps')
        self._wrapper.zero_grad()
        self.consecutive_skips += 1
        self.skipped_iters.append(runner.iter + 1)
        if self.consecutive_skips > self.max_consecutive_skips:
            raise FloatingPointError(f'{msg}; {self.consecutive_skips} consecutive steps had a '
                                     'non-finite loss (max_consecutive_skips='
                                     f'{self.max_consecutive_skips}): the run has diverged')
        print_log(f'{msg}; this step is skipped (parameters unchanged)', logger='current',
                  level=logging.WARNING)
