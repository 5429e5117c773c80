"""LayerNorm over token channels, by mmtwins' compiled CPU kernel in inference where it runs.

PyTorch's CPU LayerNorm of rows of few channels is slow on an AMD EPYC Zen 5 (AVX-512 with
bf16, no AMX): 0.50 ms for 32768 fp32 rows of 64 channels and 0.78 ms for bf16 ones (half the
bytes), 36 and 56 us for a Twins MLP chunk of 2048 such rows; 10-15 ms of SVT-S's and PCPVT-S's
inference steps at 512x512, batch 2. ``mmtwins._ext.layer_norm`` (``mmtwins/csrc/layer_norm.cpp``;
where it is built and runs: :mod:`.native`; on every CPU with AVX512-BF16, measured on the Zen 5
and a Zen 4 EPYC) took 0.15 ms and 12 us in bf16 there (on the Zen 4 0.25 ms against PyTorch's
1.26, and 0.27 against 1.02 in fp32). Its values are within the dtype's rounding of the
exact norm: in bf16 PyTorch's differ from them by a rounding step in a few values in 10**5
(nearly constant rows: PyTorch's further off), in fp32 by the order of the fp32 sums.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear import PLAIN_TENSORS, is_plain, no_global_hooks
from .native import _ext, native_rows


def _affine(x: torch.Tensor, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> bool:
    """Whether ``weight`` and ``bias`` are the kernel's: plain contiguous fp32 CPU tensors of
    ``x``'s channels (autocast's parameters)."""
    return all(type(t) in PLAIN_TENSORS and t.dtype == torch.float32 and t.device.type == 'cpu'
               and t.shape == x.shape[-1:] and t.is_contiguous() for t in (weight, bias))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``, by the compiled kernel where
    :func:`.native.native_rows` takes ``x`` (fp32 or bf16 inference on a CPU with AVX512-BF16)
    with an fp32 weight and bias (the model's parameters, autocast's too). Callers whose
    backward recomputes the norm must not call it while gradients are off (the recomputation
    would differ by a rounding step).

    Shapes:
        x (..., C), weight and bias (C,) -> (..., C).
    """
    if native_rows(x, weight, bias) and _affine(x, weight, bias):
        return _ext.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``: a plain ``nn.LayerNorm`` over the last dim (:func:`.linear.is_plain`, no
    global hook) is computed by :func:`layer_norm` where its kernel may take ``x``; every other
    case calls the module, so its hooks and its scope in a traced or exported graph stay.

    Shapes:
        x (..., C) -> (..., C).
    """
    if (native_rows(x) and is_plain(norm, nn.LayerNorm) and no_global_hooks()
            and tuple(norm.normalized_shape) == x.shape[-1:]):
        return layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)
