import math

import pytest
import torch
from torch import nn

from mmtwins.analysis.peers import randomize_parameters_
from mmtwins.models import PCPVT, SVT, Twins
from mmtwins.models.layers import GlobalSubsampledAttention, LocallyGroupedAttention

from conftest import TINY_PCPVT, TINY_SVT, projected_loss

# Paper Table 1 parameters (millions), backbone + ImageNet head.
PAPER_PARAMS = {
    (PCPVT, 'small'): 24.1, (PCPVT, 'base'): 43.8, (PCPVT, 'large'): 60.9,
    (SVT, 'small'): 24.0, (SVT, 'base'): 56.0, (SVT, 'large'): 99.2,
}


@pytest.mark.parametrize('cls,arch', list(PAPER_PARAMS))
def test_params_match_paper_table1(cls, arch):
    model = cls(arch=arch, norm_after_stage=[False, False, False, True])
    c4 = model.embed_dims[-1]
    n = sum(p.numel() for p in model.parameters()) + c4 * 1000 + 1000  # + Linear(C4, 1000)
    assert abs(n / 1e6 - PAPER_PARAMS[(cls, arch)]) <= 0.1


@pytest.mark.parametrize('alias,name', [('s', 'small'), ('B', 'base'), ('l', 'large')])
def test_arch_aliases(alias, name):
    assert SVT(arch=alias).arch_settings == SVT.arch_zoo[name]
    assert PCPVT(arch=alias).arch_settings == PCPVT.arch_zoo[name]


def test_svt_alternates_lsa_and_gsa_and_pcpvt_is_all_gsa():
    svt = SVT(arch='small')
    for stage in svt.blocks:
        kinds = [type(b.attn) for b in stage]
        assert kinds == [LocallyGroupedAttention if j % 2 == 0 else GlobalSubsampledAttention
                         for j in range(len(stage))]
    assert all(isinstance(b.attn, GlobalSubsampledAttention) for s in PCPVT('s').blocks for b in s)
    # sr 8, 4, 2, 1: the sub-sampling conv exists only where sr > 1
    assert [hasattr(s[1].attn, 'sr') for s in svt.blocks] == [True, True, True, False]


@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)])
@pytest.mark.parametrize('hw', [(64, 64), (97, 131), (29, 29), (32, 70)])
def test_multiscale_output_shapes(cls, arch, hw):
    model = cls(arch=arch).eval()
    x = torch.randn(2, 3, *hw)
    outs = model(x)
    assert len(outs) == 4
    for o, dim, stride in zip(outs, arch['embed_dims'], (4, 8, 16, 32)):
        assert o.shape == (2, dim, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
        assert torch.isfinite(o).all()
    assert model.strides == (4, 8, 16, 32)


def test_out_indices_subset_builds_only_needed_stages_and_uses_every_parameter():
    model = SVT(arch=TINY_SVT, out_indices=(1, 2))
    assert len(model.blocks) == 3
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 32]
    sum(o.sum() for o in outs).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


@pytest.mark.parametrize('given,expected', [(None, (0, 1, 2, 3)), (2, (2, )), (-1, (3, )),
                                            ((0, -2), (0, 2)), ([1, 3], (1, 3))])
def test_out_indices_default_to_every_stage_and_count_negatives_from_the_end(given, expected):
    model = SVT(arch=TINY_SVT, out_indices=given)
    assert model.out_indices == expected
    assert len(model.patch_embeds) == expected[-1] + 1


def test_one_stage_arch_needs_no_out_indices():
    lsa_only = dict(embed_dims=[16], num_heads=[1], mlp_ratios=[2], depths=[1], sr_ratios=[8],
                    window_sizes=[7])
    model = SVT(arch=lsa_only)
    assert model.out_indices == (0, )
    # one LSA block and no GSA: no sub-sampling conv, so no minimum beyond one pixel
    assert model.min_input_size == 1
    assert model(torch.randn(1, 3, 5, 9))[0].shape == (1, 16, 2, 3)
    assert SVT(arch=dict(lsa_only, depths=[2])).min_input_size == 29  # the GSA block's sr 8


