"""tools/train.py, tools/test.py and the launchers: options, scopes, 2-process CPU runs, slurm."""
import datetime
import gc
import importlib.util
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import weakref
from importlib.metadata import version
from pathlib import Path
from typing import Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from timm.models.twins import Twins

from mmtwins.apis import (allow_mmengine_checkpoints, apply_tta, build_runner,
                          owned_process_group, setup_cpu_distributed)
from mmtwins.apis import runner as runner_api
from mmtwins.apis import test as test_api
from mmtwins.apis import train as train_api
from mmtwins.engine import ConfigError

from coco_toy import REPO, load_tiny_config, make_coco_toy, write_tiny_det_config

pytestmark = pytest.mark.usefixtures('one_torch_thread')
RETINANET = str(REPO / 'configs' / 'retinanet_twins_svt_s_1x.py')
UPERNET = str(REPO / 'configs' / 'upernet_twins_svt_s_160k_ade20k.py')


def test_train_options_map_to_config(tmp_path):
    args = train_api.parse_args([
        RETINANET, '--work-dir', str(tmp_path), '--amp', '--auto-scale-lr', '--cfg-options',
        'train_dataloader.batch_size=4', 'model.backbone.init_cfg.checkpoint=my.pth', '--resume'
    ])
    cfg = train_api.build_train_cfg(args)
    assert cfg.work_dir == str(tmp_path) and cfg.launcher == 'none'
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.model.backbone.init_cfg.checkpoint == 'my.pth'
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'dynamic')
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert (cfg.resume, cfg.load_from) == (True, None)  # latest checkpoint of the work dir

    with pytest.raises(ValueError, match=r'--auto-scale-lr needs auto_scale_lr=dict\('):
        train_api.build_train_cfg(train_api.parse_args(
            [RETINANET, '--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None']))

    cfg = train_api.build_train_cfg(train_api.parse_args(
        [RETINANET, '--amp', '--cfg-options', 'optim_wrapper.loss_scale=512']))
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 512)

    cfg = train_api.build_train_cfg(train_api.parse_args([RETINANET, '--resume', 'x/epoch_3.pth']))
    assert (cfg.resume, cfg.load_from) == (True, 'x/epoch_3.pth')
    assert cfg.work_dir == os.path.join('./work_dirs', 'retinanet_twins_svt_s_1x')
    assert (cfg.resume, cfg.optim_wrapper.type) == (True, 'OptimWrapper')


def test_test_options_for_a_segmentation_config(tmp_path):
    """The same tools/test.py on an mmseg config: mmseg's --tta swap and --out directory."""
    config = tmp_path / 'fcn.py'
    config.write_text("_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'\n")
    args = test_api.parse_args([str(config), 'seg.pth', '--tta', '--out', str(tmp_path / 'maps')])
    cfg = test_api.build_test_cfg(args)
    assert cfg.default_scope == 'mmseg' and cfg.load_from == 'seg.pth'
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module.type == 'EncoderDecoder'
    assert cfg.test_dataloader.dataset.pipeline[1].type == 'TestTimeAug'
    assert cfg.test_evaluator.output_dir == str(tmp_path / 'maps')
    assert cfg.test_evaluator.keep_results is True


def test_test_amp_enables_autocast_and_warns_where_bf16_is_emulated(monkeypatch):
    from mmtwins.apis import config as config_api
    warnings = []
    monkeypatch.setattr(config_api, 'print_log', lambda msg, **kw: warnings.append(msg))
    monkeypatch.setattr(config_api, 'cpu_amp_is_emulated', lambda: True)
    monkeypatch.setattr(test_api, 'get_device', lambda: 'cpu')
    cfg = test_api.build_test_cfg(test_api.parse_args([UPERNET, 'c.pth', '--amp']))
    assert cfg.test_cfg.type == 'TestLoop' and cfg.test_cfg.fp16 is True
    assert len(warnings) == 1 and 'bf16 autocast is emulated' in warnings[0]
    monkeypatch.setattr(config_api, 'cpu_amp_is_emulated', lambda: False)
    test_api.build_test_cfg(test_api.parse_args([UPERNET, 'c.pth', '--amp']))
    assert len(warnings) == 1
    # detectors: mmcv's CPU NMS has no bf16 kernel (RuntimeError: expected scalar type Float
    # but found BFloat16), so the tool refuses on a CPU and goes on on a GPU
    with pytest.raises(ValueError, match="--amp on a CPU .* mmcv's CPU NMS takes float32"):
        test_api.build_test_cfg(test_api.parse_args([RETINANET, 'c.pth', '--amp']))
    monkeypatch.setattr(test_api, 'get_device', lambda: 'cuda')
    cfg = test_api.build_test_cfg(test_api.parse_args([RETINANET, 'c.pth', '--amp']))
    assert cfg.test_cfg.fp16 is True


