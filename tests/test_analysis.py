"""FLOPs/params (the paper's Table 1), the throughput benchmark and the log plots."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PCPVT, TINY_SVT
from mmengine.analysis import FlopAnalyzer
from mmengine.config import Config
from probes import analysis_tool
from torch import nn

from mmtwins.analysis import (benchmark, build_model, count_complexity, default_input_shape,
                              load_config, load_json_log, plot_logs, runnable)
from mmtwins.analysis.logs import resumed
from mmtwins.analysis.model_inputs import build_module
from mmtwins.models import SVT
from mmtwins.models.layers.attention import GlobalSubsampledAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')

# The paper's Table 1 (params with the ImageNet head, M; FLOPs at 224x224, G multiply-accumulates)
# and the authors' later fvcore re-count of the FLOPs (their README).
TABLE1 = {
    'pcpvt_s': (24.1, 3.8, 3.7),
    'pcpvt_b': (43.8, 6.7, 6.4),
    'pcpvt_l': (60.9, 9.8, 9.5),
    'svt_s': (24.0, 2.9, 2.8),
    'svt_b': (56.0, 8.6, 8.3),
    'svt_l': (99.2, 15.1, 14.8),
}


class _Attention(nn.Module):

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


def test_sdpa_handle_counts_both_attention_matmuls():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 5)
    # q @ k^T: 2*3 * 10*6 * 8 MACs; attn @ v: 2*3 * 10*6 * 5 MACs
    expected = 2 * 3 * 10 * 6 * (8 + 5)
    plain = FlopAnalyzer(_Attention(), (q, k, v))
    plain.unsupported_ops_warnings(False)
    assert plain.total() == 0, 'mmengine is expected not to see sdpa: the reason for the handle'
    assert count_complexity(_Attention(), (q, k, v)).flops == expected
    assert count_complexity(_Attention(), (q, k, v)).attention_flops == expected
    # grouped-query attention: 6 query heads share the 3 key/value heads, each a full product
    q = torch.randn(2, 6, 10, 8)
    gqa = count_complexity(_Attention(enable_gqa=True), (q, k, v))
    assert gqa.attention_flops == 2 * expected
    one_query_batch = torch.randn(1, 3, 10, 8)  # broadcast against the keys' batch of 2
    assert count_complexity(_Attention(), (one_query_batch, k, v)).attention_flops == expected


def test_gsa_flops_match_hand_count():
    dim, heads, sr, h, w = 32, 2, 2, 8, 8
    n, nk = h * w, (h // sr) * (w // sr)
    attn = GlobalSubsampledAttention(dim, heads, sr)
    x = torch.randn(1, n, dim)
    c = count_complexity(_WithHW(attn, (h, w)), (x, ))
    linear = n * dim * dim * 2 + nk * dim * 2 * dim  # q, proj; kv on the sub-sampled tokens
    conv = nk * dim * dim * sr * sr
    matmuls = 2 * n * nk * dim
    norm = 5 * nk * dim  # mmengine's estimate for an affine LayerNorm
    assert c.attention_flops == matmuls
    assert c.flops == linear + conv + matmuls + norm


class _WithHW(nn.Module):

    def __init__(self, attn, hw):
        super().__init__()
        self.attn, self.hw = attn, hw

    def forward(self, x):
        return self.attn(x, self.hw)


@pytest.mark.parametrize('variant', sorted(TABLE1))
def test_table1_params_and_flops(variant):
    """Reproduces Table 1: FLOPs within 2 %, params within 0.1 M, for the six classifiers.

    The convention: convolutions, linear layers and the attention matmuls, as multiply-
    accumulates. Without the attention matmuls the count is the authors' later fvcore figure.
    """
    params_m, flops_g, fvcore_g = TABLE1[variant]
    model = build_model(load_config(os.path.join(CONFIGS, f'twins_{variant}_in1k.py')))
    assert default_input_shape(model) == (224, 224)
    module, inputs = runnable(model, 'model', (224, 224))
    c = count_complexity(module, inputs)
    assert abs(c.params / 1e6 - params_m) <= 0.1, c.params
    assert abs(c.flops / 1e9 / flops_g - 1) <= 0.02, c.flops
    assert abs((c.flops - c.attention_flops) / 1e9 / fvcore_g - 1) <= 0.02, c.flops
    assert c.attention_flops > 0


def _tiny(config, arch, **cfg_options):
    cfg = load_config(os.path.join(CONFIGS, config), cfg_options)
    cfg.model.backbone.update(arch=arch, init_cfg=None)
    return build_model(cfg)


@pytest.mark.parametrize('config,arch', [
    ('mask_rcnn_twins_pcpvt_s_1x.py', TINY_PCPVT),  # two-stage: tensor mode needs data samples
    ('upernet_twins_svt_s_160k_ade20k.py', TINY_SVT),
])
def test_dense_models_counted_with_backbone_attention(config, arch):
    """Detectors and segmentors are counted too; only the backbone has attention matmuls."""
    dims = arch['embed_dims']
    neck = {'model.neck.in_channels': dims}
    if config.startswith('upernet'):
        neck = {'model.decode_head.in_channels': dims, 'model.auxiliary_head.in_channels': dims[2]}
    model = _tiny(config, arch, **neck)
    whole = count_complexity(*runnable(model, 'model', (64, 96)))
    backbone = count_complexity(*runnable(model, 'backbone', (64, 96)))
    assert whole.attention_flops == backbone.attention_flops > 0
    assert whole.flops > backbone.flops > 0
    assert whole.params > backbone.params == sum(p.numel() for p in model.backbone.parameters())


def test_get_flops_tool_prints_counts(capsys):
    analysis_tool('get_flops').main([os.path.join(CONFIGS, 'twins_svt_s_in1k.py'), '--shape', '224',
                             '224'])
    out = capsys.readouterr().out
    assert 'input shape: (1, 3, 224, 224)' in out
    flops = float(out.split('FLOPs: ')[1].split(' G')[0])
    params = float(out.split('params: ')[1].split(' M')[0])
    assert abs(flops / 2.9 - 1) <= 0.02 and abs(params - 24.0) <= 0.1, out


@pytest.mark.parametrize('part,amp', [('model', False), ('backbone', True)])
def test_benchmark_reports_throughput_and_memory(part, amp):
    model = _tiny('twins_svt_s_in1k.py', TINY_SVT, **{'model.head.in_channels': 64})
    module, inputs = runnable(model, part, (64, 64), batch_size=2)
    result = benchmark(module, inputs, warmup=1, repeats=3, amp=amp)
    assert len(result.runs) == 3 and all(r > 0 for r in result.runs)
    assert result.images_per_s == sorted(result.runs)[1]
    assert result.batch_size == 2 and result.input_shape == (2, 3, 64, 64)
    assert result.precision == ('amp-bf16' if amp else 'fp32')
    assert result.peak_memory_mb > 0 and result.memory_kind
    assert 'images/s' in result.summary()


def test_benchmark_tool_runs(capsys):
    analysis_tool('benchmark').main([
        os.path.join(CONFIGS, 'twins_pcpvt_s_in1k.py'), '--part', 'backbone', '--batch-size', '1',
        '--shape', '64', '64', '--warmup', '0', '--repeats', '2', '--device', 'cpu'
    ])
    out = capsys.readouterr().out
    ips = float(out.split('): ')[1].split(' images/s')[0])
    assert ips > 0 and 'median of 2 passes' in out and 'peak memory' in out, out


def test_benchmark_tool_amp_dtype(capsys):
    args = [os.path.join(CONFIGS, 'twins_svt_s_in1k.py'), '--part', 'backbone', '--batch-size',
            '1', '--shape', '64', '64', '--warmup', '0', '--repeats', '1', '--device', 'cpu']
    analysis_tool('benchmark').main(args + ['--amp', '--amp-dtype', 'fp16'])
    assert 'amp-fp16' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='--amp-dtype is the dtype of --amp'):
        analysis_tool('benchmark').main(args + ['--amp-dtype', 'fp16'])


class _CtrlCAt(nn.Module):
    """Interrupted (Ctrl-C) in its ``at``-th forward pass."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return x * 2


