"""Token-wise linear layers on CPUs, computed by oneDNN as 1x1 convolutions.

On a CPU PyTorch computes ``F.linear`` and ``torch.mm`` in fp32 with its BLAS, MKL in the
official wheels, and its convolutions with oneDNN. On an AMD EPYC Zen 5 (2 cores, AVX-512) MKL's
sgemm ran a 2048x2048 product at 239-241 GFLOP/s, about the AVX2 peak of two cores
(``MKL_ENABLE_INSTRUCTIONS=AVX512`` changed nothing), and oneDNN at 501-505 with its AVX-512
kernels (``ONEDNN_VERBOSE=1`` names ``brgconv_1x1:avx512_core``); through oneDNN the training
steps of SVT-S and PCPVT-S at 512x512 were 1.51x and 1.48x faster
(``tools/analysis_tools/linear_ab.py``, which times a model both ways on any CPU). On an AMD EPYC
Zen 4, which runs AVX-512 in 256-bit halves, oneDNN's rate is closer to MKL's (202-218 against
181-198 GFLOP/s) and both training steps were 1.10x faster.

A 1x1 convolution over a channels-last map is a matrix product, and (M, C) row-major tokens
already are the (1, C, 1, M) channels-last map, so the route adds no copy for them; values
agree with ``F.linear`` to fp32 rounding (the order of summation differs).

bf16 products (a bf16 model, or fp32 under CPU autocast, whose inputs the route casts as
autocast would) take it too on CPUs that compute bf16 natively without AMX
(:data:`ONEDNN_BF16`): PyTorch computes them in oneDNN already, as matrix products with the bias
added by a copy before; as 1x1 convolutions the bias is part of the kernel and the products ran
5-40 % faster (one-off timings on the Zen 5 CPU); the bf16 autocast inference steps of SVT-S and
PCPVT-S at 512x512 took 1.03-1.04x and 1.02-1.03x as long without the route (``linear_ab.py
--mode infer --amp``), a training step of SVT-S as long (0.99x).

The route is taken by :func:`onednn_dtype`: on a CPU, in fp32 or (above) bf16, where PyTorch's
fp32 convolution would use oneDNN (enabled, more than one thread, more than
:data:`ONEDNN_MIN_NUMEL` input elements; bf16 convolutions always run in oneDNN, and the route
keeps the fp32 bounds for them, not measured below them), on x86-64 CPUs, and not while a graph
is being recorded for export (an exported graph keeps its ``Gemm``/``MatMul`` nodes) or
compiled. ``USE_ONEDNN = False`` switches it off everywhere.
"""
import platform
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .graph import is_recording

#: Route CPU linears through oneDNN (see the module docstring); False: ``F.linear``.
#: x86-64 only: on ARM PyTorch's oneDNN runs on other kernels (ACL), not measured for this.
USE_ONEDNN = platform.machine().lower() in ('x86_64', 'amd64')


