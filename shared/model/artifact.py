"""What releases, composites and adaptors have in common: hashed content, tensors, provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fedatlas.shared.hashing import content_hash
from fedatlas.shared.validation import Int, ListOf, MapOf, Record, Str

HASH_TEXT = Str(80)  # "sha256:" and 64 hex digits
# content["tensors"]: every tensor's dtype, shape and SHA-256
TENSOR_INDEX = MapOf(
    Record({"dtype": Str(16), "shape": ListOf(Int(0, 2**40), 8), "sha256": HASH_TEXT}), 10_000
)


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
