"""Patch embedding and the conditional position encoding generator (PEG) of Twins.

Also home of the padding helper shared with the locally-grouped attention: eager mode pads only
when a side is not a multiple of the window/patch, while a graph being recorded for export always
pads by amounts computed from the (symbolic) input size, so one exported graph serves every size.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .graph import is_exporting
from .norm import apply_norm


Size = Union[int, torch.Tensor, torch.SymInt]


def pad_amounts(H: Size, W: Size, multiple: int) -> Tuple[Size, Size, bool]:
    """Bottom and right zero-padding that makes ``H`` and ``W`` multiples of ``multiple``.

    Returns:
        ``(pad_b, pad_r, needed)``. ``needed`` says whether the caller must pad (and mask):
        in eager mode only if an amount is non-zero, so maps of whole windows pay nothing;
        always while exporting, where the amounts are graph values (``H`` and ``W`` come from
        the traced/symbolic input shape) and a Python branch on them would bake in the
        example's case.
    """
    pad_b, pad_r = (multiple - H % multiple) % multiple, (multiple - W % multiple) % multiple
    return pad_b, pad_r, is_exporting() or bool(pad_b or pad_r)


class _TokenMajorGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int], channels: int) -> torch.Tensor:
    """Tokens (B, H*W, C) -> feature map (B, C, H, W), a view in channels-last layout.

    ``channels`` is C as a Python int (the stage's embedding dim), so an exported graph
    declares the map's channels as a number, not as a dimension it computes.

    In training the map's gradient is handed back to the tokens contiguous. A gradient that
    arrives in NCHW order (from a loss on the map, or from a neck's convolution or
    interpolation) is, seen as tokens, a transposed (B, C, N) layout. Autograd would pass it on
    as is, and the stage's residual gradients would then be summed into it in place, iterating
    against the contiguous operand's layout: on a CPU such an add over the first-stage tokens of
    a 512x512 input (8 MB) takes about 20x as long as a contiguous one. One copy here keeps the
    whole stage's backward token-major. Each consumer of a stage's tokens should get its own
    map, so that their gradients meet as tokens, both contiguous.
    """
    if x.requires_grad and not is_exporting():
        x = _TokenMajorGrad.apply(x)
    return x.transpose(1, 2).reshape(x.shape[0], channels, hw[0], hw[1])


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a ``patch_size`` strided conv, LayerNorm, dropout.

    An input whose sides are not multiples of ``patch_size`` is zero-padded at the bottom and
    right, so the output map is ``ceil(H / patch_size) x ceil(W / patch_size)``.

    Args:
        in_channels (int): Input channels.
        embed_dim (int): Output token channels.
        patch_size (int): Kernel size and stride.
        drop (float): Dropout on the tokens (the authors' ``pos_drops``).

    Shapes:
        (B, C_in, H, W) -> tokens (B, ceil(H/p) * ceil(W/p), embed_dim) and their (h, w).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, drop: float = 0.):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        # eps 1e-5 (LayerNorm's default) as in the authors' release.
        self.norm = nn.LayerNorm(embed_dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        pad_b, pad_r, needed = pad_amounts(x.shape[2], x.shape[3], self.patch_size)
        if needed:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        if x.device.type == 'cpu' and not is_exporting():
            # Channels-last in, channels-last out: the tokens below are then a view of the
            # conv's output, so the LayerNorm's input and the conv's output gradient need no
            # transposing copy. (Later stages' maps are channels-last already; see
            # tokens_to_map.) Measured on CPUs only. Under CPU autocast an fp32 input takes the
            # autocast dtype in the same copy (the convolution would cast it, a second copy);
            # hooks on ``proj`` then see it in that dtype.
            dtype = x.dtype
            if dtype == torch.float32 and torch.is_autocast_enabled('cpu'):
                dtype = torch.get_autocast_dtype('cpu')
            x = x.to(dtype=dtype, memory_format=torch.channels_last)
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.drop(apply_norm(self.norm, x.flatten(2).transpose(1, 2))), hw


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
