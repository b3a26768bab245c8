"""The registry in one SQLite file: schema, opening and creating, transactions, reads and writes.

One file (WAL journal, ``synchronous=FULL``) is shared by the gRPC server and the operator's admin
CLI, which run as separate processes. Every write is one ``BEGIN IMMEDIATE`` transaction that also
appends the audit entry describing it, so a row and its audit entry are committed together or not
at all, even when a process is killed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedatlas.coordinator.store.audit import (
    GENESIS_HASH,
    audit_entry_hash,
    entry_hashes,
    head_value,
    parse_head,
    parse_payload,
    statement_problems,
    verify_anchors,
    verify_chain,
    verify_rows,
)
from fedatlas.coordinator.store.records import (
    BUNDLE_STATES,
    OWNING_STATES,
    RESERVED_META_KEYS,
    AuditEntry,
    BundleRecord,
    CompositeRecord,
    RejectionRecord,
    ReleaseRecord,
    SiteRecord,
    Store,
    StoreBusyError,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
    utc_now,
)
from fedatlas.coordinator.store.rows import describe, insert_record, record_from_row
from fedatlas.shared.hashing import canonical_json, content_hash
from fedatlas.shared.wire.composite import CompositeStatement

SCHEMA_VERSION = 2  # 2: the rejection log
MAX_REJECTIONS = 100_000  # rejection log entries kept (the newest)
REJECTION_TEXT = 500  # characters of a rejection's reason and claimed site kept
BUSY_TIMEOUT_S = 30.0
TABLES = ("meta", "sites", "releases", "bundles", "conditions", "composites", "audit")
LOG_TABLES = ("rejections",)  # logs, not registry state: outside the audit and the snapshot
_REJECTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rejections (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    bundle_id   TEXT NOT NULL,
    site_id     TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    reason      TEXT NOT NULL,
    received_at TEXT NOT NULL,
    actor       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_by_bundle ON rejections (bundle_id);
CREATE INDEX IF NOT EXISTS rejections_by_site ON rejections (site_id)
"""

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
            for statement in [*_SCHEMA.split(";"), *_REJECTIONS_SCHEMA.split(";")]:
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("audit_head", head_value(0, GENESIS_HASH)),
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
            cls._upgrade(connection, file)
        except BaseException:
            connection.close()
            raise
        return cls(connection, file)

    @staticmethod
    def _upgrade(connection: sqlite3.Connection, file: Path) -> None:
        """Bring a registry of an earlier schema to :data:`SCHEMA_VERSION` (schema 1 lacks the
        rejection log), in one transaction; a registry already current is left alone."""

        def version() -> int:
            query = "SELECT value FROM meta WHERE key = 'schema_version'"
            return int(connection.execute(query).fetchone()[0])

        try:
            if version() >= SCHEMA_VERSION:
                return
            connection.execute("BEGIN IMMEDIATE")
            if version() < SCHEMA_VERSION:  # another process may have upgraded meanwhile
                for statement in _REJECTIONS_SCHEMA.split(";"):
                    connection.execute(statement)
                connection.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
                )
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise StoreError(f"cannot upgrade registry {file}: {exc}") from exc

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
        """The StoreError to raise for an SQLite failure (busy: StoreBusyError)."""
        if "locked" in str(exc) or "busy" in str(exc):
            return StoreBusyError(
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
            "UPDATE meta SET value = ? WHERE key = 'audit_head'", (head_value(seq, entry_hash),)
        )
        return AuditEntry(seq, at, actor, event, subject, payload, prev_hash, entry_hash)

    def audit_head(self) -> tuple[int, str]:
        """Sequence number and hash of the audit log's newest entry (0 and the genesis hash
        when it is empty)."""
        with self._read() as connection:
            return self._head(connection)

    def _head(self, connection: sqlite3.Connection) -> tuple[int, str]:
        row = connection.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        head = parse_head(None if row is None else row[0])
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
                raise StoreConflictError(
                    f"site {site_id!r} already exists ({existing[0]}); site ids are never reused"
                )
            insert_record(connection, "sites", site)
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="site.enroll",
                subject=f"site:{site_id}",
                payload=describe(site),
            )
        return site

    def revoke_site(self, site_id: str, *, actor: str, reason: str) -> SiteRecord:
        """Revoke an enrolled site (refuses an unknown or already revoked one)."""
        at = utc_now()
        with self._write() as connection:
            row = connection.execute("SELECT * FROM sites WHERE site_id = ?", (site_id,)).fetchone()
            if row is None:
                raise StoreNotFoundError(f"site {site_id!r} is not enrolled")
            site = record_from_row(SiteRecord, row)
            if site.status == "revoked":
                raise StoreConflictError(
                    f"site {site_id!r} was already revoked at {site.revoked_at}"
                )
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
                payload=describe(site, reason=reason),
            )
        return site

    def get_site(self, site_id: str) -> SiteRecord | None:
        """The site, or None."""
        with self._read() as connection:
            row = connection.execute("SELECT * FROM sites WHERE site_id = ?", (site_id,)).fetchone()
        return None if row is None else record_from_row(SiteRecord, row)

    def list_sites(self) -> list[SiteRecord]:
        """Every site (enrolled and revoked), sorted by id."""
        with self._read() as connection:
            rows = connection.execute("SELECT * FROM sites ORDER BY site_id").fetchall()
        return [record_from_row(SiteRecord, row) for row in rows]

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
                raise StoreConflictError(f"release {release_id!r} is already published")
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
                payload=describe(release),
            )
        return release

    def get_release(self, release_id: str) -> ReleaseRecord | None:
        """The release, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM releases WHERE release_id = ?", (release_id,)
            ).fetchone()
        return None if row is None else record_from_row(ReleaseRecord, row)

    def current_release(self) -> ReleaseRecord | None:
        """The most recently published release, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM releases ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        return None if row is None else record_from_row(ReleaseRecord, row)

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
                insert_record(connection, "bundles", bundle, arrival=arrival)
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
                payload=describe(bundle, arrival=arrival),
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
                return StoreConflictError(f"{name} is already registered (from site {row[0]!r})")
            site = connection.execute(
                "SELECT 1 FROM sites WHERE site_id = ?", (bundle.site_id,)
            ).fetchone()
            if site is None:
                return StoreNotFoundError(f"{name}: site {bundle.site_id!r} is not enrolled")
            row = connection.execute(
                "SELECT bundle_id FROM bundles WHERE site_id = ? AND nonce = ?",
                (bundle.site_id, bundle.nonce),
            ).fetchone()
            if row is not None:
                return StoreConflictError(
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
                    return StoreConflictError(
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
        return None if row is None else record_from_row(BundleRecord, row)

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
        return [record_from_row(BundleRecord, row) for row in rows]

    def decide_bundle(self, bundle_id: str, state: str, *, actor: str, reason: str) -> BundleRecord:
        """Accept or reject a held bundle; rejecting frees its condition names."""
        if state not in ("accepted", "rejected"):
            raise StoreError(
                f"bundle {bundle_id!r}: a decision is 'accepted' or 'rejected', not {state!r}"
            )
        return self._change_state(bundle_id, "held", state, "bundle.decide", actor, reason)

    def withdraw_bundle(self, bundle_id: str, *, actor: str, reason: str) -> BundleRecord:
        """Withdraw an accepted bundle: it becomes rejected and frees its condition names."""
        return self._change_state(
            bundle_id, "accepted", "rejected", "bundle.withdraw", actor, reason
        )

    def _change_state(
        self, bundle_id: str, current: str, state: str, event: str, actor: str, reason: str
    ) -> BundleRecord:
        """Move a bundle from ``current`` to ``state`` (audited as ``event``)."""
        at = utc_now()
        with self._write() as connection:
            row = connection.execute(
                "SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)
            ).fetchone()
            if row is None:
                raise StoreNotFoundError(f"bundle {bundle_id!r} is not registered")
            bundle = record_from_row(BundleRecord, row)
            if bundle.state != current:
                raise StoreConflictError(
                    f"bundle {bundle_id!r} is {bundle.state}; only a {current} bundle can be "
                    + ("decided" if current == "held" else "withdrawn")
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
                event=event,
                subject=f"bundle:{bundle_id}",
                payload=describe(bundle, arrival=int(row["arrival"])),
            )
        return bundle

    def add_rejection(self, record: RejectionRecord) -> None:
        """Log a refused submission; only the newest :data:`MAX_REJECTIONS` entries stay."""
        bounded = replace(
            record, site_id=record.site_id[:REJECTION_TEXT], reason=record.reason[:REJECTION_TEXT]
        )
        with self._write() as connection:
            insert_record(connection, "rejections", bounded)
            connection.execute(
                "DELETE FROM rejections WHERE seq <= (SELECT MAX(seq) FROM rejections) - ?",
                (MAX_REJECTIONS,),
            )

    def rejections(
        self, *, site_id: str | None = None, bundle_id: str | None = None, limit: int = 1_000
    ) -> list[RejectionRecord]:
        """The newest logged rejections first, optionally of one (claimed) site or bundle."""
        clauses, params = ["1 = 1"], []
        for column, value in (("site_id", site_id), ("bundle_id", bundle_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT * FROM rejections WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [record_from_row(RejectionRecord, row) for row in rows]

    def accepted_bundles(self) -> list[BundleRecord]:
        """Every accepted bundle, sorted by bundle id."""
        with self._read() as connection:
            rows = connection.execute(
                "SELECT * FROM bundles WHERE state = 'accepted' ORDER BY bundle_id"
            ).fetchall()
        return [record_from_row(BundleRecord, row) for row in rows]

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
                refused = (
                    f"composite generation {composite.generation} refused: the next generation "
                    f"is {latest + 1}"
                )
                if 1 <= composite.generation <= latest:  # already published
                    raise StoreConflictError(refused)
                raise StoreError(refused)
            insert_record(connection, "composites", composite)
            self._append_audit(
                connection,
                at=at,
                actor=actor,
                event="composite.publish",
                subject=f"composite:{composite.generation}",
                payload=describe(composite),
            )
        return composite

    def latest_composite(self) -> CompositeRecord | None:
        """The composite with the highest generation, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM composites ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        return None if row is None else record_from_row(CompositeRecord, row)

    def get_composite(self, generation: int) -> CompositeRecord | None:
        """The composite of ``generation``, or None."""
        with self._read() as connection:
            row = connection.execute(
                "SELECT * FROM composites WHERE generation = ?", (generation,)
            ).fetchone()
        return None if row is None else record_from_row(CompositeRecord, row)

    # ------------------------------------------------------------------ audit
    def audit_entries(self) -> list[AuditEntry]:
        """Every audit entry, in sequence order (payloads that are not JSON objects read {})."""
        with self._read() as connection:
            rows = connection.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        entries = []
        for row in rows:
            payload = parse_payload(row["payload"])
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

    def verify_audit(self, trusted_keys: Collection[bytes] | None = None) -> list[str]:
        """Readable integrity problems (empty when intact).

        Checks the hash chain (edited, removed or reordered entries), the head kept in
        ``meta``, that every site, release, bundle, composite, condition and meta row matches
        the latest audit event about it (and that each has one), and that every composite's
        signed statement (by one of ``trusted_keys`` when given) anchors an entry the chain
        still holds.
        """
        with self._read() as connection:
            problems, latest = verify_chain(connection)
            problems += verify_rows(connection, latest)
            problems += verify_anchors(connection, trusted_keys)
        return problems

    def statement_problems(
        self, statement: CompositeStatement, trusted_keys: Collection[bytes] | None = None
    ) -> list[str]:
        """Why a composite statement held elsewhere (a site's) does not vouch for this log."""
        with self._read() as connection:
            return statement_problems(statement, entry_hashes(connection), trusted_keys)

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