def test_benchmark_logs_each_pass_and_keeps_the_finished_passes_on_ctrl_c(monkeypatch, capsys):
    from mmtwins.analysis.benchmark import BenchmarkInterrupted
    x = torch.zeros(2, 3, 8, 8)
    lines = []
    with pytest.raises(BenchmarkInterrupted, match='^interrupted after 2 of 5 timed passes$') as e:
        benchmark(_CtrlCAt(4), x, warmup=1, repeats=5, log=lines.append)  # the 3rd timed pass
    assert [ln.split(':')[0] for ln in lines] == ['warm-up 1/1', 'pass 1/5', 'pass 2/5']
    assert all(ln.endswith(' s') for ln in lines)
    result = e.value.result
    assert len(result.runs) == 2 and result.images_per_s == statistics.median(result.runs)
    assert result.memory_kind and result.batch_size == 2
    with pytest.raises(KeyboardInterrupt) as e:  # in the warm-up: nothing to report
        benchmark(_CtrlCAt(2), x, warmup=2, repeats=5, log=lines.append)
    assert type(e.value) is KeyboardInterrupt
    tool = analysis_tool('benchmark')  # the tool prints the passes' lines, then their median
    monkeypatch.setattr(tool, 'build_model', lambda cfg: None)
    monkeypatch.setattr(tool, 'runnable', lambda model, part, shape, batch, device: (
        _CtrlCAt(3), torch.zeros(batch, 3, *shape)))
    with pytest.raises(SystemExit, match='^interrupted after 1 of 4 timed passes: the figures '
                       'above are of those$'):
        tool.main([os.path.join(CONFIGS, 'twins_svt_s_in1k.py'), '--batch-size', '1', '--shape',
                   '8', '8', '--warmup', '1', '--repeats', '4', '--device', 'cpu'])
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(':')[0] for ln in out[:2]] == ['warm-up 1/1', 'pass 1/4']
    assert 'images/s (median of 1 passes' in out[2] and len(out) == 3