def test_test_option_errors():
    with pytest.raises(ValueError, match=r'--out must name a \.pkl/\.pickle file for mmdet'):
        test_api.build_test_cfg(test_api.parse_args([RETINANET, 'c.pth', '--out', 'r.json']))
    # mmseg configs need their own (mmpretrain's get its default flip averaging)
    cfg = Config(dict(default_scope='mmseg', model=dict(type='EncoderDecoder')))
    with pytest.raises(ValueError, match='--tta needs tta_model and tta_pipeline'):
        apply_tta(cfg)


def test_tta_of_a_detector_config_without_its_own_takes_mmdets_default():
    """As mmdet's tools/test.py: DetTTAModel over each image and its flip, the flips made from
    the innermost dataset's pipeline."""
    cfg = Config.fromfile(RETINANET)
    test_pipeline = cfg.test_dataloader.dataset.pipeline
    cfg.pop('tta_model'), cfg.pop('tta_pipeline')
    cfg.test_dataloader.dataset = dict(  # wrapped twice: the innermost pipeline is taken
        type='ClassBalancedDataset', oversample_thr=0.,
        dataset=dict(type='RepeatDataset', times=1, dataset=cfg.test_dataloader.dataset))
    apply_tta(cfg)
    assert cfg.model.type == 'DetTTAModel' and cfg.model.module.type == 'RetinaNet'
    assert cfg.model.tta_cfg.nms.iou_threshold == 0.5 and cfg.model.tta_cfg.max_per_img == 100
    pipeline = cfg.test_dataloader.dataset.pipeline
    assert pipeline[:-1] == test_pipeline[:-1] and pipeline[-1].type == 'TestTimeAug'
    flips, (pack, ) = pipeline[-1].transforms
    assert [f.prob for f in flips] == [1., 0.] and pack.type == 'PackDetInputs'
    assert {'flip', 'flip_direction'} <= set(pack.meta_keys)  # DetTTAModel un-flips by them
    cfg = Config.fromfile(RETINANET)  # the config's own are kept
    cfg.tta_model.tta_cfg.max_per_img = 7
    apply_tta(cfg)
    assert cfg.model.tta_cfg.max_per_img == 7


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """A machine without GPUs: torch sees none, and no NVIDIA device files exist."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(runner_api, 'NVIDIA_DEVICES', str(tmp_path / 'nvidia[0-9]*'))
    return tmp_path


def test_cpu_launchers_other_than_pytorch_fail_clearly(no_gpu):
    assert setup_cpu_distributed(Config(dict(launcher='none'))) is False
    with pytest.raises(ConfigError, match='needs GPUs.*tools/dist_train.sh'):
        setup_cpu_distributed(Config(dict(launcher='slurm')))


@pytest.mark.parametrize('device', ['npu', 'mlu', 'musa'])
def test_other_accelerators_are_left_to_mmengines_launcher(no_gpu, monkeypatch, device):
    """mmengine's launcher sets up NPUs, MLUs and MUSA devices (hccl, cncl, mccl): no gloo
    group on the CPUs there, and AMP training is not refused."""
    monkeypatch.setattr(runner_api, f'is_{device}_available', lambda: True)
    assert setup_cpu_distributed(Config(dict(launcher='pytorch'))) is False
    assert not torch.distributed.is_initialized()
    train_api.check_amp_device(Config(dict(optim_wrapper=dict(type='AmpOptimWrapper'))))


def test_gpus_that_torch_cannot_use_stop_a_distributed_run(no_gpu, monkeypatch):
    """A CUDA build of torch with a driver too old for it sees no GPU: a distributed run is
    refused with that diagnosis rather than started on the CPUs, unless the GPUs are hidden on
    purpose."""
    (no_gpu / 'nvidia0').touch()
    (no_gpu / 'nvidiactl').touch()  # not a GPU
    monkeypatch.setattr(torch.backends.cuda, 'is_built', lambda: True)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    assert runner_api.gpus_torch_cannot_use() == str(no_gpu / 'nvidia0')
    for launcher in ('pytorch', 'slurm'):
        with pytest.raises(ConfigError, match=f'--launcher {launcher}: this machine has NVIDIA '
                           r'GPUs \(.*nvidia0\), but torch .* cannot use them.*driver is older'
                           '.*CUDA_VISIBLE_DEVICES= to run on the CPUs'):
            setup_cpu_distributed(Config(dict(launcher=launcher)))
    assert setup_cpu_distributed(Config(dict(launcher='none'))) is False
    for hidden in ('', '-1'):
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', hidden)
        assert runner_api.gpus_torch_cannot_use() is None
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1')
    assert runner_api.gpus_torch_cannot_use() is not None
    monkeypatch.setattr(torch.backends.cuda, 'is_built', lambda: False)  # a CPU-only torch
    assert runner_api.gpus_torch_cannot_use() is None


def test_only_numbered_nvidia_device_files_are_gpus(tmp_path):
    """Where the driver is loaded /dev also holds nvidiactl, nvidia-uvm, nvidia-modeset and
    nvidia-caps; one nvidiaN per GPU."""
    pattern = Path(runner_api.NVIDIA_DEVICES)
    assert pattern.parent == Path('/dev')
    for name in ('nvidia0', 'nvidia1', 'nvidia15', 'nvidiactl', 'nvidia-uvm', 'nvidia-uvm-tools',
                 'nvidia-modeset', 'nvidia-caps'):
        (tmp_path / name).touch()
    assert sorted(p.name for p in tmp_path.glob(pattern.name)) == ['nvidia0', 'nvidia1',
                                                                   'nvidia15']


def test_gpus_torch_cannot_use_none_without_device_files_or_when_torch_uses_them(no_gpu,
                                                                                 monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, 'is_built', lambda: True)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    assert runner_api.gpus_torch_cannot_use() is None  # a machine without GPUs
    for name in ('nvidia1', 'nvidia0'):
        (no_gpu / name).touch()
    assert runner_api.gpus_torch_cannot_use() == f'{no_gpu / "nvidia0"}, {no_gpu / "nvidia1"}'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert runner_api.gpus_torch_cannot_use() is None


def test_cpu_launch_takes_the_configs_timeout_and_turns_off_sync_bn(no_gpu, monkeypatch):
    """As mmengine's init_dist: env_cfg.dist_cfg.timeout (seconds) reaches the gloo group;
    SyncBN, GPU-only in torch, is turned off in the model and at the top (sync_bn)."""
    for key, value in dict(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    seen = {}
    init = torch.distributed.init_process_group
    monkeypatch.setattr(torch.distributed, 'init_process_group',
                        lambda **kw: seen.update(kw) or init(**kw))
    cfg = Config(dict(launcher='pytorch', sync_bn='torch', env_cfg=dict(dist_cfg=dict(timeout=77)),
                      model=dict(neck=dict(norm_cfg=dict(type='SyncBN')))))
    with owned_process_group():
        assert setup_cpu_distributed(cfg) is True
    assert seen == dict(backend='gloo', timeout=datetime.timedelta(seconds=77))
    assert cfg.sync_bn is None and cfg.model.neck.norm_cfg.type == 'BN'
    assert cfg.env_cfg.dist_cfg.backend == 'gloo' and cfg.model_wrapper_cfg.device_ids is None
    monkeypatch.setenv('MASTER_PORT', str(_free_port()))
    cfg = Config(dict(launcher='pytorch', sync_bn='mmcv', model=dict()))  # either kind
    with owned_process_group():
        setup_cpu_distributed(cfg)
    assert cfg.sync_bn is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, timeout=300, **env):
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _init_gloo():
    torch.distributed.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)


def test_entry_points_destroy_the_process_group_their_run_created():
    """A gloo group left alive at exit can abort the process (SIGABRT seen in a 2-process run):
    train/test destroy the group created inside their run, also on an error, and leave one
    that existed before alone."""
    with owned_process_group():
        _init_gloo()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match='boom'), owned_process_group():
        _init_gloo()
        raise RuntimeError('boom')
    assert not torch.distributed.is_initialized()
    _init_gloo()
    try:
        with owned_process_group():
            pass
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_runner_type_is_found_in_the_configs_scope():
    """A runner registered in mmdet's registry without a scope prefix, as mmdet's own tools
    find it (tools/test.py runs no preflight check, which would set the scope)."""
    from mmdet.registry import RUNNERS as DET_RUNNERS

    class ToyRunner:
        @classmethod
        def from_cfg(cls, cfg):
            return cls

    DET_RUNNERS.register_module(module=ToyRunner, force=True)
    try:
        cfg = Config(dict(default_scope='mmdet', runner_type='ToyRunner'))
        with DefaultScope.overwrite_default_scope('mmengine'):
            assert build_runner(cfg) is ToyRunner
    finally:
        DET_RUNNERS.module_dict.pop('ToyRunner')


def test_process_group_outlives_no_run_object_that_holds_it():
    """A DDP model kept in a reference cycle (as mmengine's runner keeps it) holds the group past
    ``destroy_process_group``; the block frees such objects before it destroys the group, so the
    group does not live on into interpreter shutdown (where gloo aborted a 2-process CPU run)."""

    class Run:  # a reference cycle holding a DDP model, like Runner <-> its loops
        def __init__(self):
            self.me = self
            self.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))

    enabled = gc.isenabled()
    gc.disable()  # only the block may collect the cycle
    try:
        with owned_process_group():
            _init_gloo()
            run = Run()
            run.model(torch.randn(2, 4)).sum().backward()
            model = weakref.ref(run.model)
            del run
            assert model() is not None
        assert model() is None and not torch.distributed.is_initialized()

        models = []

        def fail():  # a run that fails: its frame, in the traceback, still holds the run
            run = Run()
            run.model(torch.randn(2, 4)).sum().backward()
            models.append(weakref.ref(run.model))
            raise RuntimeError('boom')

        with pytest.raises(RuntimeError, match='boom'), owned_process_group():
            _init_gloo()
            fail()
        assert models[0]() is None and not torch.distributed.is_initialized()

        def interrupted():  # Ctrl-C: not an Exception, the same clean-up
            run = Run()
            models.append(weakref.ref(run.model))
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt), owned_process_group():
            _init_gloo()
            interrupted()
        assert models[1]() is None and not torch.distributed.is_initialized()
    finally:
        if enabled:
            gc.enable()


def test_dist_train_and_dist_test_two_cpu_processes(tmp_path):
    data = make_coco_toy(tmp_path / 'coco', num_images=4)
    tiny, _ = write_tiny_det_config(tmp_path, 'retinanet_twins_svt_s_1x.py', data, max_epochs=2,
                                    batch_size=1)
    # The resolved config as one file: each process then skips mmengine's mmdet:: look-ups.
    config = tmp_path / 'retinanet_flat.py'
    load_tiny_config(tiny).dump(str(config))
    work = tmp_path / 'work'
    _run(['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', str(work)],
         PORT=str(_free_port()))
    allow_mmengine_checkpoints()
    ckpt = torch.load(work / 'epoch_2.pth', map_location='cpu')  # weights_only=True
    # 4 images, 1 per process and step, 2 processes: 2 iterations per epoch.
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (2, 4)

    out = tmp_path / 'preds.pkl'
    _run(['bash', 'tools/dist_test.sh', str(config), str(work / 'epoch_2.pth'), '2', '--out',
          str(out), '--work-dir', str(tmp_path / 'test')], PORT=str(_free_port()))
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert sorted(p['img_id'] for p in preds) == [1, 2, 3, 4]  # gathered from both ranks
    [metrics_file] = (tmp_path / 'test').glob('*/*.json')
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics['coco/bbox_mAP'] <= 1 and 0 <= metrics['coco/bbox_mAP_50'] <= 1


def _fake_srun(tmp_path: Path) -> Tuple[Path, Path]:
    """A bin folder whose srun records its arguments, one a line, in the file returned."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    record = tmp_path / 'srun.args'
    (bin_dir / 'srun').write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / 'srun').chmod(0o755)
    return bin_dir, record


