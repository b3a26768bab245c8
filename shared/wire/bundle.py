"""Signed adaptor bundles (site -> coordinator).

A bundle is the protobuf message ``fedatlas.v1.Bundle`` (format 2): the site id and the
signer's public key in the clear, and the signed ``body``, a serialised ``BundleBody`` holding
the release it was trained against, the adaptor's content (canonical JSON, which lists the
SHA-256 of every tensor), its tensors (:mod:`fedatlas.shared.wire.codec`), a creation time and a
random nonce. The Ed25519 signature covers exactly the body's bytes, so a receiver checks it
before it decodes anything the site wrote; the adaptor's JSON is then parsed strictly and held
against its declared shape. The bundle's serialised bytes are the bundle file and what the
coordinator stores; their SHA-256 is the bundle id. Nothing in it is per cell: its size does not
depend on how many cells the site has.

Format 1 bundles (the body's fields inline) are still decoded from a store that holds them, to
compose them again; :func:`parse_bundle` marks them, and the coordinator accepts none anew.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from fedatlas.shared.errors import AdaptorError, AdaptorHashError
from fedatlas.shared.hashing import canonical_json, content_hash, digest
from fedatlas.shared.model.adaptor import Adaptor, adaptor_content
from fedatlas.shared.wire.codec import WireError, tensor_message, tensors_from_messages
from fedatlas.shared.wire.signing import public_bytes, sign, verify_signature
from fedatlas.v1 import coordinator_pb2 as pb

BUNDLE_FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # read from stores, never accepted anew
NONCE_BYTES = 16
SIGNED_PREFIX = b"fedatlas-bundle/2\n"  # what the signature covers: this, then the body
MAX_ADAPTOR_JSON_BYTES = 1 << 20  # an adaptor's content is a few kB

# the fields of the signed part: a BundleBody, or a format-1 Bundle itself
Fields = Any


class BundleError(WireError):
    """Bundle bytes that cannot be parsed, or whose parts do not fit together."""


class BundleHashError(BundleError):
    """A bundle's tensors differ from the hashes its signed content records."""


@dataclass(frozen=True)
class SignedBundle:
    """A received bundle: its outer message and the exact bytes it came from. Nothing the site
    signed is decoded until :meth:`fields` is called (after :meth:`signature_valid`)."""

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
    def legacy(self) -> bool:
        """True for a format-1 bundle (read from a store, not accepted anew)."""
        return self.message.format_version == LEGACY_FORMAT_VERSION

    def signature_valid(self, public_key: bytes) -> bool:
        """True when ``public_key`` signed the body's bytes (always False for format 1)."""
        if self.legacy:
            return False
        signed = SIGNED_PREFIX + bytes(self.message.body)
        return verify_signature(public_key, signed, bytes(self.message.signature))

    def fields(self) -> Fields:
        """The signed fields (``BundleBody``), decoded; their site id must be the bundle's."""
        if self.legacy:
            return self.message
        try:
            body = pb.BundleBody.FromString(bytes(self.message.body))
        except DecodeError as exc:
            raise BundleError(f"the signed body does not parse ({exc})") from None
        if body.site_id != self.message.site_id:
            raise BundleError(
                f"the signed body names site {body.site_id[:64]!r}, the bundle {self.site_id!r}"
            )
        return body

    def adaptor_content(self) -> dict[str, Any]:
        """The adaptor content the bundle states, parsed strictly and of the declared shape."""
        try:
            return adaptor_content(
                self.fields().adaptor_json, source="adaptor_json", max_bytes=MAX_ADAPTOR_JSON_BYTES
            )
        except AdaptorError as exc:
            raise BundleError(str(exc)) from None

    def adaptor(self) -> Adaptor:
        """The adaptor, with every tensor checked against the hash its content records
        (:class:`BundleHashError` when one differs)."""
        source = f"bundle from {self.site_id}"
        content = self.adaptor_content()
        try:
            tensors = tensors_from_messages(self.fields().tensors, source=source)
        except WireError as exc:
            raise BundleError(str(exc)) from None
        try:
            return Adaptor.verified(content, tensors, content_hash(content), source=source)
        except AdaptorHashError as exc:
            raise BundleHashError(str(exc)) from None
        except AdaptorError as exc:
            raise BundleError(str(exc)) from None


def make_bundle(
    adaptor: Adaptor,
    key: Ed25519PrivateKey,
    *,
    nonce: bytes | None = None,
    created_at: str | None = None,
) -> SignedBundle:
    """Sign ``adaptor`` with the site's ``key`` into a bundle (fresh random nonce by default)."""
    body = pb.BundleBody(
        site_id=adaptor.site_id,
        release_id=str(adaptor.content["release_id"]),
        trunk_id=str(adaptor.content["trunk_id"]),
        adaptor_json=canonical_json(adaptor.content).decode("utf-8"),
        created_at=created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        nonce=nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES),
        tensors=[tensor_message(n, t) for n, t in sorted(adaptor.tensors.items())],
    )
    signed = body.SerializeToString(deterministic=True)
    message = pb.Bundle(
        format_version=BUNDLE_FORMAT_VERSION,
        site_id=adaptor.site_id,
        signer_public_key=public_bytes(key),
        body=signed,
        signature=sign(key, SIGNED_PREFIX + signed),
    )
    return SignedBundle(message, message.SerializeToString(deterministic=True))


def parse_bundle(raw: bytes) -> SignedBundle:
    """Parse the outer message of serialised bundle bytes (what the coordinator checks before
    the signature: see :class:`SignedBundle`)."""
    try:
        message = pb.Bundle.FromString(raw)
    except DecodeError as exc:
        raise BundleError(f"not a fedatlas bundle: the bytes do not parse ({exc})") from None
    if message.format_version not in (BUNDLE_FORMAT_VERSION, LEGACY_FORMAT_VERSION):
        raise BundleError(
            f"bundle format version {message.format_version}, expected {BUNDLE_FORMAT_VERSION}"
        )
    return SignedBundle(message, raw)
