"""The peer comparison tool's short mode (run in CI): mmtwins agrees with every installed peer."""
import collections
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from probes import analysis_tool

from mmtwins.analysis import peers
from mmtwins.analysis.benchmark import autocast_context
from mmtwins.analysis.peers import (CATEGORY_NAMES, PEERS, Entry, _warm_profiler, _Workers,
                                    available_peers, compare_case, format_markdown,
                                    kernel_breakdown, randomize_parameters_)
from mmtwins.checkpoint import convert_state_dict, load_twins_checkpoint
from mmtwins.models.layers import Mlp

ROOT = Path(__file__).resolve().parents[1]


def test_every_peer_is_installed_for_the_comparison():
    # timm is a test dependency and mmseg/mmpretrain are runtime ones: none may be missing.
    assert available_peers() == list(PEERS)


def test_a_peer_that_fails_to_import_is_left_out_and_named(monkeypatch):
    import importlib
    real = importlib.import_module

    def mmseg_asserts(name, *args):
        if name.startswith('mmseg'):
            raise AssertionError('MMCV==2.2.0 is used but incompatible')
        return real(name, *args)

    monkeypatch.setattr(importlib, 'import_module', mmseg_asserts)
    said = []
    assert available_peers(log=said.append) == ['timm', 'mmpretrain']
    assert said == ['mmseg is installed but does not import (AssertionError: MMCV==2.2.0 is '
                    'used but incompatible): left out']


@pytest.mark.parametrize('family', ['pcpvt', 'svt'])
def test_every_implementation_trains_without_dropout_or_drop_path(family):
    """The timed training steps compute the same function in all four: no stochastic depth
    (mmseg's SVT defaults to drop_path_rate 0.2) or dropout, so two steps give equal maps."""
    x = torch.randn(1, 3, 64, 64)
    for impl in ('mmtwins', *PEERS):
        model = peers.build_impl(impl, family, 'small').train()
        with torch.no_grad():
            first, second = model(x), model(x)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), impl


def test_a_disagreeing_peer_stops_the_comparison_before_any_timing(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    peer = peers.build_impl('timm', 'svt', 'small')
    assert peers.max_abs_diff_with_peer(peer, 'svt', 'small', x) < 1e-4
    peer.model.blocks[0][0].norm1.eps = 1e-3  # another function, the same weights: seen
    assert peers.max_abs_diff_with_peer(peer, 'svt', 'small', x) > 1e-4
    monkeypatch.setattr(peers, 'peer_agreement', lambda p, *args: 2e-4 if p == 'mmseg' else 0.)
    monkeypatch.setattr(peers, '_Workers', None)  # nothing may be timed
    with pytest.raises(AssertionError, match=r'mmtwins disagrees with mmseg on svt-small: max '
                       r'abs difference 0\.0002 > 0\.0001'):
        compare_case('svt', 'small', 'infer', (1, 3, 64, 64), peers=['timm', 'mmseg'])


@pytest.mark.parametrize('peer', PEERS)
def test_every_peer_computes_mmtwins_function_in_float64(peer):
    # float64 leaves only a real difference of function: mmseg's and mmpretrain's block norms
    # with their own eps 1e-5 (not the authors' 1e-6) differ by 3-4e-5 here, far beyond 1e-9.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    assert peers.max_abs_diff_with_peer(peers.build_impl(peer, 'svt', 'small'), 'svt', 'small',
                                        x) < 1e-9


@pytest.mark.parametrize('family', ['pcpvt', 'svt'])
def test_gradients_equal_timms_in_float64(family):
    """mmtwins' own backward code (the chunked MLP's autograd function, in many chunks here, and
    the token-major gradient layout) against timm's plain autograd: the input's gradient and
    every parameter's, mapped to mmtwins' names by the checkpoint converter."""
    torch.manual_seed(0)
    peer = randomize_parameters_(peers.build_impl('timm', family, 'small')).double().train()
    ours = peers.build_impl('mmtwins', family, 'small').double().train()
    load_twins_checkpoint(ours, peer.model.state_dict(), logger='silent')
    for m in ours.modules():
        if isinstance(m, Mlp):
            m.chunk_rows = 128  # 25 chunks in stage 0
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [ours(inputs[0]), peer(inputs[1])]
    weights = [torch.randn_like(o) for o in outs[0]]  # a loss that weighs every output apart
    for o in outs:
        sum((a * w).sum() for a, w in zip(o, weights)).backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-9, atol=1e-12)
    grads, head = convert_state_dict({n: p.grad for n, p in peer.model.named_parameters()
                                      if p.grad is not None}, 'authors')
    assert not head and set(grads) == {n for n, _ in ours.named_parameters()}
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-9, atol=1e-12, msg=n)


