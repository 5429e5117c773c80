"""Test metrics written once, whole: MMEngine's ``LoggerHook`` for distributed tests.

MMEngine 0.10.7's ``LoggerHook.after_test_epoch`` dumps the test metrics to
``{log_dir}/{timestamp}.json`` from every rank. The ranks share the log directory, so in a
``tools/dist_test.sh`` run they write the same file at the same time, and a reader can get one
rank's JSON with the tail of another's after it (seen here: ``Extra data`` from ``json.loads``).
"""
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.fileio import dump
from mmengine.hooks import LoggerHook

from mmtwins.registry import HOOKS
from .fileio import atomic_write


@HOOKS.register_module()
class AtomicLoggerHook(LoggerHook):
    """``LoggerHook`` whose test-metrics JSON is written by the main process only, atomically.

    Same arguments as MMEngine's ``LoggerHook``; everything else it does (the log lines, the
    training/validation scalars, which MMEngine's visualizer already writes from rank 0 only)
    is unchanged. Use it in place of the default one::

        default_hooks = dict(logger=dict(type='mmtwins.AtomicLoggerHook'))
    """

    def after_test_epoch(self, runner, metrics=None) -> None:
        tag, log_str = runner.log_processor.get_log_after_epoch(
            runner, len(runner.test_dataloader), 'test', with_non_scalar=True)
        runner.logger.info(log_str)
        if is_main_process():
            atomic_write(osp.join(runner.log_dir, self.json_log_path),
                         dump(self._process_tags(tag), file_format='json'))
