"""Single source of the pcpt version (datapipes is the bottom layer, so every package can import it)."""

__version__ = "0.1.0"