@pytest.mark.parametrize('script,args,tail', [
    ('slurm_train.sh', ['part', 'job', 'cfg.py', 'work', '--resume'],
     ['train.py', 'cfg.py', '--work-dir=work', '--launcher=slurm', '--resume']),
    ('slurm_test.sh', ['part', 'job', 'cfg.py', 'ckpt.pth', '--tta'],
     ['test.py', 'cfg.py', 'ckpt.pth', '--launcher=slurm', '--tta']),
])
def test_slurm_scripts_call_srun(tmp_path, script, args, tail):
    bin_dir, record = _fake_srun(tmp_path)
    _run(['bash', f'tools/{script}', *args], GPUS='16', SRUN_ARGS='--qos=high',
         PATH=f'{bin_dir}:{os.environ["PATH"]}')
    argv = record.read_text().split('\n')[:-1]
    assert argv[:9] == ['-p', 'part', '--job-name=job', '--gres=gpu:8', '--ntasks=16',
                        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
                        '--qos=high']
    assert argv[9:11] == [sys.executable, '-u']
    assert argv[11] == str(REPO / 'tools' / tail[0]) and argv[12:] == tail[1:]


@pytest.mark.parametrize('cmd', [
    ['tools/dist_train.sh', 'cfg.py'],  # no GPU count
    ['tools/dist_train.sh', 'cfg.py', '0'],
    ['tools/dist_train.sh', 'cfg.py', '2x'],
    ['tools/dist_train.sh', 'cfg.py', '--resume'],
    ['tools/dist_test.sh', 'cfg.py', 'ckpt.pth'],  # no GPU count
    ['tools/dist_test.sh', 'cfg.py', 'ckpt.pth', '0'],
    ['tools/slurm_train.sh', 'part', 'job', 'cfg.py'],  # no WORK_DIR
    ['tools/slurm_train.sh', 'part', 'job', 'cfg.py', '--resume'],  # mmseg's argument order
    ['tools/slurm_test.sh', 'part', 'job', 'cfg.py'],  # no CHECKPOINT
    ['tools/slurm_test.sh', 'part', 'job', 'cfg.py', '--tta'],  # an option where it goes
])
def test_launch_scripts_answer_a_missing_or_malformed_argument_with_the_usage(tmp_path, cmd):
    """Not bash's 'unbound variable', nor a launch with a GPU count that is none or an option
    taken for WORK_DIR / CHECKPOINT."""
    bin_dir, record = _fake_srun(tmp_path)
    proc = subprocess.run(['bash', *cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
                                   PYTHON=sys.executable, PORT=str(_free_port())))
    assert proc.returncode == 2 and proc.stderr.startswith(
        f'usage: {Path(cmd[0]).name} '), proc.stderr
    assert not record.exists()


