"""Signed composites: what the coordinator vouches for, how it travels, and how a site checks it.

The coordinator signs a statement naming the composite's content hash, its generation, the
release it extends and the bundles it holds. :class:`SignedComposite` is the composite with
that statement, and its :meth:`~SignedComposite.encode` is the one form it travels in: gRPC
streams those bytes in pieces, a Flower campaign carries them whole, and a site decodes and
verifies them the same way whichever way they came. Saved, a composite is a release directory
(so ``fedatlas site map --reference`` accepts it) with the statement and signature beside it in
``signature.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError as ProtobufDecodeError

from fedatlas.shared.errors import ReleaseError
from fedatlas.shared.hashing import canonical_json
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.codec import WireError, tensor_message, tensors_from_messages
from fedatlas.shared.wire.signing import (
    PUBLIC_KEY_BYTES,
    fingerprint,
    public_bytes,
    sign,
    verify_signature,
)
from fedatlas.v1 import coordinator_pb2 as pb

SIGNATURE_FILE = "signature.json"
STATEMENT_KIND = "fedatlas-composite"


@dataclass(frozen=True)
class CompositeStatement:
    """A signed statement about one composite generation."""

    statement_json: str  # canonical JSON, exactly as signed
    signature: bytes

    def __post_init__(self) -> None:
        try:
            body = json.loads(self.statement_json)
            fields_ok = (
                isinstance(body, dict)
                and isinstance(body.get("content_hash"), str)
                and type(body.get("generation")) is int
                and len(bytes.fromhex(str(body.get("coordinator_key")))) == PUBLIC_KEY_BYTES
            )
        except (ValueError, TypeError) as exc:
            raise ReleaseError(f"composite statement is malformed ({exc})") from None
        if not fields_ok:
            raise ReleaseError("composite statement lacks its content hash, generation or key")

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
    def audit_head(self) -> tuple[int, str] | None:
        """The audit log entry (sequence number, hash) the statement anchors, if it has one
        (statements signed before anchoring have none)."""
        head = self.body.get("audit_head")
        if not isinstance(head, dict):
            return None
        seq, entry_hash = head.get("seq"), head.get("entry_hash")
        if type(seq) is not int or not isinstance(entry_hash, str):
            return None
        return seq, entry_hash

    def signed_by_its_key(self) -> bool:
        """True when the key the statement names made its signature."""
        return verify_signature(self.coordinator_key, self.statement_json.encode(), self.signature)

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
        except (ValueError, KeyError, TypeError, ReleaseError) as exc:
            raise ReleaseError(f"{path}: malformed ({exc})") from None


def sign_composite(
    key: Ed25519PrivateKey,
    composite: Release,
    *,
    generation: int,
    base_release_id: str,
    bundle_ids: Sequence[str],
    created_at: str,
    audit_head: tuple[int, str],
) -> CompositeStatement:
    """The coordinator's signed statement for ``composite``; ``audit_head`` (the sequence
    number and hash of the audit log's newest entry when it was signed) anchors the log: a
    rewrite of any entry up to it no longer matches what every holder of the composite has."""
    statement = canonical_json(
        {
            "kind": STATEMENT_KIND,
            "content_hash": composite.content_hash,
            "generation": generation,
            "base_release": base_release_id,
            "bundles": sorted(bundle_ids),
            "created_at": created_at,
            "coordinator_key": public_bytes(key).hex(),
            "audit_head": {"seq": audit_head[0], "entry_hash": audit_head[1]},
        }
    )
    return CompositeStatement(statement.decode(), sign(key, statement))


@dataclass(frozen=True)
class SignedComposite:
    """A composite and the coordinator's signed statement about it, as sites receive it."""

    release: Release
    statement: CompositeStatement

    @property
    def generation(self) -> int:
        """The composite's generation, as the signed statement gives it."""
        return self.statement.generation

    def encode(self) -> bytes:
        """The composite's one wire form: a serialised ``fedatlas.v1.Composite``."""
        message = pb.Composite(
            manifest_json=self.release.manifest_json(),
            statement_json=self.statement.statement_json,
            signature=self.statement.signature,
            tensors=[tensor_message(n, t) for n, t in sorted(self.release.tensors.items())],
        )
        return message.SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes, *, source: str) -> SignedComposite:
        """Inverse of :meth:`encode`, with every tensor checked against the manifest (the
        signature is checked by :meth:`verify`, against a key the site trusts)."""
        try:
            message = pb.Composite.FromString(data)
            tensors = tensors_from_messages(message.tensors, source=source)
            statement = CompositeStatement(message.statement_json, bytes(message.signature))
        except (ProtobufDecodeError, WireError, ReleaseError) as exc:
            raise ReleaseError(f"{source}: not a composite ({exc})") from None
        release = Release.from_manifest(message.manifest_json, tensors, source=source)
        return cls(release, statement)

    def verify(self, trusted_key: bytes, *, source: str) -> Release:
        """The composite's release, once ``trusted_key``'s signature of it is checked."""
        self.statement.verify(self.release, trusted_key, source=source)
        return self.release
