"""Signed adaptor bundles (site -> coordinator).

A bundle is the protobuf message ``fedatlas.v1.Bundle``: the adaptor's content (canonical JSON,
which lists the SHA-256 of every tensor), its tensors (:mod:`fedatlas.shared.wire.codec`),
the site id, the release it was trained against, a creation time, a random nonce, the signer's
public key and an Ed25519 signature over a canonical statement of all of these. Its serialised
bytes are the bundle file and what the coordinator stores; their SHA-256 is the bundle id.
Nothing in it is per cell: its size does not depend on how many cells the site has.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from fedatlas.shared.errors import AdaptorError, AdaptorHashError
from fedatlas.shared.hashing import canonical_json, content_hash, digest
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.wire.codec import WireError, tensor_message, tensors_from_messages
from fedatlas.shared.wire.signing import public_bytes, sign, verify_signature
from fedatlas.v1 import coordinator_pb2 as pb

BUNDLE_FORMAT_VERSION = 1
NONCE_BYTES = 16


class BundleError(WireError):
    """Bundle bytes that cannot be parsed, or whose parts do not fit together."""


class BundleHashError(BundleError):
    """A bundle's tensors differ from the hashes its signed content records."""


@dataclass(frozen=True)
class SignedBundle:
    """A parsed bundle and the exact bytes it came from."""

    message: pb.Bundle
    raw: bytes

    @property
    def bundle_id(self) -> str:
        """SHA-256 of the serialised bundle."""
        return digest(self.raw)

    @property
    def site_id(self) -> str:
        """The site that says it made the bundle."""
        return str(self.message.site_id)

    @property
    def nonce(self) -> bytes:
        """The bundle's nonce."""
        return bytes(self.message.nonce)

    def adaptor_content(self) -> dict[str, Any]:
        """The adaptor content as the bundle states it (not yet checked against the tensors)."""
        try:
            content = json.loads(self.message.adaptor_json)
        except json.JSONDecodeError as exc:
            raise BundleError(f"adaptor_json is not JSON ({exc})") from None
        if not isinstance(content, dict):
            raise BundleError("adaptor_json is not a JSON object")
        return content

    def statement(self) -> bytes:
        """The canonical bytes the signature covers."""
        return bundle_statement(self.message, content_hash(self.adaptor_content()))

    def signature_valid(self, public_key: bytes) -> bool:
        """True when the bundle is signed by ``public_key``."""
        return verify_signature(public_key, self.statement(), bytes(self.message.signature))

    def adaptor(self) -> Adaptor:
        """The adaptor, with every tensor checked against the hash its content records
        (:class:`BundleHashError` when one differs)."""
        source = f"bundle from {self.site_id}"
        try:
            tensors = tensors_from_messages(self.message.tensors, source=source)
        except WireError as exc:
            raise BundleError(str(exc)) from None
        content = self.adaptor_content()
        try:
            return Adaptor.verified(content, tensors, content_hash(content), source=source)
        except AdaptorHashError as exc:
            raise BundleHashError(str(exc)) from None
        except AdaptorError as exc:
            raise BundleError(str(exc)) from None


def bundle_statement(message: pb.Bundle, adaptor_hash: str) -> bytes:
    """Canonical statement of a bundle's fields (everything but the signature)."""
    return canonical_json(
        {
            "kind": "fedatlas-bundle",
            "format_version": int(message.format_version),
            "site_id": message.site_id,
            "release_id": message.release_id,
            "trunk_id": message.trunk_id,
            "adaptor": adaptor_hash,
            "created_at": message.created_at,
            "nonce": bytes(message.nonce).hex(),
            "signer": bytes(message.signer_public_key).hex(),
        }
    )


def make_bundle(
    adaptor: Adaptor,
    key: Ed25519PrivateKey,
    *,
    nonce: bytes | None = None,
    created_at: str | None = None,
) -> SignedBundle:
    """Sign ``adaptor`` with the site's ``key`` into a bundle (fresh random nonce by default)."""
    message = pb.Bundle(
        format_version=BUNDLE_FORMAT_VERSION,
        site_id=adaptor.site_id,
        release_id=str(adaptor.content["release_id"]),
        trunk_id=str(adaptor.content["trunk_id"]),
        adaptor_json=canonical_json(adaptor.content).decode("utf-8"),
        created_at=created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        nonce=nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES),
        signer_public_key=public_bytes(key),
    )
    message.tensors.extend(tensor_message(n, t) for n, t in sorted(adaptor.tensors.items()))
    message.signature = sign(key, bundle_statement(message, adaptor.content_hash))
    return SignedBundle(message, message.SerializeToString(deterministic=True))


def parse_bundle(raw: bytes) -> SignedBundle:
    """Parse serialised bundle bytes (structure only; see the coordinator for verification)."""
    try:
        message = pb.Bundle.FromString(raw)
    except DecodeError as exc:
        raise BundleError(f"not a fedatlas bundle: the bytes do not parse ({exc})") from None
    if message.format_version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {message.format_version}, expected {BUNDLE_FORMAT_VERSION}"
        )
    return SignedBundle(message, raw)
