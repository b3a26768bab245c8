"""The coordinator's registry store: real SQLite files, shared connections, tampering, kill -9."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedatlas.coordinator.store import (
    GENESIS_HASH,
    AuditEntry,
    BundleRecord,
    CompositeRecord,
    SiteRecord,
    SQLiteStore,
    StoreError,
    audit_entry_hash,
    utc_now,
)
from fedatlas.coordinator.store import sqlite as sqlite_store
from fedatlas.coordinator.store.records import (
    RejectionRecord,
    ReleaseRecord,
    StoreBusyError,
    StoreConflictError,
    StoreNotFoundError,
)
from fedatlas.coordinator.store.rows import describe, record_from_row
from fedatlas.coordinator.store.sqlite import MAX_REJECTIONS, SCHEMA_VERSION
from fedatlas.shared.hashing import canonical_json, digest
from fedatlas.shared.wire.signing import public_bytes, sign

OP = "operator:alice"
KEY1 = bytes(range(32))
KEY2 = bytes(range(32, 64))


def make_bundle(
    bundle_id: str,
    *,
    site_id: str = "s1",
    nonce: bytes | None = None,
    conditions: tuple[str, ...] | None = None,
    state: str = "accepted",
    blob: bytes | None = None,
    release_id: str = "r1",
) -> BundleRecord:
    """A bundle with a nonce, a condition and a blob derived from its id unless given."""
    return BundleRecord(
        bundle_id=bundle_id,
        site_id=site_id,
        release_id=release_id,
        nonce=nonce if nonce is not None else f"nonce-{bundle_id}".encode(),
        conditions=conditions if conditions is not None else (f"{site_id}/{bundle_id}",),
        state=state,
        blob=blob if blob is not None else f"adaptor bytes of {bundle_id}".encode() * 10,
        received_at="",
        decided_at="",
        decided_by="",
        reason="",
    )


COORDINATOR = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def make_composite(
    generation: int,
    bundle_ids: tuple[str, ...] = ("b1",),
    audit_head: tuple[int, str] = (0, GENESIS_HASH),
) -> CompositeRecord:
    """A composite record with a real statement signed by :data:`COORDINATOR`."""
    statement = canonical_json(
        {
            "kind": "fedatlas-composite",
            "content_hash": f"sha256:{generation:064d}",
            "generation": generation,
            "coordinator_key": public_bytes(COORDINATOR).hex(),
            "audit_head": {"seq": audit_head[0], "entry_hash": audit_head[1]},
        }
    )
    return CompositeRecord(
        generation=generation,
        content_hash=f"sha256:{generation:064d}",
        base_release_id="r1",
        bundle_ids=bundle_ids,
        manifest_json=f'{{"composite": {generation}}}',
        statement_json=statement.decode(),
        signature=sign(COORDINATOR, statement),
        created_at="",
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteStore]:
    """A registry with two enrolled sites and one release."""
    with SQLiteStore.create(db) as created:
        created.enroll_site("s1", KEY1, "node-key-1", actor=OP)
        created.enroll_site("s2", KEY2, "", actor=OP)
        created.add_release("r1", '{"release": 1}', b"weights-1" * 100, actor=OP)
        yield created


@pytest.fixture
def populated(store: SQLiteStore) -> SQLiteStore:
    """Every kind of row and event: accepted, held, decided and rejected bundles, a composite."""
    store.set_meta("operator", "alice", actor=OP)
    store.enroll_site("s3", b"k3" * 16, "", actor=OP)
    store.revoke_site("s3", actor=OP, reason="key lost")
    store.add_bundle(make_bundle("b1", conditions=("s1/a", "s1/b")), actor="site:s1")
    store.add_bundle(make_bundle("b2", site_id="s2", state="held"), actor="site:s2")
    store.add_bundle(make_bundle("b3", state="held"), actor="site:s1")
    store.add_bundle(make_bundle("b4", site_id="s2", state="held"), actor="site:s2")
    store.decide_bundle("b3", "accepted", actor=OP, reason="looks fine")
    store.decide_bundle("b4", "rejected", actor=OP, reason="bad QC")
    store.add_composite(make_composite(1, ("b1", "b3")), actor=OP)
    assert store.verify_audit() == []
    return store


def raw(db: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, as an attacker or a careless operator would use."""
    return sqlite3.connect(db, isolation_level=None)


# --------------------------------------------------------------------------- create / open
def test_a_schema_1_registry_is_upgraded_on_open(db: Path) -> None:
    """A registry written before the rejection log existed gets it, state and audit intact."""
    with SQLiteStore.create(db) as store:
        store.enroll_site("h1", KEY1, "", actor=OP)
        before = store.snapshot()
    connection = raw(db)
    connection.execute("DROP TABLE rejections")
    connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    connection.close()
    with SQLiteStore.open(db) as store:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert store.snapshot() == before
        assert store.verify_audit() == []
        store.add_rejection(RejectionRecord("sha256:x", "h1", "malformed", "why", utc_now(), OP))
        assert [r.reason_code for r in store.rejections(site_id="h1")] == ["malformed"]


