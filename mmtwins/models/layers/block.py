"""One Twins transformer block: pre-norm attention and MLP, each a residual branch."""
from typing import Optional, Tuple

import torch
from mmcv.cnn.bricks import DropPath
from torch import nn

from .attention import GlobalSubsampledAttention, LocallyGroupedAttention
from .mlp import Mlp
from .norm import apply_norm

#: eps of the blocks' and stage-end LayerNorms, as in the authors' release.
NORM_EPS = 1e-6


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
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        if window_size is None:
            self.attn = GlobalSubsampledAttention(dim, num_heads, sr_ratio, attn_drop, drop)
        else:
            self.attn = LocallyGroupedAttention(dim, num_heads, window_size, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(apply_norm(self.norm1, x), hw))
        return x + self.drop_path(self.mlp(x, norm=self.norm2))