@pytest.mark.parametrize('bad', [(4, ), (-1, 0), (), (0, 4), (3, 1), (1, 1), (-5, ), ('a', )])
def test_bad_out_indices(bad):
    """Out of range, not increasing (the maps would come back in another order than asked)
    or repeated (a neck's in_channels would no longer line up): one clear error."""
    with pytest.raises(ValueError, match='out_indices must be increasing stage indices'):
        SVT(arch=TINY_SVT, out_indices=bad)


@pytest.mark.parametrize('cls,arch', [(PCPVT, TINY_PCPVT), (SVT, TINY_SVT)])
def test_frozen_stages(cls, arch):
    model = cls(arch=arch, frozen_stages=1, drop_rate=0.5)
    model.train()
    stage_of = {}
    for i in range(4):
        frozen = i <= 1
        mods = [model.patch_embeds[i], model.blocks[i], model.pos_block[i]]
        mods += [model.stage_norms[str(i)]] if cls is SVT else []  # SVT: a norm after each
        for m in mods:
            assert all(p.requires_grad != frozen for p in m.parameters())
            assert all(sub.training != frozen for sub in m.modules())
            stage_of.update({id(p): i for p in m.parameters()})
    assert set(stage_of) == {id(p) for p in model.parameters()}
    # An optimiser step over every parameter, as mmengine's constructor builds it (weight decay
    # included), leaves the frozen stages' weights alone.
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.05)
    projected_loss(model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (stage_of[id(p)] <= 1)
    with pytest.raises(ValueError, match='frozen_stages'):
        cls(arch=arch, frozen_stages=4)
    # Only the stages out_indices builds can be frozen.
    with pytest.raises(ValueError,
                       match=r'\[-1, 1\] \(the stages built for out_indices \(1,\)\), got 2'):
        cls(arch=arch, out_indices=(1, ), frozen_stages=2)


def test_drop_path_once_per_residual_branch():
    model = SVT(arch=TINY_SVT, drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.blocks for b in s]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 8).tolist())
    # Each block holds exactly one DropPath module and nothing else inside drops paths.
    from mmcv.cnn.bricks import DropPath
    block = model.blocks[3][1]
    assert sum(isinstance(m, DropPath) for m in block.modules()) == 1
    # Count the calls per forward: two residual branches -> two calls.
    calls = []
    block.drop_path.register_forward_hook(lambda *a: calls.append(1))
    block(torch.randn(1, 4, 64), (2, 2))
    assert len(calls) == 2


def test_drop_path_keeps_or_drops_each_branch_whole_scaled_once():
    """In training each sample's residual branch is dropped (adds 0) or kept and scaled by
    1 / (1 - p) once: every output is one of the four combinations computed by hand, and each
    occurs (a second drop inside a branch would scale by 1 / (1 - p)^2 and match none)."""
    from mmtwins.models.layers import TwinsBlock
    p, keep = 0.5, 0.5
    block = TwinsBlock(16, 2, 2, sr_ratio=1, drop_path=p)
    x = torch.randn(1, 4, 16).expand(64, 4, 16).contiguous()
    hw = (2, 2)
    with torch.no_grad():
        block.eval()
        attn = block.attn(block.norm1(x), hw) / keep
        mlp = lambda y: block.mlp(y, norm=block.norm2) / keep  # noqa: E731
        cases = [x, x + attn, x + mlp(x), x + attn + mlp(x + attn)]
        block.train()
        out = block(x, hw)
    which = [[torch.allclose(o, c[i], atol=1e-5) for c in cases] for i, o in enumerate(out)]
    assert all(sum(w) == 1 for w in which)
    assert {w.index(True) for w in which} == {0, 1, 2, 3}