def test_the_rejection_log_is_bounded_and_outside_the_audited_state(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "MAX_REJECTIONS", 3)
    with SQLiteStore.create(db) as store:
        before = store.snapshot()
        for i in range(5):
            store.add_rejection(
                RejectionRecord(
                    f"sha256:{i}", "x" * 10_000, "bad_signature", "r" * 10_000, utc_now(), OP
                )
            )
        logged = store.rejections()
        assert [r.bundle_id for r in logged] == ["sha256:4", "sha256:3", "sha256:2"]
        assert all(len(r.site_id) == len(r.reason) == 500 for r in logged)
        assert store.rejections(bundle_id="sha256:3")[0].reason_code == "bad_signature"
        assert store.snapshot() == before
        assert store.verify_audit() == []
    assert MAX_REJECTIONS >= 10_000


def test_create_then_open_round_trip(db: Path) -> None:
    with SQLiteStore.create(db) as created:
        assert created.get_meta("schema_version") == str(SCHEMA_VERSION)
        created.set_meta("campaign", "pilot", actor=OP)
    with SQLiteStore.open(db) as opened:
        assert opened.get_meta("campaign") == "pilot"
        assert opened.get_meta("absent") is None
        assert opened.verify_audit() == []
    connection = raw(db)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_create_refuses_existing_file(db: Path) -> None:
    db.write_text("precious")
    with pytest.raises(StoreError, match=re.escape(str(db))):
        SQLiteStore.create(db)
    assert db.read_text() == "precious"
    SQLiteStore.create(db.with_name("other.db")).close()
    with pytest.raises(StoreError, match="already exists"):
        SQLiteStore.create(db.with_name("other.db"))


def test_open_refuses_missing_file(db: Path) -> None:
    with pytest.raises(StoreError, match="fedatlas admin init") as info:
        SQLiteStore.open(db)
    assert str(db) in str(info.value)
    assert not db.exists()


def _text_file(path: Path) -> None:
    path.write_text("site_id,public_key\ns1,abc\n" * 50)


def _truncated_store(path: Path) -> None:
    with SQLiteStore.create(path) as created:
        created.enroll_site("s1", KEY1, "", actor=OP)
        created.add_release("r1", "{}", os.urandom(100_000), actor=OP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _foreign_database(path: Path) -> None:
    connection = raw(path)
    connection.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    connection.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    connection.close()


def _newer_schema(path: Path) -> None:
    SQLiteStore.create(path).close()
    connection = raw(path)
    connection.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    connection.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_text_file, "not a fedatlas registry"),
        (_truncated_store, "damaged"),
        (_empty_file, "not a fedatlas registry"),
        (_foreign_database, "not a fedatlas registry"),
        (_newer_schema, "newer"),
    ],
)
def test_open_refuses_non_registry_files(
    db: Path, make: Callable[[Path], None], message: str
) -> None:
    make(db)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=message) as info:
        SQLiteStore.open(db)
    assert str(db) in str(info.value)
    assert db.read_bytes() == before  # opening never converts or repairs a foreign file


def test_open_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a regular file"):
        SQLiteStore.open(tmp_path)


def test_closed_store_refuses_use(db: Path) -> None:
    with SQLiteStore.create(db) as created:
        pass
    with pytest.raises(StoreError, match="closed"):
        created.get_meta("schema_version")
    created.close()  # idempotent


def test_timestamps_are_utc_iso_seconds(store: SQLiteStore) -> None:
    pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert re.fullmatch(pattern, utc_now())
    site = store.get_site("s1")
    assert site is not None
    assert re.fullmatch(pattern, site.enrolled_at)


def test_meta_reserved_keys(store: SQLiteStore) -> None:
    before = store.snapshot()
    for key in ("schema_version", "audit_head"):
        with pytest.raises(StoreError, match="reserved"):
            store.set_meta(key, "x", actor=OP)
    assert store.snapshot() == before
    store.set_meta("k", "1", actor=OP)
    store.set_meta("k", "2", actor=OP)
    assert store.get_meta("k") == "2"
    assert [e.payload for e in store.audit_entries() if e.event == "meta.set"] == [
        {"key": "k", "value": "1"},
        {"key": "k", "value": "2"},
    ]


