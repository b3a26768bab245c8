"""The coordinator's registry: sites, releases, bundles, composites and a hash-chained audit log.

One SQLite file (WAL journal, ``synchronous=FULL``) shared by the gRPC server and the operator's
admin CLI, which run as separate processes. Every write is one ``BEGIN IMMEDIATE`` transaction
that also appends the audit entry describing it, so a row and its audit entry are committed
together or not at all, even when a process is killed. The audit log is a hash chain whose head
is kept in ``meta``; :meth:`SQLiteStore.verify_audit` re-hashes the chain and checks every row
against the latest audit event about it.

:class:`Store` is the interface the coordinator programs against, so that another database (e.g.
PostgreSQL) can replace :class:`SQLiteStore` later.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.hashing import HASH_PREFIX, canonical_json, content_hash, digest

SCHEMA_VERSION = 1
GENESIS_HASH = HASH_PREFIX + "0" * 64
BUSY_TIMEOUT_S = 30.0
SITE_STATES = ("enrolled", "revoked")
BUNDLE_STATES = ("accepted", "held", "rejected")
# Bundle states whose conditions are owned (a ``conditions`` row exists for each).
OWNING_STATES = ("accepted", "held")
RESERVED_META_KEYS = ("schema_version", "audit_head")
TABLES = ("meta", "sites", "releases", "bundles", "conditions", "composites", "audit")

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE sites (
    site_id         TEXT PRIMARY KEY NOT NULL,
    public_key      BLOB NOT NULL,
    node_public_key TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('enrolled', 'revoked')),
    enrolled_at     TEXT NOT NULL,
    revoked_at      TEXT NOT NULL
);
CREATE TABLE releases (
    sequence      INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id    TEXT NOT NULL UNIQUE,
    manifest_json TEXT NOT NULL,
    weights       BLOB NOT NULL,
    published_at  TEXT NOT NULL
);
CREATE TABLE bundles (
    bundle_id   TEXT PRIMARY KEY NOT NULL,
    arrival     INTEGER NOT NULL UNIQUE,
    site_id     TEXT NOT NULL REFERENCES sites (site_id),
    release_id  TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    conditions  TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('accepted', 'held', 'rejected')),
    blob        BLOB NOT NULL,
    received_at TEXT NOT NULL,
    decided_at  TEXT NOT NULL,
    decided_by  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    UNIQUE (site_id, nonce)
);
CREATE TABLE conditions (
    name      TEXT PRIMARY KEY NOT NULL,
    bundle_id TEXT NOT NULL REFERENCES bundles (bundle_id)
);
CREATE INDEX conditions_by_bundle ON conditions (bundle_id);
CREATE TABLE composites (
    generation      INTEGER PRIMARY KEY CHECK (generation >= 1),
    content_hash    TEXT NOT NULL,
    base_release_id TEXT NOT NULL,
    bundle_ids      TEXT NOT NULL,
    manifest_json   TEXT NOT NULL,
    statement_json  TEXT NOT NULL,
    signature       BLOB NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    event      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    entry_hash TEXT NOT NULL
)
"""


class StoreError(FedatlasError):
    """The registry file is missing, not a registry, damaged, or a write breaks its rules."""