@pytest.mark.parametrize('cls', [GlobalSubsampledAttention, LocallyGroupedAttention])
def test_attn_drop_rate_drops_attention_weights_in_training_only(cls):
    model = SVT(arch=TINY_SVT, attn_drop_rate=0.5)
    attn = next(b.attn for s in model.blocks for b in s if isinstance(b.attn, cls))
    assert {b.attn.attn_drop for s in model.blocks for b in s} == {0.5}
    x, hw = torch.randn(2, 16 * 16, 16), (16, 16)
    attn.eval()
    ref = attn(x, hw)
    assert torch.equal(attn(x, hw), ref)
    attn.train()
    a, b = attn(x, hw), attn(x, hw)
    assert not torch.allclose(a, ref, atol=1e-3) and not torch.allclose(a, b, atol=1e-3)
    attn.attn_drop = 0.
    torch.testing.assert_close(attn(x, hw), ref)


def test_drop_path_rate_applies_stochastic_depth_in_training_only():
    model = SVT(arch=TINY_SVT, drop_path_rate=0.9)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    a, b = model(x)[-1], model(x)[-1]
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(x)[-1], model(x)[-1])


@pytest.mark.parametrize('cls,arch,kwargs', [
    (SVT, TINY_SVT, {}), (SVT, TINY_SVT, dict(frozen_stages=1)), (PCPVT, TINY_PCPVT, {}),
    (SVT, TINY_SVT, dict(drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3))],
    ids=['svt', 'svt-frozen-stages', 'pcpvt-one-block-stages', 'svt-dropout'])
def test_with_cp_gives_same_gradients(cls, arch, kwargs):
    """Checkpointed segments: the patch embeddings, and each block with the stage's PEG (at the
    start of the second block's segment, or the end of a lone block's) and stage norm. The
    recomputation draws the same dropout masks."""
    ref = cls(arch=arch, **kwargs)
    cp = cls(arch=arch, with_cp=True, **kwargs)
    cp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (ref, cp):
        m.train()
        torch.manual_seed(1)
        projected_loss(m(x)).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), cp.named_parameters()):
        assert (p.grad is None) == (q.grad is None) == (not p.requires_grad), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize('cls,arch', [(SVT, TINY_SVT), (PCPVT, TINY_PCPVT)])
def test_with_cp_keeps_only_the_segments_inputs_for_backward(cls, arch):
    """What autograd keeps under ``with_cp``: the input image and each checkpointed segment's
    input tokens, nothing of the patch embeddings, PEGs, norms or blocks inside."""
    model = cls(arch=arch, with_cp=True).train()
    saved = {}
    x = torch.randn(2, 3, 64, 64)
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t), lambda t: t):
        model(x)
    segments = len(model.patch_embeds) + sum(len(b) for b in model.blocks)
    # one storage per segment's input (the image the first); the last output is no input
    assert len(saved) == segments and x.untyped_storage().data_ptr() in saved


def test_with_cp_makes_every_mlp_recompute_its_hidden_also_when_set_later():
    model = SVT(arch=TINY_SVT)
    mlps = [blk.mlp for blocks in model.blocks for blk in blocks]
    assert not any(m.recompute_hidden for m in mlps)
    model.with_cp = True
    assert all(m.recompute_hidden for m in mlps)
    assert all(blk.mlp.recompute_hidden for blocks in SVT(arch=TINY_SVT, with_cp=True).blocks
               for blk in blocks)


def test_norm_after_stage():
    assert list(SVT(arch='s').stage_norms) == ['0', '1', '2', '3']
    assert list(PCPVT(arch='s').stage_norms) == []
    assert list(PCPVT(arch='s', norm_after_stage=[False, True, False, True]).stage_norms) == \
        ['1', '3']
    for bad in ([True, False], 1, [1, 1, 1, 1], 'yes'):
        with pytest.raises(ValueError, match='norm_after_stage must be a bool or a sequence'):
            SVT(arch='s', norm_after_stage=bad)