# --------------------------------------------------------------------------- sites
def test_enroll_and_revoke_rules(store: SQLiteStore) -> None:
    site = store.get_site("s1")
    assert site is not None
    assert (site.public_key, site.node_public_key, site.status, site.revoked_at) == (
        KEY1,
        "node-key-1",
        "enrolled",
        "",
    )
    with pytest.raises(StoreConflictError, match="already exists"):
        store.enroll_site("s1", KEY2, "", actor=OP)
    revoked = store.revoke_site("s1", actor=OP, reason="compromised")
    assert revoked.status == "revoked"
    assert revoked.revoked_at
    assert store.get_site("s1") == revoked
    with pytest.raises(StoreConflictError, match="already revoked"):
        store.revoke_site("s1", actor=OP, reason="again")
    with pytest.raises(StoreConflictError, match="never reused"):
        store.enroll_site("s1", KEY1, "", actor=OP)
    with pytest.raises(StoreNotFoundError, match="not enrolled"):
        store.revoke_site("nobody", actor=OP, reason="?")
    store.enroll_site("a0", b"k", "", actor=OP)
    assert [s.site_id for s in store.list_sites()] == ["a0", "s1", "s2"]
    assert store.get_site("nobody") is None
    revoke = store.audit_entries()[-2]
    assert (revoke.event, revoke.subject, revoke.payload["reason"]) == (
        "site.revoke",
        "site:s1",
        "compromised",
    )
    assert store.verify_audit() == []


# --------------------------------------------------------------------------- releases
def test_releases(store: SQLiteStore) -> None:
    with pytest.raises(StoreConflictError, match="already published"):
        store.add_release("r1", "{}", b"", actor=OP)
    second = store.add_release("r2", '{"release": 2}', b"weights-2", actor=OP)
    current = store.current_release()
    assert current == second
    first = store.get_release("r1")
    assert first is not None
    assert first.sequence < second.sequence
    assert first.weights == b"weights-1" * 100
    assert store.get_release("r9") is None
    publish = store.audit_entries()[-1].payload
    assert publish["weights_sha256"] == digest(b"weights-2")
    assert publish["manifest_sha256"] == digest(b'{"release": 2}')


def test_current_release_of_empty_store(db: Path) -> None:
    with SQLiteStore.create(db) as empty:
        assert empty.current_release() is None
        assert empty.latest_composite() is None
        assert empty.audit_entries() == []
        assert empty.verify_audit() == []


# --------------------------------------------------------------------------- bundles
def test_add_bundle_registers_bundle_conditions_and_audit(store: SQLiteStore) -> None:
    blob = bytes(range(256)) * 4
    stored = store.add_bundle(
        make_bundle("b1", conditions=("s1/a", "s1/b"), blob=blob), actor="site:s1"
    )
    assert stored.received_at
    assert store.get_bundle("b1") == stored
    assert store.find_nonce("s1", b"nonce-b1") == "b1"
    assert store.find_nonce("s2", b"nonce-b1") is None
    assert store.condition_owner("s1/a") == ("s1", "b1")
    assert store.condition_owner("s1/b") == ("s1", "b1")
    assert store.condition_owner("s1/c") is None
    entry = store.audit_entries()[-1]
    assert (entry.event, entry.subject, entry.actor) == ("bundle.register", "bundle:b1", "site:s1")
    assert entry.payload["blob_sha256"] == digest(blob)
    assert entry.payload["nonce"] == b"nonce-b1".hex()
    assert entry.payload["conditions"] == ["s1/a", "s1/b"]
    assert entry.payload["state"] == "accepted"
    assert store.verify_audit() == []


@pytest.mark.parametrize(
    ("bundle", "error", "message"),
    [
        (make_bundle("b2", nonce=b"nonce-b1"), StoreConflictError, "already used nonce"),
        (
            make_bundle("b2", conditions=("s1/new", "s1/a")),
            StoreConflictError,
            "condition 's1/a' already belongs",
        ),
        (
            make_bundle("b1", nonce=b"fresh", conditions=("s1/z",)),
            StoreConflictError,
            "already registered",
        ),
        (make_bundle("b2", site_id="ghost"), StoreNotFoundError, "not enrolled"),
        (make_bundle("b2", state="rejected"), StoreError, "accepted or held"),
        (make_bundle("b2", conditions=("s1/x", "s1/x")), StoreError, "more than once"),
    ],
)
def test_refused_bundle_leaves_store_unchanged(
    store: SQLiteStore, bundle: BundleRecord, error: type[StoreError], message: str
) -> None:
    store.add_bundle(make_bundle("b1", conditions=("s1/a",)), actor="site:s1")
    before = store.snapshot()
    with pytest.raises(StoreError, match=message) as info:
        store.add_bundle(bundle, actor="site:s1")
    assert type(info.value) is error
    assert store.snapshot() == before
    assert store.condition_owner("s1/new") is None
    assert store.verify_audit() == []


def test_same_nonce_from_another_site_is_fine(store: SQLiteStore) -> None:
    store.add_bundle(make_bundle("b1", nonce=b"n"), actor="site:s1")
    store.add_bundle(make_bundle("b2", site_id="s2", nonce=b"n"), actor="site:s2")
    assert store.find_nonce("s2", b"n") == "b2"


