"""fedatlas: federated updating of single-cell reference atlases."""

from fedatlas.shared import __version__

__all__ = ["__version__"]