def test_drop_rate_also_drops_the_patch_embeddings_tokens():
    """As the authors' ``pos_drops``: dropout on each stage's tokens after the embedding."""
    model = SVT(arch=TINY_SVT, drop_rate=0.5)
    embed = model.patch_embeds[0]
    assert [e.drop.p for e in model.patch_embeds] == [0.5] * 4
    x = torch.randn(1, 3, 32, 32)
    embed.train()
    tokens = embed(x)[0]
    assert 0.3 < (tokens == 0).float().mean() < 0.7
    embed.eval()
    assert torch.equal(embed(x)[0], embed(x)[0])


def test_init_weights_random():
    model = SVT(arch=TINY_SVT)
    model.init_weights()
    attn = model.blocks[0][0].attn
    assert attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(attn.qkv.bias == 0)
    conv = model.patch_embeds[0].proj  # normal(0, sqrt(2 / fan_out)), fan_out = 4 * 4 * 16
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.2)
    # the PEG's depthwise 3x3 conv: fan_out = 3 * 3 * C / C (groups = C) = 9
    peg = torch.cat([m.proj[0].weight.flatten() for m in model.pos_block])
    assert peg.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    assert torch.all(model.pos_block[0].proj[0].bias == 0)
    assert torch.all(model.blocks[0][0].norm1.weight == 1)
    # GSA's 8x8 sub-sampling conv, 16 -> 16 channels: fan_out = 8 * 8 * 16 (PyTorch's default
    # init would give 1 / sqrt(3 * fan_in) = 0.018)
    sr = model.blocks[0][1].attn.sr
    assert sr.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.1)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Conv2d))


def _linear_default_init(layer: nn.Linear) -> bool:
    """True if ``layer`` still has PyTorch's default init (uniform, non-zero bias)."""
    return bool(layer.bias.abs().sum() > 0)


@pytest.mark.parametrize('init_cfg', [dict(type='Constant', val=0.5, layer='LayerNorm'),
                                      [dict(type='Constant', val=0.5, layer='LayerNorm')]])