def test_decide_bundle(store: SQLiteStore) -> None:
    store.add_bundle(make_bundle("b1", state="held", conditions=("s1/a",)), actor="site:s1")
    store.add_bundle(make_bundle("b2", state="held", conditions=("s1/b",)), actor="site:s1")
    store.add_bundle(make_bundle("b3", site_id="s2"), actor="site:s2")
    assert [b.bundle_id for b in store.list_bundles(state="held")] == ["b1", "b2"]

    accepted = store.decide_bundle("b1", "accepted", actor=OP, reason="reviewed")
    assert (accepted.state, accepted.decided_by, accepted.reason) == ("accepted", OP, "reviewed")
    assert accepted.decided_at
    assert store.get_bundle("b1") == accepted
    assert store.condition_owner("s1/a") == ("s1", "b1")

    rejected = store.decide_bundle("b2", "rejected", actor=OP, reason="bad QC")
    assert rejected.state == "rejected"
    assert store.condition_owner("s1/b") is None  # the name is free again
    store.add_bundle(make_bundle("b4", site_id="s2", conditions=("s1/b",)), actor="site:s2")
    assert store.condition_owner("s1/b") == ("s2", "b4")

    before = store.snapshot()
    with pytest.raises(StoreConflictError, match="only a held bundle"):
        store.decide_bundle("b1", "rejected", actor=OP, reason="changed my mind")
    with pytest.raises(StoreConflictError, match="only a held bundle"):
        store.decide_bundle("b2", "accepted", actor=OP, reason="")
    with pytest.raises(StoreNotFoundError, match="not registered"):
        store.decide_bundle("nope", "accepted", actor=OP, reason="")
    with pytest.raises(StoreError, match="'accepted' or 'rejected'"):
        store.decide_bundle("b3", "held", actor=OP, reason="")
    assert store.snapshot() == before

    assert [b.bundle_id for b in store.list_bundles()] == ["b1", "b2", "b3", "b4"]
    assert [b.bundle_id for b in store.list_bundles(site_id="s2")] == ["b3", "b4"]
    assert [b.bundle_id for b in store.list_bundles(state="accepted", site_id="s1")] == ["b1"]
    assert [b.bundle_id for b in store.accepted_bundles()] == ["b1", "b3", "b4"]
    decide = [e for e in store.audit_entries() if e.event == "bundle.decide"]
    assert [(e.payload["state"], e.payload["reason"]) for e in decide] == [
        ("accepted", "reviewed"),
        ("rejected", "bad QC"),
    ]
    assert store.verify_audit() == []


def test_list_bundles_orders_by_arrival_not_id(store: SQLiteStore) -> None:
    for bundle_id in ("zz", "aa", "mm"):
        store.add_bundle(make_bundle(bundle_id), actor="site:s1")
    assert [b.bundle_id for b in store.list_bundles()] == ["zz", "aa", "mm"]
    assert [b.bundle_id for b in store.accepted_bundles()] == ["aa", "mm", "zz"]


# --------------------------------------------------------------------------- composites
def test_composite_generations_increase_by_one(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="next generation is 1"):
        store.add_composite(make_composite(2), actor=OP)
    first = store.add_composite(make_composite(1), actor=OP)
    assert first.created_at
    before = store.snapshot()
    # only a generation already published is a conflict; a skipped or zero one is a plain refusal
    for generation, error in ((1, StoreConflictError), (3, StoreError), (0, StoreError)):
        with pytest.raises(StoreError, match="next generation is 2") as info:
            store.add_composite(make_composite(generation), actor=OP)
        assert type(info.value) is error
    assert store.snapshot() == before
    second = store.add_composite(make_composite(2, ("b1", "b2")), actor=OP)
    assert store.latest_composite() == second
    assert store.get_composite(1) == first
    assert store.get_composite(3) is None
    payload = store.audit_entries()[-1].payload
    assert payload["bundle_ids"] == ["b1", "b2"]
    assert payload["signature"] == second.signature.hex()
    assert payload["statement_sha256"] == digest(second.statement_json.encode())


# --------------------------------------------------------------------------- rows, audit payloads
AT = "2025-01-31T12:00:00+00:00"
LATER = "2025-02-01T08:30:00+00:00"

