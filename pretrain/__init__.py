"""pcpt core library: geometric ops, layers, encoders, encoder artifacts and pre-training methods."""

from datapipes._version import __version__

__all__ = ["__version__"]