def bf16_without_amx() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16) without AMX. The bf16 paths measured
    faster on such CPUs (AMD EPYC Zen 5 and Zen 4) leave AMX CPUs, where oneDNN and the fused
    attention run on AMX tiles and were not measured against them, as PyTorch runs them."""
    cpu = torch.cpu
    try:
        return cpu._is_avx512_bf16_supported() and not cpu._is_amx_tile_supported()
    except AttributeError:  # a PyTorch without these probes
        return False


#: Route bf16 products as well as fp32 ones (:func:`bf16_without_amx`; see the module docstring).
ONEDNN_BF16 = bf16_without_amx()

_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')


def no_global_hooks() -> bool:
    """True where no global module hook (forward or backward) is set."""
    return not any(getattr(_module, f'_global{h}', None) for h in _HOOKS)


def is_plain(module: nn.Module, cls: type) -> bool:
    """True where ``module`` is exactly a ``cls`` (no subclass: quantised, LoRA-wrapped) with no
    module hook and no ``forward`` of its own (offloading and adapter tools replace it on the
    instance), so computing with its parameters equals calling it."""
    return (type(module) is cls and not any(getattr(module, h) for h in _HOOKS)
            and 'forward' not in vars(module))


#: PyTorch runs an fp32 1x1 convolution of one image with oneDNN only above this many input
#: elements and with more than one thread (``ConvParams::use_mkldnn``); otherwise its own route,
#: which is MKL's product again plus a dispatch overhead (measured: 10-30 us more per call than
#: ``F.linear`` for small products), so :func:`use_onednn` leaves those to ``F.linear``; bf16
#: products keep the same bounds (bf16 convolutions always run in oneDNN; not measured).
ONEDNN_MIN_NUMEL = 20480

#: Tensor types the route takes; a subclass (a quantised or sharded weight, a fake tensor, a
#: nested tensor) may not implement the operators it calls.
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)

#: The input dtypes the route casts to CPU autocast's dtype (autocast casts fp16 too; an fp16
#: operand keeps ``F.linear``).
_AUTOCAST_CASTS = {torch.float32, torch.bfloat16}


def onednn_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype in which the product of ``x`` (..., C), a linear's input, with ``weight`` (O, C)
    goes through oneDNN (see the module docstring): the autocast dtype under CPU autocast (for fp32
    and bf16 operands), else theirs; None where ``F.linear`` computes it. Not while
    ``torch.compile`` traces the model: its inductor picks its own kernels for a linear."""
    # Cheapest first: a GPU step, launch-bound at small batches, stops at the device. The export
    # checks come before numel(), which a trace would record as a tensor.
    if not (USE_ONEDNN and x.device.type == 'cpu' and not is_recording()
            and type(x) in PLAIN_TENSORS
            and type(weight) in PLAIN_TENSORS):
        return None
    dtype = x.dtype
    if torch.is_autocast_enabled('cpu') and {x.dtype, weight.dtype} <= _AUTOCAST_CASTS:
        dtype = torch.get_autocast_dtype('cpu')
    elif weight.dtype != dtype:
        return None
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and ONEDNN_BF16):
        return None
    if (x.numel() > ONEDNN_MIN_NUMEL and weight.numel() > 0 and torch.get_num_threads() > 1
            and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return dtype
    return None


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product of ``x`` with ``weight`` goes through oneDNN (:func:`onednn_dtype`)."""
    return onednn_dtype(x, weight) is not None


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Row-major (M, C) -> the channels-last (1, C, 1, M) map it already is (a view)."""
    return x.view(1, 1, *x.shape).permute(0, 3, 1, 2)


def _from_map(y: torch.Tensor) -> torch.Tensor:
    """Channels-last (1, O, 1, M) -> (M, O) rows (a view; oneDNN keeps the input's layout)."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` through oneDNN, forward and backward. Keeps for backward what ``F.linear``
    keeps: the weight, and the input only where the weight needs a gradient.

    Shapes:
        x (M, C) row-major, weight (O, C), bias (O,) or None -> (M, O).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return _from_map(F.conv2d(_as_map(x), weight[:, :, None, None], bias))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return linear_grads(grad, x, weight, ctx.needs_input_grad)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`onednn_dtype` says;
    differentiable, twice too.

    Shapes:
        x (..., C), weight (O, C), bias (O,) -> (..., O).
    """
    dtype = onednn_dtype(x, weight)
    if dtype is None:
        return F.linear(x, weight, bias)
    return onednn_linear(x, weight, bias, dtype)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`linear` through oneDNN, for a caller that took the route's ``dtype`` from
    :func:`onednn_dtype` already; operands of another dtype are cast to it (differentiably, as
    autocast casts them); None: they have it.

    Shapes:
        x (..., C), weight (O, C), bias (O,) -> (..., O).
    """
    if dtype is not None:
        x, weight, bias = (t if t is None or t.dtype == dtype else t.to(dtype)
                           for t in (x, weight, bias))
    y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class ChunkProducts:
    """One linear's products with many row blocks (the chunks of an MLP) in a forward that
    autograd does not record (inference, or the forward of an autograd Function): not
    differentiable.

    Where the route takes a block (:func:`use_onednn`), oneDNN computes it as a 1x1 convolution
    with a post-op (``mkldnn::_convolution_pointwise``, which PyTorch's inductor fuses
    activations into): the weight is reordered into oneDNN's blocked layout once, for the first
    block and the blocks of its rows, when ``pack`` is set (a plain weight is reordered again in
    every product), and on request an exact GELU is applied to the product before it is stored
    (one pass over the output instead of three). Products agree with :func:`linear`'s bit for
    bit, the GELU with ``F.gelu`` to fp32 rounding. Other blocks take ``F.linear`` and
    ``F.gelu``.

    Shapes:
        x (M, C), weight (O, C), bias (O,) -> (M, O).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], pack: bool):
        self.weight, self.bias, self.pack = weight, bias, pack
        self._packed: Optional[torch.Tensor] = None
        self._packed_shape: Optional[torch.Size] = None

    def __call__(self, x: torch.Tensor, gelu: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The product (its GELU if ``gelu``), written into ``out`` if given (oneDNN writes a
        new tensor, copied there; ``torch.addmm`` writes it directly)."""
        if use_onednn(x, self.weight):
            x = _as_map(x.contiguous())
            y = _from_map(torch.ops.mkldnn._convolution_pointwise(
                x, self._weight(x.shape), self.bias, [0, 0], [1, 1], [1, 1], 1,
                'gelu' if gelu else 'none', [], 'none'))
            return y if out is None else out.copy_(y)
        if gelu:
            return F.gelu(F.linear(x, self.weight, self.bias))
        if out is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)

    def _weight(self, map_shape: torch.Size) -> torch.Tensor:
        """The (O, C, 1, 1) weight, reordered for the first input map if ``pack``, for maps of
        its shape: oneDNN may pick another layout for a map of other rows (a shorter last
        chunk), and reordering a reordered weight again took 4 ms for 1024 x 256 values, where
        the plain one takes microseconds."""
        weight = self.weight[:, :, None, None]
        if not self.pack:
            return weight
        if self._packed is None:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.contiguous().to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, list(map_shape))
            self._packed_shape = map_shape
        return self._packed if map_shape == self._packed_shape else weight


def linear_grads(grad: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor,
                 needs: Sequence[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward of ``linear(x, weight, bias)``: ``(grad @ weight, grad.T @ x, grad.sum(0))``,
    each only where ``needs`` says (else None); ``x`` may be None where the weight needs no
    gradient. oneDNN computes the products for fp32 and bf16 CPU tensors (any other input gives
    the same values through PyTorch's own convolution); the bias gradient is PyTorch's sum,
    accumulated in fp32 and exact to the dtype's rounding (oneDNN's own was measured 0.6 % off
    over 2048 fp32 rows).

    Shapes:
        grad (M, O), x (M, C), weight (O, C) -> (M, C), (O, C), (O,).
    """
    need_x, need_w, need_b = needs[:3]
    gx = gw = None
    g = _as_map(grad.contiguous())
    if need_w or (need_x and x is not None):
        # the input gradient alone reads only x's shape, and takes the weight as it is (a
        # convolution with the transposed weight copied it in every call: 1.4 ms for 2048 x 512
        # values on the Zen 4 CPU)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, _as_map(x.contiguous()), weight[:, :, None, None], None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], 1, [need_x, need_w, False])
        gw = None if gw is None else gw.view(weight.shape)
    elif need_x:
        gx = F.conv2d(g, weight.t().contiguous()[:, :, None, None])
    return (None if gx is None else _from_map(gx), gw, grad.sum(0) if need_b else None)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: a plain ``nn.Linear`` (:func:`is_plain`, no global hook) on an input the
    route takes (:func:`onednn_dtype`) is computed from its weights through oneDNN; every other
    case calls the layer, so its hooks, quantisation, adapters and its scope in a traced or
    exported graph stay.

    Shapes:
        x (..., C) -> (..., O).
    """
    if is_plain(layer, nn.Linear) and no_global_hooks():
        dtype = onednn_dtype(x, layer.weight)
        if dtype is not None:
            return onednn_linear(x, layer.weight, layer.bias, dtype)
    return layer(x)
