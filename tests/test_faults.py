"""Faults during training: killed runs resume exactly, dying workers end the job, damaged
checkpoints are never resumed from, and a NaN/inf loss stops (or skips) before it harms weights.

The first tests drive the real ``tools/train.py`` / ``tools/dist_train.sh`` on a tiny
mmpretrain classifier (tiny SVT, 32x32 images, no random augmentation: deterministic on CPU);
the others run MMEngine's Runner in-process on a toy regression model.
"""
import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import BaseDataset
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from mmengine.runner import Runner
from PIL import Image
from torch import nn

import mmtwins.engine  # noqa: F401 - registers the hooks
from mmtwins.analysis import load_json_log
from mmtwins.analysis.logs import resumed
from mmtwins.apis import build_runner
from mmtwins.checkpoint import CheckpointError
from mmtwins.engine import (AtomicLocalBackend, atomic_torch_save, atomic_write,
                            checkpoint_problem, newest_intact_checkpoint)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- real tools
CLASSIFIER_CFG = '''
default_scope = 'mmpretrain'
custom_imports = dict(imports=['mmtwins.models', 'mmtwins.engine', 'fault_hooks'],
                      allow_failed_imports=False)
arch = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[2, 2, 2, 2],
            depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], window_sizes=[7, None, 7, None])
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=2, mean=[127.5] * 3, std=[57.0] * 3, to_rgb=True),
    backbone=dict(type='mmtwins.SVT', arch=arch, norm_after_stage=[False, False, False, True]),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=2, in_channels=64,
              loss=dict(type='CrossEntropyLoss')))
train_dataloader = dict(
    batch_size=2, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root={data_root!r}, data_prefix='train',
                 pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]))
train_cfg = dict(by_epoch=False, max_iters=8)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
default_hooks = dict(
    checkpoint=dict(type='mmtwins.AtomicCheckpointHook', interval=2, by_epoch=False),
    logger=dict(type='LoggerHook', interval=1))
custom_hooks = [dict(type='mmtwins.NonFiniteLossHook')]
randomness = dict(seed=0, deterministic=True)
'''

