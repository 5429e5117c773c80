"""Softmax over rows of bf16 attention scores, by mmtwins' compiled CPU kernel where it runs.

PyTorch's CPU softmax computes its exp with a vectorised fp32 exp accurate to about one fp32 ulp,
more than a bf16 result keeps. On an AMD EPYC Zen 5 (AVX-512 with bf16, no AMX) its bf16 softmax
took 0.29 ms per 2**20 scores, slower than its fp32 one (0.22), the exp alone 0.14, and held
bf16 inference below 1.8x its fp32 speed. ``mmtwins._ext.softmax_bf16_``
(``mmtwins/csrc/softmax.cpp``; where it is built and runs: :mod:`.native`) computes the exp to a
relative 6e-5, far inside bf16's rounding (a relative 2**-8), and keeps short rows in registers:
0.08-0.11 ms per 2**20 scores there in rows of 32 to 1056 scores, against PyTorch's 0.24-0.46.
Elsewhere :func:`softmax_rows_` computes the same (to bf16 rounding) with PyTorch's softmax.
"""
import torch

from .native import _ext, native_bf16


def softmax_rows_(scores: torch.Tensor, keys: int, scale: float = 1.) -> torch.Tensor:
    """In place: the softmax over the first ``keys`` scores of each row of ``scale * scores``
    (``scale`` > 0: attention's 1 / sqrt(d)), zeros in the rest of each row (padding: rows of
    whole registers); returns ``scores``. Through the compiled kernel where
    :func:`.native.native_bf16` takes ``scores`` (a contiguous bf16 CPU tensor whose rows are a
    multiple of 16 scores, no gradient): the padding is never read (it needs no -inf written
    into it), the scores are scaled in fp32 registers, the exp differs from PyTorch's by at most
    a relative 6e-5, weights below 2**-126 flush to 0. Else PyTorch's softmax of the scores
    scaled in fp32 (-inf written into the padding first), copied back. A row whose softmax is
    NaN (a NaN or +inf score, every key at -inf) is NaN throughout, padding included, either
    way.

    Shapes:
        scores (..., width), 0 < keys <= width -> (..., width).
    """
    width = scores.shape[-1] if scores.dim() else 0
    if 0 < keys <= width and scale > 0 and native_bf16(scores):
        return _ext.softmax_bf16_(scores, keys, scale)
    if keys < width:
        scores[..., keys:] = float('-inf')
    # scaled in fp32 at least, as the kernel scales (bf16 would round the scaled scores)
    wide = scores.float() if scores.dtype in (torch.bfloat16, torch.float16) else scores
    return scores.copy_((wide * scale).softmax(-1))
