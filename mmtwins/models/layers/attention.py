"""The two spatial attentions of Twins (paper section 3.2), on token sequences.

Both take ``x`` of shape (B, N, C) with N = H * W tokens in row-major order and ``hw = (H, W)``,
and return (B, N, C). Attention runs through :func:`attend` (PyTorch's fused kernel, or in bf16
inference on some CPUs its composition from matmuls and a softmax), the linears through
:func:`.linear.apply_linear` (oneDNN on x86-64 CPUs, see there).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .embed import pad_amounts
from .graph import is_recording
from .linear import PLAIN_TENSORS, apply_linear, bf16_without_amx
from .norm import apply_norm
from .softmax import softmax_rows_

#: The most scores (batch x heads x queries x keys, padded to :data:`SOFTMAX_LANES`) one step of
#: :func:`attend`'s composition computes at a time: it runs chunks of that size, whose scores stay
#: in cache (whole batch entries, LSA's windows, where one entry's scores fit; else query rows of
#: every entry). Measured (with query chunks, before rows were padded) on an AMD EPYC Zen 5 (AVX-512
#: with bf16, no AMX), where PyTorch's fused CPU kernel is slower in bf16 than in fp32, with
#: ``tools/analysis_tools/sdpa_ab.py``-style A/B runs of whole bf16 inference steps at 512x512,
#: batch 2: with chunks of 2**20 scores PCPVT-S's step took 0.81-0.83x the time it took with the
#: kernel, SVT-S's 0.92-0.95x (2**18: 0.90x and 1.10x; 2**19: 0.85x and 0.97x; 2**21: 0.84x and
#: 0.93x; 2**22: 0.88x and 1.01x). One call alone, SVT-S's first-stage GSA (2**24 scores): 8.0 ms in
#: chunks of 2**20, 13.0 ms with the kernel, 23.6 ms whole.
COMPOSE_CHUNK_SCORES = 1 << 20

#: :func:`attend`'s composition pads each row of scores to a multiple of this many keys (the
#: padding weighs 0), the bf16 lanes of an AVX-512 register (and a whole number of the compiled
#: softmax's fp32 registers, :data:`.native.NATIVE_LANES`): PyTorch's bf16 softmax over rows
#: of whole registers ran twice as fast on the Zen 5 CPU as over LSA's 49 keys (0.36 ms for
#: 50x8x49 rows of 64, 0.75 ms for the same rows of 49; rows of 48 or 56: 0.70 and 1.18 ms).
#: With LSA chunked by windows, the attention calls of an SVT-S bf16 inference step at 512x512
#: took 36.5 ms instead of 40.6 (PCPVT-S's, all of 256 keys, 40.0 instead of 39.6); whole steps
#: (``revision_ab.py --mode infer --amp``) at 224x224, batch 8: PCPVT-S 1.07x and SVT-S 1.05x
#: faster (49 keys in PCPVT's first stage there); at 512x512, batch 2: 1.01x and 1.02x.
SOFTMAX_LANES = 32

#: Whether :func:`attend` composes bf16 inference on this CPU (:func:`.linear.bf16_without_amx`:
#: every CPU with AVX512-BF16 and no AMX, Zen 4 and Cooper Lake too; measured on a Zen 5 only).
COMPOSE_CPU = bf16_without_amx()


def _composes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              dropout_p: float) -> bool:
    """Whether :func:`attend` composes: bf16 (B, heads, N, d) tensors on a CPU of
    :data:`COMPOSE_CPU` with oneDNN enabled (its bf16 products), keys and values of the queries'
    batch and heads (not broadcast), a boolean mask or none, no gradient needed, no dropout, no
    autocast to another dtype, and not while exporting or compiling (a graph keeps the one
    attention operator)."""
    if not (COMPOSE_CPU and q.device.type == 'cpu' and q.dtype == torch.bfloat16
            and q.dim() == 4 and type(q) in PLAIN_TENSORS and not dropout_p
            and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and (mask is None or mask.dtype == torch.bool) and torch.backends.mkldnn.enabled
            and not is_recording()):
        return False
    if torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') != torch.bfloat16:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))


def _even(total: int, most: int) -> int:
    """The size of equal chunks of ``total`` items, at most ``most`` each (at least one)."""
    chunks = -(-total // max(1, most))
    return max(1, -(-total // max(1, chunks)))


def _composed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` (``mask`` False: a score of -inf; the scaled softmax by
    :func:`.softmax.softmax_rows_`, mmtwins' compiled kernel where it runs) in chunks of at most
    :data:`COMPOSE_CHUNK_SCORES` scores (at least one query row each): of whole batch entries
    where one entry's scores fit (LSA's windows), else of query rows of all entries; shapes as
    :func:`attend`'s. A query whose every key is masked gets NaN (the fused kernel: zeros); the
    layers never mask every key of a window."""
    # q, k and v stay views of the packed projections: each chunk's product copies its slices
    # where it needs them contiguous, small and in cache (whole copies up front were allocations
    # large enough that glibc maps them fresh, page faults every step); the softmax scales.
    scale = q.shape[-1] ** -0.5
    B, heads, N = q.shape[:3]
    keys = k.shape[-2]
    # Score rows of whole softmax registers, of which the softmax and the product with ``v``
    # take the first ``keys``
    width = -(-keys // SOFTMAX_LANES) * SOFTMAX_LANES
    k_t = k.transpose(-2, -1)
    drop = None if mask is None else ~mask.view((1,) * (4 - mask.dim()) + mask.shape)
    per_entry = heads * N * width
    if per_entry <= COMPOSE_CHUNK_SCORES:
        entries, rows = _even(B, COMPOSE_CHUNK_SCORES // max(1, per_entry)), max(1, N)
    else:
        entries, rows = max(1, B), _even(N, COMPOSE_CHUNK_SCORES // max(1, B * heads * width))
    # Rows of ``width`` scores: every chunk is a contiguous prefix of them
    scores = q.new_empty(entries * heads * rows, width)
    # (B, N, heads, d) memory, as the fused kernel's output: the callers' merge of the heads,
    # (B, N, heads * d), is then a view
    out = q.new_empty(B, N, heads, v.shape[-1]).transpose(1, 2)
    for b in range(0, B, entries):
        e = slice(b, b + entries)
        for s in range(0, N, rows):
            r = slice(s, s + rows)
            shape = (min(entries, B - b), heads, min(rows, N - s), width)
            chunk = scores[:math.prod(shape[:3])].view(shape)
            logits = torch.matmul(q[e, :, r], k_t[e], out=chunk[..., :keys])
            if drop is not None:
                logits.masked_fill_(drop[e if drop.shape[0] > 1 else slice(None), :,
                                         r if drop.shape[2] > 1 else slice(None)], float('-inf'))
            out[e, :, r] = softmax_rows_(chunk, keys, scale)[..., :keys] @ v[e]
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: Optional[torch.Tensor] = None, dropout_p: float = 0.) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)``; in bf16
    inference on a CPU with AVX512-BF16 and no AMX (:data:`COMPOSE_CPU`) composed from bf16
    matmuls and a softmax instead (:func:`_composed`; logits and weights rounded to bf16, where
    the kernel keeps them in fp32; a whole SVT-S or PCPVT-S stays within cosine 0.99997 of fp32
    either way).

    Shapes:
        q (B, heads, Nq, d), k and v (B, heads, Nk, d), mask boolean, broadcastable to
        (B, heads, Nq, Nk), True where a key is attended -> (B, heads, Nq, d).
    """
    if _composes(q, k, v, mask, dropout_p):
        return _composed(q, k, v, mask)
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
