"""Crash-safe checkpoints: atomic writes, safe pruning, and an integrity check before resuming.

MMEngine 0.10.7's ``CheckpointHook`` writes a checkpoint and the ``last_checkpoint`` pointer
in place, and with ``max_keep_ckpts`` deletes the oldest checkpoint *before* writing the new one.
A crash while saving can therefore leave a truncated file that ``--resume`` picks, and with
``max_keep_ckpts=1`` no intact checkpoint at all. :class:`AtomicCheckpointHook` fixes all three.
"""
import glob
import logging
import os.path as osp
import re
import string
import zipfile
from typing import Optional

from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.runner import find_latest_checkpoint

from mmtwins.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint
from .fileio import ATOMIC_BACKEND, atomic_write
from mmtwins.registry import HOOKS

LAST_CHECKPOINT = 'last_checkpoint'


def checkpoint_problem(path: str) -> Optional[str]:
    """What is wrong with the checkpoint file ``path``, or None if it is intact.

    A checkpoint in torch's zip format is checked against the CRC of every member (a truncated
    file has no zip directory at all); a legacy-format file is read with torch's weights-only
    loader, and one it refuses as unsafe counts as intact (the loader that resumes decides). A
    directory (DeepSpeed's checkpoints, which this hook also saves and prunes) is left to the
    engine that loads it.
    """
    if not path:
        return 'the path is empty'
    if osp.isdir(path):
        return None
    if not osp.isfile(path):
        return 'the file does not exist'
    if osp.getsize(path) == 0:
        return 'the file is empty'
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f'it cannot be read ({e})'
        return None if bad is None else f'its member {bad} is corrupt (CRC mismatch)'
    try:
        read_checkpoint(path)
    except UnsafeCheckpointError:
        return None
    except CheckpointError as e:
        return str(e)
    return None


