"""The two spatial attentions of Twins (paper section 3.2), on token sequences.

Both take ``x`` of shape (B, N, C) with N = H * W tokens in row-major order and ``hw = (H, W)``,
and return (B, N, C). Attention runs through :func:`attend` (PyTorch's fused kernel, or on
some CPUs mmtwins' compiled one, forward and backward), the linears through
:func:`.linear.apply_linear` (oneDNN on x86-64 CPUs, see there).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .embed import pad_amounts
from .linear import apply_linear, bf16_without_amx
from .native import NATIVE_BF16, NATIVE_DTYPES, NATIVE_LANES, _ext, native_call
from .norm import apply_norm

#: Whether :func:`attend` runs mmtwins' compiled kernel (:mod:`.native`) here: built, on a CPU
#: with AVX512-BF16 and no AMX (:func:`.linear.bf16_without_amx`; measured on AMD EPYC Zen 5 and
#: Zen 4 CPUs: AMX CPUs, where PyTorch's kernel multiplies on AMX tiles, keep it).
NATIVE_ATTENTION = NATIVE_BF16 and bf16_without_amx()

#: The most channels per head the compiled kernel takes (a multiple of
#: :data:`.native.NATIVE_LANES` up to this).
NATIVE_HEAD_DIM = 128


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            dropout_p: float) -> bool:
    """Whether :func:`attend` runs the compiled kernel: on a CPU of :data:`NATIVE_ATTENTION`,
    fp32 or bf16 (B, heads, N, d) tensors, the channels contiguous, d a multiple of 16 up to
    :data:`NATIVE_HEAD_DIM`, keys and values of the queries' batch, heads and dtype (not
    broadcast), at least one key, a boolean mask or none, no dropout, no autocast to another
    dtype, and what :func:`.native.native_call` asks (not while recording a graph: an exported
    or compiled graph keeps the one attention operator), with or without a gradient (the kernel
    has its backward). It takes the place of ``F.scaled_dot_product_attention``
    there, so a ``sdpa_kernel`` context or a function mode around it does not see these calls."""
    if not (NATIVE_ATTENTION and q.device.type == k.device.type == v.device.type == 'cpu'
            and q.dtype in NATIVE_DTYPES and not dropout_p
            and q.dim() == k.dim() == v.dim() == 4 and k.shape == v.shape
            and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3] and k.shape[2] > 0
            and 0 < q.shape[3] <= NATIVE_HEAD_DIM and not q.shape[3] % NATIVE_LANES
            and k.dtype == v.dtype == q.dtype
            and q.stride(3) == k.stride(3) == v.stride(3) == 1
            and (mask is None or (mask.dtype == torch.bool and 1 <= mask.dim() <= 4))):
        return False
    if torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') != q.dtype:
        return False
    return native_call(q, k, v, mask, backward=True)


class _Attention(torch.autograd.Function):
    """The compiled kernel, forward and backward (``_ext.attention_backward``: the gradients
    from q, k, v, the output and each query's log-sum-exp of its scaled scores, as PyTorch's
    fused backward takes them). Once differentiable, as PyTorch's fused attention is.

    Shapes:
        q (B, heads, Nq, d), k and v (B, heads, Nk, d), mask boolean, broadcastable to
        (B, heads, Nq, Nk) with its keys contiguous -> (B, heads, Nq, d).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out, lse = _ext.attention(q, k, v, mask, q.shape[-1] ** -0.5, True)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        return (*_ext.attention_backward(grad, q, k, v, out, lse, mask, q.shape[-1] ** -0.5),
                None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: Optional[torch.Tensor] = None, dropout_p: float = 0.) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)``; on a
    CPU of :data:`NATIVE_ATTENTION` by mmtwins' compiled kernel (``mmtwins/csrc/attention.cpp``;
    where :func:`_native` says), and its backward where a gradient is needed (:class:`_Attention`):
    fp32 to fp32 rounding of PyTorch's values (within 2e-6 here), bf16 with the softmax weights
    rounded to bf16 for their product with ``v`` (as a bf16 matmul rounds them; PyTorch's kernel
    keeps them in fp32), gradients computed in fp32 for bf16 tensors too. A query whose every key
    is masked gives zeros (and gradients 0) either way.

    Shapes:
        q (B, heads, Nq, d), k and v (B, heads, Nk, d), mask boolean, broadcastable to
        (B, heads, Nq, Nk), True where a key is attended -> (B, heads, Nq, d).
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if _native(q, k, v, mask, dropout_p):
        if mask is not None and k.shape[2] > 1 and (mask.shape[-1] == 1 or mask.stride(-1) != 1):
            mask = mask.expand(*mask.shape[:-1], k.shape[2]).contiguous()  # keys contiguous
        if grad:
            return _Attention.apply(q, k, v, mask)
        return _ext.attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _check_heads(dim: int, num_heads: int) -> int:
    if dim % num_heads:
        raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
    return dim // num_heads


