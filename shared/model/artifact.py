"""What releases, composites and adaptors have in common: hashed content, tensors, provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedatlas.shared.hashing import content_hash


@dataclass
class Artifact:
    """``content`` (canonical JSON, hashed: it identifies the artifact and lists every tensor's
    hash), ``tensors`` (pickle-free on disk) and ``provenance`` (informative, not hashed)."""

    content: dict[str, Any]
    tensors: dict[str, Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """The artifact's id: ``sha256:`` of its canonical content."""
        return content_hash(self.content)

    @property
    def short_id(self) -> str:
        """First 12 hex digits of the id, for display."""
        return self.content_hash.split(":", 1)[1][:12]
