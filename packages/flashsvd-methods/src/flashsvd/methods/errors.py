"""One exception hierarchy for flashsvd.methods.

Every error derives from :class:`FlashSVDMethodError`, itself a ``ValueError``, so callers that
only know "bad input" can catch ``ValueError`` and callers that care can catch the precise kind.
"""

from __future__ import annotations


class FlashSVDMethodError(ValueError):
    """Base class of every error raised by flashsvd.methods."""


class InvalidRankError(FlashSVDMethodError):
    """A rank is not a positive integer or exceeds what the matrix (or head) can hold."""


class InvalidKeepRatioError(FlashSVDMethodError):
    """A keep_ratio outside (0, 1]."""


class UnknownMethodError(FlashSVDMethodError):
    """A method name that is not in the registry."""


class CalibrationMissingError(FlashSVDMethodError):
    """A data-aware method was called without the calibration statistics it needs."""


class NonFiniteStatisticsError(FlashSVDMethodError):
    """Calibration statistics or weights contain NaN/Inf, or a Gram matrix is unusable."""


class ShapeError(FlashSVDMethodError):
    """Tensors whose shapes do not fit together (weight vs statistics, heads vs output dim)."""
