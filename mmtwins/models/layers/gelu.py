"""The exact GELU of a training MLP's chunks, by mmtwins' compiled CPU kernel where it runs.

The backward of a chunked MLP (:mod:`.mlp`) needs, for each chunk of pre-activations ``h``,
``gelu(h)`` (``fc2``'s weight gradient) and ``grad * gelu'(h)`` (``fc1``'s gradients). PyTorch
computes them in two passes over the chunk, ``F.gelu`` and ``gelu_backward``, each evaluating
erf and exp, and a pass over a chunk of a million values is bound by memory on a 2-core CPU.
``mmtwins._ext.gelu_with_grad`` (``mmtwins/csrc/gelu.cpp``; where it is built and runs:
:mod:`.native`) gives both in one pass from one exp: on an AMD EPYC Zen 4, 0.26-0.32 ms per
million values against 0.65-0.90 ms for PyTorch's two (fp32 and bf16; one-off timings). Its erf
is the formula of PyTorch's and oneDNN's vectorised erf (Abramowitz and Stegun 7.1.26, to
1.5e-7): its fp32 values were 4e-7 and 8e-7 from the exact GELU and its gradient at most
(PyTorch's 1.2e-6 and 7e-7; ``tests/test_gelu.py``).
The forward's ``gelu(h)`` takes the same kernel, so the backward recomputes exactly the values
the forward used.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .native import _ext, native_rows


def gelu(h: torch.Tensor) -> torch.Tensor:
    """``F.gelu(h)`` (exact), by the kernel where :func:`.native.native_rows` takes ``h``."""
    if native_rows(h):
        return _ext.gelu(h)
    return F.gelu(h)


def gelu_with_grad(grad: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), grad * gelu'(h))``, in one pass by the kernel where it takes ``h`` and a
    ``grad`` of its shape, dtype and layout; else PyTorch's two.

    Shapes:
        grad (..., C), h (..., C) -> (..., C), (..., C).
    """
    if (native_rows(h, grad) and grad.shape == h.shape and grad.dtype == h.dtype
            and grad.is_contiguous()):
        return _ext.gelu_with_grad(grad, h)
    return F.gelu(h), torch.ops.aten.gelu_backward(grad, h)