# One record of each kind (with the columns its payload pins that are no record field) and the
# audit payload the hand-written descriptors of schema version 1 gave it. Stored registries verify
# only while these stay byte-for-byte the same.
PINNED_PAYLOADS: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "site": (
        SiteRecord("s1", bytes(range(4)), "node-key", "revoked", AT, LATER),
        {},
        {
            "site_id": "s1",
            "public_key": "00010203",
            "node_public_key": "node-key",
            "status": "revoked",
            "enrolled_at": AT,
            "revoked_at": LATER,
        },
    ),
    "release": (
        ReleaseRecord("r1", '{"release": "\u00fc"}', b"\x00weights\xff", AT, 3),
        {},
        {
            "release_id": "r1",
            "sequence": 3,
            "manifest_sha256": (
                "sha256:1f854f0cd9ba5cec37d3f01450a4d89fb9ec64f918c9ea1b1047c19ecd2df67c"
            ),
            "weights_sha256": (
                "sha256:69643d247dae505ea8f01b48248a131aa81d0594a78b67eb33aaa59afc6ab524"
            ),
            "published_at": AT,
        },
    ),
    "bundle": (
        BundleRecord(
            "b1",
            "s1",
            "r1",
            b"\x0f\xa0",
            ("s1/a", "s1/b"),
            "accepted",
            b"adaptor\x00blob",
            AT,
            LATER,
            OP,
            "reviewed",
        ),
        {"arrival": 7},
        {
            "bundle_id": "b1",
            "arrival": 7,
            "site_id": "s1",
            "release_id": "r1",
            "nonce": "0fa0",
            "conditions": ["s1/a", "s1/b"],
            "state": "accepted",
            "blob_sha256": (
                "sha256:016706d1c413fa906e3a98e065806245b98d5c969aa94ba9bc871a92b40203ef"
            ),
            "received_at": AT,
            "decided_at": LATER,
            "decided_by": OP,
            "reason": "reviewed",
        },
    ),
    "composite": (
        CompositeRecord(
            2,
            "sha256:" + "c" * 64,
            "r1",
            ("b1", "b3"),
            '{"composite": 2}',
            '{"statement": "\u00fc"}',
            b"\x01\xfe",
            AT,
        ),
        {},
        {
            "generation": 2,
            "content_hash": "sha256:" + "c" * 64,
            "base_release_id": "r1",
            "bundle_ids": ["b1", "b3"],
            "manifest_sha256": (
                "sha256:93280f9b814e60d78da31a161bd5a6e80e808ceb6940b3c9a0406dbfdf3afd13"
            ),
            "statement_sha256": (
                "sha256:d833cf6ad3930ada62f89e8aa770366824283b6588c09ed5c9f9baaaeeab1d12"
            ),
            "signature": "01fe",
            "created_at": AT,
        },
    ),
}


@pytest.mark.parametrize("kind", sorted(PINNED_PAYLOADS))
def test_audit_payloads_are_pinned(kind: str) -> None:
    record, unmapped, expected = PINNED_PAYLOADS[kind]
    described = describe(record, **unmapped)
    assert described == expected
    assert canonical_json(described) == canonical_json(expected)


def test_records_round_trip_through_sqlite(store: SQLiteStore) -> None:
    site = store.enroll_site("s\u00e9", bytes([0, 255]) * 16, "", actor=OP)
    release = store.add_release("r2", '{"\u00fc": 1}', b"\x00" * 3, actor=OP)
    bundle = store.add_bundle(
        make_bundle("b1", site_id=site.site_id, conditions=(), blob=b"\x00\x01"), actor=OP
    )
    composite = store.add_composite(
        replace(make_composite(1, ()), manifest_json='{"\u00e9": 2}'), actor=OP
    )
    assert store.get_site(site.site_id) == site
    assert store.get_release("r2") == release
    assert store.get_bundle("b1") == bundle
    assert store.get_composite(1) == composite
    assert store.verify_audit() == []


@pytest.mark.parametrize(
    ("statement", "unreadable"),
    [
        (
            "UPDATE bundles SET conditions = 'not json' WHERE bundle_id = 'b1'",
            "bundles row 'b1': unreadable (Expecting value",
        ),
        (
            "UPDATE bundles SET conditions = '[1, 2]' WHERE bundle_id = 'b1'",
            "bundles row 'b1': unreadable (conditions is not a JSON list of strings)",
        ),
        (
            "UPDATE bundles SET nonce = 'text' WHERE bundle_id = 'b3'",
            "bundles row 'b3': unreadable",
        ),
        (
            "UPDATE composites SET bundle_ids = '{}' WHERE generation = 1",
            "composites row 1: unreadable (bundle_ids is not a JSON list of strings)",
        ),
        ("UPDATE sites SET public_key = 'text' WHERE site_id = 's1'", "sites row 's1': unreadable"),
    ],
)
def test_malformed_stored_value_is_reported_unreadable(
    populated: SQLiteStore, db: Path, statement: str, unreadable: str
) -> None:
    connection = raw(db)
    connection.execute(statement)
    connection.close()
    problems = populated.verify_audit()
    assert any(problem.startswith(unreadable) for problem in problems), problems


@pytest.mark.parametrize(
    ("sequence", "error"), [("7", None), ("seven", ValueError), (None, TypeError)]
)
def test_record_from_row_converts_by_annotated_type(
    sequence: object, error: type[Exception] | None
) -> None:
    connection = sqlite3.connect(":memory:")
    connection.row_factory = sqlite3.Row
    row = connection.execute(
        "SELECT 'r1' AS release_id, '{}' AS manifest_json, x'00' AS weights, "
        "'' AS published_at, ? AS sequence",
        (sequence,),
    ).fetchone()
    connection.close()
    if error is None:
        assert record_from_row(ReleaseRecord, row) == ReleaseRecord("r1", "{}", b"\x00", "", 7)
    else:
        with pytest.raises(error):
            record_from_row(ReleaseRecord, row)