def _write_log(path, records):
    with open(path, 'w') as f:
        f.write('\n'.join(json.dumps(r) for r in records) + '\n')


def test_plot_logs_places_epoch_metrics_at_iterations(tmp_path):
    """An epoch-based log: validation ``step`` is the epoch, drawn at its last iteration."""
    records = []
    for it in range(1, 7):
        records.append(dict(lr=1e-3 * it, loss=2.0 / it, epoch=1 + (it - 1) // 3, iter=it,
                            step=it, data_time=0.1, time=0.2, memory=10))
        if it % 3 == 0:
            records.append({'accuracy/top1': 20.0 * it, 'data_time': 0.1, 'time': 0.2,
                            'step': it // 3})
    log_dir = tmp_path / 'work' / '20250101_000000' / 'vis_data'
    log_dir.mkdir(parents=True)
    _write_log(log_dir / '20250101_000000.json', records)
    log = load_json_log(str(tmp_path / 'work'))  # a work dir: the JSON log is found
    assert log.curves['loss'] == ([1, 2, 3, 4, 5, 6], [2.0 / i for i in range(1, 7)])
    assert log.curves['accuracy/top1'] == ([3, 6], [60.0, 120.0])
    assert set(log.curves) == {'lr', 'loss', 'accuracy/top1'}  # not time, memory...
    written = plot_logs([str(tmp_path / 'work')], str(tmp_path / 'plots'))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ['accuracy_top1.png', 'loss.png', 'lr.png']
    for p in written:
        with open(p, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(KeyError, match='mIoU'):
        plot_logs([str(tmp_path / 'work')], str(tmp_path / 'plots'), keys=['mIoU'])


def test_load_config_copies_and_build_module_builds_any_model():
    """A Config passed in is left as it was; a bare backbone builds with default_scope None;
    SyncBN becomes BN (the analysis tools and the export run on one device)."""
    cfg = Config(dict(a=1))
    assert load_config(cfg, {'a': 2}).a == 2 and cfg.a == 1
    backbone = dict(type='mmtwins.SVT', arch=TINY_SVT)
    assert type(build_module(Config(dict(default_scope=None, model=backbone)))) is SVT
    cfg = load_config(os.path.join(CONFIGS, 'fpn_twins_svt_s_80k_ade20k.py'))
    cfg.model.backbone.update(arch=TINY_SVT, init_cfg=None)
    cfg.model.neck.in_channels = TINY_SVT['embed_dims']
    cfg.model.decode_head.norm_cfg = dict(type='SyncBN', requires_grad=True)
    model = build_module(cfg)
    assert not model.training
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.decode_head.modules())


def test_a_resumed_run_is_read_as_one_from_its_work_dir(tmp_path):
    """Resuming from iteration 4 wrote a second log that repeats iterations 5-6 (and validates
    at 5, before the first log's validation at 6); a folder of work dirs is not a work dir."""
    work = tmp_path / 'exp'
    runs = {'20250101_000000': range(1, 7), '20250102_000000': range(5, 9)}
    for stamp, its in runs.items():
        (work / stamp / 'vis_data').mkdir(parents=True)
        resumed = stamp.startswith('20250102')
        records = [dict(loss=it + 0.5 * resumed, lr=0.1, step=it) for it in its]
        if resumed:
            records.insert(1, dict(mIoU=5., step=5))
        _write_log(work / stamp / 'vis_data' / f'{stamp}.json',
                   records + [dict(mIoU=float(its[-1]), step=its[-1])])
    first = work / '20250101_000000' / 'vis_data' / '20250101_000000.json'
    os.utime(first, (2e9, 2e9))  # copied after the other: the time stamp in the name orders
    log = load_json_log(str(work))
    assert log.curves['loss'] == ([1, 2, 3, 4, 5, 6, 7, 8], [1., 2., 3., 4., 5.5, 6.5, 7.5, 8.5])
    assert log.curves['mIoU'] == ([5, 6, 8], [5., 6., 8.])  # in step order
    assert [os.path.basename(f) for f in log.files] == ['20250101_000000.json',
                                                        '20250102_000000.json']
    plot_logs([str(work) + '/'], str(tmp_path / 'plots'))  # legend: the work dir's name
    with pytest.raises(FileNotFoundError, match='no MMEngine JSON log'):
        load_json_log(str(tmp_path))


def test_a_work_dir_trained_into_again_from_scratch_plots_its_newest_run(tmp_path, capsys):
    """Run A (a log, its resumed log and a log with no training record), then run B trained
    from scratch into the same work dir (no --resume) and resumed from iteration 2: B's first
    log starts at a step not after the previous log's first, so A is left out and named."""
    work = tmp_path / 'exp'
    logs = {'20250101_000000': [dict(loss=float(it), lr=0.1, step=it) for it in range(1, 7)],
            '20250102_000000': [dict(loss=float(it), lr=0.1, step=it) for it in range(5, 9)],
            '20250103_000000': [dict(mIoU=9., step=8)],
            '20250104_000000': [dict(loss=it + 0.5, lr=0.2, step=it) for it in range(1, 5)],
            '20250105_000000': [dict(loss=it + 0.25, lr=0.2, step=it) for it in range(3, 6)]}
    for stamp, records in logs.items():
        (work / stamp / 'vis_data').mkdir(parents=True)
        _write_log(work / stamp / 'vis_data' / f'{stamp}.json', records)
    log = load_json_log(str(work))
    assert log.curves['loss'] == ([1, 2, 3, 4, 5], [1.5, 2.5, 3.25, 4.25, 5.25])
    assert set(log.curves) == {'loss', 'lr'}  # A's mIoU is not B's
    assert [os.path.basename(f) for f in log.files] == ['20250104_000000.json',
                                                        '20250105_000000.json']
    assert [[os.path.basename(f) for f in run] for run in log.earlier_runs] == [
        ['20250101_000000.json', '20250102_000000.json', '20250103_000000.json']]
    analysis_tool('plot_logs').main([str(work), '--out-dir', str(tmp_path / 'png')])
    out, err = capsys.readouterr()
    assert [os.path.basename(p) for p in out.split()] == ['loss.png', 'lr.png']
    assert err == (f'{work}: plotting the newest run (from 20250104_000000); left out the '
                   'earlier run(s) trained from scratch into the same work dir: 20250101_000000 '
                   '(3 logs) (pass a JSON log, TIMESTAMP/vis_data/TIMESTAMP.json, to plot one of '
                   'those)\n')
    first = work / '20250101_000000' / 'vis_data' / '20250101_000000.json'
    assert load_json_log(str(first)).curves['loss'][0] == [1, 2, 3, 4, 5, 6]  # a run picked


def test_plot_logs_tool(tmp_path, capsys):
    log = tmp_path / 'run.json'
    _write_log(log, [dict(lr=0.1, loss=1.0, step=50), dict(mIoU=30.5, aAcc=70.0, step=50),
                     dict(lr=0.1, loss=0.5, step=100), dict(mIoU=35.5, aAcc=72.0, step=100)])
    analysis_tool('plot_logs').main([str(log), '--out-dir', str(tmp_path / 'png'), '--keys', 'mIoU',
                             'loss'])
    out = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in out] == ['mIoU.png', 'loss.png']
    assert load_json_log(str(log)).curves['mIoU'] == ([50, 100], [30.5, 35.5])
    assert all(os.path.getsize(p) > 1000 for p in out)
    tool = analysis_tool('plot_logs')  # a user's mistakes end in a one-line message
    with pytest.raises(SystemExit, match=r"^plot_logs.py: error: key\(s\) \['mAP'\] are in none"):
        tool.main([str(log), '--keys', 'mAP'])
    with pytest.raises(SystemExit, match=r'^plot_logs.py: error: 2 legends for 1 logs$'):
        tool.main([str(log), '--legend', 'a', 'b'])
    with pytest.raises(SystemExit, match=r'^plot_logs.py: error: no log file or work directory'):
        tool.main([str(tmp_path / 'missing.json')])


def test_peak_live_mb_counts_live_tensor_bytes_not_the_heap():
    from mmtwins.analysis.benchmark import peak_live_mb
    keep = []

    def fn():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**21)  # 8 MiB: 12 live
        del a
        keep.append(torch.empty(2**19))  # 2 MiB kept: 10 live
        del b

    assert 12 <= peak_live_mb(fn) < 12.1
    assert peak_live_mb(lambda: None) == 0


