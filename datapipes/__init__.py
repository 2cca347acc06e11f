"""pcpt data layer: streaming shards, transforms, converters and the ``pcpt-data`` CLI (no model code)."""

from datapipes._version import __version__

__all__ = ["__version__"]