def _heads(packed: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(B, N, n, heads, d) packed projections -> n views of shape (B, heads, N, d).

    Unbound along the packing dim (not permuted to (n, B, heads, N, d) first): autograd then
    stacks the n gradients straight into the (B, N, n * heads * d) layout of the linear's
    output, one copy, where the permuted form needs a second to make them contiguous again.
    """
    return tuple(t.transpose(1, 2) for t in packed.unbind(2))


class GlobalSubsampledAttention(nn.Module):
    """Global sub-sampled attention (GSA).

    Queries come from every token; keys and values from the feature map sub-sampled by a
    ``sr_ratio`` x ``sr_ratio`` strided convolution followed by LayerNorm (sr_ratio 1: plain
    global self-attention over all tokens).

    Args:
        dim (int): Token channels C.
        num_heads (int): Attention heads; must divide ``dim``.
        sr_ratio (int): Kernel size and stride of the sub-sampling convolution.
        attn_drop (float): Dropout on the attention weights.
        proj_drop (float): Dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            # eps 1e-5 (LayerNorm's default) as in the authors' release, unlike the blocks' 1e-6.
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = apply_linear(self.q, x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
            x = apply_norm(self.norm, self.sr(x).flatten(2).transpose(1, 2))
        k, v = _heads(apply_linear(self.kv, x).view(B, -1, 2, self.num_heads, self.head_dim))
        x = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(apply_linear(self.proj, x))


class LocallyGroupedAttention(nn.Module):
    """Locally-grouped self-attention (LSA): self-attention inside non-overlapping windows.

    A map whose sides are not multiples of ``window_size`` is zero-padded at the bottom and right
    to whole windows. Padded positions are masked out as keys, for each side independently, so a
    real token never attends to padding (the public ports either do not mask at all or build a
    mask that switches off when only one side is padded). Padded queries are cropped away.
    Maps of whole windows skip padding and mask in eager mode; an exported graph always pads
    and masks (by zero amounts and an all-true mask where nothing is padded), computing both
    from the input size, so one export is exact at every size (see :func:`.embed.pad_amounts`).

    Args:
        dim (int): Token channels C.
        num_heads (int): Attention heads; must divide ``dim``.
        window_size (int): Side of the square windows.
        attn_drop (float): Dropout on the attention weights.
        proj_drop (float): Dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = _check_heads(dim, num_heads)
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _key_mask(self, H, W, Hp, Wp, device) -> torch.Tensor:
        """Boolean (num_windows, 1, 1, ws*ws) mask, True where the key is a real token."""
        ws = self.window_size
        rows = torch.arange(Hp, device=device) < H
        cols = torch.arange(Wp, device=device) < W
        valid = (rows[:, None] & cols[None, :]).view(Hp // ws, ws, Wp // ws, ws)
        return valid.transpose(1, 2).reshape(-1, 1, 1, ws * ws)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = hw
        ws = self.window_size
        pad_b, pad_r, padded = pad_amounts(H, W, ws)
        x = x.view(B, H, W, C)
        if padded:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        nh, nw = Hp // ws, Wp // ws
        # (B, nh, ws, nw, ws, C) -> (B * nh * nw, ws * ws, C): one row of tokens per window
        x = x.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        qkv = apply_linear(self.qkv, x).view(-1, ws * ws, 3, self.num_heads, self.head_dim)
        q, k, v = _heads(qkv)
        mask = None
        if padded:
            mask = self._key_mask(H, W, Hp, Wp, x.device).repeat(B, 1, 1, 1)
        x = attend(q, k, v, mask, self.attn_drop if self.training else 0.)
        # Projected per window: (B * nh * nw, heads, ws * ws, d) -> (B * nh * nw, ws * ws, C) is
        # a view of the attention's output, which it keeps for backward anyway, so the
        # projection keeps no copy of its own. Then un-windowed to (B, Hp, Wp, C) and cropped.
        x = apply_linear(self.proj, x.transpose(1, 2).reshape(-1, ws * ws, C))
        x = x.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if padded:
            x = x[:, :H, :W]
        return self.proj_drop(x.reshape(B, N, C))
