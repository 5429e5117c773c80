"""The compiled LayerNorm (``mmtwins._ext.layer_norm``), which fp32 and bf16 CPU inference uses
for the blocks', patch embeddings', GSA's and stage-end norms on CPUs with AVX512-BF16: PyTorch's
values to the dtype's rounding; everything else PyTorch's LayerNorm."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtwins.models.backbones import SVT
from mmtwins.models.layers import native as kernels
from mmtwins.models.layers import norm as norms
from mmtwins.models.layers.mlp import Mlp
from mmtwins.models.layers.norm import apply_norm, layer_norm
from conftest import TINY_SVT

native = pytest.mark.skipif(not kernels.NATIVE_BF16,
                            reason='the kernel runs on CPUs with AVX512-BF16 only')


@pytest.fixture
def kernel_calls(monkeypatch):
    """The shapes the kernel was called on, in order."""
    calls, kernel = [], kernels._ext.layer_norm

    def counted(x, *args):
        calls.append(tuple(x.shape))
        return kernel(x, *args)

    monkeypatch.setattr(kernels._ext, 'layer_norm', counted)
    return calls


def affine(channels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, generator=g), torch.randn(channels, generator=g)


DTYPES = pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])


@native
@DTYPES
@pytest.mark.parametrize('channels', [16, 64, 128, 256, 320, 512, 1024])
@pytest.mark.parametrize('scale,shift', [(1., 0.), (30., 100.), (1e-3, 1.)])
def test_rows_within_rounding_of_the_exact_norm(kernel_calls, channels, scale, shift, dtype):
    """Every width (64, 128 and 256 channels held in registers, four, two and one rows at a
    time, 37 rows leaving a remainder; other multiples of 16 read from memory), values spread
    and offset (the rows 1e-3 wide on an offset of 1 hold a few bf16 values). bf16: each value
    within bf16's rounding (a relative 2**-8) of the exact norm, or 1e-4 of it near 0 (where the
    bias cancels the normalised value, both rounded in fp32). fp32: no further from the exact
    norm than twice PyTorch's fp32 LayerNorm (its sums cost a narrow row on an offset digits:
    both 2-5e-4 off there, about 1e-6 elsewhere)."""
    weight, bias = affine(channels, channels)
    g = torch.Generator().manual_seed(channels)
    x = (torch.randn(37, channels, generator=g) * scale + shift).to(dtype)
    exact = F.layer_norm(x.double(), (channels,), weight.double(), bias.double(), 1e-6)
    got = layer_norm(x, weight, bias, 1e-6)
    assert kernel_calls == [(37, channels)]
    assert got.dtype == dtype and got.shape == x.shape
    error = (got.double() - exact).abs()
    if dtype == torch.bfloat16:
        assert (error <= exact.abs() * 2 ** -8 + 1e-4).all()
    else:
        pytorchs = F.layer_norm(x, (channels,), weight, bias, 1e-6)
        assert error.max() <= 2 * (pytorchs.double() - exact).abs().max() + 1e-6


@native
@DTYPES
def test_constant_rows_and_no_rows(dtype):
    """A constant row (variance 0) gives the bias (rounded to the dtype); no rows, no values."""
    weight, bias = affine(64, 2)
    got = layer_norm(torch.full((3, 64), 2.5).to(dtype), weight, bias, 1e-6)
    assert torch.equal(got, bias.to(dtype).expand(3, 64))
    for empty in (torch.empty(0, 64), torch.empty(2, 0, 64)):
        got = layer_norm(empty.to(dtype), weight, bias, 1e-6)
        assert got.shape == empty.shape and got.dtype == dtype


@native
@DTYPES
@pytest.mark.parametrize('channels', [64, 320])
def test_threads_split_rows_and_leading_dims_flatten(channels, dtype):
    """Many rows (an odd number: every thread's share ends in a remainder) over every thread, a
    (B, N, C) tensor: the same values as row by row, a 1-D tensor each."""
    weight, bias = affine(channels, 0)
    x = (torch.randn(3, 2731, channels) * 3).to(dtype)
    whole = layer_norm(x, weight, bias, 1e-5)
    rows = torch.stack([layer_norm(r, weight, bias, 1e-5) for r in x.view(-1, channels)])
    assert whole.shape == x.shape and torch.equal(whole.view(-1, channels), rows)


@native
def test_the_kernel_runs_in_inference_only(kernel_calls):
    """The kernel for a contiguous fp32 or bf16 CPU input with fp32 affine parameters and no
    gradient; PyTorch's LayerNorm (and autograd) for anything else."""
    weight, bias = affine(64, 1)
    x = (torch.randn(8, 64) * 2).bfloat16()
    kernel = layer_norm(x, weight, bias, 1e-6)
    layer_norm(x.float(), weight, bias, 1e-6)
    assert kernel_calls == [(8, 64)] * 2
    others = {
        'fp64': (x.double(), weight.double(), bias.double()),
        'fp16': (x.half(), weight, bias),
        'no affine': (x, None, None),
        'bf16 weight': (x, weight.bfloat16(), bias.bfloat16()),
        'not a multiple of 16 channels': (x[:, :40].contiguous(), weight[:40], bias[:40]),
        'not contiguous': (x.t().contiguous().t(), weight, bias),
        'weight not contiguous': (x, torch.randn(64, 2)[:, 0], bias),
        'x needs a gradient': (x.clone().requires_grad_(), weight, bias),
        'the bias needs a gradient': (x, weight, bias.clone().requires_grad_()),
    }
    for case, (xi, w, b) in others.items():
        torch.testing.assert_close(layer_norm(xi, w, b, 1e-6),
                                   F.layer_norm(xi, xi.shape[-1:], w, b, 1e-6), rtol=0, atol=0,
                                   msg=case)
    assert len(kernel_calls) == 2
    grad_w = weight.clone().requires_grad_()
    assert layer_norm(x, grad_w, bias, 1e-6).grad_fn is not None
    with torch.no_grad():
        assert torch.equal(layer_norm(x, grad_w, bias, 1e-6), kernel)
    assert len(kernel_calls) == 3
    with torch.no_grad():  # a trace records PyTorch's LayerNorm
        traced = torch.jit.trace(lambda t: layer_norm(t, weight, bias, 1e-6), x,
                                 check_trace=False)
    assert len(kernel_calls) == 3 and 'layer_norm' in str(traced.graph)


@native
def test_apply_norm_calls_modules_it_cannot_stand_in_for(kernel_calls):
    """In inference a plain LayerNorm takes the kernel; a LayerNorm subclass, one with a
    hook, one whose instance has its own forward, one over more than the last dim, one without
    affine parameters or without a bias are called (their forward and hooks run)."""
    x = torch.randn(2, 5, 32).bfloat16()

    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    calls = []
    hooked = nn.LayerNorm(32)
    hooked.register_forward_hook(lambda *args: calls.append(1))
    own = nn.LayerNorm(32)
    own.forward = lambda t: calls.append(1) or F.layer_norm(t, (32,))
    modules = (Scaled(32), hooked, own, nn.LayerNorm((5, 32)),
               nn.LayerNorm(32, elementwise_affine=False), nn.LayerNorm(32, bias=False))
    with torch.no_grad():
        apply_norm(nn.LayerNorm(32), x)
        assert kernel_calls == [(2, 5, 32)]
        for module in modules:
            torch.testing.assert_close(apply_norm(module, x), module(x), rtol=0, atol=0)
    assert len(calls) == 4 and len(kernel_calls) == 1


@native
@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16 autocast'])
def test_inference_of_a_backbone_takes_the_kernel_within_rounding(monkeypatch, kernel_calls,
                                                                   autocast):
    """In inference, fp32 or under bf16 autocast, every norm of the backbone runs the kernel
    once (two per block, one per patch embedding, GSA with sub-sampling and stage end), and its
    maps are those of PyTorch's LayerNorm to the dtype's rounding (fp32: the max abs difference
    the peer comparisons allow, 1e-4)."""
    torch.manual_seed(0)
    model = SVT(arch=TINY_SVT).eval()
    x = torch.randn(2, 3, 64, 56)
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=autocast):
        got = model(x)
        monkeypatch.setattr(norms, 'native_rows', lambda *args: False)
        pytorchs = model(x)
    assert len(kernel_calls) == sum(isinstance(m, nn.LayerNorm) for m in model.modules()) > 20
    for a, b in zip(got, pytorchs):
        assert a.dtype == (torch.bfloat16 if autocast else torch.float32)
        if autocast:
            cosine = F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0)
            assert cosine > 0.9999
        else:
            assert (a - b).abs().max() <= 1e-4


@native
@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16 autocast'])
def test_the_mlps_norm_takes_the_kernel_in_inference_only(kernel_calls, autocast):
    """The chunked MLP's pre-norm takes the kernel where no backward follows; in training its
    autograd function's forward (which runs with gradients off) keeps PyTorch's LayerNorm, the
    one its backward recomputes, so with and without ``recompute_hidden`` it is one norm."""
    mlp, ln = Mlp(64, 256, chunk_rows=40), nn.LayerNorm(64, eps=1e-6)
    x = torch.randn(2, 50, 64).to(torch.bfloat16 if autocast else torch.float32)
    with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
        mlp(x.clone().requires_grad_(), norm=ln).float().sum().backward()
        assert kernel_calls == []
        with torch.no_grad():
            mlp(x, norm=ln)
    assert kernel_calls == [(40, 64), (40, 64), (20, 64)]