def newest_intact_checkpoint(directory: str, damaged: str = '',
                             filename_tmpl: str = 'iter_{}.pth') -> Optional[str]:
    """The intact training checkpoint of the highest step in ``directory``: files named by
    ``filename_tmpl`` (a ``CheckpointHook``'s, e.g. ``'epoch_{}.pth'``), so not ``best_*.pth``
    (saved without optimizer and schedulers) nor other weights kept there.

    With ``damaged`` (the newest checkpoint of the run to resume), only steps below its step
    count: a file of a higher step in the work dir is an earlier run's, left there when the
    work dir was reused."""
    # the names filename_tmpl.format(step) gives, format specs ('{:06d}') included
    name = re.compile(''.join(re.escape(literal) + ('' if field is None else r'(\d+)')
                              for literal, field, _, _ in string.Formatter().parse(filename_tmpl))
                      + '$')

    def step(path: str) -> Optional[int]:
        m = name.match(osp.basename(path))
        return int(m.group(1)) if m else None

    below = step(damaged) if damaged else None
    steps = {}
    for path in glob.glob(osp.join(glob.escape(directory), '*')):
        s = step(path)
        if s is not None and osp.abspath(path) != osp.abspath(damaged) and (
                below is None or s < below):
            steps[path] = s
    for path in sorted(steps, key=steps.get, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that never leaves a damaged checkpoint for ``--resume`` to pick.

    Same arguments as MMEngine's ``CheckpointHook``. Differences:

    * checkpoints and the ``last_checkpoint`` pointer are written atomically (temporary file,
      then rename; local directories, the default ``backend_args``);
    * with ``max_keep_ckpts``, old checkpoints are deleted only after the new one is in place,
      and one left behind by a run that died in between is deleted when the run resumes;
    * before a run resumes, the checkpoint it will load is checked. If ``last_checkpoint``
      (``--resume`` without a path) names a damaged or missing file, the intact checkpoint
      of the highest step in the work dir (named as this hook names them) is used instead,
      with a warning, and the pointer is rewritten;
      if there is none, or if an explicitly given checkpoint is damaged, a
      :class:`~mmtwins.checkpoint.CheckpointError` names the file and what is wrong. In a
      distributed run the main process alone reads the checkpoint, and every rank follows its
      decision (each goes on, or each raises the same error).

    Use it in place of the default one::

        default_hooks = dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook', interval=1))
        custom_imports = dict(imports=['mmtwins.models', 'mmtwins.engine'], ...)
    """

    def __init__(self, *args, backend_args: Optional[dict] = None, **kwargs):
        if backend_args is None and kwargs.get('file_client_args') is None:
            out_dir = kwargs.get('out_dir')
            if out_dir is None or '://' not in str(out_dir):
                backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, backend_args=backend_args, **kwargs)

    # ------------------------------------------------------------------ resume check
    def before_run(self, runner) -> None:
        super().before_run(runner)
        if not runner.cfg.get('resume', False):
            return
        # The main process alone reads the checkpoint (a whole file per rank would be read from
        # a shared file system otherwise) and tells every rank the outcome, after rewriting the
        # pointer that they all read again when they load the checkpoint: all go on, or all stop
        # with the same error (another error of the main process, such as a pointer it cannot
        # write, reaches the others as a CheckpointError naming it: they must not wait).
        outcome, error = [None], None
        if is_main_process():
            try:
                self._check_resume(runner)
            except Exception as err:  # noqa: BLE001 - every rank must learn of any failure
                error = err
                outcome = [err if isinstance(err, CheckpointError) else CheckpointError(
                    f'the resume check failed on the main process: {type(err).__name__}: {err}')]
        broadcast_object_list(outcome)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise outcome[0]

    def _check_resume(self, runner) -> None:
        """Check the checkpoint the run will resume from (main process only).

        Raises:
            CheckpointError: an explicitly given checkpoint is damaged, or ``last_checkpoint``
                names a damaged one and no intact one is left in its directory.
        """
        explicit = runner.cfg.get('load_from')
        if explicit and '://' in str(explicit):
            return  # a remote file: mmengine's file backends read it, this check cannot
        if explicit:
            problem = checkpoint_problem(explicit)
            if problem:
                raise CheckpointError(f'cannot resume from {explicit}: {problem}. Pick another '
                                      'checkpoint, or use --resume without a path to take the '
                                      'newest intact one of the work dir')
            return
        latest = find_latest_checkpoint(runner.work_dir)
        # Nothing saved yet (MMEngine starts from scratch), or saved remotely: nothing to check.
        if latest is None or '://' in latest:
            return
        problem = checkpoint_problem(latest)
        if problem is None:
            return
        pointer = osp.join(runner.work_dir, LAST_CHECKPOINT)
        fallback = newest_intact_checkpoint(osp.dirname(latest) or runner.work_dir, latest,
                                            self.filename_tmpl)
        if fallback is None:
            raise CheckpointError(
                f'cannot resume: {pointer} names {latest!r}, but {problem}, and no other intact '
                'checkpoint is in its directory. Start without --resume, or pass --resume '
                'PATH with a checkpoint from elsewhere')
        print_log(f'{latest} is damaged ({problem}); resuming from {fallback}, the newest '
                  'intact checkpoint, instead', logger='current', level=logging.WARNING)
        atomic_write(pointer, fallback)

    # ------------------------------------------------------------------ saving
    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        """As MMEngine's, but write the pointer atomically and prune only after saving."""
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            # The new checkpoint records the outdated step too, first: if the run dies before
            # the file is deleted, MMEngine's before_train deletes it on resume (it prunes the
            # recorded steps down to max_keep_ckpts, oldest first).
            pending = [outdated] if outdated is not None else []
            runner.message_hub.update_info('keep_ckpt_ids', pending + list(self.keep_ckpt_ids))

        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args,
            save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
            meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if outdated is not None:
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, LAST_CHECKPOINT), self.last_ckpt)
        if outdated is not None:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # DeepSpeed checkpoints are directories
                self.file_backend.rmtree(path)