@pytest.mark.parametrize('script,args,tail', [
    ('slurm_train.sh', ['part', 'job', 'cfg.py', 'work'],
     ['train.py', 'cfg.py', '--work-dir=work', '--launcher=slurm']),
    ('slurm_test.sh', ['part', 'job', 'cfg.py', 'ckpt.pth'],
     ['test.py', 'cfg.py', 'ckpt.pth', '--launcher=slurm']),
])
def test_slurm_scripts_find_the_tools_by_the_submit_dir_only_when_run_from_a_copy(
        tmp_path, script, args, tail):
    """sbatch runs a copy of the script from its spool directory, in another working directory
    (sbatch --chdir): it takes the tools of SLURM_SUBMIT_DIR; the script itself, run inside an
    allocation submitted from elsewhere, takes its own."""
    bin_dir, record = _fake_srun(tmp_path)
    spool = tmp_path / 'spool'
    spool.mkdir()
    shutil.copy(REPO / 'tools' / script, spool / 'slurm_script')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    for path, submit_dir in ((spool / 'slurm_script', REPO), (REPO / 'tools' / script, elsewhere)):
        subprocess.run(['bash', str(path), *args], cwd=elsewhere, check=True,
                       env=dict(os.environ, PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(submit_dir),
                                PATH=f'{bin_dir}:{os.environ["PATH"]}'))
        argv = record.read_text().split('\n')[:-1]
        assert argv[-len(tail):] == [str(REPO / 'tools' / tail[0]), *tail[1:]]
        record.unlink()