FAULT_HOOKS = '''
import os
import signal

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SigkillOnceHook(Hook):
    """Test fault: rank ``rank`` SIGKILLs itself after iteration ``at_iter``, once (a marker
    file next to the work dir remembers it, so the resumed run goes through)."""

    def __init__(self, at_iter, rank=0):
        self.at_iter, self.rank = at_iter, rank

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        marker = runner.work_dir.rstrip('/') + '.killed'
        due = runner.iter + 1 == self.at_iter and get_rank() == self.rank
        if due and not os.path.exists(marker):
            open(marker, 'w').close()
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    """A 2-class ImageFolder of 8 images and the configs: plain, and killed at iteration 5."""
    root = tmp_path_factory.mktemp('faults')
    rng = np.random.default_rng(0)
    for k in range(2):
        folder = root / 'data' / 'train' / f'class_{k}'
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(80 + 100 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f'{i}.png')
    (root / 'fault_hooks.py').write_text(FAULT_HOOKS)
    (root / 'cls.py').write_text(CLASSIFIER_CFG.format(data_root=str(root / 'data')))
    (root / 'cls_killed.py').write_text(
        "_base_ = './cls.py'\n"
        "custom_hooks = [dict(type='mmtwins.NonFiniteLossHook'),\n"
        "                dict(type='SigkillOnceHook', at_iter=5, rank=0)]\n")
    (root / 'cls_killed_dist.py').write_text(
        "_base_ = './cls.py'\n"
        "custom_hooks = [dict(type='SigkillOnceHook', at_iter=3, rank=1)]\n")
    return root


def start_tool(root: Path, *args, **env_vars) -> subprocess.Popen:
    """Run ``args`` from the repository root with the test's hook module importable."""
    env = dict(os.environ, PYTHONPATH=f'{root}{os.pathsep}{REPO}', OMP_NUM_THREADS='1',
               PYTHON=sys.executable, **env_vars)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> Tuple[int, str]:
    """Wait for ``proc`` (bounded: an expired timeout fails the test) -> (exit code, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f'{proc.args} did not end within {timeout} s')
    return proc.returncode, out


def start_training(root: Path, config: str, work_dir: Path, *extra) -> subprocess.Popen:
    return start_tool(root, sys.executable, 'tools/train.py', str(root / config), '--work-dir',
                      str(work_dir), *extra)


def final_state(work_dir: Path):
    ckpt = torch.load(work_dir / 'iter_8.pth', map_location='cpu', weights_only=False)
    return ckpt['meta']['iter'], ckpt['state_dict']


def test_sigkilled_run_resumes_to_the_same_weights_as_an_uninterrupted_run(classifier):
    work = classifier / 'killed'
    clean = start_training(classifier, 'cls.py', classifier / 'clean')
    killed = start_training(classifier, 'cls_killed.py', work)
    rc, out = finish(clean)
    assert rc == 0, out[-3000:]
    assert finish(killed)[0] == -signal.SIGKILL
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_4.pth')
    assert not (work / 'iter_6.pth').exists()  # iteration 5 was lost with the process
    assert not list(work.glob('.*tmp*'))

    rc, out = finish(start_training(classifier, 'cls_killed.py', work, '--resume'))
    assert rc == 0, out[-3000:]
    assert 'resumed epoch: 0, iter: 4' in out
    log = load_json_log(str(work))  # MMEngine's own text logs tell the resume (plot_logs)
    assert [resumed(f) for f in log.files] == [False, True] and not log.earlier_runs
    assert log.curves['loss'][0] == list(range(1, 9))
    it_clean, sd_clean = final_state(classifier / 'clean')
    it_resumed, sd_resumed = final_state(work)
    assert it_clean == it_resumed == 8
    assert sd_clean.keys() == sd_resumed.keys()
    for k in sd_clean:
        assert torch.equal(sd_clean[k], sd_resumed[k]), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_dying_worker_ends_the_distributed_job_with_an_error(classifier):
    """Rank 1 is SIGKILLed after iteration 3 of a 2-process gloo run; rank 0 then waits in
    DDP's all-reduce until torchrun notices and ends the job (the timeout bounds the wait)."""
    proc = start_tool(classifier, 'bash', 'tools/dist_train.sh',
                      str(classifier / 'cls_killed_dist.py'), '2', '--work-dir',
                      str(classifier / 'dist'), PORT=str(free_port()))
    rc, out = finish(proc, timeout=240)
    assert rc != 0
    assert 'Signal 9 (SIGKILL) received by PID' in out, out[-3000:]
    assert not (classifier / 'dist' / 'iter_8.pth').exists()


# ----------------------------------------------------------------------------- in-process
@MODELS.register_module(force=True)
class FaultToyModel(BaseModel):
    """y = w x + b fitted by MSE on (B, 2) inputs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, targets=None, mode='tensor', **meta):
        out = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return dict(loss=((out - torch.stack(targets))**2).mean())
        return out


@DATASETS.register_module(force=True)
class FaultToyDataset(BaseDataset):
    """8 samples in a fixed order; ``nan_at`` (an index or a list of them) makes those samples'
    inputs NaN."""

    def __init__(self, nan_at=-1, **kwargs):
        self.nan_at = {nan_at} if isinstance(nan_at, int) else set(nan_at)
        super().__init__(serialize_data=False, **kwargs)

    def load_data_list(self):
        gen = torch.Generator().manual_seed(0)
        data = []
        for i in range(8):
            x = torch.randn(2, generator=gen)
            if i in self.nan_at:
                x[0] = float('nan')
            data.append(dict(inputs=x, targets=x.sum(0, keepdim=True)))
        return data


def toy_runner(work_dir: Path, max_iters=8, nan_at=-1, skip=False, resume=False,
               load_from=None, max_keep_ckpts=-1, max_consecutive_skips=10) -> Runner:
    cfg = Config(dict(
        model=dict(type='FaultToyModel'),
        work_dir=str(work_dir),
        experiment_name=f'toy_{uuid.uuid4().hex}',
        train_dataloader=dict(
            batch_size=1, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='pseudo_collate'),
            dataset=dict(type='FaultToyDataset', nan_at=nan_at)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='mmtwins.AtomicCheckpointHook', interval=2,
                                           by_epoch=False, max_keep_ckpts=max_keep_ckpts)),
        custom_hooks=[dict(type='mmtwins.NonFiniteLossHook', skip=skip,
                           max_consecutive_skips=max_consecutive_skips)],
        default_scope='mmengine', resume=resume, load_from=load_from,
        randomness=dict(seed=0), log_level='WARNING'))
    return build_runner(cfg)  # the Runner of tools/train.py


def weights(runner: Runner):
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


def hook_of(runner: Runner, name: str) -> Hook:
    """The runner's hook of class ``name``."""
    return next(h for h in runner.hooks if type(h).__name__ == name)


class _Snapshot(Hook):
    """Records the weights after every iteration."""

    def __init__(self, store: dict):
        self.store = store

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.store[runner.iter + 1] = weights(runner)


def test_nan_loss_stops_before_the_update_naming_the_iteration(tmp_path):
    runner = toy_runner(tmp_path / 'w', nan_at=4)  # sample 4 is iteration 5
    saved = {}
    runner.register_hook(_Snapshot(saved), priority='VERY_LOW')
    with pytest.raises(FloatingPointError, match=r'loss is not finite at iteration 5: nan\. '
                       r'Training stopped before this step changed the parameters'):
        runner.train()
    assert runner.iter == 4
    for k, v in weights(runner).items():
        assert torch.isfinite(v).all() and torch.equal(v, saved[4][k])


def test_nan_loss_skip_mode_drops_the_step_and_trains_on(tmp_path):
    runner = toy_runner(tmp_path / 'w', nan_at=4, skip=True)
    saved = {}
    runner.register_hook(_Snapshot(saved), priority='VERY_LOW')
    runner.train()
    hook = hook_of(runner, 'NonFiniteLossHook')
    assert hook.skipped_iters == [5] and runner.iter == 8
    for k in saved[4]:
        assert torch.equal(saved[5][k], saved[4][k])  # the NaN step changed nothing
        assert not torch.equal(saved[6][k], saved[5][k])  # training went on
        assert torch.isfinite(saved[8][k]).all()
    # after training the optimizer wrapper is the plain one again (no guard left behind)
    assert 'update_params' not in vars(runner.optim_wrapper) and hook._wrapper is None


def test_nan_loss_skip_mode_stops_after_max_consecutive_skips(tmp_path):
    runner = toy_runner(tmp_path / 'w', nan_at=[2, 3, 4], skip=True, max_consecutive_skips=2)
    saved = {}
    runner.register_hook(_Snapshot(saved), priority='VERY_LOW')
    with pytest.raises(FloatingPointError, match=r'at iteration 5: nan; 3 consecutive steps had '
                       r'a non-finite loss \(max_consecutive_skips=2\): the run has diverged'):
        runner.train()
    hook = hook_of(runner, 'NonFiniteLossHook')
    assert hook.skipped_iters == [3, 4, 5]
    for k, v in weights(runner).items():
        assert torch.equal(v, saved[2][k])  # none of the three NaN steps changed the weights


def test_nan_loss_skip_mode_counts_only_consecutive_steps(tmp_path):
    runner = toy_runner(tmp_path / 'w', nan_at=[1, 3, 5], skip=True, max_consecutive_skips=1)
    runner.train()  # a finite step between the NaN ones resets the count
    hook = hook_of(runner, 'NonFiniteLossHook')
    assert hook.skipped_iters == [2, 4, 6] and runner.iter == 8


def _loss_guard_on_rank(rank: int, store: str) -> None:
    """Rank ``rank`` of 2 gloo processes trains through the guarded ``update_params``, its loss
    NaN on rank 1 only: both ranks stop (or, with ``skip``, both skip), then a finite step
    updates both."""
    import datetime
    import types

    import torch.distributed as dist
    from mmengine.optim import OptimWrapper

    from mmtwins.engine import NonFiniteLossHook
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.ones(2, 3)
        scale = float('nan') if rank == 1 else 1.
        own = 'nan' if rank == 1 else r'[-0-9.e]+ here, not on another rank'
        for skip in (False, True):
            hook = NonFiniteLossHook(skip=skip)
            wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
            runner = types.SimpleNamespace(optim_wrapper=wrapper, iter=2, epoch=0,
                                           train_loop=None)
            hook.before_train(runner)
            loss = model(x).sum() * scale
            if skip:
                wrapper.update_params(loss)  # no rank raises: both skip
                assert hook.skipped_iters == [3]
            else:
                with pytest.raises(FloatingPointError,
                                   match=f'at iteration 3: {own}\\. Training stopped'):
                    wrapper.update_params(loss)
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        wrapper.update_params(model(x).sum())  # finite on both ranks: both step
        assert hook.consecutive_skips == 0
        assert not torch.equal(model.bias, before['bias'])
        hook.after_train(runner)
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """A rank stopping alone would leave the others waiting in DDP's gradient all-reduce."""
    torch.multiprocessing.spawn(_loss_guard_on_rank, (str(tmp_path / 'store'), ), nprocs=2)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path):
    clean = toy_runner(tmp_path / 'clean')
    clean.train()
    expected = weights(clean)

    # A crash right after iteration 6 was saved, and the save of iteration 6 left a torn file.
    work = tmp_path / 'crashed'
    work.mkdir()
    for step in (2, 4, 6):
        shutil.copy(tmp_path / 'clean' / f'iter_{step}.pth', work)
    (work / 'last_checkpoint').write_text(str(work / 'iter_6.pth'))
    size = (work / 'iter_6.pth').stat().st_size
    with open(work / 'iter_6.pth', 'r+b') as f:
        f.truncate(size // 2)
    assert 'truncated' in checkpoint_problem(str(work / 'iter_6.pth'))
    # Newer, intact, but no training checkpoints of this run: a best-metric file (saved without
    # optimizer and schedulers) and other weights kept in the work dir.
    model_only = {'state_dict': torch.load(work / 'iter_4.pth', weights_only=False)['state_dict']}
    for name in ('best_loss_iter_6.pth', 'pretrained.pth'):
        torch.save(model_only, work / name)
    assert newest_intact_checkpoint(str(work), str(work / 'iter_6.pth')) == str(work / 'iter_4.pth')

    resumed = toy_runner(work, resume=True)
    resumed.train()
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_8.pth')
    for k, v in weights(resumed).items():
        assert torch.equal(v, expected[k]), k


def test_a_directory_checkpoint_is_left_to_its_engine(tmp_path):
    """DeepSpeed saves each checkpoint as a directory; resuming one is not refused as missing."""
    (tmp_path / 'iter_2.pth').mkdir()
    assert checkpoint_problem(str(tmp_path / 'iter_2.pth')) is None
    assert checkpoint_problem(str(tmp_path / 'iter_4.pth')) == 'the file does not exist'


def test_a_flipped_byte_inside_a_member_is_found_by_its_crc(tmp_path):
    """The zip directory and sizes are intact, so only the members' CRCs tell."""
    path = tmp_path / 'iter_2.pth'
    weights_ = torch.arange(1000, dtype=torch.float32)
    torch.save({'state_dict': {'w': weights_}}, path)
    assert checkpoint_problem(str(path)) is None
    data = bytearray(path.read_bytes())
    start = data.find(weights_.numpy().tobytes())
    assert start > 0
    at = start + 2000  # inside the tensor's storage
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    problem = checkpoint_problem(str(path))
    assert problem is not None and problem.endswith('is corrupt (CRC mismatch)'), problem
    assert 'data/0' in problem  # names the tensor's storage


def test_a_legacy_format_checkpoint_is_checked_by_reading_it(tmp_path):
    """Not a zip: read with the weights-only loader. Torn, it is damaged; holding an object that
    loader refuses, it counts as intact (nothing is unpickled to find out; resuming decides)."""
    path, other = tmp_path / 'iter_2.pth', tmp_path / 'iter_4.pth'
    torch.save({'state_dict': {'w': torch.ones(1000)}}, path, _use_new_zipfile_serialization=False)
    torch.save({'state_dict': {'w': torch.ones(1000)}, 'meta': argparse.Namespace(epoch=1)},
               other, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert checkpoint_problem(str(path)) is None and checkpoint_problem(str(other)) is None
    path.write_bytes(path.read_bytes()[:-100])
    assert 'truncated' in checkpoint_problem(str(path))


def test_the_fallback_skips_an_earlier_runs_higher_steps(tmp_path):
    """A reused work dir: an earlier run left iter_8000; this run saved iter_1000 and tore
    iter_2000."""
    for step in (8000, 1000):
        torch.save({'state_dict': {}}, tmp_path / f'iter_{step}.pth')
    (tmp_path / 'iter_2000.pth').write_bytes(b'PK\x03\x04 torn')
    assert newest_intact_checkpoint(str(tmp_path), str(tmp_path / 'iter_2000.pth')) == \
        str(tmp_path / 'iter_1000.pth')


def test_the_fallback_reads_step_numbers_through_a_format_spec(tmp_path):
    """CheckpointHook names files by ``filename_tmpl.format(step)``, so ``'epoch_{:03d}.pth'``
    is a template too; other files beside them are not training checkpoints."""
    for name in ('epoch_001.pth', 'epoch_002.pth', 'epoch_9.pt', 'best_epoch_004.pth'):
        torch.save({'state_dict': {}}, tmp_path / name)
    (tmp_path / 'epoch_003.pth').write_bytes(b'PK\x03\x04 torn')
    assert newest_intact_checkpoint(str(tmp_path), str(tmp_path / 'epoch_003.pth'),
                                    'epoch_{:03d}.pth') == str(tmp_path / 'epoch_002.pth')
    for name in ('iter_8.pth', 'iter_12.pth.bak', 'iter_11Xpth'):  # whole names, dots literal
        torch.save({'state_dict': {}}, tmp_path / name)
    assert newest_intact_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_8.pth')


def _resume_check_on_rank(rank: int, work: str, store: str) -> None:
    """Rank ``rank`` of 2 gloo processes runs the resume check, then an all-reduce (DDP's first
    gradient sum): first with ``last_checkpoint`` naming a damaged file, then with a damaged
    checkpoint given explicitly. Rank 1 reads no checkpoint and follows the main process."""
    import datetime
    import types

    import torch.distributed as dist

    from mmtwins.engine import AtomicCheckpointHook, checkpoint_hook
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    if rank == 1:
        def read(path):
            raise AssertionError(f'rank 1 read {path}')
        checkpoint_hook.checkpoint_problem = read
    try:
        hook = AtomicCheckpointHook(interval=2, by_epoch=False)
        runner = types.SimpleNamespace(cfg=Config(dict(resume=True, load_from=None)),
                                       work_dir=work)
        hook.before_run(runner)
        # every rank loads the checkpoint the pointer names once the check is over
        assert (Path(work) / 'last_checkpoint').read_text() == f'{work}/iter_2.pth'
        total = torch.ones(1)
        dist.all_reduce(total)  # timed out on rank 0 when only it had waited in a barrier
        assert total.item() == 2

        runner.cfg.load_from = f'{work}/iter_4.pth'
        with pytest.raises(CheckpointError, match=f'cannot resume from {work}/iter_4.pth: '):
            hook.before_run(runner)  # rank 1 too: a rank going on would wait for the others

        # another error of the main process (a pointer it cannot write) stops every rank too
        runner.cfg.load_from = None
        (Path(work) / 'last_checkpoint').write_text(f'{work}/iter_4.pth')
        dist.barrier()
        if rank == 0:
            def unwritable(path, data):
                raise PermissionError(f'[Errno 13] Permission denied: {path!r}')
            checkpoint_hook.atomic_write = unwritable
        expected = (PermissionError if rank == 0 else CheckpointError, 'Permission denied')
        with pytest.raises(expected[0], match=expected[1]):
            hook.before_run(runner)
    finally:
        dist.destroy_process_group()


def test_every_rank_follows_the_main_processs_resume_check(tmp_path):
    work = tmp_path / 'w'
    work.mkdir()
    torch.save({'state_dict': {}}, work / 'iter_2.pth')
    (work / 'iter_4.pth').write_bytes(b'PK\x03\x04 torn')
    (work / 'last_checkpoint').write_text(str(work / 'iter_4.pth'))
    torch.multiprocessing.spawn(_resume_check_on_rank, (str(work), str(tmp_path / 'store')),
                                nprocs=2)
    # as the last check left it: the pointer it could not rewrite
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_4.pth')


def test_resuming_an_explicitly_named_damaged_checkpoint_fails_clearly(tmp_path):
    bad = tmp_path / 'iter_4.pth'
    bad.write_bytes(b'PK\x03\x04 not really a checkpoint')
    runner = toy_runner(tmp_path / 'w', resume=True, load_from=str(bad))
    with pytest.raises(CheckpointError, match=f'cannot resume from {bad}: .*Pick another'):
        runner.train()
    assert runner.iter == 0


def test_newest_intact_checkpoint_orders_by_step_and_takes_the_hooks_names(tmp_path):
    for step in (8, 10):
        torch.save({'state_dict': {}}, tmp_path / f'epoch_{step}.pth')
        torch.save({'state_dict': {}}, tmp_path / f'iter_{step}.pth')
    (tmp_path / 'iter_9.pth').write_bytes(b'')  # newest, damaged
    assert newest_intact_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    assert newest_intact_checkpoint(str(tmp_path), filename_tmpl='epoch_{}.pth') == \
        str(tmp_path / 'epoch_10.pth')
    assert newest_intact_checkpoint(str(tmp_path), str(tmp_path / 'iter_10.pth')) == \
        str(tmp_path / 'iter_8.pth')


def test_a_remote_checkpoint_is_left_to_mmengine(tmp_path):
    """The integrity check reads local files only: a remote checkpoint to resume from is not
    refused as missing (mmengine's file backends load it)."""
    runner = toy_runner(tmp_path / 'w', resume=True, load_from='s3://bucket/run/iter_4.pth')
    hook = hook_of(runner, 'AtomicCheckpointHook')
    hook.before_run(runner)  # raised CheckpointError ('the file does not exist') before
    assert runner.cfg.load_from == 's3://bucket/run/iter_4.pth'
    with pytest.raises(CheckpointError, match='does not exist'):  # a local one is checked
        runner.cfg.load_from = str(tmp_path / 'iter_4.pth')
        hook.before_run(runner)


def test_a_remote_last_checkpoint_is_left_to_mmengine(tmp_path):
    """Checkpoints saved remotely (CheckpointHook out_dir='s3://...'): last_checkpoint in the
    work dir names a remote file, which resuming neither refuses nor replaces."""
    runner = toy_runner(tmp_path / 'w', resume=True)
    pointer = tmp_path / 'w' / 'last_checkpoint'
    pointer.write_text('s3://bucket/run/iter_4.pth')
    hook_of(runner, 'AtomicCheckpointHook').before_run(runner)
    assert pointer.read_text() == 's3://bucket/run/iter_4.pth'


def test_no_intact_checkpoint_left_fails_clearly(tmp_path):
    work = tmp_path / 'w'
    work.mkdir()
    (work / 'iter_2.pth').write_bytes(b'')
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    with pytest.raises(CheckpointError, match=r'last_checkpoint names .*iter_2.pth.*the file is '
                       r'empty, and no other intact checkpoint'):
        toy_runner(work, resume=True).train()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / 'iter_2.pth'
    AtomicLocalBackend().put(b'old checkpoint', target)

    def disk_full(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space left'):
        atomic_write(target, b'new checkpoint, half written')
    assert target.read_bytes() == b'old checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter_2.pth']  # no temporary file


def test_atomic_torch_save_streams_and_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    """torch.save writes straight into the temporary file (no bytes of the whole checkpoint in
    memory); a save that fails midway leaves the old file and no temporary one."""
    target = tmp_path / 'converted.pth'
    written = []
    save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f: (written.append(f), save(obj, f)))
    atomic_torch_save({'w': torch.arange(3.)}, target)
    assert not isinstance(written[0], (io.BytesIO, str, Path))
    assert written[0].closed  # flushed and closed before it was moved into place
    assert torch.equal(torch.load(target)['w'], torch.arange(3.))

    def fails_midway(obj, f):
        f.write(b'half a checkpoint')
        raise RuntimeError('cannot pickle')

    monkeypatch.setattr(torch, 'save', fails_midway)
    with pytest.raises(RuntimeError, match='cannot pickle'):
        atomic_torch_save({'w': torch.zeros(3)}, target)
    assert torch.equal(torch.load(target)['w'], torch.arange(3.))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['converted.pth']


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts open files in /proc')
def test_atomic_write_closes_the_temporary_file_whatever_fails(tmp_path, monkeypatch):
    """No descriptor is left open, and no temporary file, when opening the file object or
    syncing it fails."""
    def open_fds():
        return len(os.listdir('/proc/self/fd'))

    def fails(*args):
        raise OSError(5, 'Input/output error')

    before = open_fds()
    for name in ('fdopen', 'fsync'):
        with monkeypatch.context() as m:
            m.setattr(os, name, fails)
            with pytest.raises(OSError, match='Input/output'):
                atomic_write(tmp_path / 'metrics.json', '{}')
        assert open_fds() == before, name
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_atomic_write_gives_a_new_files_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / 'iter_2.pth', b'checkpoint')
        (tmp_path / 'plain.pth').write_bytes(b'checkpoint')
    finally:
        os.umask(old)
    mode = (tmp_path / 'iter_2.pth').stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / 'plain.pth').stat().st_mode & 0o777


def test_old_checkpoints_are_pruned_only_after_the_new_one_is_saved(tmp_path, monkeypatch):
    """MMEngine deletes the oldest checkpoint first: with max_keep_ckpts=1 a failed save would
    leave none at all."""
    runner = toy_runner(tmp_path / 'w', max_iters=4, max_keep_ckpts=1)
    put = AtomicLocalBackend.put

    def fail_second_save(self, obj, filepath):
        if str(filepath).endswith('iter_4.pth'):
            raise OSError(28, 'No space left on device')
        return put(self, obj, filepath)

    monkeypatch.setattr(AtomicLocalBackend, 'put', fail_second_save)
    with pytest.raises(OSError):
        runner.train()
    work = tmp_path / 'w'
    assert (work / 'last_checkpoint').read_text() == str(work / 'iter_2.pth')
    assert checkpoint_problem(str(work / 'iter_2.pth')) is None
    assert not (work / 'iter_4.pth').exists()


def test_a_checkpoint_left_unpruned_by_a_dead_run_is_deleted_on_resume(tmp_path, monkeypatch):
    """A run killed after saving iter_4.pth but before deleting iter_2.pth (max_keep_ckpts=1)
    must not leave iter_2.pth on disk for ever: the resumed run deletes it."""
    work = tmp_path / 'w'

    def killed(self, filepath):
        raise KeyboardInterrupt(f'killed before deleting {filepath}')

    with monkeypatch.context() as patch:
        patch.setattr(AtomicLocalBackend, 'remove', killed)
        with pytest.raises(KeyboardInterrupt, match='iter_2.pth'):
            toy_runner(work, max_iters=8, max_keep_ckpts=1).train()
    assert sorted(p.name for p in work.glob('*.pth')) == ['iter_2.pth', 'iter_4.pth']

    runner = toy_runner(work, max_iters=8, max_keep_ckpts=1, resume=True)
    runner.train()
    assert runner.iter == 8
    assert sorted(p.name for p in work.glob('*.pth')) == ['iter_8.pth']


@METRICS.register_module(force=True)
class FaultToyError(BaseMetric):
    """Mean absolute error of :class:`FaultToyModel` on its test samples."""

    def process(self, data_batch, data_samples):
        for out, target in zip(data_samples, data_batch['targets']):
            self.results.append((out - target).abs().item())

    def compute_metrics(self, results):
        return dict(mae=float(np.mean(results)))


@pytest.mark.parametrize('main_process', [True, False])
def test_test_metrics_json_is_written_by_the_main_process_only(tmp_path, monkeypatch,
                                                               main_process):
    """MMEngine's LoggerHook dumps the test metrics from every rank into the one file the ranks
    share; two ranks writing it at once left torn JSON in a 2-process dist_test.sh run."""
    monkeypatch.setattr('mmtwins.engine.logger_hook.is_main_process', lambda: main_process)
    data = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='pseudo_collate'), dataset=dict(type='FaultToyDataset'))
    runner = build_runner(Config(dict(
        model=dict(type='FaultToyModel'), work_dir=str(tmp_path), default_scope='mmengine',
        test_dataloader=data, test_evaluator=dict(type='FaultToyError'), test_cfg=dict(),
        default_hooks=dict(logger=dict(type='mmtwins.AtomicLoggerHook')), log_level='WARNING')))
    metrics = runner.test()
    written = list(tmp_path.glob('*/*.json'))
    if not main_process:
        assert written == []
        return
    [path] = written
    logged = json.loads(path.read_text())
    assert logged['mae'] == pytest.approx(metrics['mae']) and metrics['mae'] > 0
    assert [p.name for p in path.parent.iterdir() if p.name.startswith('.')] == []  # no temp file


def test_atomic_write_creates_the_folder_takes_a_bare_name_and_syncs_the_rename(
        tmp_path, monkeypatch):
    """The file's data, then its directory entry, reach the disk (fsync of each); a path in
    folders not there yet, and a bare file name (the current directory), are written."""
    import stat
    synced, fsync = [], os.fsync

    def record(fd):
        synced.append('dir' if stat.S_ISDIR(os.fstat(fd).st_mode) else 'file')
        fsync(fd)

    monkeypatch.setattr(os, 'fsync', record)
    atomic_write(tmp_path / 'new' / 'deeper' / 'metrics.json', '{}')
    assert (tmp_path / 'new' / 'deeper' / 'metrics.json').read_text() == '{}'
    assert synced == ['file', 'dir']
    monkeypatch.chdir(tmp_path)
    atomic_write('plain.json', b'x')
    assert (tmp_path / 'plain.json').read_bytes() == b'x'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['new', 'plain.json']
