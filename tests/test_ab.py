"""The in-process A/B tools (mmtwins/analysis/ab.py, tools/analysis_tools/*_ab.py)."""
import contextlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from probes import CountOps, analysis_tool

from mmtwins.analysis import ab
from mmtwins.analysis.ab import (_in_sys_modules, alternate, extension_arm, format_arms,
                                 load_extension, module_at, patched, revision_arm)
from mmtwins.analysis.peers import build_impl
from mmtwins.models.backbones import SVT
from mmtwins.models.layers import (GlobalSubsampledAttention, LocallyGroupedAttention, Mlp,
                                   PatchEmbed, attention, gelu, native, norm)
from mmtwins.models.layers.mlp import CHUNK_ROWS
from mmtwins.registry import MODELS


class _Box:
    value = 'a'

    @staticmethod
    def double(x):
        return 2 * x


class _SubBox(_Box):
    pass


def test_alternate_runs_each_arm_in_turn_and_restores_patches():
    seen = []
    arms = {'a': patched(_Box, 'value', 'A'), 'b': patched(_Box, 'value', 'B')}
    res = alternate(lambda: seen.append(_Box.value), arms, steps=4, device=torch.device('cpu'),
                    warmup=1)
    assert seen == ['B', 'A', 'A', 'B', 'B', 'A', 'A', 'B']  # alternating order, step by step
    assert _Box.value == 'a'
    assert set(res) == {'a', 'b'} and all(r['peak_mb'] is None for r in res.values())
    assert all(0 < r['min_ms'] <= r['median_ms'] for r in res.values())
    assert format_arms(res).startswith('a ') and ', b ' in format_arms(res)
    assert res['a']['ratio'] == 1 and "x a's time in paired steps" in format_arms(res)
    with pytest.raises(ValueError, match='must exceed warmup'):
        alternate(lambda: None, arms, steps=5, device=torch.device('cpu'))


def test_alternate_reports_the_median_ratio_of_paired_steps(monkeypatch):
    """On a clock that a step advances by its arm's cost (b 3 s; a 1 s, once 9 s), the ratio is
    b's time over a's in the same round, its median over the timed rounds: 3, where the ratio
    of the mean times would be 1.15."""
    clock = [0.]
    monkeypatch.setattr(ab.time, 'perf_counter', lambda: clock[0])
    a_costs = iter([1., 1., 1., 9., 1., 1.])  # seconds, a's 6 steps (the first untimed)

    def step():
        clock[0] += next(a_costs) if _Box.value == 'A' else 3.

    arms = {'a': patched(_Box, 'value', 'A'), 'b': patched(_Box, 'value', 'B')}
    res = alternate(step, arms, steps=6, device=torch.device('cpu'), warmup=1)
    assert res['a']['ratio'] == 1 and res['b']['ratio'] == 3000 / 1000
    assert format_arms({'a': dict(median_ms=1., min_ms=1., ratio=1., peak_mb=None),
                        'b': dict(median_ms=3., min_ms=3., ratio=3., peak_mb=None)}) == \
        "a 1.0 ms (min 1.0), b 3.0 ms (min 3.0, 3.00x a's time in paired steps)"


def test_the_gpu_peak_is_the_rise_above_the_steps_start(monkeypatch):
    """As compare_peers counts it: weights and input, allocated before the step, left out."""
    for name in ('synchronize', 'reset_peak_memory_stats'):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, 'memory_allocated', lambda *args: 100 * 2**20)
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda *args: 150 * 2**20)
    res = alternate(lambda: None, {'a': patched(_Box, 'value', 'A')}, steps=2,
                    device=torch.device('cuda'), warmup=1)
    assert res['a']['peak_mb'] == 50


def test_sys_modules_entries_are_restored_and_removed():
    name = 'mmtwins._ab_probe'
    with _in_sys_modules({name: types.ModuleType('probe'), 'torch': types.ModuleType('t')}):
        assert name in sys.modules and not hasattr(sys.modules['torch'], 'nn')
    assert name not in sys.modules and sys.modules['torch'] is torch


@pytest.mark.parametrize('where, fused_in', [('gsa', {LocallyGroupedAttention}),
                                             ('lsa', {GlobalSubsampledAttention}),
                                             ('all', set())])