def test_record_field_without_a_column_type_is_refused() -> None:
    @dataclass(frozen=True)
    class Measurement:
        value: float

    with pytest.raises(TypeError, match="field value: no SQLite column type"):
        describe(Measurement(1.5))


# --------------------------------------------------------------------------- audit chain
def test_audit_chain_links_every_write(populated: SQLiteStore, db: Path) -> None:
    entries = populated.audit_entries()
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0].prev_hash == GENESIS_HASH
    for previous, entry in itertools.pairwise(entries):
        assert entry.prev_hash == previous.entry_hash
    for entry in entries:
        assert entry.entry_hash == audit_entry_hash(
            entry.seq,
            entry.at,
            entry.actor,
            entry.event,
            entry.subject,
            entry.payload,
            entry.prev_hash,
        )
    assert [e.event for e in entries] == [
        "site.enroll",
        "site.enroll",
        "release.publish",
        "meta.set",
        "site.enroll",
        "site.revoke",
        "bundle.register",
        "bundle.register",
        "bundle.register",
        "bundle.register",
        "bundle.decide",
        "bundle.decide",
        "composite.publish",
    ]
    assert f'"seq":{len(entries)}' in (populated.get_meta("audit_head") or "")


def _delete_last_entry_and_fix_head(connection: sqlite3.Connection) -> None:
    """A careful forger: removes the newest entry and rewinds the head to match."""
    seq, entry_hash = connection.execute(
        "SELECT seq, entry_hash FROM audit ORDER BY seq DESC LIMIT 1 OFFSET 1"
    ).fetchone()
    connection.execute("DELETE FROM audit WHERE seq = ?", (seq + 1,))
    connection.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'",
        (f'{{"entry_hash":"{entry_hash}","seq":{seq}}}',),
    )


def _rehash_edited_entry(connection: sqlite3.Connection) -> None:
    """Edits a bundle.register payload and recomputes that entry's own hash."""
    row = connection.execute(
        "SELECT seq, at, actor, event, subject, payload, prev_hash FROM audit "
        "WHERE subject = 'bundle:b1'"
    ).fetchone()
    seq, at, actor, event, subject, payload, prev_hash = row
    payload = payload.replace('"s1/a"', '"s1/zzz"')
    new_hash = audit_entry_hash(seq, at, actor, event, subject, json.loads(payload), prev_hash)
    connection.execute(
        "UPDATE audit SET payload = ?, entry_hash = ? WHERE seq = ?", (payload, new_hash, seq)
    )


def _flip_blob_byte(connection: sqlite3.Connection) -> None:
    blob = bytearray(
        connection.execute("SELECT blob FROM bundles WHERE bundle_id = 'b1'").fetchone()[0]
    )
    blob[7] ^= 0x01
    connection.execute("UPDATE bundles SET blob = ? WHERE bundle_id = 'b1'", (bytes(blob),))


def _sql(*statements: str) -> Callable[[sqlite3.Connection], None]:
    def run(connection: sqlite3.Connection) -> None:
        for statement in statements:
            connection.execute(statement)

    return run


