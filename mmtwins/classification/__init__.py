"""ImageNet classification with mmpretrain: checkpoint conversion for the Twins classifiers."""
from .convert import classifier_state_dict

__all__ = ['classifier_state_dict']
