"""fedatlas.shared: what coordinator and sites both need (model family, formats, metrics)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedatlas")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
