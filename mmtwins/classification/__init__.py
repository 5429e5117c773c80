"""ImageNet classification with mmpretrain: checkpoint conversion for the Twins classifiers.

The names below are imported from :mod:`.convert` on first use, not when this package is: the
metafiles' ``python -m mmtwins.classification.convert`` then runs that module once, as
``__main__``, and not after an import of it (which runpy warns about with a RuntimeWarning).
"""
__all__ = ['classifier_state_dict', 'convert_classifier_checkpoint']


def __getattr__(name: str):
    """Import the names of ``__all__`` from :mod:`.convert` when first asked for (PEP 562)."""
    if name in __all__:
        from . import convert
        return getattr(convert, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