def test_autocast_cosine_is_exact_on_outputs_autocast_leaves_alone():
    # In fp32 the cosine of these 4M values with themselves comes out 1.00015.
    maps = torch.randn(1, 4, 1000, 1000, generator=torch.Generator().manual_seed(0)) * 5 + 3

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return (maps + 0 * x.sum(),)

    assert peers.autocast_cosine(Fixed(), torch.zeros(1)) == pytest.approx(1, abs=1e-9)


def test_compare_peers_short_mode_asserts_agreement(tmp_path):
    out = tmp_path / 'peers.json'
    res = subprocess.run([sys.executable, str(ROOT / 'tools/analysis_tools/compare_peers.py'),
                          '--short', '--out', str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data['peers'] == list(PEERS) and data['machine']['threads'] >= 1
    assert data['code'] == peers.code_version()  # the commit that ran
    ran = data['args']  # what --short ran, not the defaults it replaced
    assert (ran['cases'], ran['warmup'], ran['repeats'], ran['no_memory']) == (
        ['infer224'], 1, 1, True)
    assert [c['variant'] for c in data['cases']] == ['pcpvt-small', 'svt-small']
    for case in data['cases']:
        assert set(case['max_abs_diff']) == set(PEERS)
        assert all(d <= 1e-4 for d in case['max_abs_diff'].values()), case['max_abs_diff']
        assert set(case['seconds']) == {'mmtwins', *PEERS}
        assert all(t > 0 for t in case['seconds'].values())
        assert set(case['page_faults']) == set(case['seconds'])
        assert all(f >= 0 for f in case['page_faults'].values())


_REUSE = '''
import torch
from mmtwins.analysis.peers import minor_page_faults
faults = []
for _ in range(10):
    before = minor_page_faults()
    t = torch.ones(64 * 2**20 // 4)
    faults.append(minor_page_faults() - before)
    del t
print(min(faults[1:]))
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='GLIBC_TUNABLES is glibc\'s')
def test_page_faults_are_counted_and_keep_freed_memory_spares_later_steps_them():
    env = {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=7'}
    assert peers.keep_freed_memory(env) == 'glibc.malloc.tcache_count=7:' + peers.KEEP_FREED_MEMORY
    assert peers.keep_freed_memory(env) == env['GLIBC_TUNABLES']  # added once

    def fewest_faults_of_a_later_allocation(environ):
        out = subprocess.run([sys.executable, '-c', _REUSE], env=environ, check=True,
                             capture_output=True, text=True).stdout
        return int(out.split()[-1])

    default = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    # 64 MB, allocated ten times: by default each time its own mapping, handed back when freed
    # and faulted in anew (16384 pages of 4 KB, or 32 huge ones); kept, the freed heap is soon
    # reused as it is.
    faults = fewest_faults_of_a_later_allocation(default)
    kept = dict(default, GLIBC_TUNABLES=peers.KEEP_FREED_MEMORY)
    assert faults >= 32 and fewest_faults_of_a_later_allocation(kept) * 10 < faults


@pytest.mark.parametrize('flags, amx', [('fpu avx512f avx512_bf16 amx_bf16 amx_tile', True),
                                         ('fpu avx2 avx512f', False), (None, None)])
def test_machine_info_tells_amx_cpus_apart(tmp_path, monkeypatch, flags, amx):
    cpuinfo = tmp_path / 'cpuinfo'
    if flags is not None:
        cpuinfo.write_text(f'processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\n'
                           f'model name\t: Some CPU\nflags\t\t: {flags}\n\n'
                           'processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n'
                           'model name\t: Some CPU\nflags\t\t: fpu\n')
    monkeypatch.setattr(peers, '_CPUINFO', str(cpuinfo))
    info = peers.machine_info()
    assert info['cpu_amx'] is amx
    assert (info['cpu'] == 'Some CPU') is (flags is not None)
    assert info['cpu_family_model'] == ('26/2' if flags is not None else None)


def test_code_version_names_the_checkout_commit_and_nothing_elsewhere(tmp_path):
    code = peers.code_version()
    assert len(code['commit']) == 40 and isinstance(code['dirty'], bool)
    assert peers.code_version(tmp_path) is None  # not a git checkout
    assert peers.code_version(peers.CHECKOUT / 'mmtwins') is None  # not the checkout's top


_FIRST_STEPS = '''
import torch
from mmtwins.analysis.peers import _first_steps_peaks
sizes = iter([48, 128, 48])

def step():
    torch.ones(next(sizes) << 18)  # MB of fp32, every page written

print(*_first_steps_peaks(step, torch.device('cpu'), 3))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/self/status')
def test_first_steps_peaks_give_the_first_step_and_the_high_water_mark_over_all():
    """Steps writing 48 MB, then 128 MB, then 48 MB, in a fresh process (whose heap has no free
    block that large, so each is mapped afresh and handed back when freed): the first step's
    peak is about 48 MB above the size before it, the peak over the three about 128 MB (the
    mark is not reset between them)."""
    out = subprocess.run([sys.executable, '-c', _FIRST_STEPS], check=True, capture_output=True,
                         text=True).stdout
    first, run = map(float, out.split()[-2:])
    assert 40 < first < 80 and 120 < run < 160


def test_training_case_with_cp_one_process_at_a_time():
    """The COCO case's mode, on a small input: with_cp entry, workers one after another, memory
    measured; gradient checkpointing keeps well under half the activations (a count)."""
    lines = []
    res = compare_case('svt', 'small', 'train', (1, 3, 64, 64), peers=['timm'], warmup=2,
                       repeats=1, with_cp=True, interleave=False, kernels=True, log=lines.append)
    assert set(res.seconds) == {'mmtwins', 'timm', 'mmtwins-with_cp'} and not res.interleaved
    assert all(t > 0 for t in res.seconds.values())
    assert res.saved_mb['mmtwins-with_cp'] < 0.6 * res.saved_mb['mmtwins']
    assert res.saved_mb['mmtwins'] <= 0.8 * res.saved_mb['timm']
    assert set(res.peak_mb) == set(res.seconds)
    # the peak over both warm-up steps holds the first step's (the RSS mark is not reset between)
    assert set(res.run_peak_mb) == set(res.seconds)
    assert all(res.run_peak_mb[n] >= res.peak_mb[n] for n in res.seconds)
    assert 'warm-up peak ratio' in format_markdown([res]) and 'over the warm-up' in lines[0]
    # peak live tensor bytes (CPU): with_cp's cut is in the line and the JSON
    assert set(res.live_mb) == set(res.seconds) and all(m > 0 for m in res.live_mb.values())
    assert res.live_mb['mmtwins-with_cp'] < res.live_mb['mmtwins'] < res.live_mb['timm']
    assert 0 < res.with_cp_saving('live_mb') < 1
    assert f'{res.with_cp_saving("live_mb"):.0%} of the peak live' in lines[0]
    assert 'mmtwins-with_cp peak live MB' in format_markdown([res])
    assert '(*) implementations run one after another' in format_markdown([res])
    # --kernels: one profiled step per entry, in the log and in a second table
    assert set(res.kernels) == set(res.seconds)
    for k in res.kernels.values():
        assert k['ms']['matmul'] > 0 and k['ms']['fused attention'] > 0 and k['matmul_gflops'] > 0
    assert len(lines) == 1 + len(res.seconds) and 'profiled step' in lines[1]
    assert '| svt-small | train 1x3x64x64 | mmtwins-with_cp |' in format_markdown([res])


def test_rounds_start_fresh_processes_and_report_the_median_and_the_spread(monkeypatch):
    started = []

    class CountedWorkers(_Workers):
        def __init__(self, entries, *args):
            started.append([e.name for e in entries])
            super().__init__(entries, *args)

    monkeypatch.setattr(peers, '_Workers', CountedWorkers)
    lines = []
    res = compare_case('svt', 'small', 'infer', (1, 3, 64, 64), peers=['timm'], warmup=1,
                       repeats=1, rounds=3, log=lines.append)
    assert started == [['mmtwins', 'timm']] * 3  # one set of fresh workers per round
    assert {n: len(ts) for n, ts in res.round_seconds.items()} == {'mmtwins': 3, 'timm': 3}
    for n, ts in res.round_seconds.items():
        assert res.seconds[n] == statistics.median(ts) and min(ts) > 0
    ups = res.round_speedups()
    assert ups == [t / m for m, t in zip(res.round_seconds['mmtwins'],
                                         res.round_seconds['timm'])]
    assert set(res.peak_mb) == {'mmtwins', 'timm'}  # the median of the rounds' peaks
    spread = f'{min(ups):.2f}-{max(ups):.2f}x'
    assert [ln for ln in lines if 'round ' in ln] == [
        f'svt-small infer 1x3x64x64: round {i} of 3' for i in (1, 2, 3)]
    assert f'({spread} over 3 rounds)' in lines[-1]
    # the headline is the median round, each round's times paired with each other only
    assert res.speedup() == statistics.median(ups)
    three = peers.CaseResult('svt-small', 'infer', [1], 'fp32', round_seconds={
        'mmtwins': [1.0, 2.0, 1.0], 'timm': [1.1, 2.2, 1.4], 'mmseg': [3.0, 3.0, 1.05]})
    three.seconds = {n: statistics.median(ts) for n, ts in three.round_seconds.items()}
    assert three.round_speedups() == pytest.approx([1.1, 1.1, 1.05])
    assert three.speedup() == pytest.approx(1.1)  # medians of the times would give 1.4
    assert f'{res.speedup():.2f}x ({spread})' in format_markdown([res])
    assert json.loads(peers.to_json([res], {}))['cases'][0]['round_speedups'] == ups
    with pytest.raises(ValueError, match='rounds must be >= 1'):
        compare_case('svt', 'small', 'infer', (1, 3, 64, 64), peers=[], rounds=0)
    # No peer (none installed): the rounds are kept and reported, with no speed-up to spread.
    alone = peers.CaseResult('svt-small', 'infer', [1, 3, 64, 64], 'fp32',
                             seconds={'mmtwins': 0.2}, round_seconds={'mmtwins': [0.2, 0.3]})
    assert alone.round_speedups() == [] and 'rounds' not in peers.format_case(alone)
    assert '(' not in format_markdown([alone]).split('| svt-small |')[1].split('\n')[0]


def test_rounds_option_reaches_every_case_but_the_short_one(monkeypatch):
    tool = analysis_tool('compare_peers')
    planned = []
    monkeypatch.setattr(peers, 'run_plan', lambda jobs, *a, **k: planned.append(jobs))
    tool.main(['--rounds', '4', '--peers', 'timm'])
    tool.main(['--rounds', '4', '--peers', 'timm', '--short'])
    assert [{j[3]['rounds'] for j in jobs} for jobs in planned] == [{4}, {1}]
    assert len(planned[0]) == 2 * len(peers.DEFAULT_CASES)
    for option in (['--rounds', '0'], ['--repeats', '0'], ['--warmup', '-1']):
        with pytest.raises(SystemExit):
            tool.parse_args(option)


def test_kernel_breakdown_categories_add_up_and_count_matmul_flops():
    x, w, b = torch.randn(64, 128), torch.randn(256, 128), torch.randn(256)
    a, c = torch.randn(4, 32, 16), torch.randn(4, 16, 8)

    def step():
        y = F.gelu(F.linear(x, w, b))                    # addmm: 2 * 64 * 128 * 256
        torch.cat([y, y]).mm(w)                          # mm: 2 * 128 * 256 * 128
        torch.bmm(a, c)                                  # bmm: 2 * 4 * 32 * 16 * 8
        F.layer_norm(y, (256, ))

    k = kernel_breakdown(step)
    ms = k['ms']
    assert list(ms) == [*CATEGORY_NAMES, 'total']
    for category in ('matmul', 'copies', 'GELU', 'LayerNorm'):
        assert ms[category] > 0, category
    assert ms['fused attention'] == ms['convolution'] == 0
    flops = 2 * (64 * 128 * 256 + 128 * 256 * 128 + 4 * 32 * 16 * 8)
    assert k['matmul_gflops'] == pytest.approx(flops / ms['matmul'] / 1e6)


class _RecordedProfiles:
    """``torch.profiler.profile`` as it is, keeping each profile and whether it recorded
    shapes."""

    def __init__(self, monkeypatch):
        import torch.profiler
        self.runs = []
        real = torch.profiler.profile

        def profile(*args, record_shapes=False, **kwargs):
            prof = real(*args, record_shapes=record_shapes, **kwargs)
            self.runs.append((record_shapes, prof))
            return prof

        monkeypatch.setattr(torch.profiler, 'profile', profile)

    def matmul_ms(self, run: int) -> float:
        prof = self.runs[run][1]
        return sum(e.self_cpu_time_total for e in prof.events()
                   if peers._category(e.name) == 'matmul') / 1e3


def test_kernel_breakdown_times_a_call_without_shapes_and_reads_them_from_a_second(
        monkeypatch):
    x, w = torch.randn(64, 128), torch.randn(256, 128)
    kernel_breakdown(lambda: None)  # the profiler's warm start, before the recording
    recorded = _RecordedProfiles(monkeypatch)
    k = kernel_breakdown(lambda: x.mm(w.t()))
    assert [shapes for shapes, _ in recorded.runs] == [False, True]
    assert not k['times_with_shapes']
    # the times are the first call's, the FLOPs come from the second's shapes
    assert k['ms']['matmul'] == pytest.approx(recorded.matmul_ms(0))
    assert k['matmul_gflops'] == pytest.approx(2 * 64 * 128 * 256 / k['ms']['matmul'] / 1e6)


def test_kernel_breakdown_takes_the_shapes_call_whole_where_the_step_changes(monkeypatch):
    a, b = torch.randn(4, 32, 16), torch.randn(4, 16, 8)
    calls = []

    def step():  # a step that runs other operators on its second call
        calls.append(None)
        return torch.bmm(a, b) if len(calls) % 2 else a.sum()

    kernel_breakdown(lambda: None)
    recorded = _RecordedProfiles(monkeypatch)
    k = kernel_breakdown(step)
    assert k['times_with_shapes']
    assert k['ms']['matmul'] == 0  # the second call's: no matmul
    assert k['ms']['total'] > 0 and k['matmul_gflops'] is None
    assert recorded.matmul_ms(0) > 0
    result = peers.CaseResult('svt-small', 'infer', [1, 3, 8, 8], 'fp32', kernels={'timm': k})
    assert 'timed with its shapes recorded' in peers.format_kernels(result)[0]


def test_kernel_breakdown_starts_the_profiler_once_before_and_leaves_that_out():
    kernel_breakdown(lambda: None)
    before = _warm_profiler.cache_info()
    k = kernel_breakdown(lambda: None)
    assert k['ms']['total'] == 0  # the warm start's operator is in no profile
    after = _warm_profiler.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


@contextlib.contextmanager
def _fails_within(seconds: int):
    """Turn a hang into a test failure (SIGALRM)."""
    def hung(signum, frame):
        raise TimeoutError(f'still waiting after {seconds} s')

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _exit_at_start(conn, *args):
    """A worker that dies before it answers (as one killed while building its model)."""
    os._exit(1)


def test_a_worker_dying_at_start_is_an_error_not_a_hang(monkeypatch):
    """The parent closes its copy of each worker's pipe end, so a worker's death ends the wait
    for its answer (EOF) instead of leaving the parent waiting forever."""
    monkeypatch.setattr(peers, '_worker', _exit_at_start)  # spawn pickles it by reference
    with _fails_within(60), pytest.raises(RuntimeError,
                                          match='the worker process of mmtwins died'):
        _Workers([Entry('mmtwins', 'mmtwins')], 'svt', 'small', 'infer', (1, 3, 64, 64), 'cpu')


def test_a_worker_killed_between_steps_is_an_error():
    with _Workers([Entry('mmtwins', 'mmtwins')], 'svt', 'small', 'infer', (1, 3, 64, 64),
                  'cpu') as workers:
        seconds, faults = workers.ask('mmtwins', 'step')
        assert seconds > 0 and faults >= 0
        _, proc = workers.workers['mmtwins']
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with _fails_within(60), pytest.raises(RuntimeError,
                                              match='the worker process of mmtwins died'):
            workers.ask('mmtwins', 'step')


def test_workers_refuse_two_entries_of_one_name(monkeypatch):
    """The second would replace the first, whose process would then never be stopped."""
    monkeypatch.setattr(peers, '_worker', None)  # nothing may start
    with pytest.raises(ValueError, match='each entry needs its own name'):
        _Workers([Entry('timm', 'timm'), Entry('timm', 'timm')], 'svt', 'small', 'infer',
                 (1, 3, 64, 64), 'cpu')
    with pytest.raises(SystemExit):  # and the tool takes only the peers it knows
        analysis_tool('compare_peers').parse_args(['--peers', 'detectron2'])


def test_batch_option_sets_every_cases_batch():
    tool = analysis_tool('compare_peers')
    kw = dict(peers=['timm'])

    def jobs_of(argv):
        args = tool.parse_args(argv)
        return peers.plan(args.variants, args.cases, kw, batch=args.batch, short=args.short)

    assert [j[2] for j in jobs_of(['--cases', 'infer224', 'train512', 'amp512'])][:3] == [
        (8, 3, 224, 224), (2, 3, 512, 512), (2, 3, 512, 512)]
    jobs = jobs_of(['--cases', 'infer224', 'train512', 'amp512', '--batch', '16',
                    '--variants', 'svt-small'])
    assert [(j[0], j[1], j[2]) for j in jobs] == [('svt-small', 'infer', (16, 3, 224, 224)),
                                                  ('svt-small', 'train', (16, 3, 512, 512)),
                                                  ('svt-small', 'infer', (16, 3, 512, 512))]
    assert [j[3]['peers'] for j in jobs] == [['timm'], ['timm'], []]  # amp512: own fp32 only


@pytest.mark.parametrize('n', [1, 2, 3, 4, 5])
def test_balanced_orders_give_every_position_and_predecessor_equally_often(n):
    orders = peers.balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 else n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    positions = collections.Counter((o[k], k) for o in orders for k in range(n))
    assert set(positions.values()) == {len(orders) // n}
    follows = collections.Counter((o[k], o[k + 1]) for o in orders for k in range(n - 1))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1


def test_interleaved_steps_take_the_balanced_orders_in_turn():
    asked = []

    class Recorder:
        def ask(self, name, cmd):
            asked.append(name)
            return 0.1, 0

    names = ['mmtwins', 'timm', 'mmseg', 'mmpretrain']
    times = peers.interleaved_times(Recorder(), names, repeats=6)
    orders = peers.balanced_orders(4)
    assert asked == [names[i] for r in range(6) for i in orders[r % 4]]
    assert {n: len(t) for n, t in times.items()} == dict.fromkeys(names, 6)


def test_variants_are_checked_and_spelled_out_before_any_case_runs(monkeypatch, capsys):
    tool = analysis_tool('compare_peers')
    monkeypatch.setattr(peers, 'run_plan', None)  # nothing may run
    for bad in (['svt-small', 'svt_small'], ['svt-x'], ['all', 'svt-s']):
        with pytest.raises(SystemExit):
            tool.main(['--variants', *bad])
    err = capsys.readouterr().err
    assert "invalid choice: 'svt_small' (choose from 'pcpvt-small', 'pcpvt-base'" in err
    assert "invalid choice: 'svt-x'" in err and "'all' stands alone" in err
    assert tool.parse_args(['--variants', 'svt-s', 'pcpvt-b', 'svt-large', 'pcpvt']).variants == [
        'svt-small', 'pcpvt-base', 'svt-large', 'pcpvt-small']
    assert tool.parse_args(['--variants', 'all']).variants == ['all']


def test_run_plan_logs_each_case_as_it_starts_and_marks_the_json_unfinished(monkeypatch,
                                                                           tmp_path):
    """The JSON and Markdown rewritten after each case say whether the run finished, and the
    JSON lists every planned case."""
    out, md = tmp_path / 'peers.json', tmp_path / 'peers.md'
    seen = []  # (log so far, JSON on disk) as each case starts

    def fake_case(family, arch, mode, shape, **kw):
        seen.append((list(lines), json.loads(out.read_text()) if out.exists() else None))
        return peers.CaseResult(f'{family}-{arch}', mode, list(shape), 'fp32',
                                seconds={'mmtwins': 0.1})

    monkeypatch.setattr(peers, 'compare_case', fake_case)
    lines = []
    jobs = peers.plan(['svt-small'], ['infer224', 'amp512'], dict(peers=[]))
    results = peers.run_plan(jobs, dict(machine={}), out=str(out), markdown=str(md),
                             log=lines.append)
    assert len(results) == 2
    assert lines == ['case 1/2: svt-small infer 8x3x224x224 fp32',
                     'case 2/2: svt-small infer 2x3x512x512 amp']
    planned = [dict(variant='svt-small', mode='infer', shape=[8, 3, 224, 224], amp=False),
               dict(variant='svt-small', mode='infer', shape=[2, 3, 512, 512], amp=True)]
    first, second = seen
    assert first == (lines[:1], None)
    assert second[0] == lines and second[1]['finished'] is False
    assert second[1]['planned'] == planned and len(second[1]['cases']) == 1
    data = json.loads(out.read_text())
    assert data['finished'] is True and data['planned'] == planned and len(data['cases']) == 2
    assert data['machine'] == {}
    assert 'not finished' not in md.read_text()

    def interrupted(*args, **kw):  # Ctrl-C in the second case
        if out.exists():
            raise KeyboardInterrupt
        return fake_case(*args, **kw)

    out.unlink()
    monkeypatch.setattr(peers, 'compare_case', interrupted)
    with pytest.raises(KeyboardInterrupt):
        peers.run_plan(jobs, {}, out=str(out), markdown=str(md), log=lines.append)
    data = json.loads(out.read_text())
    assert data['finished'] is False and len(data['cases']) == 1 and data['planned'] == planned
    assert md.read_text().endswith('\n\n1 of 2 cases: the run has not finished.\n')


def test_compare_peers_defaults_to_the_small_variants():
    assert analysis_tool('compare_peers').parse_args([]).variants == ['pcpvt-small', 'svt-small']


def _result(case, variant='svt-small', amp_dtype=None, **fields):
    """A CaseResult as :data:`peers.CASES`' ``case`` gives it on a CPU (its precision named as
    :func:`compare_case` names it)."""
    mode, shape, amp = peers.CASES[case]
    precision = autocast_context(torch.device('cpu'), amp is not None, amp_dtype)[1]
    return peers.CaseResult(variant, mode, list(shape), precision, **fields)


def test_issue_targets_judge_the_cases_they_name():
    """Each target of issue 7 from its case's result, reached or missed at its bound; results
    of other inputs or precisions (another batch, fp16) are not judged."""
    results = [
        _result('infer224', seconds={'mmtwins': 1.0, 'timm': 1.15, 'mmseg': 2.0},
                gflops=100., matmul_gflops=200.),
        _result('train512', seconds={'mmtwins': 1.0, 'timm': 1.19},
                peak_mb={'mmtwins': 80., 'timm': 100.}),
        _result('amp512', seconds={'mmtwins': 1.0, 'mmtwins-fp32': 1.8}, cosine=0.99997),
        _result('coco', seconds={'mmtwins': 1.0, 'timm': 1.2, 'mmtwins-with_cp': 1.3},
                peak_mb={'mmtwins': 100., 'timm': 150., 'mmtwins-with_cp': 61.}),
        _result('train512', variant='pcpvt-small', seconds={'mmtwins': 1.0, 'timm': 1.3}),
        peers.CaseResult('svt-small', 'train', [16, 3, 512, 512], 'fp32',
                         seconds={'mmtwins': 1.0, 'timm': 2.0}),
        _result('amp512', amp_dtype=torch.float16,
                seconds={'mmtwins': 1.0, 'mmtwins-fp32': 3.0}),
    ]
    assert [peers.case_name(r) for r in results] == [
        'infer224', 'train512', 'amp512', 'coco', 'train512', None, None]
    rows = peers.issue_targets(results)
    got = [(t['variant'], t['target'].split(': ')[1], t['shown'], t['reached']) for t in rows]
    assert got == [
        ('svt-small', 'speed-up against the fastest peer >= 1.10x', '1.15x', True),
        ('svt-small', 'GFLOP/s over dense matmul GFLOP/s >= 0.85', '0.50', False),
        ('svt-small', 'speed-up against the fastest peer >= 1.20x', '1.19x', False),
        ('svt-small', "first step's peak RSS rise against the leanest peer's <= 0.80", '0.80',
         True),
        ('svt-small', "speed-up against mmtwins' own fp32 >= 1.80x", '1.80x', True),
        ('svt-small', 'cosine similarity of the outputs with fp32 >= 0.99900', '0.99997', True),
        ('svt-small', "with_cp's cut of mmtwins' first-step peak RSS >= 40%", '39%', False),
        ('pcpvt-small', 'speed-up against the fastest peer >= 1.20x', '1.30x', True),
        # no memory measured: not judged
        ('pcpvt-small', "first step's peak RSS rise against the leanest peer's <= 0.80", None,
         None)]
    assert rows[0]['target'] == ('inference 224x224 b8 fp32: speed-up against the fastest peer '
                                 '>= 1.10x')
    assert rows[0]['value'] == pytest.approx(1.15) and rows[-1]['value'] is None
    table = peers.format_targets(rows).split('\n')
    assert table[0] == '| variant | target of issue 7 | this run | |' and len(table) == 11
    assert table[4] == ('| svt-small | training step 512x512 b2 fp32: speed-up against the '
                        'fastest peer >= 1.20x | 1.19x | **missed** |')
    assert table[-1].endswith('| not measured | not judged |')


def test_run_plan_judges_the_targets_where_asked(monkeypatch, tmp_path):
    """A CPU run's JSON, Markdown and log judge the targets; elsewhere (a GPU run, the short
    mode) none of them does."""
    def fake_case(family, arch, mode, shape, **kw):
        return peers.CaseResult(f'{family}-{arch}', mode, list(shape), 'fp32',
                                seconds={'mmtwins': 0.1, 'timm': 0.2})

    monkeypatch.setattr(peers, 'compare_case', fake_case)
    jobs = peers.plan(['svt-small'], ['infer224'], dict(peers=['timm']))
    for targets in (True, False):
        out, md, lines = tmp_path / f'{targets}.json', tmp_path / f'{targets}.md', []
        peers.run_plan(jobs, {}, out=str(out), markdown=str(md), targets=targets,
                       log=lines.append)
        data = json.loads(out.read_text())
        assert ('targets' in data) == targets and ('target of issue 7' in md.read_text()) == \
            targets and any('target of issue 7' in ln for ln in lines) == targets
    judged = json.loads((tmp_path / 'True.json').read_text())['targets']
    assert [(t['case'], t['reached']) for t in judged] == [('infer224', True), ('infer224', None)]
    assert judged[0]['value'] == 2.0
    tool = analysis_tool('compare_peers')
    asked = []
    monkeypatch.setattr(peers, 'run_plan', lambda *a, **k: asked.append(k['targets']))
    tool.main(['--peers', 'timm', '--device', 'cpu'])
    tool.main(['--peers', 'timm', '--device', 'cpu', '--short'])
    assert asked == [True, False]