TAMPERING: dict[str, tuple[Callable[[sqlite3.Connection], None], str]] = {
    "edit audit payload": (
        _sql("UPDATE audit SET payload = replace(payload, 'key lost', 'routine') WHERE seq = 6"),
        "audit seq 6: entry_hash does not match",
    ),
    "edit audit actor": (
        _sql("UPDATE audit SET actor = 'operator:mallory' WHERE seq = 11"),
        "audit seq 11: entry_hash",
    ),
    "edit audit entry and its own hash": (_rehash_edited_entry, "audit seq 8: prev_hash"),
    "delete middle audit entry": (_sql("DELETE FROM audit WHERE seq = 5"), "audit seq 6"),
    "delete last audit entry": (
        _sql("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)"),
        "meta audit_head",
    ),
    "delete last audit entry and rewind head": (
        _delete_last_entry_and_fix_head,
        "composites row 1: no audit entry",
    ),
    "reorder audit entries": (
        _sql(
            "UPDATE audit SET seq = 1000 WHERE seq = 9",
            "UPDATE audit SET seq = 9 WHERE seq = 10",
            "UPDATE audit SET seq = 10 WHERE seq = 1000",
        ),
        "audit seq 9",
    ),
    "edit bundle blob byte": (_flip_blob_byte, "bundles row 'b1': blob_sha256"),
    "change bundle state": (
        _sql("UPDATE bundles SET state = 'accepted' WHERE bundle_id = 'b2'"),
        "bundles row 'b2': state",
    ),
    "edit bundle nonce": (
        _sql("UPDATE bundles SET nonce = x'00' WHERE bundle_id = 'b3'"),
        "bundles row 'b3': nonce",
    ),
    "edit site public key": (
        _sql("UPDATE sites SET public_key = x'deadbeef' WHERE site_id = 's1'"),
        "sites row 's1': public_key",
    ),
    "un-revoke a site": (
        _sql("UPDATE sites SET status = 'enrolled', revoked_at = '' WHERE site_id = 's3'"),
        "sites row 's3': revoked_at, status",
    ),
    "insert bundle without audit": (
        _sql(
            "INSERT INTO bundles VALUES ('evil', 99, 's1', 'r1', x'01', '[]', 'accepted', "
            "x'00', '', '', '', '')"
        ),
        "bundles row 'evil': no audit entry",
    ),
    "insert site without audit": (
        _sql("INSERT INTO sites VALUES ('s9', x'00', '', 'enrolled', '', '')"),
        "sites row 's9': no audit entry",
    ),
    "delete a bundle": (
        _sql(
            "DELETE FROM conditions WHERE bundle_id = 'b1'",
            "DELETE FROM bundles WHERE bundle_id = 'b1'",
        ),
        "bundles row 'b1': missing",
    ),
    "steal a condition": (
        _sql("UPDATE conditions SET bundle_id = 'b2' WHERE name = 's1/a'"),
        "conditions row 's1/a'",
    ),
    "free a condition": (
        _sql("DELETE FROM conditions WHERE name = 's1/b'"),
        "conditions row 's1/b' of bundle 'b1' is missing",
    ),
    "edit release weights": (
        _sql("UPDATE releases SET weights = x'00' WHERE release_id = 'r1'"),
        "releases row 'r1': weights_sha256",
    ),
    "edit composite signature": (
        _sql("UPDATE composites SET signature = x'00' WHERE generation = 1"),
        "composites row 1: signature",
    ),
    "edit meta value": (
        _sql("UPDATE meta SET value = 'mallory' WHERE key = 'operator'"),
        "meta row 'operator': value",
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_verify_audit_detects_tampering(populated: SQLiteStore, db: Path, name: str) -> None:
    tamper, expected = TAMPERING[name]
    before = populated.snapshot()
    connection = raw(db)
    connection.execute("BEGIN")
    tamper(connection)
    connection.execute("COMMIT")
    connection.close()
    assert populated.snapshot() != before
    problems = populated.verify_audit()
    assert problems, name
    assert any(expected in problem for problem in problems), problems
    with SQLiteStore.open(db) as reopened:  # another process sees the same problems
        assert reopened.verify_audit() == problems


# --------------------------------------------------------------------------- sharing, atomicity
def test_two_stores_on_one_file_see_each_others_writes(store: SQLiteStore, db: Path) -> None:
    with SQLiteStore.open(db) as other:
        other.enroll_site("s3", b"k3", "", actor=OP)
        assert store.get_site("s3") is not None
        store.add_bundle(make_bundle("b1", site_id="s3"), actor="site:s3")
        assert other.condition_owner("s3/b1") == ("s3", "b1")
        with pytest.raises(StoreConflictError, match="already belongs"):
            other.add_bundle(make_bundle("b2", conditions=("s3/b1",)), actor="site:s1")
        other.add_composite(make_composite(1), actor=OP)
        with pytest.raises(StoreConflictError, match="next generation is 2"):
            store.add_composite(make_composite(1), actor=OP)
        assert other.snapshot() == store.snapshot()
        assert store.verify_audit() == []


def test_concurrent_writers_keep_one_chain(store: SQLiteStore, db: Path) -> None:
    errors: list[BaseException] = []

    def writer(site_id: str) -> None:
        try:
            with SQLiteStore.open(db) as own:
                for i in range(15):
                    own.add_bundle(make_bundle(f"{site_id}-{i}", site_id=site_id), actor=site_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in ("s1", "s2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_bundles()) == 30
    assert store.verify_audit() == []


def test_busy_registry_raises_store_busy_error(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.05)
    with SQLiteStore.create(db) as created:
        holder = raw(db)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StoreBusyError, match="is busy"):
                created.set_meta("k", "v", actor=OP)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        created.set_meta("k", "v", actor=OP)
        assert created.verify_audit() == []


class FailingAuditStore(SQLiteStore):
    """A store whose audit step fails after the row was written, inside the transaction."""

    def _append_audit(self, connection: sqlite3.Connection, **kwargs: Any) -> AuditEntry:
        super()._append_audit(connection, **kwargs)
        raise RuntimeError("interrupted inside the transaction")


WRITES: dict[str, Callable[[SQLiteStore], object]] = {
    "set_meta": lambda s: s.set_meta("k", "v", actor=OP),
    "enroll_site": lambda s: s.enroll_site("s9", b"k", "", actor=OP),
    "revoke_site": lambda s: s.revoke_site("s2", actor=OP, reason="test"),
    "add_release": lambda s: s.add_release("r2", "{}", b"w", actor=OP),
    "add_bundle": lambda s: s.add_bundle(make_bundle("b9", conditions=("s1/x",)), actor="s1"),
    "decide_bundle": lambda s: s.decide_bundle("held", "rejected", actor=OP, reason="no"),
    "add_composite": lambda s: s.add_composite(make_composite(1), actor=OP),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_interrupted_write_leaves_nothing(store: SQLiteStore, db: Path, name: str) -> None:
    store.add_bundle(make_bundle("held", state="held"), actor="site:s1")
    before = store.snapshot()
    with FailingAuditStore.open(db) as failing:
        with pytest.raises(RuntimeError, match="interrupted"):
            WRITES[name](failing)
        assert failing.snapshot() == before
    assert store.snapshot() == before
    assert store.condition_owner("s1/x") is None
    WRITES[name](store)  # the same write then succeeds normally
    assert store.snapshot() != before
    assert store.verify_audit() == []


# --------------------------------------------------------------------------- kill -9
CHILD = textwrap.dedent(
    """
    import sys
    from fedatlas.coordinator.store import BundleRecord, SQLiteStore

    store = SQLiteStore.open(sys.argv[1])
    prefix = sys.argv[2]
    i = 0
    while True:
        i += 1
        bundle_id = f"{prefix}-{i}"
        record = BundleRecord(
            bundle_id, "s1", "r1", f"{prefix}-nonce-{i}".encode(), (f"s1/{bundle_id}",),
            "held" if i % 2 else "accepted", bytes(range(256)) * 64, "", "", "", "",
        )
        store.add_bundle(record, actor="site:s1")
        if i % 4 == 1:
            store.decide_bundle(bundle_id, "accepted", actor="op", reason="auto")
        elif i % 8 == 7:
            store.decide_bundle(bundle_id, "rejected", actor="op", reason="auto")
        print(bundle_id, flush=True)
    """
)


@pytest.mark.timeout(60)
def test_kill_9_keeps_acknowledged_bundles_and_a_valid_chain(store: SQLiteStore, db: Path) -> None:
    store.close()
    acknowledged: list[str] = []
    for prefix in ("first", "second"):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stderr is not None
        seen = 0
        while seen < 25:
            line = child.stdout.readline()
            if not line:
                child.wait()
                pytest.fail(f"child exited early ({child.returncode}): {child.stderr.read()}")
            acknowledged.append(line.strip())
            seen += 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        acknowledged += [line.strip() for line in child.stdout.read().splitlines()]
        child.stdout.close()
        child.stderr.close()

    with SQLiteStore.open(db) as reopened:
        present = {b.bundle_id for b in reopened.list_bundles()}
        missing = [b for b in acknowledged if b not in present]
        assert missing == []
        assert reopened.verify_audit() == []
        for bundle_id in present:
            bundle = reopened.get_bundle(bundle_id)
            assert bundle is not None
            owner = None if bundle.state == "rejected" else ("s1", bundle_id)
            assert reopened.condition_owner(bundle.conditions[0]) == owner
        states = {b.state for b in reopened.list_bundles()}
        assert states == {"accepted", "held", "rejected"}


def test_a_rewritten_log_no_longer_matches_the_composites_signed_anchors(
    store: SQLiteStore, db: Path
) -> None:
    """An intruder rewrites an early entry and recomputes every later hash and the head: the
    chain and the rows check out, but the anchor signed into a later composite does not."""
    store.enroll_site("s9", KEY1, "", actor=OP)
    store.add_composite(make_composite(1, (), audit_head=store.audit_head()), actor=OP)
    trusted = {public_bytes(COORDINATOR)}
    assert store.verify_audit(trusted) == []
    connection = raw(db)
    connection.execute("UPDATE sites SET public_key = ? WHERE site_id = 's9'", (KEY2,))
    prev_hash = GENESIS_HASH
    for seq, at, actor, event, subject, payload in connection.execute(
        "SELECT seq, at, actor, event, subject, payload FROM audit ORDER BY seq"
    ).fetchall():
        body = json.loads(payload)
        if subject == "site:s9":
            body["public_key"] = KEY2.hex()
        entry_hash = audit_entry_hash(seq, at, actor, event, subject, body, prev_hash)
        connection.execute(
            "UPDATE audit SET payload = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (canonical_json(body).decode(), prev_hash, entry_hash, seq),
        )
        prev_hash = entry_hash
    connection.execute(
        "UPDATE meta SET value = ? WHERE key = 'audit_head'",
        (canonical_json({"seq": seq, "entry_hash": prev_hash}).decode(),),
    )
    connection.close()
    problems = store.verify_audit(trusted)
    assert len(problems) == 1
    assert "composites row 1" in problems[0]
    assert "the log was rewritten" in problems[0]
    assert store.verify_audit({KEY1}) == [
        "composites row 1: the statement is signed by a key that is not this coordinator's"
    ]