def test_cpu_profiling_logs_nothing_to_stderr():
    # Kineto logs each profiler start and stop (and, in a CUDA build without a GPU, an ERROR):
    # in a benchmark run's output they were dozens of lines among the results.
    code = ('import torch; from mmtwins.analysis.benchmark import peak_live_mb; '
            'from mmtwins.analysis.peers import kernel_breakdown; '
            'peak_live_mb(lambda: torch.ones(8).sum()); '
            'kernel_breakdown(lambda: torch.ones(8).sum())')
    env = {k: v for k, v in os.environ.items() if k != 'KINETO_LOG_LEVEL'}
    res = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'profiler_start' not in res.stderr and 'ERROR' not in res.stderr, res.stderr


def test_runs_split_at_a_first_step_not_after_the_previous_one_and_not_at_validation_logs(
        tmp_path):
    """Run A: a log of validation records alone (tools/test.py into the work dir), then a run
    killed after one log line at step 50; run B trained from scratch, also first logged at 50;
    run C likewise, followed by a log of an epoch's validation alone (step 1, the epoch): it
    stays with C. Each earlier run is named, with its count of logs where it has several."""
    work = tmp_path / 'exp'
    logs = {'20250101_000000': [dict(mIoU=1., step=0)],
            '20250102_000000': [dict(loss=1., lr=0.1, step=50)],
            '20250103_000000': [dict(loss=2., lr=0.1, step=it) for it in (50, 100)],
            '20250104_000000': [dict(loss=it / 100, lr=0.2, step=it) for it in (50, 100, 150)],
            '20250105_000000': [dict(mIoU=3., step=1)]}
    for stamp, records in logs.items():
        (work / stamp / 'vis_data').mkdir(parents=True)
        _write_log(work / stamp / 'vis_data' / f'{stamp}.json', records)
    log = load_json_log(str(work))
    assert [os.path.basename(f) for f in log.files] == ['20250104_000000.json',
                                                        '20250105_000000.json']
    assert [[os.path.basename(f) for f in run] for run in log.earlier_runs] == [
        ['20250101_000000.json', '20250102_000000.json'], ['20250103_000000.json']]
    assert log.curves['loss'] == ([50, 100, 150], [0.5, 1.0, 1.5])
    assert log.left_out_note() == (
        f'{work}: plotting the newest run (from 20250104_000000); left out the earlier run(s) '
        'trained from scratch into the same work dir: 20250101_000000 (2 logs), '
        '20250103_000000 (pass a JSON log, TIMESTAMP/vis_data/TIMESTAMP.json, to plot one of '
        'those)')
    one = work / '20250104_000000' / 'vis_data' / '20250104_000000.json'
    assert load_json_log(str(one)).left_out_note() is None  # nothing left out: no note


