"""flashsvd.kernels — see docs/architecture.md for what this package owns."""

from flashsvd.kernels.__about__ import __version__

__all__ = ["__version__"]
