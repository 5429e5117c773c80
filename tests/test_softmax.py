"""The compiled bf16 row softmax (``mmtwins._ext``), which bf16 CPU inference attention uses on
CPUs with AVX512-BF16: built by the package's install, equal to the softmax to bf16 rounding,
in place, over a row's first ``keys`` scores."""
import platform
import sys

import pytest
import torch

from mmtwins.models.layers import native as kernels
from mmtwins.models.layers import softmax as softmax_module
from mmtwins.models.layers.softmax import softmax_rows_

native = pytest.mark.skipif(not kernels.NATIVE_BF16,
                            reason='the kernel runs on CPUs with AVX512-BF16 only')


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64')
                    or not sys.platform.startswith('linux'), reason='built on x86-64 Linux')
def test_the_kernel_is_built_by_the_install():
    """``make setup`` (``pip install --no-build-isolation -e .``) compiles it here."""
    assert kernels._ext is not None
    assert kernels.NATIVE_BF16 == torch.cpu._is_avx512_bf16_supported()


def exact(scores: torch.Tensor, keys: int) -> torch.Tensor:
    """The softmax of the first ``keys`` bf16 scores of each row (float64), zeros beyond."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    out[..., :keys] = scores[..., :keys].double().softmax(-1)
    return out


@pytest.mark.skipif(not torch.backends.openmp.is_available() or kernels._ext is None,
                    reason='a torch with OpenMP threads, and the kernel built')
def test_the_kernel_runs_on_torchs_openmp_threads():
    """at::parallel_for is inlined into the extension and runs its threads only where the
    extension is compiled with OpenMP (without it, one thread): it calls libgomp's entry."""
    with open(kernels._ext.__file__, 'rb') as f:
        assert b'GOMP_parallel' in f.read()


@native
@pytest.mark.parametrize('width', [16, 32, 64, 128, 256, 272, 1056])
@pytest.mark.parametrize('scale', [0.1, 3., 40.])
def test_rows_within_bf16_rounding_of_the_exact_softmax(width, scale):
    """Every width (rows of 32, 64, 128 and 256 kept in registers; other multiples of 16
    through a buffer) and number of keys (whole and part registers), scores near and far
    apart, the padding beyond ``keys`` holding anything (NaN here): each
    weight within bf16's rounding (a relative 2**-8) of the exact one, give or take the
    kernel's exp (1 %), no further off than PyTorch's bf16 softmax by half as much again; the
    padding exactly 0; the scores' own memory."""
    g = torch.Generator().manual_seed(width)
    scores = (torch.randn(3, 5, 37, width, generator=g) * scale).bfloat16()
    for keys in sorted({1, 15, 16, 17, width // 2, width - 15, width - 1, width} - {0}):
        rows = scores.clone()
        want = exact(rows, keys)
        pytorchs = rows[..., :keys].softmax(-1).double()
        rows[..., keys:] = float('nan')  # padding: never read
        got = softmax_rows_(rows, keys)
        assert got.data_ptr() == rows.data_ptr() and got.dtype == torch.bfloat16
        assert ((got.double() - want).abs() <= want * 2 ** -8 * 1.01 + 1e-30).all(), keys
        assert (got[..., keys:] == 0).all(), keys
        torch_error = (pytorchs - want[..., :keys]).abs().max()
        assert (got.double() - want).abs().max() <= 1.5 * torch_error + 1e-30, keys


@native
def test_a_row_of_minus_inf_is_nan_and_other_inputs_take_pytorchs_softmax():
    """A row whose every key scores -inf gives NaN (as PyTorch's softmax); fp32 scores, rows
    not a multiple of 16, non-contiguous rows and scores that a gradient flows through get
    PyTorch's softmax (the padding at -inf), written back in place as the kernel writes."""
    scores = torch.randn(4, 32).bfloat16()
    scores[1, :20] = float('-inf')
    got = softmax_rows_(scores, 20)
    assert got[1, :20].isnan().all() and not got[[0, 2, 3]].isnan().any()
    needs_grad = torch.randn(4, 32).bfloat16().requires_grad_()
    for other in (torch.randn(4, 32), torch.randn(4, 49).bfloat16(),
                  torch.randn(32, 4).bfloat16().t(), needs_grad * 1):
        padded = other.detach().clone()
        padded[..., 3:] = float('-inf')
        got = softmax_rows_(other, 3)
        assert got is other and torch.equal(got, padded.softmax(-1))  # in place too
    assert other.grad_fn is not None  # the write back is recorded where a gradient flows


@native
def test_threads_split_rows_not_values():
    """Many rows over every thread: the same values as one row at a time."""
    scores = (torch.randn(2, 8, 1000, 256) * 5).bfloat16()
    rows = torch.stack([softmax_rows_(r.clone(), 200) for r in scores.view(-1, 1, 256)[:64]])
    whole = softmax_rows_(scores, 200)
    assert torch.equal(whole.view(-1, 1, 256)[:64], rows)


@pytest.mark.parametrize('kernel', [True, False], ids=['kernel', 'fallback'])
def test_scores_scaled_on_the_way(monkeypatch, kernel):
    """``scale`` (attention's 1 / sqrt(d)) multiplies the scores inside the softmax: within
    bf16's rounding of the exact softmax of the scaled scores, by the kernel and by PyTorch."""
    if kernel and not kernels.NATIVE_BF16:
        pytest.skip('the kernel runs on CPUs with AVX512-BF16 only')
    if not kernel:
        monkeypatch.setattr(softmax_module, 'native_bf16', lambda *args: False)
    scores = (torch.randn(2, 3, 17, 64) * 30).bfloat16()
    scale = 32 ** -0.5
    want = exact(scores.double() * scale, 49)
    got = softmax_rows_(scores.clone(), 49, scale)
    assert ((got.double() - want).abs() <= want * 2 ** -7 + 1e-30).all()