def test_init_cfg_applies_mmengine_initialisers_after_the_authors_init(init_cfg):
    model = SVT(arch=TINY_SVT, init_cfg=init_cfg)
    model.init_weights()
    assert all(torch.all(m.weight == 0.5) for m in model.modules() if isinstance(m, nn.LayerNorm))
    qkv = model.blocks[0][0].attn.qkv  # the authors' init still ran for the rest
    assert torch.all(qkv.bias == 0) and qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_pretrained_is_applied_after_the_other_initialisers(tmp_path):
    """Listed first or last, the checkpoint's weights win: another initialiser never
    overwrites what was loaded."""
    src = randomize_parameters_(SVT(arch=TINY_SVT))
    torch.save(src.state_dict(), tmp_path / 'src.pth')
    pretrained = dict(type='Pretrained', checkpoint=str(tmp_path / 'src.pth'))
    constant = dict(type='Constant', val=0.5, layer='LayerNorm')
    for init_cfg in ([pretrained, constant], [constant, pretrained]):
        model = SVT(arch=TINY_SVT, init_cfg=init_cfg)
        model.init_weights()
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_pretrained_init_cfg_keeps_the_authors_init_where_the_checkpoint_lacks_a_tensor(tmp_path):
    src = SVT(arch=TINY_SVT)
    src.init_weights()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith('blocks.3.1.mlp.fc2.')}
    torch.save(sd, tmp_path / 'partial.pth')
    model = SVT(arch=TINY_SVT, init_cfg=dict(type='Pretrained',
                                             checkpoint=str(tmp_path / 'partial.pth')))
    assert _linear_default_init(model.blocks[3][1].mlp.fc2)
    model.init_weights()
    fc2 = model.blocks[3][1].mlp.fc2
    assert torch.all(fc2.bias == 0) and fc2.weight.std().item() == pytest.approx(0.02, rel=0.2)
    torch.testing.assert_close(model.blocks[3][1].mlp.fc1.weight, src.blocks[3][1].mlp.fc1.weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize('init_cfg,exc,match', [
    (dict(type='Pretrained'), ValueError, "'Pretrained' needs a checkpoint path"),
    (dict(type='Pretrained', checkpoint=None), ValueError, "'Pretrained' needs a checkpoint"),
    ('ckpt.pth', TypeError, 'init_cfg must be a dict with a "type"'),
    ([dict(val=1)], TypeError, 'init_cfg must be a dict with a "type"'),
])
def test_bad_init_cfg_fails_when_the_model_is_built(init_cfg, exc, match):
    with pytest.raises(exc, match=match):
        SVT(arch=TINY_SVT, init_cfg=init_cfg)


# ------------------------------------------------------------------ arch validation and bad input
@pytest.mark.parametrize('arch,match', [
    ('medium', "unknown arch 'medium'"),
    (dict(TINY_SVT, depths=[1, 1, 1]), "'embed_dims' has 4 entries but depths has 3"),
    (dict(TINY_SVT, embed_dims=[16, 31, 32, 64]), "'embed_dims': stage 1 dim 31 .* 'num_heads' 2"),
    ({k: v for k, v in TINY_SVT.items() if k != 'sr_ratios'}, r"missing key\(s\) \['sr_ratios'\]"),
    (dict(TINY_SVT, windiow_sizes=[7] * 4), r"unknown key\(s\) \['windiow_sizes'\]"),
    ({k: v for k, v in TINY_SVT.items() if k != 'window_sizes'},
     r"^SVT: custom arch is missing key 'window_sizes'"),
    ({**{k: v for k, v in TINY_SVT.items() if k != 'window_sizes'}, 'windiow_sizes': [7] * 4},
     r"unknown key\(s\) \['windiow_sizes'\]"),
    (dict(TINY_SVT, sr_ratios=[8, 0, 2, 1]), "'sr_ratios' must hold positive ints"),
    (dict(TINY_SVT, sr_ratios=[8.5, 4, 2, 1]), "'sr_ratios' must hold positive ints"),
    (dict(TINY_SVT, embed_dims=[0, 32, 32, 64]), "'embed_dims' must hold positive ints"),
    (dict(TINY_SVT, num_heads=[1, 2, 0, 4]), "'num_heads' must hold positive ints"),
    (dict(TINY_SVT, mlp_ratios=[2, 0, 2, 2]), "'mlp_ratios' must hold positive numbers"),
    (dict(TINY_SVT, window_sizes=[7, None, 0, 7]), "'window_sizes' must hold positive ints"),
    (dict(TINY_SVT, depths=2), "'depths' must be a list with one entry per stage"),
])
def test_arch_validation_names_the_problem(arch, match):
    with pytest.raises(ValueError, match=match):
        SVT(arch=arch)


def test_misspelled_public_argument_is_rejected():
    with pytest.raises(TypeError, match='windiow_sizes'):
        SVT(arch='s', windiow_sizes=[7, 7, 7, 7])


@pytest.mark.parametrize('x,exc,match', [
    (torch.randn(1, 4, 64, 64), ValueError, 'built for 3 input channels, got 4'),
    (torch.randn(3, 64, 64), ValueError, r'4-D \(B, C, H, W\)'),
    (torch.randn(1, 3, 28, 64), ValueError, 'too small; height and width must be >= 29'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, 'floating-point'),
    ([[1.0]], TypeError, 'torch.Tensor'),
])
def test_bad_input_raises_one_clear_error(x, exc, match):
    model = SVT(arch=TINY_SVT)
    with pytest.raises(exc, match=match):
        model(x)


def test_is_one_network_class():
    assert issubclass(SVT, Twins) and issubclass(PCPVT, Twins)
    assert SVT.forward is Twins.forward and PCPVT.__init__ is Twins.__init__
    assert not any(isinstance(m, nn.MultiheadAttention) for m in SVT(arch=TINY_SVT).modules())