def test_sdpa_ab_math_arm_takes_the_math_path_where_asked(where, fused_in):
    tool = analysis_tool('sdpa_ab')
    x = torch.randn(2, 49, 32)
    layers = {GlobalSubsampledAttention: GlobalSubsampledAttention(32, 2, sr_ratio=2),
              LocallyGroupedAttention: LocallyGroupedAttention(32, 2, window_size=7)}
    expected = {cls: layer(x, (7, 7)) for cls, layer in layers.items()}
    with tool.math_arm(tool.WHERE[where])():
        for cls, layer in layers.items():
            with CountOps() as ops:
                y = layer(x, (7, 7))
            fused = any(n.startswith('_scaled_dot_product_') for n in ops.ops)
            assert fused == (cls in fused_in)
            assert torch.allclose(y, expected[cls], atol=1e-5)
    with CountOps() as ops:  # restored
        layers[GlobalSubsampledAttention](x, (7, 7))
    assert any(n.startswith('_scaled_dot_product_') for n in ops.ops)


def test_sdpa_ab_tool_prints_both_arms(capsys):
    analysis_tool('sdpa_ab').main(['--size', '32', '--steps', '6', '--variants', 'svt', '--batch',
                                   '1', '--where', 'all'])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('svt-small train 1x3x32x32 fp32 cpu: fused ')
    assert ', math-all ' in line


@pytest.mark.skipif(not attention.NATIVE_ATTENTION,
                    reason='the compiled kernel runs on CPUs with AVX512-BF16, no AMX')
def test_sdpa_ab_times_mmtwins_own_choice_too_where_it_takes_its_kernel(capsys):
    tool = analysis_tool('sdpa_ab')
    tool.main(['--size', '32', '--steps', '6', '--variants', 'svt', '--batch', '1', '--mode',
               'infer', '--amp'])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('svt-small infer 1x3x32x32 amp cpu: fused ')
    assert ', math-gsa ' in line and ', mmtwins ' in line
    layer = GlobalSubsampledAttention(32, 2, sr_ratio=2).eval()
    x = torch.randn(2, 49, 32)
    sdpa, calls = F.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    for arm, fused in [(tool.kernel_only, True), (contextlib.nullcontext, False)]:
        calls.clear()
        with arm(), torch.inference_mode(), torch.autocast('cpu', torch.bfloat16), \
                patched(F, 'scaled_dot_product_attention', counted)():
            layer(x, (7, 7))
        assert bool(calls) == fused


def test_sdpa_ab_records_each_distinct_attention_call_of_a_forward():
    tool = analysis_tool('sdpa_ab')
    torch.manual_seed(0)
    model = build_impl('mmtwins', 'svt', 'small')
    calls = tool.recorded_calls(model, torch.randn(1, 3, 64, 64), amp=False)
    # SVT-S's 18 blocks: per stage one LSA and one GSA shape (stage 4: 2 x 2 maps, a window)
    assert sum(c[-1] for c in calls.values()) == 18 and len(calls) == 8
    for (q_key, k_key, v_key, mask_key, dtype), (q, k, v, mask, _) in calls.items():
        assert (tuple(q.shape), q.stride()) == q_key and (tuple(k.shape), k.stride()) == k_key
        assert (tuple(v.shape), v.stride()) == v_key and dtype == q.dtype == torch.float32
        assert not q.requires_grad and (mask is None) == (mask_key is None)
    amp = tool.recorded_calls(model, torch.randn(1, 3, 64, 64), amp=True)
    assert {key[-1] for key in amp} == {torch.bfloat16}


def test_sdpa_ab_times_each_call_and_their_sum(capsys):
    tool = analysis_tool('sdpa_ab')
    tool.main(['--calls', '--size', '32', '--steps', '6', '--variants', 'svt', '--batch', '1'])
    *lines, total = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith('svt-small train float32 q (') for line in lines)
    assert all(': pytorch ' in line and ', mmtwins ' in line for line in lines)
    assert total.startswith('svt-small train fp32 32x32 batch 1, all calls of a forward: pytorch ')
    with pytest.raises(SystemExit, match='--device cpu'):
        tool.main(['--calls', '--device', 'cuda'])