def test_runs_split_where_the_text_logs_say_resumed_or_not(tmp_path):
    """With MMEngine's text logs beside the JSON ones, they decide: run A resumed from a
    checkpoint of iteration 9 (saved before its first logged step, 10) is one run, though its
    second log starts at the same step; run B, trained from scratch with a longer log interval
    (first step 50, after A's), is a new one. Where the text log says neither (no INFO lines:
    ``log_level='WARNING'``) or there is none, the steps decide: B's last two logs (first steps
    150 and 200, after B's 50) are B resumed."""
    work = tmp_path / 'exp'
    train_line = 'Iter(train) [ 10/100]  lr: 1.0000e-01  loss: 1.0\n'
    logs = {'20250101_000000': ([dict(loss=1., lr=0.1, step=it) for it in (10, 20)],
                                'Config:\ntrain_cfg = dict(max_iters=100)\n' + train_line),
            '20250102_000000': ([dict(loss=2., lr=0.1, step=it) for it in (10, 20, 30)],
                                'Load checkpoint from iter_9.pth\n'
                                'resumed epoch: 0, iter: 9\n' + train_line),
            '20250103_000000': ([dict(loss=3., lr=0.2, step=it) for it in (50, 100)],
                                'Config:\nresume = False\n' + train_line),
            '20250104_000000': ([dict(loss=4., lr=0.2, step=150)],
                                'WARNING - a warning, and no INFO line\n'),
            '20250105_000000': ([dict(loss=5., lr=0.2, step=200)], None)}
    for stamp, (records, text) in logs.items():
        (work / stamp / 'vis_data').mkdir(parents=True)
        _write_log(work / stamp / 'vis_data' / f'{stamp}.json', records)
        if text is not None:
            (work / stamp / f'{stamp}.log').write_text(text)
    log = load_json_log(str(work))
    assert [os.path.basename(f) for f in log.files] == [
        '20250103_000000.json', '20250104_000000.json', '20250105_000000.json']
    assert [[os.path.basename(f) for f in run] for run in log.earlier_runs] == [
        ['20250101_000000.json', '20250102_000000.json']]
    assert [resumed(f) for f in log.earlier_runs[0] + log.files] == [
        False, True, False, None, None]
    assert log.curves['loss'] == ([50, 100, 150, 200], [3., 3., 4., 5.])


def test_an_interrupted_benchmark_is_still_a_keyboard_interrupt():
    """A caller that stops on Ctrl-C (except KeyboardInterrupt) stops on BenchmarkInterrupted."""
    with pytest.raises(KeyboardInterrupt) as e:
        benchmark(_CtrlCAt(2), torch.zeros(1, 3, 8, 8), warmup=0, repeats=3, log=lambda _: None)
    assert type(e.value).__name__ == 'BenchmarkInterrupted' and len(e.value.result.runs) == 1
