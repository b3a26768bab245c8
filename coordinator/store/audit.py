"""The audit log's hash chain and the verifier that checks it and every row against it.

Each entry's hash covers its content and the hash of the entry before it (the first follows
:data:`GENESIS_HASH`); ``meta`` keeps the head, the seq and hash of the last entry. Every site,
release, bundle, composite, condition and meta row must match the latest audit event about it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, NamedTuple

from fedatlas.coordinator.store.records import (
    OWNING_STATES,
    RESERVED_META_KEYS,
    BundleRecord,
    CompositeRecord,
    ReleaseRecord,
    SiteRecord,
)
from fedatlas.coordinator.store.rows import describe, record_from_row
from fedatlas.shared.errors import ReleaseError
from fedatlas.shared.hashing import HASH_PREFIX, canonical_json, content_hash
from fedatlas.shared.wire.composite import CompositeStatement

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

GENESIS_HASH = HASH_PREFIX + "0" * 64


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


def head_value(seq: int, entry_hash: str) -> str:
    """The ``meta`` value recording the last entry of the chain."""
    return canonical_json({"seq": seq, "entry_hash": entry_hash}).decode("utf-8")


def parse_head(value: Any) -> tuple[int, str] | None:
    """``(seq, entry_hash)`` of a head value, or None when it is malformed."""
    try:
        head = json.loads(value)
        seq, entry_hash = head["seq"], head["entry_hash"]
    except (TypeError, ValueError, KeyError):
        return None
    if not isinstance(seq, int) or not isinstance(entry_hash, str):
        return None
    return seq, entry_hash


def parse_payload(text: Any) -> dict[str, Any] | None:
    """A stored payload as a dict, or None when it is not a JSON object."""
    try:
        payload = json.loads(text)
    except (TypeError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


# subject -> (seq, event, payload) of the latest audit entry about it
Latest = dict[str, tuple[int, str, dict[str, Any]]]


class _RecordTable(NamedTuple):
    """A table of records and how the audit log names and describes its rows."""

    table: str
    kind: str  # audit subjects are "<kind>:<key>"
    record_type: type[DataclassInstance]
    key: str
    unmapped: tuple[str, ...] = ()  # columns the audit pins that are no record field


_RECORD_TABLES = (
    _RecordTable("sites", "site", SiteRecord, "site_id"),
    _RecordTable("releases", "release", ReleaseRecord, "release_id"),
    _RecordTable("bundles", "bundle", BundleRecord, "bundle_id", ("arrival",)),
    _RecordTable("composites", "composite", CompositeRecord, "generation"),
)


def verify_chain(connection: sqlite3.Connection) -> tuple[list[str], Latest]:
    """Problems of the hash chain and its head, and the latest entry about each subject."""
    problems: list[str] = []
    latest: Latest = {}
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
        payload = parse_payload(row["payload"])
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
    head = parse_head(None if head_row is None else head_row[0])
    if head is None:
        problems.append("meta audit_head: missing or malformed")
    elif head != (prev_seq, prev_hash):
        problems.append(
            f"meta audit_head: records seq {head[0]} but the last audit entry is seq {prev_seq} "
            "(newest entries removed, or the head was edited)"
        )
    return problems, latest


def verify_rows(connection: sqlite3.Connection, latest: Latest) -> list[str]:
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

    owned: set[tuple[str, str]] = set()
    for spec in _RECORD_TABLES:
        for row in connection.execute(f"SELECT * FROM {spec.table}"):
            key = repr(row[spec.key])
            try:
                record = record_from_row(spec.record_type, row)
            except (TypeError, ValueError) as exc:
                problems.append(f"{spec.table} row {key}: unreadable ({exc})")
                continue
            unmapped = {column: row[column] for column in spec.unmapped}
            subject = f"{spec.kind}:{getattr(record, spec.key)}"
            check(spec.table, key, subject, describe(record, **unmapped))
            if isinstance(record, BundleRecord) and record.state in OWNING_STATES:
                owned.update((name, record.bundle_id) for name in record.conditions)
    for row in connection.execute("SELECT * FROM meta"):
        if row["key"] not in RESERVED_META_KEYS:
            check(
                "meta",
                repr(row["key"]),
                f"meta:{row['key']}",
                {"key": row["key"], "value": row["value"]},
            )

    stored = {(str(r[0]), str(r[1])) for r in connection.execute("SELECT * FROM conditions")}
    for name, bundle_id in sorted(stored - owned):
        problems.append(
            f"conditions row {name!r}: names bundle {bundle_id!r}, which does not own it "
            "(missing, rejected, or not listing that condition)"
        )
    for name, bundle_id in sorted(owned - stored):
        problems.append(f"conditions row {name!r} of bundle {bundle_id!r} is missing")

    tables = {spec.kind: spec.table for spec in _RECORD_TABLES} | {"meta": "meta"}
    for subject in sorted(set(latest) - seen):
        seq, event, _ = latest[subject]
        kind, _, ident = subject.partition(":")
        table = tables.get(kind)
        if table is None:
            problems.append(f"audit seq {seq}: unknown subject {subject!r} ({event})")
        else:
            problems.append(
                f"{table} row {ident!r}: missing, but audit seq {seq} ({event}) records it"
            )
    return problems


def verify_anchors(
    connection: sqlite3.Connection, trusted_keys: Collection[bytes] | None
) -> list[str]:
    """Problems of the composites' signed statements (:func:`statement_problems`), so a log
    rewritten up to an anchor (every later hash recomputed) is caught."""
    hashes = entry_hashes(connection)
    problems: list[str] = []
    for row in connection.execute("SELECT generation, statement_json, signature FROM composites"):
        where = f"composites row {row[0]!r}"
        try:
            statement = CompositeStatement(str(row[1]), bytes(row[2]))
        except (ReleaseError, TypeError) as exc:
            problems.append(f"{where}: unreadable statement ({exc})")
            continue
        problems += [f"{where}: {p}" for p in statement_problems(statement, hashes, trusted_keys)]
    return problems


def entry_hashes(connection: sqlite3.Connection) -> dict[int, str]:
    """Every audit entry's hash by sequence number."""
    return {int(r[0]): str(r[1]) for r in connection.execute("SELECT seq, entry_hash FROM audit")}


def statement_problems(
    statement: CompositeStatement, hashes: dict[int, str], trusted_keys: Collection[bytes] | None
) -> list[str]:
    """Why a composite statement does not vouch for this log: not signed by the key it names
    (or by none of ``trusted_keys`` when given), or anchoring an audit entry (sequence number
    and hash) that the chain no longer holds."""
    if not statement.signed_by_its_key():
        return ["the statement's signature does not verify"]
    if trusted_keys is not None and statement.coordinator_key not in trusted_keys:
        return ["the statement is signed by a key that is not this coordinator's"]
    head = statement.audit_head
    if head is not None and head[0] > 0 and hashes.get(head[0]) != head[1]:
        return [
            f"its signed statement anchors audit seq {head[0]} with hash {head[1][:19]}..., "
            "which the log no longer holds (the log was rewritten)"
        ]
    return []