def test_patched_restores_static_methods_and_inherited_attributes():
    with patched(_Box, 'double', staticmethod(lambda x: 3 * x))():
        assert _Box().double(1) == 3
    assert _Box().double(1) == 2  # still a static method
    with patched(_SubBox, 'value', 'sub')():
        assert _SubBox.value == 'sub' and _Box.value == 'a'
    assert 'value' not in vars(_SubBox) and _SubBox.value == 'a'


def test_module_at_loads_a_revision_beside_the_working_tree():
    old = module_at('HEAD', 'mmtwins/models/backbones/twins.py')
    assert old.SVT is not SVT and issubclass(old.SVT, old.Twins)
    assert MODELS.get('SVT') is SVT  # the revision registered nothing


# embed.py as a revision of it might read, committed to a repository of its own by the fixture
# below, so the test needs none of this checkout's history (a shallow clone has none): its
# PatchEmbed runs the conv on the NCHW input as given, calls a helper of its own module and
# returns a name imported relatively, and it registers itself (a decorator module_at drops).
_REVISION_OF_EMBED = """
from torch import nn

from ...registry import MODELS
from .mlp import CHUNK_ROWS


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


@MODELS.register_module()
class PatchEmbed(nn.Module):

    def forward(self, x):
        return self.norm(_tokens(self.proj(x))), CHUNK_ROWS
"""


# mlp.py as a revision might read: another chunk bound, which the embed.py above imports, and
# an Mlp whose train() calls super() (the working tree's Mlp has no train of its own).
_REVISION_OF_MLP = """
from torch import nn

CHUNK_ROWS = 123


class Mlp(nn.Module):

    def train(self, mode=True):
        self.trained_by_revision = mode
        return super().train(mode)
"""


