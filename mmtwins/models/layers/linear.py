"""Token-wise linear layers on CPUs, computed by oneDNN as 1x1 convolutions.

On a CPU PyTorch computes ``F.linear`` and ``torch.mm`` in fp32 with its BLAS, MKL in the
official wheels, and its convolutions with oneDNN. On an AMD EPYC Zen 5 (2 cores, AVX-512) MKL's
sgemm ran the linears of a Twins block at 190-240 GFLOP/s, about the AVX2 peak of two cores
(``MKL_ENABLE_INSTRUCTIONS=AVX512`` changed nothing), while oneDNN ran the same products, forward
and backward, at 340-550 with its AVX-512 kernels (``ONEDNN_VERBOSE=1`` names
``brgconv_1x1:avx512_core``). ``tools/analysis_tools/linear_ab.py`` times a whole model both
ways on any CPU. A 1x1 convolution over a channels-last map is a matrix product, and (M, C)
row-major tokens already are the (1, C, 1, M) channels-last map, so the route costs no copy;
values agree with ``F.linear`` to fp32 rounding (the order of summation differs).

The route is taken by :func:`use_onednn`: on a CPU, in fp32, outside autocast (whose bf16
products already run in oneDNN), where PyTorch's convolution would use oneDNN for it (enabled,
more than one thread, more than :data:`ONEDNN_MIN_NUMEL` input elements), and not while a graph
is being recorded for export (an exported graph keeps its ``Gemm``/``MatMul`` nodes).
``USE_ONEDNN = False`` switches it off everywhere.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .embed import is_exporting

#: Route fp32 CPU linears through oneDNN (see the module docstring); False: ``F.linear``.
USE_ONEDNN = True

_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')


def no_global_hooks() -> bool:
    """True where no global module hook (forward or backward) is set."""
    return not any(getattr(_module, f'_global{h}', None) for h in _HOOKS)


def is_plain(module: nn.Module, cls: type) -> bool:
    """True where ``module`` is exactly a ``cls`` (no subclass: quantised, LoRA-wrapped) with no
    module hook of its own, so computing with its parameters equals calling it."""
    return type(module) is cls and not any(getattr(module, h) for h in _HOOKS)


#: PyTorch runs a 1x1 convolution of one image with oneDNN only above this many input elements
#: and with more than one thread (``ConvParams::use_mkldnn``); otherwise its own route, which is
#: MKL's product again plus a dispatch overhead (measured: 10-30 us more per call than
#: ``F.linear`` for small products), so :func:`use_onednn` leaves those to ``F.linear``.
ONEDNN_MIN_NUMEL = 20480


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product of ``x`` (the linear's input) with ``weight`` goes through oneDNN
    (module docstring)."""
    return (USE_ONEDNN and not is_exporting() and x.device.type == 'cpu'
            and x.dtype == weight.dtype == torch.float32 and x.numel() > ONEDNN_MIN_NUMEL
            and torch.get_num_threads() > 1 and not torch.is_autocast_enabled('cpu')
            and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Row-major (M, C) -> the channels-last (1, C, 1, M) map it already is (a view)."""
    return x.view(1, 1, *x.shape).permute(0, 3, 1, 2)


def _from_map(y: torch.Tensor) -> torch.Tensor:
    """Channels-last (1, O, 1, M) -> (M, O) rows (a view; oneDNN keeps the input's layout)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` on row-major (M, C) tokens through oneDNN, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _from_map(F.conv2d(_as_map(x), weight[:, :, None, None], bias))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return linear_grads(grad, x, weight, ctx.needs_input_grad)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`use_onednn`; differentiable.

    Shapes:
        x (..., C), weight (O, C), bias (O,) -> (..., O).
    """
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 needs: Sequence[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward of ``linear(x, weight, bias)`` for :func:`use_onednn` inputs: ``(grad @
    weight, grad.T @ x, grad.sum(0))``, each only where ``needs`` says (else None). oneDNN
    computes the products; the bias gradient is PyTorch's sum, whose blocked summation is
    exact to fp32 rounding (oneDNN's own was measured 0.6 % off over 2048 rows).

    Shapes:
        grad (M, O), x (M, C), weight (O, C) -> (M, C), (O, C), (O,).
    """
    need_x, need_w, need_b = needs[:3]
    gx = gw = None
    if need_x or need_w:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            _as_map(grad.contiguous()), _as_map(x.contiguous()), weight[:, :, None, None],
            None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_w, False])
    return (None if gx is None else _from_map(gx), None if gw is None else gw.view(weight.shape),
            grad.sum(0) if need_b else None)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: a plain ``nn.Linear`` without hooks goes through :func:`linear`; any other
    layer (quantised, LoRA-wrapped, pruned, hooked) is called as it is."""
    if is_plain(layer, nn.Linear) and no_global_hooks():
        return linear(x, layer.weight, layer.bias)
    return layer(x)
