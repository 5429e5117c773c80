"""The main job (``make demo``): toy data, training, evaluation and pictures, end to end."""
from .toy_data import CLASSES, SEG_CLASSES, make_toy_data, toy_data_paths

__all__ = ['CLASSES', 'SEG_CLASSES', 'make_toy_data', 'toy_data_paths']
