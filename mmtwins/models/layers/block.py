"""One Twins transformer block: pre-norm attention and MLP, each a residual branch."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import nn

from .attention import GlobalSubsampledAttention, LocallyGroupedAttention
from .embed import is_exporting


class _GeluLinear(torch.autograd.Function):
    """``F.linear(gelu(h), weight, bias)`` that keeps ``h`` for backward and recomputes the GELU.

    Autograd would otherwise keep both ``h`` (for the GELU) and ``gelu(h)`` (for the linear
    layer): the MLP's widest tensor, twice. Same values and gradients, one hidden tensor less
    per block in memory.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.compute_dtype = torch.get_autocast_dtype(h.device.type) \
            if torch.is_autocast_enabled(h.device.type) else None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype or grad.dtype
        a = F.gelu(h).to(dtype)
        grad = grad.to(dtype)
        grad_h = torch.ops.aten.gelu_backward(grad @ weight.to(dtype), h).to(h.dtype)
        grad_w = grad.flatten(0, -2).t().mm(a.flatten(0, -2)).to(weight.dtype)
        grad_b = grad.flatten(0, -2).sum(0).to(weight.dtype)
        return grad_h, grad_w, grad_b


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout, on (B, N, C) tokens.

    When gradients are needed and the hidden dropout is off, GELU and ``fc2`` run as one
    function that recomputes the GELU in backward instead of storing its output.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        # Named fc1/fc2 as in the authors' release.
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.requires_grad and not (self.training and self.drop1.p > 0) and not is_exporting():
            return self.drop2(_GeluLinear.apply(h, self.fc2.weight, self.fc2.bias))
        return self.drop2(self.fc2(self.drop1(self.act(h))))


class TwinsBlock(nn.Module):
    """``x + DropPath(attn(LN(x)))`` then ``x + DropPath(mlp(LN(x)))``.

    The attention is chosen by ``window_size``: an int gives locally-grouped attention (LSA) in
    windows of that side, ``None`` gives global sub-sampled attention (GSA) with ``sr_ratio``.
    Drop path is applied exactly once per residual branch.

    Shapes:
        tokens (B, H*W, C) and (H, W) -> (B, H*W, C).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int = 1,
                 window_size: Optional[int] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if window_size is None:
            self.attn = GlobalSubsampledAttention(dim, num_heads, sr_ratio, attn_drop, drop)
        else:
            self.attn = LocallyGroupedAttention(dim, num_heads, window_size, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))
