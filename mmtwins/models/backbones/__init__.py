from .twins import PCPVT, SVT, Twins

__all__ = ['PCPVT', 'SVT', 'Twins']
