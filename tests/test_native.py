"""The compiled CPU kernels (``mmtwins._ext``): built by the package's install, on PyTorch's
threads."""
import platform
import sys

import pytest
import torch

from mmtwins.models.layers import native as kernels


@pytest.mark.skipif(platform.machine().lower() not in ('x86_64', 'amd64')
                    or not sys.platform.startswith('linux'), reason='built on x86-64 Linux')
def test_the_kernels_are_built_by_the_install():
    """``make setup`` (``pip install --no-build-isolation -e .``) compiles them here."""
    assert kernels._ext is not None
    assert {'attention', 'layer_norm_bf16'} <= set(dir(kernels._ext))
    assert kernels.NATIVE_BF16 == torch.cpu._is_avx512_bf16_supported()


@pytest.mark.skipif(not torch.backends.openmp.is_available() or kernels._ext is None,
                    reason='a torch with OpenMP threads, and the kernels built')
def test_the_kernels_run_on_torchs_openmp_threads():
    """at::parallel_for is inlined into the extension and runs its threads only where the
    extension is compiled with OpenMP (without it, one thread): it calls libgomp's entry."""
    with open(kernels._ext.__file__, 'rb') as f:
        assert b'GOMP_parallel' in f.read()
