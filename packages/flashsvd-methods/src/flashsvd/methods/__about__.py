"""Single source of the flashsvd-methods version, read by hatch at build time."""

__version__ = "0.1.0"
