from .attention import GlobalSubsampledAttention, LocallyGroupedAttention
from .block import TwinsBlock
from .embed import PatchEmbed, PositionEncodingGenerator
from .mlp import Mlp

__all__ = [
    'GlobalSubsampledAttention', 'LocallyGroupedAttention', 'Mlp', 'PatchEmbed',
    'PositionEncodingGenerator', 'TwinsBlock'
]