def _commit(repo, files: dict):
    """``files`` (path -> text) committed to a new git repository at ``repo``."""
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    for args in (['init', '-q'], ['add', '.'],
                 ['-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'revision']):
        subprocess.run(['git', *args], cwd=repo, check=True, capture_output=True)
    return repo


@pytest.fixture
def revision_repo(tmp_path):
    return _commit(tmp_path, {'mmtwins/models/layers/embed.py': _REVISION_OF_EMBED})


def test_revision_arm_runs_the_revision_methods_and_restores_the_working_tree(revision_repo):
    embed = PatchEmbed(3, 16, 4)
    layouts = []
    embed.proj.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    img = torch.randn(1, 3, 16, 16)
    expected, hw = embed(img)
    with revision_arm('HEAD', ['mmtwins/models/layers/embed.py'], revision_repo)():
        tokens, tag = embed(img)
    torch.testing.assert_close(tokens, expected)
    assert hw == (4, 4) and tag == CHUNK_ROWS
    assert embed(img)[1] == (4, 4)
    assert layouts == [True, False, True]
    assert 'PatchEmbed' not in MODELS.module_dict
    with pytest.raises(subprocess.CalledProcessError):
        module_at('HEAD', 'mmtwins/models/layers/mlp.py', revision_repo)


def test_revision_modules_import_each_other_and_their_methods_call_super(tmp_path):
    """Taken together, the revision's embed.py imports the revision's mlp.py (loaded first,
    whatever the order given), not the working tree's; a swapped method's super() is that of
    the working tree's class."""
    repo = _commit(tmp_path, {'mmtwins/models/layers/embed.py': _REVISION_OF_EMBED,
                              'mmtwins/models/layers/mlp.py': _REVISION_OF_MLP})
    embed, mlp = PatchEmbed(3, 16, 4), Mlp(16, 32)
    img = torch.randn(1, 3, 16, 16)
    paths = ['mmtwins/models/layers/embed.py', 'mmtwins/models/layers/mlp.py']
    with revision_arm('HEAD', paths, repo)():
        assert embed(img)[1] == 123
        assert mlp.eval() is mlp and mlp.trained_by_revision is False and not mlp.training
    with revision_arm('HEAD', paths[:1], repo)():
        assert embed(img)[1] == CHUNK_ROWS  # mlp.py not taken: the working tree's
    assert mlp.train() is mlp and mlp.trained_by_revision is False  # the working tree's again


def test_revision_ab_tool_prints_both_arms(capsys):
    analysis_tool('revision_ab').main(['--against', 'HEAD', '--size', '32', '--steps', '6',
                                       '--variants', 'pcpvt', 'svt-base', '--batch', '1'])
    small, base = capsys.readouterr().out.splitlines()  # a family alone is its small arch
    assert small.startswith('pcpvt-small train 1x3x32x32 fp32 cpu: working tree ')
    assert base.startswith('svt-base train 1x3x32x32 fp32 cpu: working tree ')
    assert ', HEAD ' in small and ', HEAD ' in base


def test_missing_at_names_the_files_a_revision_lacks(revision_repo):
    embed, mlp = 'mmtwins/models/layers/embed.py', 'mmtwins/models/layers/mlp.py'
    assert ab.missing_at('HEAD', [embed, mlp], revision_repo) == [mlp]
    with pytest.raises(ValueError, match="^fatal: invalid object name 'nosuchrev'.$"):
        ab.missing_at('nosuchrev', [embed], revision_repo)


def test_revision_ab_checks_the_revision_files_and_variants_before_running(monkeypatch, capsys):
    """The default files that the revision lacks are left out with a note; a file given that it
    lacks, an unknown revision or variant end in a message before anything runs."""
    tool = analysis_tool('revision_ab')
    taken = []
    monkeypatch.setattr(tool, 'revision_arm', lambda rev, files: taken.append(files))
    monkeypatch.setattr(tool, 'run_variants', lambda args, arms: None)
    new = 'mmtwins/models/layers/not_yet.py'
    monkeypatch.setattr(tool, 'MODEL_FILES', ['mmtwins/models/layers/mlp.py', new])
    tool.main(['--against', 'HEAD'])
    assert taken == [['mmtwins/models/layers/mlp.py']]
    assert capsys.readouterr().err == (f'not in revision HEAD, so run as in the working tree by '
                                       f'both arms: {new}\n')
    with pytest.raises(SystemExit, match=f'^--files: not in revision HEAD: {new}; give only'):
        tool.main(['--against', 'HEAD', '--files', 'mmtwins/models/layers/mlp.py', new])
    with pytest.raises(SystemExit,
                       match="^--against nosuchrev: fatal: invalid object name 'nosuchrev'.$"):
        tool.main(['--against', 'nosuchrev'])
    with pytest.raises(SystemExit):
        tool.main(['--against', 'HEAD', '--variants', 'svt', 'svt_small'])
    assert "invalid choice: 'svt_small' (choose from 'pcpvt-small'" in capsys.readouterr().err
    assert tool.parse_args(['--against', 'HEAD', '--variants', 'svt', 'pcpvt-b']).variants == [
        'svt-small', 'pcpvt-base']
    assert len(taken) == 1  # nothing else reached the revision


def test_revision_ab_defaults_to_the_small_variants_and_takes_no_all():
    """'all' is compare_peers' alone (revision_ab would split it into a family and an arch)."""
    tool = analysis_tool('revision_ab')
    assert tool.parse_args(['--against', 'HEAD']).variants == ['pcpvt-small', 'svt-small']
    with pytest.raises(SystemExit):
        tool.parse_args(['--against', 'HEAD', '--variants', 'all'])


built = pytest.mark.skipif(native._ext is None, reason='mmtwins._ext is not built here')


@built
def test_a_second_build_loads_apart_and_every_kernel_caller_switches_to_it():
    """Loaded again from its own file, the build is a module of its own (under the same name
    Python would hand back the first one), and its arm switches every module that calls the
    kernels, restoring them after."""
    current = native._ext
    other = load_extension(Path(current.__file__).parent)
    assert other is not current and other.gelu is not current.gelu
    h = torch.randn(64)
    assert torch.equal(other.gelu(h), current.gelu(h))
    callers = (native, attention, norm, gelu)
    with extension_arm(other)():
        assert all(m._ext is other for m in callers)
    assert all(m._ext is current for m in callers)


def test_a_missing_build_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='no compiled _ext'):
        load_extension(tmp_path)
    with pytest.raises(SystemExit, match='--against'):
        analysis_tool('build_ab').main(['--against', str(tmp_path / 'none.so')])


@built
def test_build_ab_tool_prints_both_arms(capsys):
    folder = str(Path(native._ext.__file__).parent)
    analysis_tool('build_ab').main(['--against', folder, '--size', '32', '--steps', '6',
                                    '--variants', 'svt', '--batch', '1', '--mode', 'infer'])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('svt-small infer 1x3x32x32 fp32 cpu: this build ')
    assert f', {folder} ' in line