@pytest.mark.parametrize('script,args', [
    ('dist_train.sh', ['cfg.py', '2']),
    ('dist_test.sh', ['cfg.py', 'ckpt.pth', '2']),
    ('slurm_train.sh', ['part', 'job', 'cfg.py', 'work']),
    ('slurm_test.sh', ['part', 'job', 'cfg.py', 'ckpt.pth']),
])
def test_every_launch_script_runs_the_python_it_names(tmp_path, script, args):
    """Each script takes its interpreter from launch_python.sh: here the .venv of its checkout
    (a stub that records how it was called), named on stderr."""
    checkout = tmp_path / 'checkout'
    (checkout / 'tools').mkdir(parents=True)
    for name in (script, 'launch_python.sh'):
        shutil.copy(REPO / 'tools' / name, checkout / 'tools')
    record = tmp_path / 'python.args'
    venv_python = checkout / '.venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > {record}\n')
    venv_python.chmod(0o755)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text('#!/bin/bash\nshift 2  # -p PARTITION\n'
                                 'while [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / 'srun').chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHON', 'VIRTUAL_ENV', 'CONDA_DEFAULT_ENV', 'SLURM_SUBMIT_DIR')}
    proc = subprocess.run(['bash', str(checkout / 'tools' / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=dict(env, PATH=f'{bin_dir}:{env["PATH"]}', PORT=str(_free_port())))
    assert proc.returncode == 0, proc.stderr
    chosen = str(checkout / 'tools' / '..' / '.venv' / 'bin' / 'python')
    assert f'{script}: running the tools with {chosen}\n' in proc.stderr
    assert record.read_text().split('\n')[0] == chosen


def test_launch_scripts_name_the_python_they_found_on_the_path(tmp_path):
    """An activated environment's python is named by its path, a missing one as not found."""
    env_bin = tmp_path / 'env' / 'bin'
    env_bin.mkdir(parents=True)
    (env_bin / 'python').write_text('#!/bin/sh\n')
    (env_bin / 'python').chmod(0o755)
    clean = {k: v for k, v in os.environ.items()
             if k not in ('PYTHON', 'VIRTUAL_ENV', 'CONDA_DEFAULT_ENV')}
    for extra, named in ((dict(VIRTUAL_ENV=str(tmp_path / 'env')), str(env_bin / 'python')),
                         (dict(PYTHON=str(tmp_path / 'nowhere')),
                          f'{tmp_path / "nowhere"} (not found)')):
        proc = subprocess.run(
            ['bash', '-c', f'TOOLS={tmp_path}/tools; source {REPO}/tools/launch_python.sh'],
            capture_output=True, text=True, check=True,
            env=dict(clean, PATH=f'{env_bin}:{clean["PATH"]}', **extra))
        assert proc.stderr == f'bash: running the tools with {named}\n'


def test_launch_scripts_take_the_activated_environments_python(tmp_path):
    """PYTHON as given, else an activated virtualenv's or conda environment's (not base's)
    python, else the checkout's .venv, else python; the choice is named on stderr."""
    def chosen(with_venv: bool, **env) -> str:
        checkout = tmp_path / ('with' if with_venv else 'without')
        (checkout / 'tools').mkdir(parents=True, exist_ok=True)
        if with_venv:
            (checkout / '.venv' / 'bin').mkdir(parents=True, exist_ok=True)
            (checkout / '.venv' / 'bin' / 'python').touch(mode=0o755)
        clean = {k: v for k, v in os.environ.items()
                 if k not in ('PYTHON', 'VIRTUAL_ENV', 'CONDA_DEFAULT_ENV')}
        proc = subprocess.run(
            ['bash', '-c', f'TOOLS={checkout}/tools; source {REPO}/tools/launch_python.sh; '
             'echo "$PYTHON"'], capture_output=True, text=True, env=dict(clean, **env),
            check=True)
        assert 'running the tools with' in proc.stderr
        return proc.stdout.strip()

    venv = str(tmp_path / 'with' / 'tools' / '..' / '.venv' / 'bin' / 'python')
    assert chosen(True) == venv
    assert chosen(True, CONDA_DEFAULT_ENV='base') == venv
    assert chosen(True, VIRTUAL_ENV='/opt/env') == 'python'
    assert chosen(True, CONDA_DEFAULT_ENV='twins') == 'python'
    assert chosen(True, PYTHON='/usr/bin/python3', VIRTUAL_ENV='/opt/env') == '/usr/bin/python3'
    assert chosen(False) == 'python'


def test_cpu_distributed_runs_turn_syncbn_into_bn():
    from mmtwins.apis.runner import _sync_bn_to_bn
    cfg = Config.fromfile(str(REPO / 'configs/upernet_twins_svt_s_160k_ade20k.py'))
    assert 'SyncBN' in str(cfg.model)
    assert _sync_bn_to_bn(cfg.model)
    assert 'SyncBN' not in str(cfg.model) and cfg.model.decode_head.norm_cfg.type == 'BN'
    assert cfg.model.auxiliary_head.norm_cfg.type == 'BN'


def test_amp_training_without_a_gpu_fails_before_anything_is_built(monkeypatch):
    """mmengine's AmpOptimWrapper asserts a GPU when the Runner builds it, after the model and
    the data; ``main`` refuses at once, for ``--amp`` and for a config's own wrapper."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)

    def must_not_run(*args, **kwargs):
        raise AssertionError('reached after the AMP check')

    monkeypatch.setattr(train_api, 'preflight_check', must_not_run)
    monkeypatch.setattr(train_api, 'build_runner', must_not_run)
    with pytest.raises(SystemExit, match='^train.py: error: AMP training .* needs a GPU, NPU, '
                       'MLU or MUSA'):
        train_api.main([RETINANET, '--amp'])
    amp = Config(dict(optim_wrapper=dict(type='mmengine.AmpOptimWrapper')))
    with pytest.raises(ConfigError, match='AMP training'):
        train_api.check_amp_device(amp)
    train_api.check_amp_device(Config(dict(optim_wrapper=dict(type='OptimWrapper'))))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    train_api.check_amp_device(amp)


def test_train_and_test_print_a_refusal_as_one_line(tmp_path):
    """A config the preflight check refuses, or options it cannot take, end the tools with the
    message alone (exit status 1, no traceback), before anything is built."""
    cfg = Config.fromfile(RETINANET)
    cfg.model.backbone.drop_path_rat = 0.1
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_coco')
    config = tmp_path / 'retinanet.py'
    cfg.dump(str(config))
    cases = [
        ('train.py', [], r'config .*retinanet.py has \d+ problems:\n  - model.backbone.'
         "drop_path_rat: SVT has no argument 'drop_path_rat'; did you mean 'drop_path_rate'"),
        ('train.py', ['--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None'],
         '--auto-scale-lr needs auto_scale_lr=dict'),
        ('test.py', ['ckpt.pth', '--out', 'preds.json'],
         '--out must name a .pkl/.pickle file for mmdet')]
    if not runner_api.accelerator_available() and not runner_api.gpus_torch_cannot_use():
        cases.append(('test.py', ['ckpt.pth', '--launcher', 'slurm'],  # a machine without GPUs
                      '--launcher slurm needs GPUs, and this machine has none'))
    for tool, args, message in cases:
        proc = subprocess.run([sys.executable, f'tools/{tool}', str(config), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
        assert re.search(f'(^|\n){tool}: error: {message}', proc.stderr), proc.stderr[-3000:]


def test_runtime_requirements_hold_for_the_pinned_and_installed_stack():
    """setup.py's install_requires (requirements/runtime.txt) admit the versions that
    requirements/constraints.txt pins and the ones installed here."""
    spec = importlib.util.spec_from_file_location('mmtwins_setup', REPO / 'setup.py')
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    pins = {}
    for req in map(Requirement, setup.read_requirements('requirements/constraints.txt')):
        exact = [s.version for s in req.specifier if s.operator in ('==', '===')]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    requirements = list(map(Requirement, setup.read_requirements('requirements/runtime.txt')))
    assert {'mmcv', 'mmdet', 'numpy'} <= {r.name for r in requirements if r.specifier}
    for req in requirements:
        for source, found in (('pinned', pins.get(canonicalize_name(req.name))),
                              ('installed', version(req.name))):
            assert found is None or req.specifier.contains(found, prereleases=True), \
                f'{req} does not admit the {source} {req.name} {found}'


def test_classifier_converter_runs_once_as_a_tool_and_as_a_module(tmp_path):
    """tools/model_converters/twins2mmpretrain.py and the metafiles' ``python -m
    mmtwins.classification.convert`` convert a classifier without runpy's RuntimeWarning about a
    module imported before it runs as ``__main__``."""
    peer = Twins(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
                 depths=(1, 1, 1, 1), num_classes=10)  # a tiny PCPVT in the authors' layout
    src = tmp_path / 'authors.pth'
    torch.save({'model': peer.state_dict()}, src)
    outputs = []
    for entry in (['tools/model_converters/twins2mmpretrain.py'],
                  ['-m', 'mmtwins.classification.convert']):
        dst = tmp_path / f'{len(outputs)}' / 'cls.pth'
        proc = _run([sys.executable, *entry, str(src), str(dst)])
        assert 'found in sys.modules' not in proc.stderr, proc.stderr
        assert 'classifier with 10 classes' in proc.stdout
        outputs.append(torch.load(dst, weights_only=True))
    assert outputs[0]['meta'] == outputs[1]['meta']
    assert outputs[0]['meta']['num_classes'] == 10
    sd = outputs[0]['state_dict']
    assert sd.keys() == outputs[1]['state_dict'].keys()
    assert torch.equal(sd['head.fc.weight'], peer.state_dict()['head.weight'])


def test_setup_refuses_a_python_older_than_3_10_before_installing_anything(tmp_path):
    """An old python3 would only show as pip finding no torch, and its venv would be reused on
    every retry: both are refused at once, with what to do."""
    old = tmp_path / 'python3.8'
    # a Python 3.8 answers the version check with its exit status 10
    old.write_text('#!/bin/sh\n[ "$1" = -V ] && { echo "Python 3.8.10"; exit 0; }\n'
                   '[ "$1" = -c ] && exit 10\nexit 1\n')
    old.chmod(0o755)

    def setup(**env):
        return subprocess.run(['bash', 'tools/setup_env.sh'], cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, **env), timeout=60)

    proc = setup(MMTWINS_VENV=str(tmp_path / 'venv'), PYTHON=str(old))
    assert proc.returncode == 1 and not (tmp_path / 'venv').exists()
    assert f'{old} is Python 3.8.10; mmtwins needs 3.10 or newer' in proc.stderr
    (tmp_path / 'venv' / 'bin').mkdir(parents=True)
    shutil.copy(old, tmp_path / 'venv' / 'bin' / 'python')
    proc = setup(MMTWINS_VENV=str(tmp_path / 'venv'))
    assert proc.returncode == 1 and 'holds Python 3.8.10, older than the' in proc.stderr
    assert f'rm -rf {tmp_path / "venv"}' in proc.stderr
    broken = tmp_path / 'python3.12'  # one that fails every command is not taken for an old one
    broken.write_text('#!/bin/sh\nexit 1\n')
    broken.chmod(0o755)
    proc = setup(MMTWINS_VENV=str(tmp_path / 'venv2'), PYTHON=str(broken))
    assert proc.returncode != 0 and 'needs 3.10' not in proc.stderr


def test_cli_errors_reports_only_the_refusals_it_names():
    """A refusal of the types named is one line; anything else (a bug) keeps its traceback."""
    from mmtwins.cli import cli_errors
    with pytest.raises(SystemExit, match='^prog: error: bad value$'):
        with cli_errors('prog', (ValueError, )):
            raise ValueError('bad value')
    with pytest.raises(KeyError):
        with cli_errors('prog', (ValueError, )):
            raise KeyError('a bug')
