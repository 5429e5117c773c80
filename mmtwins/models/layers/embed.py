"""Patch embedding and the conditional position encoding generator (PEG) of Twins."""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a ``patch_size`` strided conv, then LayerNorm.

    An input whose sides are not multiples of ``patch_size`` is zero-padded at the bottom and
    right, so the output map is ``ceil(H / patch_size) x ceil(W / patch_size)``.

    Args:
        in_channels (int): Input channels.
        embed_dim (int): Output token channels.
        patch_size (int): Kernel size and stride.

    Shapes:
        (B, C_in, H, W) -> tokens (B, ceil(H/p) * ceil(W/p), embed_dim) and their (h, w).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        # eps 1e-5 (LayerNorm's default) as in the authors' release.
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        p = self.patch_size
        pad_b, pad_r = (p - x.shape[2] % p) % p, (p - x.shape[3] % p) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PositionEncodingGenerator(nn.Module):
    """PEG of CPVT: a 3x3 depth-wise conv with bias over the token map, added as a residual.

    The conv sits in a one-element ``nn.Sequential`` so the module's parameter names
    (``proj.0.weight``) are those of the authors' release, which then loads verbatim.

    Shapes:
        tokens (B, H*W, C) and (H, W) -> (B, H*W, C).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        feat = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        return x + self.proj(feat).flatten(2).transpose(1, 2)


def conv_fan_out_init_(conv: nn.Conv2d) -> None:
    """The authors' conv init: normal with std sqrt(2 / fan_out), zero bias."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
