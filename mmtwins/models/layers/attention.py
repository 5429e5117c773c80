"""The two spatial attentions of Twins (paper section 3.2), on token sequences.

Both take ``x`` of shape (B, N, C) with N = H * W tokens in row-major order and ``hw = (H, W)``,
and return (B, N, C). Attention runs through :func:`attend` (PyTorch's fused kernel, or in bf16
inference on some CPUs its composition from matmuls and a softmax), the linears through
:func:`.linear.apply_linear` (oneDNN for fp32 on x86-64 CPUs, see there).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .embed import is_exporting, pad_amounts
from .linear import apply_linear

#: bf16 CPU inference composes attention (:func:`attend`) where its score tensor (batch x heads x
#: queries x keys) has at most this many elements; 0 never composes. Measured on an AMD EPYC Zen 5
#: (AVX-512 with bf16, no AMX; every attention call of SVT-S and PCPVT-S at 512x512, batch 2):
#: PyTorch's fused CPU kernel is slower in bf16 than in fp32 there, and the composition took
#: 1.2-2.3x less time up to 2**22 scores (1.59 against 3.61 ms for PCPVT-S's third-stage GSA,
#: 6.4 against 7.8 ms for SVT-S's first-stage LSA), 1.3-1.75x more at 2**23 and 2**24 (where
#: its scores, 16 MB and more, no longer stay in cache). Whole inference steps in bf16 autocast
#: (``tools/analysis_tools/sdpa_ab.py --mode infer --amp``): PCPVT-S's took 0.88-0.89x the time
#: of the kernel's, SVT-S's 0.97-1.01x (within the machine's noise).
COMPOSE_MAX_SCORES = 1 << 22


def _bf16_without_amx() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16) without AMX (with AMX the fused
    kernel runs on AMX tiles: not measured against the composition, so it keeps the kernel)."""
    cpu = torch.cpu
    try:
        return cpu._is_avx512_bf16_supported() and not cpu._is_amx_tile_supported()
    except AttributeError:  # a PyTorch without these probes
        return False


#: Whether this CPU is one where :func:`attend` composes (:func:`_bf16_without_amx`).
COMPOSE_CPU = _bf16_without_amx()


def _composes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`attend` composes: bf16 inference on a CPU of :func:`_bf16_without_amx`,
    no gradient needed, no dropout, at most :data:`COMPOSE_MAX_SCORES` scores, and not while
    exporting or compiling (a graph keeps the one attention operator)."""
    if not (COMPOSE_CPU and q.device.type == 'cpu' and q.dtype == torch.bfloat16
            and not dropout_p and not is_exporting() and not torch.compiler.is_compiling()):
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return not needs_grad and q.shape[:-1].numel() * k.shape[-2] <= COMPOSE_MAX_SCORES


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: Optional[torch.Tensor] = None, dropout_p: float = 0.) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)``; in bf16
    inference on a CPU with AVX512-BF16 and no AMX, up to :data:`COMPOSE_MAX_SCORES` scores,
    composed as ``softmax(q k^T / sqrt(d)) v`` in bf16 (logits and weights rounded to bf16,
    where the kernel keeps them in fp32; a whole SVT-S or PCPVT-S stays within cosine 0.99997 of
    fp32 either way).

    Shapes:
        q (B, heads, Nq, d), k and v (B, heads, Nk, d), mask boolean, broadcastable to
        (B, heads, Nq, Nk), True where a key is attended -> (B, heads, Nq, d).
    """
    if not _composes(q, k, v, dropout_p):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf'))
    return scores.softmax(-1) @ v


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
            x = self.norm(self.sr(x).flatten(2).transpose(1, 2))
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
