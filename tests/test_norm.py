"""The compiled bf16 LayerNorm (``mmtwins._ext.layer_norm_bf16``), which bf16 CPU inference uses
for the blocks', patch embeddings', GSA's and stage-end norms on CPUs with AVX512-BF16: PyTorch's
values to bf16 rounding; everything else PyTorch's LayerNorm."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtwins.models.backbones import SVT
from mmtwins.models.layers import native as kernels
from mmtwins.models.layers import norm as norms
from mmtwins.models.layers.norm import apply_norm, layer_norm
from conftest import TINY_SVT

native = pytest.mark.skipif(not kernels.NATIVE_BF16,
                            reason='the kernel runs on CPUs with AVX512-BF16 only')


@pytest.fixture
def kernel_calls(monkeypatch):
    """The shapes the kernel was called on, in order."""
    calls, kernel = [], kernels._ext.layer_norm_bf16

    def counted(x, *args):
        calls.append(tuple(x.shape))
        return kernel(x, *args)

    monkeypatch.setattr(kernels._ext, 'layer_norm_bf16', counted)
    return calls


def affine(channels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, generator=g), torch.randn(channels, generator=g)


@native
@pytest.mark.parametrize('channels', [16, 64, 128, 256, 320, 512, 1024])
@pytest.mark.parametrize('scale,shift', [(1., 0.), (30., 100.), (1e-3, 1.)])
def test_rows_within_bf16_rounding_of_the_exact_norm(channels, scale, shift):
    """Every width (64, 128 and 256 channels held in registers, four, two and one rows at a
    time, 37 rows leaving a remainder; other multiples of 16 read from memory), values spread
    and offset (the rows 1e-3 wide on an offset of 1 hold a few bf16 values): each value within
    bf16's rounding (a relative 2**-8) of the exact norm, or 1e-4 of it near 0 (where the
    bias cancels the normalised value, both rounded in fp32)."""
    weight, bias = affine(channels, channels)
    g = torch.Generator().manual_seed(channels)
    x = (torch.randn(37, channels, generator=g) * scale + shift).bfloat16()
    exact = F.layer_norm(x.double(), (channels,), weight.double(), bias.double(), 1e-6)
    got = layer_norm(x, weight, bias, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()


@native
def test_threads_split_rows_and_leading_dims_flatten():
    """Many rows over every thread and a (B, N, C) tensor: the same values as row by row."""
    weight, bias = affine(64, 0)
    x = (torch.randn(2, 4096, 64) * 3).bfloat16()
    whole = layer_norm(x, weight, bias, 1e-5)
    rows = torch.cat([layer_norm(r, weight, bias, 1e-5) for r in x.view(-1, 64)[:40].split(1)])
    assert whole.shape == x.shape and torch.equal(whole.view(-1, 64)[:40], rows)


@native
def test_the_kernel_runs_in_bf16_inference_only(kernel_calls):
    """The kernel for a contiguous bf16 CPU input with fp32 affine parameters and no gradient;
    PyTorch's LayerNorm (and autograd) for anything else."""
    weight, bias = affine(64, 1)
    x = (torch.randn(8, 64) * 2).bfloat16()
    kernel = layer_norm(x, weight, bias, 1e-6)
    assert kernel_calls == [(8, 64)]
    others = {
        'fp32': (x.float(), weight, bias),
        'no affine': (x, None, None),
        'bf16 weight': (x, weight.bfloat16(), bias.bfloat16()),
        'not a multiple of 16 channels': (x[:, :40].contiguous(), weight[:40], bias[:40]),
        'not contiguous': (x.t().contiguous().t(), weight, bias),
    }
    for case, (xi, w, b) in others.items():
        torch.testing.assert_close(layer_norm(xi, w, b, 1e-6),
                                   F.layer_norm(xi, xi.shape[-1:], w, b, 1e-6), rtol=0, atol=0,
                                   msg=case)
    grad_w = weight.clone().requires_grad_()
    out = layer_norm(x, grad_w, bias, 1e-6)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, F.layer_norm(x, (64,), weight, bias, 1e-6), rtol=0, atol=0)
    assert len(kernel_calls) == 1
    with torch.no_grad():
        assert torch.equal(layer_norm(x, grad_w, bias, 1e-6), kernel)
    assert len(kernel_calls) == 2


def test_apply_norm_calls_modules_it_cannot_stand_in_for():
    """A LayerNorm subclass, one with a hook, and one over more than the last dim are called
    (their forward and hooks run); a plain one gives F.layer_norm's values."""
    x = torch.randn(2, 5, 32)
    plain = nn.LayerNorm(32)
    torch.testing.assert_close(apply_norm(plain, x), plain(x), rtol=0, atol=0)

    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    calls = []
    hooked = nn.LayerNorm(32)
    hooked.register_forward_hook(lambda *args: calls.append(1))
    for module in (Scaled(32), hooked, nn.LayerNorm((5, 32))):
        torch.testing.assert_close(apply_norm(module, x), module(x), rtol=0, atol=0)
    assert len(calls) == 2


@native
def test_bf16_inference_of_a_backbone_takes_the_kernel_within_bf16_rounding(monkeypatch,
                                                                             kernel_calls):
    """Under bf16 autocast every norm of the backbone runs the kernel once (two per block, one
    per patch embedding, GSA with sub-sampling and stage end), and its maps are those of
    PyTorch's LayerNorm to bf16 rounding."""
    torch.manual_seed(0)
    model = SVT(arch=TINY_SVT).eval()
    x = torch.randn(2, 3, 64, 56)
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16):
        got = model(x)
        monkeypatch.setattr(norms, 'native_bf16', lambda *args: False)
        pytorchs = model(x)
    assert len(kernel_calls) == sum(isinstance(m, nn.LayerNorm) for m in model.modules()) > 20
    for a, b in zip(got, pytorchs):
        assert a.dtype == torch.bfloat16
        cosine = F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0)
        assert cosine > 0.9999
