"""Softmax over rows of bf16 attention scores, by mmtwins' compiled CPU kernel where it is built.

PyTorch's CPU softmax computes its exp with a vectorised fp32 exp accurate to about one fp32 ulp,
more than a bf16 result keeps. On an AMD EPYC Zen 5 (AVX-512 with bf16, no AMX) its bf16 softmax
took 0.29 ms per 2**20 scores, slower than its fp32 one (0.22), the exp alone 0.14, and held
bf16 inference below 1.8x its fp32 speed. ``mmtwins._ext.softmax_bf16_``
(``mmtwins/csrc/softmax.cpp``) computes the exp to a relative 6e-5, far inside bf16's rounding
(a relative 2**-8), and keeps short rows in registers: 0.08-0.11 ms per 2**20 scores there in
rows of 32 to 1056 scores, against PyTorch's 0.24-0.46. The install builds it on x86-64 Linux
where torch is importable at build time (pip's ``setup.py`` path or ``--no-build-isolation``, as
``tools/setup_env.sh`` installs) and a C++ compiler can (else it warns and installs without it);
it runs on CPUs with AVX512-BF16. Elsewhere :func:`softmax_rows_` computes the same (to bf16
rounding) with PyTorch's softmax.
"""
import torch

try:
    from mmtwins import _ext
except ImportError:  # not built (see above), or not x86-64 Linux
    _ext = None


def _avx512_bf16() -> bool:
    try:
        return torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # a PyTorch without the probe
        return False


#: Whether :func:`softmax_rows_` runs the compiled kernel: built, and a CPU with AVX512-BF16.
NATIVE_SOFTMAX = _ext is not None and _avx512_bf16()

#: The kernel's rows: a multiple of this many scores (16 fp32 lanes of an AVX-512 register).
NATIVE_LANES = 16


def softmax_rows_(scores: torch.Tensor, keys: int) -> torch.Tensor:
    """In place: the softmax over the first ``keys`` scores of each row of ``scores``, zeros in
    the rest of each row (padding: rows of whole registers); returns ``scores``. Through the
    compiled kernel (:data:`NATIVE_SOFTMAX`) for a contiguous bf16 CPU tensor whose rows are a
    multiple of :data:`NATIVE_LANES` scores and that no gradient flows through: the padding is
    never read (it needs no -inf written into it), the exp differs from PyTorch's by at most a
    relative 6e-5, weights below 2**-126 flush to 0. Else PyTorch's softmax (-inf written into
    the padding first), copied back. A row whose softmax is NaN (a NaN or +inf score, every key
    at -inf) is NaN throughout, padding included, either way.

    Shapes:
        scores (..., width), 0 < keys <= width -> (..., width).
    """
    width = scores.shape[-1] if scores.dim() else 0
    if (NATIVE_SOFTMAX and scores.dtype == torch.bfloat16 and scores.device.type == 'cpu'
            and type(scores) is torch.Tensor and scores.is_contiguous() and 0 < keys <= width
            and not width % NATIVE_LANES
            and not (torch.is_grad_enabled() and scores.requires_grad)):
        return _ext.softmax_bf16_(scores, keys)
    if keys < width:
        scores[..., keys:] = float('-inf')
    return scores.copy_(scores.softmax(-1))