def utc_now() -> str:
    """Current UTC time as ISO-8601 with seconds, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- records
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
    manifest_json: str
    weights: bytes
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
    blob: bytes
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
    manifest_json: str
    statement_json: str
    signature: bytes
    created_at: str


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


def audit_entry_hash(
    seq: int, at: str, actor: str, event: str, subject: str, payload: Any, prev_hash: str
) -> str:
    """The hash that chains an audit entry to its predecessor."""
    return content_hash(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "event": event,
            "subject": subject,
            "payload": payload,
            "prev_hash": prev_hash,
        }
    )


# --------------------------------------------------------------------------- interface
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

    def audit_entries(self) -> list[AuditEntry]:
        """Every audit entry, in order."""
        ...

    def verify_audit(self) -> list[str]:
        """Readable integrity problems of the audit log and the rows it describes (empty: ok)."""
        ...

    def snapshot(self) -> str:
        """A digest of the full content of every table."""
        ...


# --------------------------------------------------------------------------- row helpers
def _site_from_row(row: sqlite3.Row) -> SiteRecord:
    return SiteRecord(
        site_id=str(row["site_id"]),
        public_key=bytes(row["public_key"]),
        node_public_key=str(row["node_public_key"]),
        status=str(row["status"]),
        enrolled_at=str(row["enrolled_at"]),
        revoked_at=str(row["revoked_at"]),
    )


def _release_from_row(row: sqlite3.Row) -> ReleaseRecord:
    return ReleaseRecord(
        release_id=str(row["release_id"]),
        manifest_json=str(row["manifest_json"]),
        weights=bytes(row["weights"]),
        published_at=str(row["published_at"]),
        sequence=int(row["sequence"]),
    )


def _str_tuple(text: str, what: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a JSON list of strings")
    return tuple(value)


def _bundle_from_row(row: sqlite3.Row) -> BundleRecord:
    return BundleRecord(
        bundle_id=str(row["bundle_id"]),
        site_id=str(row["site_id"]),
        release_id=str(row["release_id"]),
        nonce=bytes(row["nonce"]),
        conditions=_str_tuple(row["conditions"], "conditions"),
        state=str(row["state"]),
        blob=bytes(row["blob"]),
        received_at=str(row["received_at"]),
        decided_at=str(row["decided_at"]),
        decided_by=str(row["decided_by"]),
        reason=str(row["reason"]),
    )


def _composite_from_row(row: sqlite3.Row) -> CompositeRecord:
    return CompositeRecord(
        generation=int(row["generation"]),
        content_hash=str(row["content_hash"]),
        base_release_id=str(row["base_release_id"]),
        bundle_ids=_str_tuple(row["bundle_ids"], "bundle_ids"),
        manifest_json=str(row["manifest_json"]),
        statement_json=str(row["statement_json"]),
        signature=bytes(row["signature"]),
        created_at=str(row["created_at"]),
    )


def _text_sha256(text: str) -> str:
    return digest(text.encode("utf-8"))


# Audit payloads pin down every column of the row they describe (large values by hash).
def _describe_site(site: SiteRecord) -> dict[str, Any]:
    return {
        "site_id": site.site_id,
        "public_key": site.public_key.hex(),
        "node_public_key": site.node_public_key,
        "status": site.status,
        "enrolled_at": site.enrolled_at,
        "revoked_at": site.revoked_at,
    }


def _describe_release(release: ReleaseRecord) -> dict[str, Any]:
    return {
        "release_id": release.release_id,
        "sequence": release.sequence,
        "manifest_sha256": _text_sha256(release.manifest_json),
        "weights_sha256": digest(release.weights),
        "published_at": release.published_at,
    }


def _describe_bundle(bundle: BundleRecord, arrival: int) -> dict[str, Any]:
    return {
        "bundle_id": bundle.bundle_id,
        "arrival": arrival,
        "site_id": bundle.site_id,
        "release_id": bundle.release_id,
        "nonce": bundle.nonce.hex(),
        "conditions": list(bundle.conditions),
        "state": bundle.state,
        "blob_sha256": digest(bundle.blob),
        "received_at": bundle.received_at,
        "decided_at": bundle.decided_at,
        "decided_by": bundle.decided_by,
        "reason": bundle.reason,
    }


def _describe_composite(composite: CompositeRecord) -> dict[str, Any]:
    return {
        "generation": composite.generation,
        "content_hash": composite.content_hash,
        "base_release_id": composite.base_release_id,
        "bundle_ids": list(composite.bundle_ids),
        "manifest_sha256": _text_sha256(composite.manifest_json),
        "statement_sha256": _text_sha256(composite.statement_json),
        "signature": composite.signature.hex(),
        "created_at": composite.created_at,
    }


def _snapshot_value(value: Any) -> list[Any]:
    """A typed, JSON-safe form of one SQLite value (so text never equals a blob's hex)."""
    if value is None:
        return ["null"]
    if isinstance(value, bytes):
        return ["blob", value.hex()]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["real", repr(value)]
    return ["text", str(value)]


def _require_text(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")


# --------------------------------------------------------------------------- SQLite
class SQLiteStore(Store):
    """The registry in one SQLite file; safe to share between processes and threads."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        """Wrap an opened, configured connection (use :meth:`create` or :meth:`open`)."""
        self._connection: sqlite3.Connection | None = connection
        self._path = path
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ opening
    @property
    def path(self) -> Path:
        """The registry file."""
        return self._path

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> SQLiteStore:
        """Create a new registry at ``path`` (refuses an existing file)."""
        file = Path(path)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise StoreError(
                f"registry {file} already exists; refusing to overwrite it "
                "(open it, or choose another path)"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot create registry {file}: {exc.strerror}") from exc
        os.close(fd)
        connection: sqlite3.Connection | None = None
        try:
            connection = cls._connect(file)
            cls._configure(connection, file)
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("audit_head", _head_value(0, GENESIS_HASH)),
                ],
            )
            connection.execute("COMMIT")
        except BaseException as exc:
            if connection is not None:
                connection.close()
            for leftover in (file, Path(f"{file}-wal"), Path(f"{file}-shm")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot create registry {file}: {exc}") from exc
            raise
        return cls(connection, file)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SQLiteStore:
        """Open an existing registry, checking that it is one this version can use."""
        file = Path(path)
        if not file.exists():
            raise StoreError(
                f"registry {file} does not exist; create it with `fedatlas admin init`"
            )
        if not file.is_file():
            raise StoreError(f"registry {file} is not a regular file")
        try:
            connection = cls._connect(file)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open registry {file}: {exc}") from exc
        try:
            cls._check_registry(connection, file)
            cls._configure(connection, file)
        except BaseException:
            connection.close()
            raise
        return cls(connection, file)

    @staticmethod
    def _connect(file: Path) -> sqlite3.Connection:
        # mode=rw: never create a file here (create() makes it first with O_EXCL).
        connection = sqlite3.connect(
            file.absolute().as_uri() + "?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_S,
            check_same_thread=False,
        )
        connection.row_factory = sqlite3.Row
        return connection

    @staticmethod
    def _check_registry(connection: sqlite3.Connection, file: Path) -> None:
        """Raise StoreError unless ``file`` is an intact registry of a schema this code reads."""
        not_registry = f"{file} is not a fedatlas registry"
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            tables = {
                str(row[0])
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "meta" not in tables:
                raise StoreError(f"{not_registry} (it has no meta table)")
            row = connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"{not_registry} or is damaged (SQLite: {exc})") from exc
        if row is None:
            raise StoreError(f"{not_registry} (meta has no schema_version)")
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise StoreError(f"{not_registry} (schema_version is {row[0]!r})") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"registry {file} has schema version {version}, newer than this fedatlas "
                f"supports ({SCHEMA_VERSION}); upgrade fedatlas"
            )
        if version < 1:
            raise StoreError(f"{not_registry} (schema_version is {version})")
        missing = sorted(set(TABLES) - tables)
        if missing:
            raise StoreError(f"{not_registry} (tables missing: {', '.join(missing)})")
        try:
            problems = [str(r[0]) for r in connection.execute("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            raise StoreError(f"registry {file} is damaged (SQLite: {exc})") from exc
        if problems != ["ok"]:
            raise StoreError(f"registry {file} is damaged: {'; '.join(problems[:3])}")

    @staticmethod
    def _configure(connection: sqlite3.Connection, file: Path) -> None:
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot configure registry {file}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"registry {file}: SQLite refused WAL journal mode (got {mode!r}); "
                "is the file on a network or read-only file system?"
            )

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Self:
        """Use the store in a ``with`` block; it is closed on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        self.close()

    # ------------------------------------------------------------------ transactions
    def _live(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreError(f"registry {self._path} is closed")
        return self._connection

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """Run the body in one transaction; roll back on any exception."""
        with self._lock:
            connection = self._live()
            try:
                connection.execute(begin)
            except sqlite3.OperationalError as exc:
                raise self._sqlite_error(exc) from exc
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException as exc:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._sqlite_error(exc) from exc
                raise

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction: takes the database write lock up front (``BEGIN IMMEDIATE``)."""
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: a consistent view while other processes write."""
        return self._transaction("BEGIN")

    def _sqlite_error(self, exc: sqlite3.Error) -> StoreError:
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreError(
                f"registry {self._path} is busy: another process held it for more than "
                f"{BUSY_TIMEOUT_S:g} s ({exc})"
            )
        return StoreError(f"registry {self._path}: {exc}")

    def _append_audit(
        self,
        connection: sqlite3.Connection,
        *,
        at: str,
        actor: str,
        event: str,
        subject: str,
        payload: dict[str, Any],
    ) -> AuditEntry:
        """Append one entry to the chain and move the head, inside the caller's transaction."""
        _require_text(actor, "actor")
        seq, prev_hash = self._head(connection)
        seq += 1
        entry_hash = audit_entry_hash(seq, at, actor, event, subject, payload, prev_hash)
        connection.execute(
            "INSERT INTO audit (seq, at, actor, event, subject, payload, prev_hash, entry_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq,
                at,
                actor,
                event,
                subject,
                canonical_json(payload).decode("utf-8"),
                prev_hash,
                entry_hash,
            ),
        )
        connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'audit_head'", (_head_value(seq, entry_hash),)
        )
        return AuditEntry(seq, at, actor, event, subject, payload, prev_hash, entry_hash)

    def _head(self, connection: sqlite3.Connection) -> tuple[int, str]:
        row = connection.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        head = _parse_head(None if row is None else row[0])
        if head is None:
            raise StoreError(
                f"registry {self._path}: the audit head in meta is missing or malformed; "
                "the registry has been tampered with"
            )
        return head

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        with self._read() as connection:
            row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str, *, actor: str) -> None:
        """Store ``value`` under ``key`` (audited as ``meta.set``; reserved keys refused)."""
        _require_text(key, "meta key")
        if key in RESERVED_META_KEYS:
            raise StoreError(f"meta key {key!r} is reserved for the registry itself")
        if not isinstance(value, str):
            raise StoreError(f"meta value for {key!r} must be a string, got {value!r}")
        with self._write() as connection:
            connection.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
            self._append_audit(
                connection,
                at=utc_now(),
                actor=actor,
                event="meta.set",
                subject=f"meta:{key}",
                payload={"key": key, "value": value},
            )

    # ------------------------------------------------------------------ sites
    def enroll_site(
        self, site_id: str, public_key: bytes, node_public_key: str, *, actor: str
    ) -> SiteRecord:
        """Enroll a new site; an id already used (even by a revoked site) is refused."""
        _require_text(site_id, "site id")
        if not isinstance(public_key, bytes) or not public_key:
            raise StoreError(f"site {site_id!r}: the public key must be non-empty bytes")
        at = utc_now()
        site = SiteRecord(site_id, public_key, node_public_key, "enrolled", at, "")
        with self._write() as connection:
            existing = connection.execute(
                "SELECT status FROM sites WHERE site_id = ?", (site_id,)
            ).fetchone()
            if existing is not None:
                raise StoreError(
                    f"site {site_id!r} already exists ({existing[0]}); site ids are never reused"
                )
            connection.execute(
                "INSERT INTO sites (site_id, public_key, node_public_key, status, enrolled_at, "
                "revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
                (site_id, public_key, node_public_key, site.status, at, ""),
            )
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="site.enroll",
                subject=f"site:{site_id}",
                payload=_describe_site(site),
            )
        return site

    def revoke_site(self, site_id: str, *, actor: str, reason: str) -> SiteRecord:
        """Revoke an enrolled site (refuses an unknown or already revoked one)."""
        at = utc_now()
        with self._write() as connection:
            row = connection.execute("SELECT * FROM sites WHERE site_id = ?", (site_id,)).fetchone()
            if row is None:
                raise StoreError(f"site {site_id!r} is not enrolled")
            site = _site_from_row(row)
            if site.status == "revoked":
                raise StoreError(f"site {site_id!r} was already revoked at {site.revoked_at}")
            site = replace(site, status="revoked", revoked_at=at)
            connection.execute(
                "UPDATE sites SET status = ?, revoked_at = ? WHERE site_id = ?",
                (site.status, at, site_id),
            )
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="site.revoke",
                subject=f"site:{site_id}",
                payload={**_describe_site(site), "reason": reason},
            )
        return site

    def get_site(self, site_id: str) -> SiteRecord | None:
        """The site, or None."""
        with self._read() as connection:
            row = connection.execute("SELECT * FROM sites WHERE site_id = ?", (site_id,)).fetchone()
        return None if row is None else _site_from_row(row)

    def list_sites(self) -> list[SiteRecord]:
        """Every site (enrolled and revoked), sorted by id."""
        with self._read() as connection:
            rows = connection.execute("SELECT * FROM sites ORDER BY site_id").fetchall()
        return [_site_from_row(row) for row in rows]

    # ------------------------------------------------------------------ releases
    def add_release(
        self, release_id: str, manifest_json: str, weights: bytes, *, actor: str
    ) -> ReleaseRecord:
        """Publish a release (refuses a release id already published)."""
        _require_text(release_id, "release id")
        at = utc_now()
        with self._write() as connection:
            if connection.execute(
                "SELECT 1 FROM releases WHERE release_id = ?", (release_id,)
            ).fetchone():
                raise StoreError(f"release {release_id!r} is already published")
            cursor = connection.execute(
                "INSERT INTO releases (release_id, manifest_json, weights, published_at) "
                "VALUES (?, ?, ?, ?)",
                (release_id, manifest_json, weights, at),
            )
            sequence = cursor.lastrowid
            assert sequence is not None
            release = ReleaseRecord(release_id, manifest_json, weights, at, sequence)
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="release.publish",
                subject=f"release:{release_id}",
                payload=_describe_release(release),
            )
        return release

    def get_release(self, release_id: str) -> ReleaseRecord | None:
        """The release, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM releases WHERE release_id = ?", (release_id,)
            ).fetchone()
        return None if row is None else _release_from_row(row)

    def current_release(self) -> ReleaseRecord | None:
        """The most recently published release, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM releases ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _release_from_row(row)

    # ------------------------------------------------------------------ bundles
    def add_bundle(self, record: BundleRecord, *, actor: str) -> BundleRecord:
        """Register an accepted or held bundle and claim its conditions, atomically.

        Refuses a bundle id already registered, an unknown site, a ``(site_id, nonce)`` pair
        already used and a condition another accepted or held bundle owns. An empty
        ``received_at`` is filled with the current time; the stored record is returned.
        """
        _require_text(record.bundle_id, "bundle id")
        if record.state not in OWNING_STATES:
            raise StoreError(
                f"bundle {record.bundle_id!r}: a new bundle must be accepted or held, "
                f"not {record.state!r}"
            )
        if not isinstance(record.nonce, bytes) or not isinstance(record.blob, bytes):
            raise StoreError(f"bundle {record.bundle_id!r}: nonce and blob must be bytes")
        for name in record.conditions:
            _require_text(name, f"bundle {record.bundle_id!r}: condition name")
        repeated = sorted(name for name, n in Counter(record.conditions).items() if n > 1)
        if repeated:
            raise StoreError(
                f"bundle {record.bundle_id!r} lists condition(s) more than once: "
                + ", ".join(repeated)
            )
        at = utc_now()
        bundle = replace(record, conditions=tuple(record.conditions))
        if not bundle.received_at:
            bundle = replace(bundle, received_at=at)
        with self._write() as connection:
            last = connection.execute("SELECT COALESCE(MAX(arrival), 0) FROM bundles").fetchone()
            arrival = int(last[0]) + 1
            claimed = False  # True once the bundle row is in: a later failure is a condition
            try:
                connection.execute(
                    "INSERT INTO bundles (bundle_id, arrival, site_id, release_id, nonce, "
                    "conditions, state, blob, received_at, decided_at, decided_by, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        bundle.bundle_id,
                        arrival,
                        bundle.site_id,
                        bundle.release_id,
                        bundle.nonce,
                        canonical_json(list(bundle.conditions)).decode("utf-8"),
                        bundle.state,
                        bundle.blob,
                        bundle.received_at,
                        bundle.decided_at,
                        bundle.decided_by,
                        bundle.reason,
                    ),
                )
                claimed = True
                connection.executemany(
                    "INSERT INTO conditions (name, bundle_id) VALUES (?, ?)",
                    [(name, bundle.bundle_id) for name in bundle.conditions],
                )
            except sqlite3.IntegrityError as exc:
                raise self._bundle_conflict(connection, bundle, claimed, exc) from exc
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="bundle.register",
                subject=f"bundle:{bundle.bundle_id}",
                payload=_describe_bundle(bundle, arrival),
            )
        return bundle

    @staticmethod
    def _bundle_conflict(
        connection: sqlite3.Connection,
        bundle: BundleRecord,
        claimed: bool,
        exc: sqlite3.IntegrityError,
    ) -> StoreError:
        """Say which rule a refused bundle insert broke (still inside its transaction)."""
        name = f"bundle {bundle.bundle_id!r}"
        if not claimed:
            row = connection.execute(
                "SELECT site_id FROM bundles WHERE bundle_id = ?", (bundle.bundle_id,)
            ).fetchone()
            if row is not None:
                return StoreError(f"{name} is already registered (from site {row[0]!r})")
            site = connection.execute(
                "SELECT 1 FROM sites WHERE site_id = ?", (bundle.site_id,)
            ).fetchone()
            if site is None:
                return StoreError(f"{name}: site {bundle.site_id!r} is not enrolled")
            row = connection.execute(
                "SELECT bundle_id FROM bundles WHERE site_id = ? AND nonce = ?",
                (bundle.site_id, bundle.nonce),
            ).fetchone()
            if row is not None:
                return StoreError(
                    f"{name}: site {bundle.site_id!r} already used nonce {bundle.nonce.hex()} "
                    f"(bundle {row[0]!r}); refusing a replay"
                )
        else:
            for condition in bundle.conditions:
                row = connection.execute(
                    "SELECT b.site_id, b.bundle_id FROM conditions c "
                    "JOIN bundles b ON b.bundle_id = c.bundle_id "
                    "WHERE c.name = ? AND c.bundle_id != ?",
                    (condition, bundle.bundle_id),
                ).fetchone()
                if row is not None:
                    return StoreError(
                        f"{name}: condition {condition!r} already belongs to bundle "
                        f"{row[1]!r} of site {row[0]!r}"
                    )
        return StoreError(f"{name} breaks a registry constraint ({exc})")

    def get_bundle(self, bundle_id: str) -> BundleRecord | None:
        """The bundle, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)
            ).fetchone()
        return None if row is None else _bundle_from_row(row)

    def find_nonce(self, site_id: str, nonce: bytes) -> str | None:
        """Id of the bundle of ``site_id`` that used ``nonce``, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT bundle_id FROM bundles WHERE site_id = ? AND nonce = ?", (site_id, nonce)
            ).fetchone()
        return None if row is None else str(row[0])

    def condition_owner(self, name: str) -> tuple[str, str] | None:
        """``(site_id, bundle_id)`` of the accepted or held bundle owning ``name``, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT b.site_id, b.bundle_id FROM conditions c "
                "JOIN bundles b ON b.bundle_id = c.bundle_id WHERE c.name = ?",
                (name,),
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def list_bundles(
        self, *, state: str | None = None, site_id: str | None = None
    ) -> list[BundleRecord]:
        """Bundles in order of arrival, optionally only those of ``state`` and/or ``site_id``."""
        if state is not None and state not in BUNDLE_STATES:
            raise StoreError(f"unknown bundle state {state!r} (expected one of {BUNDLE_STATES})")
        clauses: list[str] = []
        params: list[str] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if site_id is not None:
            clauses.append("site_id = ?")
            params.append(site_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT * FROM bundles{where} ORDER BY arrival", params
            ).fetchall()
        return [_bundle_from_row(row) for row in rows]

    def decide_bundle(self, bundle_id: str, state: str, *, actor: str, reason: str) -> BundleRecord:
        """Accept or reject a held bundle; rejecting frees its condition names."""
        if state not in ("accepted", "rejected"):
            raise StoreError(
                f"bundle {bundle_id!r}: a decision is 'accepted' or 'rejected', not {state!r}"
            )
        at = utc_now()
        with self._write() as connection:
            row = connection.execute(
                "SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"bundle {bundle_id!r} is not registered")
            bundle = _bundle_from_row(row)
            if bundle.state != "held":
                raise StoreError(
                    f"bundle {bundle_id!r} is {bundle.state}; only a held bundle can be decided"
                )
            bundle = replace(bundle, state=state, decided_at=at, decided_by=actor, reason=reason)
            connection.execute(
                "UPDATE bundles SET state = ?, decided_at = ?, decided_by = ?, reason = ? "
                "WHERE bundle_id = ?",
                (state, at, actor, reason, bundle_id),
            )
            if state == "rejected":
                connection.execute("DELETE FROM conditions WHERE bundle_id = ?", (bundle_id,))
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="bundle.decide",
                subject=f"bundle:{bundle_id}",
                payload=_describe_bundle(bundle, int(row["arrival"])),
            )
        return bundle

    def accepted_bundles(self) -> list[BundleRecord]:
        """Every accepted bundle, sorted by bundle id."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT * FROM bundles WHERE state = 'accepted' ORDER BY bundle_id"
            ).fetchall()
        return [_bundle_from_row(row) for row in rows]

    # ------------------------------------------------------------------ composites
    def add_composite(self, record: CompositeRecord, *, actor: str) -> CompositeRecord:
        """Publish a composite; its generation must be the latest plus one (1 for the first).

        An empty ``created_at`` is filled with the current time; the stored record is returned.
        """
        at = utc_now()
        composite = replace(record, bundle_ids=tuple(record.bundle_ids))
        if not composite.created_at:
            composite = replace(composite, created_at=at)
        with self._write() as connection:
            latest = int(
                connection.execute(
                    "SELECT COALESCE(MAX(generation), 0) FROM composites"
                ).fetchone()[0]
            )
            if composite.generation != latest + 1:
                raise StoreError(
                    f"composite generation {composite.generation} refused: the next generation "
                    f"is {latest + 1}"
                )
            connection.execute(
                "INSERT INTO composites (generation, content_hash, base_release_id, bundle_ids, "
                "manifest_json, statement_json, signature, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    composite.generation,
                    composite.content_hash,
                    composite.base_release_id,
                    canonical_json(list(composite.bundle_ids)).decode("utf-8"),
                    composite.manifest_json,
                    composite.statement_json,
                    composite.signature,
                    composite.created_at,
                ),
            )
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="composite.publish",
                subject=f"composite:{composite.generation}",
                payload=_describe_composite(composite),
            )
        return composite

    def latest_composite(self) -> CompositeRecord | None:
        """The composite with the highest generation, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM composites ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _composite_from_row(row)

    def get_composite(self, generation: int) -> CompositeRecord | None:
        """The composite of ``generation``, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM composites WHERE generation = ?", (generation,)
            ).fetchone()
        return None if row is None else _composite_from_row(row)

    # ------------------------------------------------------------------ audit
    def audit_entries(self) -> list[AuditEntry]:
        """Every audit entry, in sequence order (payloads that are not JSON objects read {})."""
        with self._read() as connection:
            rows = connection.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        entries = []
        for row in rows:
            payload = _parse_payload(row["payload"])
            entries.append(
                AuditEntry(
                    seq=int(row["seq"]),
                    at=str(row["at"]),
                    actor=str(row["actor"]),
                    event=str(row["event"]),
                    subject=str(row["subject"]),
                    payload={} if payload is None else payload,
                    prev_hash=str(row["prev_hash"]),
                    entry_hash=str(row["entry_hash"]),
                )
            )
        return entries

    def verify_audit(self) -> list[str]:
        """Readable integrity problems (empty when intact).

        Checks the hash chain (edited, removed or reordered entries), the head kept in
        ``meta``, and that every site, release, bundle, composite, condition and meta row
        matches the latest audit event about it (and that each has one).
        """
        with self._read() as connection:
            problems, latest = _verify_chain(connection)
            problems += _verify_rows(connection, latest)
        return problems

    def snapshot(self) -> str:
        """A digest of the full content of every table, independent of physical row order."""
        content: dict[str, list[str]] = {}
        with self._read() as connection:
            for table in TABLES:
                cursor = connection.execute(f"SELECT * FROM {table}")
                columns = [column[0] for column in cursor.description]
                content[table] = sorted(
                    canonical_json(
                        {c: _snapshot_value(v) for c, v in zip(columns, row, strict=True)}
                    ).decode("utf-8")
                    for row in cursor
                )
        return content_hash(content)


