"""The package's version (a leaf module: imported by the package root and by
the start-up checks without a cycle)."""

__version__ = "0.1.0"
