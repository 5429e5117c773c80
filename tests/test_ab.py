"""The in-process A/B tools (mmtwins/analysis/ab.py, tools/analysis_tools/*_ab.py)."""
import pytest
import torch
from probes import CountOps, analysis_tool

from mmtwins.analysis.ab import alternate, format_arms, module_at, patched, revision_arm
from mmtwins.models.backbones import SVT
from mmtwins.models.layers import GlobalSubsampledAttention, LocallyGroupedAttention, PatchEmbed
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
    with pytest.raises(ValueError, match='must exceed warmup'):
        alternate(lambda: None, arms, steps=5, device=torch.device('cpu'))


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


# The parent of d181e87, whose PatchEmbed still ran its conv on the NCHW input.
BEFORE_CHANNELS_LAST = '2c49855'


def test_revision_arm_runs_the_revision_methods_and_restores_the_working_tree():
    embed = PatchEmbed(3, 16, 4)
    layouts = []
    embed.proj.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    img = torch.randn(1, 3, 16, 16)
    expected = embed(img)[0]
    with revision_arm(BEFORE_CHANNELS_LAST, ['mmtwins/models/layers/embed.py'])():
        torch.testing.assert_close(embed(img)[0], expected)
    embed(img)
    assert layouts == [True, False, True]


def test_revision_ab_tool_prints_both_arms(capsys):
    analysis_tool('revision_ab').main(['--against', 'HEAD', '--size', '32', '--steps', '6',
                                       '--variants', 'pcpvt', 'svt-base', '--batch', '1'])
    small, base = capsys.readouterr().out.splitlines()  # a family alone is its small arch
    assert small.startswith('pcpvt-small train 1x3x32x32 fp32 cpu: working tree ')
    assert base.startswith('svt-base train 1x3x32x32 fp32 cpu: working tree ')
    assert ', HEAD ' in small and ', HEAD ' in base
