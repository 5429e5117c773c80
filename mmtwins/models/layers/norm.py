"""LayerNorm over token channels, by mmtwins' compiled CPU kernel for bf16 inference where it runs.

PyTorch's CPU LayerNorm of bf16 tokens was slower than of fp32 ones on an AMD EPYC Zen 5 (AVX-512
with bf16, no AMX): 0.81 against 0.49 ms for 32768 rows of 64 channels, 52 us for a Twins MLP
chunk of 2048 such rows; 10-14 ms of SVT-S's and PCPVT-S's bf16 inference steps at 512x512, batch
2. ``mmtwins._ext.layer_norm_bf16`` (``mmtwins/csrc/layer_norm.cpp``; where it is built and
runs: :mod:`.native`) took 0.15 ms and 11 us there; its values are PyTorch's up to the order of
its fp32 sums (a bf16 rounding step apart in a few values in 10**5).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear import is_plain, no_global_hooks
from .native import _ext, native_bf16


def _kernel_takes(x: torch.Tensor, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor]) -> bool:
    """Whether the kernel computes the norm of ``x``: :func:`.native.native_bf16` takes it (bf16
    inference on a CPU with AVX512-BF16), with an fp32 weight and bias (autocast's
    parameters)."""
    return (weight is not None and bias is not None and weight.dtype == bias.dtype == torch.float32
            and native_bf16(x, weight, bias))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)``, by the compiled kernel where it
    takes them (bf16 inference on a CPU with AVX512-BF16, fp32 weight and bias).

    Shapes:
        x (..., C), weight and bias (C,) -> (..., C).
    """
    if _kernel_takes(x, weight, bias):
        return _ext.layer_norm_bf16(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def apply_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``: a plain ``nn.LayerNorm`` over the last dim (:func:`.linear.is_plain`, no
    global hook) is computed by the compiled kernel where it takes ``x`` (as in
    :func:`layer_norm`); every other case calls the module, so its hooks and its scope in a
    traced or exported graph stay.

    Shapes:
        x (..., C) -> (..., C).
    """
    if (is_plain(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == x.shape[-1:]
            and no_global_hooks() and _kernel_takes(x, norm.weight, norm.bias)):
        return _ext.layer_norm_bf16(x, norm.weight, norm.bias, norm.eps)
    return norm(x)
