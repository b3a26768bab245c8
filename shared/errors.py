"""Errors fedatlas reports to people: each says what was wrong, where, and what was expected."""

from __future__ import annotations


class FedatlasError(Exception):
    """Base of every error fedatlas raises on purpose (the CLI prints it, no traceback)."""


class InputDataError(FedatlasError):
    """A user's data file or one of its fields cannot be used as given."""


class ConfigError(FedatlasError):
    """A model, training or command-line setting is invalid."""


class ReleaseError(FedatlasError):
    """A reference release directory is missing, malformed or fails verification."""


class AdaptorError(FedatlasError):
    """An adaptor file is malformed, or cannot be combined with a release or with other adaptors."""


class AdaptorHashError(AdaptorError):
    """An adaptor's tensors or content differ from the hashes it records (it was altered)."""
