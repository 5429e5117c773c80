"""mmtwins' compiled CPU kernels (``mmtwins._ext``, sources in ``mmtwins/csrc``), and on which
tensors they run.

Three operations ran slower in PyTorch on a CPU with AVX512-BF16 and no AMX (an AMD EPYC Zen 5)
than they need to: attention (:mod:`.attention`, fp32 and bf16, forward and backward;
PyTorch's fused kernel multiplies through MKL, which runs there at its AVX2 rate), LayerNorm
in inference (:mod:`.norm`, fp32 and bf16: PyTorch's is slow on rows of few channels) and the
GELU of a training MLP with its gradient (:mod:`.gelu`: two passes in PyTorch, one here). The
install builds them on x86-64 Linux where torch is importable at build time (pip's ``setup.py``
path or ``--no-build-isolation``, as ``tools/setup_env.sh`` installs) and a C++ compiler can
(else it warns and installs without them); they run on CPUs with AVX512-BF16. Elsewhere, and
wherever :func:`native_call` says no, PyTorch computes the same (to bf16 rounding in bf16, to
fp32 rounding in fp32).
"""
from typing import Optional

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .graph import is_recording
from .linear import PLAIN_TENSORS

try:
    from mmtwins import _ext
except ImportError:  # not built (see above), or not x86-64 Linux
    _ext = None


def _avx512_bf16() -> bool:
    try:
        return torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # a PyTorch without the probe
        return False


#: Whether the kernels run here: built, and a CPU with AVX512-BF16.
NATIVE_BF16 = _ext is not None and _avx512_bf16()

#: The kernels' rows: a multiple of this many values (16 fp32 lanes of an AVX-512 register).
NATIVE_LANES = 16


def native_call(*tensors: Optional[torch.Tensor], backward: bool = False) -> bool:
    """Whether a kernel may compute on ``tensors`` (its inputs and weights; their dtype, device,
    shape and layout are the caller's to check): the kernels built and run here
    (:data:`NATIVE_BF16`); not while a graph is being recorded for export or compiled, nor under
    a dispatch mode or a forward-mode AD level (none would see the call); plain tensors or
    parameters (:data:`.linear.PLAIN_TENSORS`: no other subclass, no vmap or grad transform's
    wrapper); no gradient flowing through any of them, unless the caller has a ``backward`` for
    the kernel (only attention's has one)."""
    present = [t for t in tensors if t is not None]
    return (NATIVE_BF16 and not is_recording()
            and _get_current_dispatch_mode() is None and forward_ad._current_level < 0
            and all(type(t) in PLAIN_TENSORS for t in present)
            and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present)
            and (backward
                 or not (torch.is_grad_enabled() and any(t.requires_grad for t in present))))


#: The dtypes the kernels compute in (their inputs').
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_rows(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether a row kernel may compute on ``x`` and the tensors ``params`` (its weights; their
    dtype, device and shape are the caller's to check): :func:`native_call`, and ``x`` a
    contiguous fp32 or bf16 CPU tensor of rows of a multiple of :data:`NATIVE_LANES` values."""
    return (native_call(x, *params) and x.dtype in NATIVE_DTYPES and x.device.type == 'cpu'
            and x.dim() > 0 and x.shape[-1] > 0 and not x.shape[-1] % NATIVE_LANES
            and x.is_contiguous())
