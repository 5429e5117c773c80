"""The compiled CPU kernels (``mmtwins._ext``): built by the package's install, on PyTorch's
threads."""
import contextlib
import platform
import sys

import pytest
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode

from mmtwins.models.layers import native as kernels


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64')
                    or not sys.platform.startswith('linux'), reason='built on x86-64 Linux')
def test_the_kernels_are_built_by_the_install():
    """``make setup`` (``pip install --no-build-isolation -e .``) compiles them here."""
    assert kernels._ext is not None
    assert {'attention', 'layer_norm'} <= set(dir(kernels._ext))
    assert kernels.NATIVE_BF16 == torch.cpu._is_avx512_bf16_supported()


@pytest.mark.skipif(not torch.backends.openmp.is_available() or kernels._ext is None,
                    reason='a torch with OpenMP threads, and the kernels built')
def test_the_kernels_run_on_torchs_openmp_threads():
    """at::parallel_for is inlined into the extension and runs its threads only where the
    extension is compiled with OpenMP (without it, one thread): it calls libgomp's entry."""
    with open(kernels._ext.__file__, 'rb') as f:
        assert b'GOMP_parallel' in f.read()


@pytest.mark.parametrize('case', ['plain', 'parameter', 'gradient', 'gradient, with a backward',
                                  'no grad mode', 'subclass', 'dispatch mode', 'forward AD',
                                  'vmap', 'tracing', 'not built'])
def test_native_call_says_where_a_kernel_may_run(monkeypatch, case):
    """The gate every kernel shares: plain tensors (or parameters), no gradient unless the caller
    has a backward, nothing that would not see the call."""
    monkeypatch.setattr(kernels, 'NATIVE_BF16', case != 'not built')
    x, weight = torch.randn(4, 16), torch.randn(16)
    context, backward = contextlib.nullcontext(), False
    if case == 'parameter':
        weight = torch.nn.Parameter(weight, requires_grad=False)
    elif case.startswith('gradient'):
        weight.requires_grad_()
        backward = case.endswith('backward')
    elif case == 'no grad mode':
        weight.requires_grad_()
        context = torch.no_grad()
    elif case == 'subclass':
        x = x.as_subclass(_Sub)
    elif case == 'dispatch mode':
        context = _Mode()
    elif case == 'forward AD':
        context = forward_ad.dual_level()
    elif case == 'tracing':
        monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
    if case == 'vmap':
        seen = []
        torch.vmap(lambda row: seen.append(kernels.native_call(row, weight)) or row)(x)
        allowed = seen[0]
    else:
        with context:
            allowed = kernels.native_call(x, weight, None, backward=backward)
    assert allowed == (case in ('plain', 'parameter', 'gradient, with a backward',
                                'no grad mode'))


class _Sub(torch.Tensor):
    pass


class _Mode(TorchDispatchMode):

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
