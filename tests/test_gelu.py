"""The compiled GELU (``mmtwins._ext.gelu``, ``gelu_with_grad``), which a training MLP's chunks
use on CPUs with AVX512-BF16: the exact GELU and its gradient to the dtype's rounding, one pass
for both in backward; everything else PyTorch's."""
import pytest
import torch
import torch.nn.functional as F

from mmtwins.models.layers import native as kernels
from mmtwins.models.layers.gelu import gelu, gelu_with_grad
from mmtwins.models.layers.mlp import Mlp

native = pytest.mark.skipif(not kernels.NATIVE_BF16,
                            reason='the kernel runs on CPUs with AVX512-BF16 only')


def exact(h: torch.Tensor, grad: torch.Tensor):
    """gelu(h) and grad * gelu'(h) in float64."""
    h, grad = h.double(), grad.double()
    phi = 0.5 * torch.erfc(-h / 2 ** 0.5)  # not 1 + erf, which is 0 in float64 below -8.3
    density = torch.exp(-h * h / 2) / (2 * torch.pi) ** 0.5
    return h * phi, grad * (phi + h * density)


def pre_activations(dtype: torch.dtype):
    """A chunk of 64 x 48 values: both tails, zero and a normal spread; and its gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.linspace(-12, 12, 1024), torch.randn(2048, generator=g) * 3])
    grad = torch.randn(3072, generator=g)
    return h.view(64, 48).to(dtype), grad.view(64, 48).to(dtype)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel functions called, in order."""
    calls = []
    for name in ('gelu', 'gelu_with_grad'):
        kernel = getattr(kernels._ext, name)

        def counted(*args, _name=name, _kernel=kernel):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(kernels._ext, name, counted)
    return calls


@native
def test_fp32_values_and_gradient_within_1e_6_of_the_exact_ones(kernel_calls):
    """As close as PyTorch's own fp32 GELU and gradient (the same erf formula): about 4e-7 and
    8e-7 from the exact values here, PyTorch's 1.2e-6 and 7e-7."""
    h, grad = pre_activations(torch.float32)
    value, grad_h = gelu_with_grad(grad, h)
    assert kernel_calls == ['gelu_with_grad']
    want_value, want_grad = exact(h, grad)
    torch_value = F.gelu(h).double()
    assert (value.double() - want_value).abs().max() <= max(
        1e-6, (torch_value - want_value).abs().max())
    torch.testing.assert_close(grad_h.double(), want_grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(gelu(h), value)  # the forward's values are the backward's
    assert kernel_calls == ['gelu_with_grad', 'gelu']


@native
def test_bf16_values_and_gradient_within_bf16_rounding():
    h, grad = pre_activations(torch.bfloat16)
    value, grad_h = gelu_with_grad(grad, h)
    assert value.dtype == grad_h.dtype == torch.bfloat16
    want_value, want_grad = exact(h, grad)
    for got, want in ((value, want_value), (grad_h, want_grad)):
        assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()


@native
def test_tails_zero_and_non_finite_values():
    """The negative tail is computed directly, not as 1 - erf: at -5 and -10 nearer the exact
    values than PyTorch's (-1.4e-6 within 0.2 % against PyTorch's -1.2e-6; -7.8e-23 against 0);
    NaN and -inf give NaN, as PyTorch's; +inf gives +inf (PyTorch's NaN)."""
    inf, nan = float('inf'), float('nan')
    h = torch.tensor([-inf, -10., -5., -0., 0., 1., 10., inf, nan] + [0.] * 7)
    value, grad_h = gelu_with_grad(torch.ones(16), h)
    want_value, want_grad = exact(h[1:7], torch.ones(6))
    torch.testing.assert_close(value[1:7].double(), want_value, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_h[1:7].double(), want_grad, rtol=1e-6, atol=1e-8)
    error = (value[1:3].double() - want_value[:2]).abs()
    assert (error < (F.gelu(h[1:3]).double() - want_value[:2]).abs()).all()
    assert value[0].isnan() and value[8].isnan() and grad_h[8].isnan()
    assert value[7] == inf


def test_pytorch_computes_what_the_kernel_does_not_take(kernel_calls):
    """Rows not a multiple of 16 values, a gradient of another layout, or gradients recorded:
    PyTorch's GELU and gradient, exactly."""
    g = torch.Generator().manual_seed(1)
    h, grad = torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)
    value, grad_h = gelu_with_grad(grad, h)
    assert torch.equal(value, F.gelu(h))
    assert torch.equal(grad_h, torch.ops.aten.gelu_backward(grad, h))
    h, grad = torch.randn(16, 32, generator=g), torch.randn(32, 16, generator=g).t()
    assert torch.equal(gelu_with_grad(grad, h)[1], torch.ops.aten.gelu_backward(grad, h))
    h.requires_grad_()
    assert torch.equal(gelu(h), F.gelu(h))
    assert kernel_calls == []


@native
@pytest.mark.parametrize('recompute_hidden', [False, True])
def test_a_training_mlp_takes_the_kernel_once_per_chunk_each_way(kernel_calls,
                                                                 recompute_hidden):
    """Three chunks of a 16 -> 64 -> 16 MLP: the forward's GELU by the kernel, and in backward
    one pass for the GELU and its gradient per chunk; gradients those of the plain composition
    to fp32 rounding, the same with and without ``recompute_hidden``."""
    torch.manual_seed(0)
    mlp = Mlp(16, 64, chunk_rows=7, recompute_hidden=recompute_hidden)
    x = torch.randn(2, 10, 16, requires_grad=True)
    mlp(x).square().sum().backward()
    assert kernel_calls == ['gelu'] * 3 + ['gelu_with_grad'] * 3
    ours = [x.grad] + [p.grad for p in mlp.parameters()]
    x2 = x.detach().clone().requires_grad_()
    mlp.zero_grad()
    mlp.fc2(mlp.act(mlp.fc1(x2))).square().sum().backward()
    for a, b in zip(ours, [x2.grad] + [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
