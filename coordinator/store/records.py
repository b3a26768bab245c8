"""What the registry holds: its records, the rules they follow, the :class:`Store` interface and
the errors a store raises."""

from __future__ import annotations

import datetime
from collections.abc import Collection
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from fedatlas.coordinator.store.rows import AUDIT_BY_HASH
from fedatlas.shared.errors import FedatlasError

SITE_STATES = ("enrolled", "revoked")
BUNDLE_STATES = ("accepted", "held", "rejected")
# Bundle states whose conditions are owned (a ``conditions`` row exists for each).
OWNING_STATES = ("accepted", "held")
# Meta keys the registry keeps for itself (no audit event describes them).
RESERVED_META_KEYS = ("schema_version", "audit_head")


class StoreError(FedatlasError):
    """The registry file is missing, not a registry, damaged, or a write breaks its rules."""


class StoreConflictError(StoreError):
    """A write collides with what the registry holds: an id, nonce, condition or generation is
    already taken, or the record is no longer in the state the write needs."""


class StoreNotFoundError(StoreError):
    """A write names a site or bundle the registry does not have."""


class StoreBusyError(StoreError):
    """Another process held the registry's lock for longer than the busy timeout."""


def utc_now() -> str:
    """Current UTC time as ISO-8601 with seconds, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# Each record is one row of the table of the same name; field names are column names, and
# ``metadata=AUDIT_BY_HASH`` marks a large value the audit log pins by its hash (see rows.py).
@dataclass(frozen=True)
class SiteRecord:
    """An enrolled (or revoked) site."""

    site_id: str
    public_key: bytes
    node_public_key: str  # "" when the site has no node key
    status: str  # "enrolled" | "revoked"
    enrolled_at: str
    revoked_at: str  # "" while enrolled


@dataclass(frozen=True)
class ReleaseRecord:
    """A published reference release; ``sequence`` orders publications."""

    release_id: str
    manifest_json: str = field(metadata=AUDIT_BY_HASH)
    weights: bytes = field(metadata=AUDIT_BY_HASH)
    published_at: str
    sequence: int


@dataclass(frozen=True)
class BundleRecord:
    """A site's signed adaptor bundle and the decision about it."""

    bundle_id: str
    site_id: str
    release_id: str
    nonce: bytes
    conditions: tuple[str, ...]
    state: str  # "accepted" | "held" | "rejected"
    blob: bytes = field(metadata=AUDIT_BY_HASH)
    received_at: str
    decided_at: str
    decided_by: str
    reason: str


@dataclass(frozen=True)
class CompositeRecord:
    """A published composite (generation 1, 2, ...)."""

    generation: int
    content_hash: str
    base_release_id: str
    bundle_ids: tuple[str, ...]
    manifest_json: str = field(metadata=AUDIT_BY_HASH)
    statement_json: str = field(metadata=AUDIT_BY_HASH)
    signature: bytes
    created_at: str


@dataclass(frozen=True)
class RejectionRecord:
    """A refused submission, as the rejection log keeps it: who claimed to send it, when, why
    and the bundle's id; never its bytes. ``site_id`` is as claimed (unverified)."""

    bundle_id: str
    site_id: str
    reason_code: str
    reason: str
    received_at: str
    actor: str


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the hash-chained audit log."""

    seq: int
    at: str
    actor: str
    event: str
    subject: str
    payload: dict[str, Any]
    prev_hash: str
    entry_hash: str


class Store(Protocol):
    """The registry interface the coordinator uses (SQLite today)."""

    def close(self) -> None:
        """Release the database connection."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        ...

    def set_meta(self, key: str, value: str, *, actor: str) -> None:
        """Store ``value`` under ``key`` (audited as ``meta.set``)."""
        ...

    def enroll_site(
        self, site_id: str, public_key: bytes, node_public_key: str, *, actor: str
    ) -> SiteRecord:
        """Enroll a new site; site ids are never reused."""
        ...

    def revoke_site(self, site_id: str, *, actor: str, reason: str) -> SiteRecord:
        """Revoke an enrolled site."""
        ...

    def get_site(self, site_id: str) -> SiteRecord | None:
        """The site, or None."""
        ...

    def list_sites(self) -> list[SiteRecord]:
        """Every site, sorted by id."""
        ...

    def add_release(
        self, release_id: str, manifest_json: str, weights: bytes, *, actor: str
    ) -> ReleaseRecord:
        """Publish a release."""
        ...

    def get_release(self, release_id: str) -> ReleaseRecord | None:
        """The release, or None."""
        ...

    def current_release(self) -> ReleaseRecord | None:
        """The most recently published release, or None."""
        ...

    def add_bundle(self, record: BundleRecord, *, actor: str) -> BundleRecord:
        """Register an accepted or held bundle and claim its conditions."""
        ...

    def get_bundle(self, bundle_id: str) -> BundleRecord | None:
        """The bundle, or None."""
        ...

    def find_nonce(self, site_id: str, nonce: bytes) -> str | None:
        """Id of the bundle of ``site_id`` that used ``nonce``, or None."""
        ...

    def condition_owner(self, name: str) -> tuple[str, str] | None:
        """``(site_id, bundle_id)`` owning condition ``name``, or None when it is free."""
        ...

    def list_bundles(
        self, *, state: str | None = None, site_id: str | None = None
    ) -> list[BundleRecord]:
        """Bundles in order of arrival, optionally filtered."""
        ...

    def decide_bundle(self, bundle_id: str, state: str, *, actor: str, reason: str) -> BundleRecord:
        """Accept or reject a held bundle."""
        ...

    def withdraw_bundle(self, bundle_id: str, *, actor: str, reason: str) -> BundleRecord:
        """Withdraw an accepted bundle (it becomes rejected)."""
        ...

    def add_rejection(self, record: RejectionRecord) -> None:
        """Log a refused submission (the oldest entries go beyond a bounded length)."""
        ...

    def rejections(self, *, site_id: str | None = None, bundle_id: str | None = None,
                   limit: int = 1_000) -> list[RejectionRecord]:  # fmt: skip
        """The newest logged rejections first, optionally of one (claimed) site or bundle."""
        ...

    def accepted_bundles(self) -> list[BundleRecord]:
        """Every accepted bundle, sorted by id."""
        ...

    def add_composite(self, record: CompositeRecord, *, actor: str) -> CompositeRecord:
        """Publish the next composite generation."""
        ...

    def latest_composite(self) -> CompositeRecord | None:
        """The composite with the highest generation, or None."""
        ...

    def get_composite(self, generation: int) -> CompositeRecord | None:
        """The composite of ``generation``, or None."""
        ...

    def audit_head(self) -> tuple[int, str]:
        """Sequence number and hash of the audit log's newest entry."""
        ...

    def audit_entries(self) -> list[AuditEntry]:
        """Every audit entry, in order."""
        ...

    def verify_audit(self, trusted_keys: Collection[bytes] | None = None) -> list[str]:
        """Readable integrity problems of the audit log and the rows it describes (empty: ok)."""
        ...

    def snapshot(self) -> str:
        """A digest of the full content of every table."""
        ...
