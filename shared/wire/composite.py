"""Signed composites: what the coordinator vouches for, and how a site checks it.

The coordinator signs a statement naming the composite's content hash, its generation, the
release it extends and the bundles it holds. A pulled composite is a release directory (so
``fedatlas site map --reference`` accepts it) with the statement and signature beside it in
``signature.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedatlas.shared.errors import ReleaseError
from fedatlas.shared.hashing import canonical_json
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.signing import fingerprint, public_bytes, sign, verify_signature

SIGNATURE_FILE = "signature.json"
STATEMENT_KIND = "fedatlas-composite"


@dataclass(frozen=True)
class CompositeStatement:
    """A signed statement about one composite generation."""

    statement_json: str  # canonical JSON, exactly as signed
    signature: bytes

    @property
    def body(self) -> dict[str, Any]:
        """The statement's fields."""
        body: dict[str, Any] = json.loads(self.statement_json)
        return body

    @property
    def generation(self) -> int:
        """Generation number (1 for the first composite of a coordinator)."""
        return int(self.body["generation"])

    @property
    def content_hash(self) -> str:
        """Content hash of the composite it vouches for."""
        return str(self.body["content_hash"])

    @property
    def coordinator_key(self) -> bytes:
        """The signing coordinator's raw public key."""
        return bytes.fromhex(self.body["coordinator_key"])

    def verify(self, release: Release, trusted_key: bytes, *, source: str) -> None:
        """Check that ``trusted_key`` signed this statement and that it names ``release``."""
        if self.coordinator_key != trusted_key:
            raise ReleaseError(
                f"{source}: composite signed by coordinator key "
                f"{fingerprint(self.coordinator_key)}, but the trusted key is "
                f"{fingerprint(trusted_key)}; refusing it (if the coordinator really changed "
                "its key, remove the pinned key and pull again)"
            )
        if not verify_signature(trusted_key, self.statement_json.encode(), self.signature):
            raise ReleaseError(f"{source}: the coordinator's signature does not verify")
        if self.body.get("kind") != STATEMENT_KIND or self.content_hash != release.content_hash:
            raise ReleaseError(
                f"{source}: the signed statement names composite {self.content_hash}, but the "
                f"weights and manifest hash to {release.content_hash}"
            )

    def save(self, directory: Path) -> Path:
        """Write ``signature.json`` into a composite directory."""
        path = directory / SIGNATURE_FILE
        path.write_text(
            json.dumps(
                {"statement": json.loads(self.statement_json), "signature": self.signature.hex()},
                indent=1,
                sort_keys=True,
            )
        )
        return path

    @classmethod
    def load(cls, directory: Path) -> CompositeStatement:
        """Read ``signature.json`` from a composite directory."""
        path = directory / SIGNATURE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(canonical_json(data["statement"]).decode(), bytes.fromhex(data["signature"]))
        except FileNotFoundError:
            raise ReleaseError(f"{path}: missing; not a signed composite") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ReleaseError(f"{path}: malformed ({exc})") from None


def sign_composite(
    key: Ed25519PrivateKey,
    composite: Release,
    *,
    generation: int,
    base_release_id: str,
    bundle_ids: Sequence[str],
    created_at: str,
) -> CompositeStatement:
    """The coordinator's signed statement for ``composite``."""
    statement = canonical_json(
        {
            "kind": STATEMENT_KIND,
            "content_hash": composite.content_hash,
            "generation": generation,
            "base_release": base_release_id,
            "bundles": sorted(bundle_ids),
            "created_at": created_at,
            "coordinator_key": public_bytes(key).hex(),
        }
    )
    return CompositeStatement(statement.decode(), sign(key, statement))
