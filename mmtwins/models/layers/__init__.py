from .attention import GlobalSubsampledAttention, LocallyGroupedAttention
from .block import TwinsBlock
from .embed import PatchEmbed, PositionEncodingGenerator

__all__ = [
    'GlobalSubsampledAttention', 'LocallyGroupedAttention', 'PatchEmbed',
    'PositionEncodingGenerator', 'TwinsBlock'
]