# --------------------------------------------------------------------------- verification
def _head_value(seq: int, entry_hash: str) -> str:
    return canonical_json({"seq": seq, "entry_hash": entry_hash}).decode("utf-8")


def _parse_head(value: Any) -> tuple[int, str] | None:
    try:
        head = json.loads(value)
        seq, entry_hash = head["seq"], head["entry_hash"]
    except (TypeError, ValueError, KeyError):
        return None
    if not isinstance(seq, int) or not isinstance(entry_hash, str):
        return None
    return seq, entry_hash


def _parse_payload(text: Any) -> dict[str, Any] | None:
    try:
        payload = json.loads(text)
    except (TypeError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


# subject -> (seq, event, payload) of the latest audit entry about it
_Latest = dict[str, tuple[int, str, dict[str, Any]]]


def _verify_chain(connection: sqlite3.Connection) -> tuple[list[str], _Latest]:
    """Problems of the hash chain and its head, and the latest entry about each subject."""
    problems: list[str] = []
    latest: _Latest = {}
    prev_seq, prev_hash = 0, GENESIS_HASH
    for row in connection.execute("SELECT * FROM audit ORDER BY seq"):
        seq = row["seq"]
        if seq != prev_seq + 1:
            problems.append(
                f"audit seq {seq}: follows seq {prev_seq} (entries removed or reordered)"
            )
        if row["prev_hash"] != prev_hash:
            problems.append(
                f"audit seq {seq}: prev_hash does not match the hash of the entry before it "
                f"(seq {prev_seq}); entries removed, inserted or reordered"
            )
        payload = _parse_payload(row["payload"])
        if payload is None:
            problems.append(f"audit seq {seq}: payload is not a JSON object (entry edited)")
        else:
            recomputed = audit_entry_hash(
                seq,
                row["at"],
                row["actor"],
                row["event"],
                row["subject"],
                payload,
                row["prev_hash"],
            )
            if recomputed != row["entry_hash"]:
                problems.append(f"audit seq {seq}: entry_hash does not match its content (edited)")
            latest[str(row["subject"])] = (seq, str(row["event"]), payload)
        prev_seq, prev_hash = seq, row["entry_hash"]
    head_row = connection.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    head = _parse_head(None if head_row is None else head_row[0])
    if head is None:
        problems.append("meta audit_head: missing or malformed")
    elif head != (prev_seq, prev_hash):
        problems.append(
            f"meta audit_head: records seq {head[0]} but the last audit entry is seq {prev_seq} "
            "(newest entries removed, or the head was edited)"
        )
    return problems, latest


def _verify_rows(connection: sqlite3.Connection, latest: _Latest) -> list[str]:
    """Problems of rows that differ from, or lack, the latest audit event about them."""
    problems: list[str] = []
    seen: set[str] = set()

    def check(table: str, key: str, subject: str, described: dict[str, Any]) -> None:
        seen.add(subject)
        entry = latest.get(subject)
        if entry is None:
            problems.append(f"{table} row {key}: no audit entry records it")
            return
        seq, event, payload = entry
        differing = sorted(k for k, v in described.items() if k not in payload or payload[k] != v)
        if differing:
            problems.append(
                f"{table} row {key}: {', '.join(differing)} "
                f"{'differs' if len(differing) == 1 else 'differ'} from audit seq {seq} ({event})"
            )

    def rows(table: str, key_column: str) -> Iterator[tuple[str, sqlite3.Row]]:
        for row in connection.execute(f"SELECT * FROM {table}"):
            yield repr(row[key_column]), row

    for key, row in rows("sites", "site_id"):
        try:
            site = _site_from_row(row)
        except (TypeError, ValueError) as exc:
            problems.append(f"sites row {key}: unreadable ({exc})")
            continue
        check("sites", key, f"site:{site.site_id}", _describe_site(site))
    for key, row in rows("releases", "release_id"):
        try:
            release = _release_from_row(row)
        except (TypeError, ValueError) as exc:
            problems.append(f"releases row {key}: unreadable ({exc})")
            continue
        check("releases", key, f"release:{release.release_id}", _describe_release(release))
    owned: set[tuple[str, str]] = set()
    for key, row in rows("bundles", "bundle_id"):
        try:
            bundle = _bundle_from_row(row)
        except (TypeError, ValueError) as exc:
            problems.append(f"bundles row {key}: unreadable ({exc})")
            continue
        subject = f"bundle:{bundle.bundle_id}"
        check("bundles", key, subject, _describe_bundle(bundle, row["arrival"]))
        if bundle.state in OWNING_STATES:
            owned.update((name, bundle.bundle_id) for name in bundle.conditions)
    for key, row in rows("composites", "generation"):
        try:
            composite = _composite_from_row(row)
        except (TypeError, ValueError) as exc:
            problems.append(f"composites row {key}: unreadable ({exc})")
            continue
        check(
            "composites", key, f"composite:{composite.generation}", _describe_composite(composite)
        )
    for key, row in rows("meta", "key"):
        if row["key"] not in RESERVED_META_KEYS:
            check("meta", key, f"meta:{row['key']}", {"key": row["key"], "value": row["value"]})

    stored = {(str(r[0]), str(r[1])) for r in connection.execute("SELECT * FROM conditions")}
    for name, bundle_id in sorted(stored - owned):
        problems.append(
            f"conditions row {name!r}: names bundle {bundle_id!r}, which does not own it "
            "(missing, rejected, or not listing that condition)"
        )
    for name, bundle_id in sorted(owned - stored):
        problems.append(f"conditions row {name!r} of bundle {bundle_id!r} is missing")

    for subject in sorted(set(latest) - seen):
        seq, event, _ = latest[subject]
        kind, _, ident = subject.partition(":")
        table = {
            "site": "sites",
            "release": "releases",
            "bundle": "bundles",
            "composite": "composites",
            "meta": "meta",
        }.get(kind)
        if table is None:
            problems.append(f"audit seq {seq}: unknown subject {subject!r} ({event})")
        else:
            problems.append(
                f"{table} row {ident!r}: missing, but audit seq {seq} ({event}) records it"
            )
    return problems
