"""Looking after a coordinator store: backups, restores and key/certificate rotation.

A **backup** is one tar.gz file (mode 0600: it holds the private keys) with a consistent copy of
``registry.sqlite`` taken with SQLite's online backup API (safe while ``coordinator serve`` and
the SuperLink write to the store, which is in WAL mode), the key and certificate files, and a
``manifest.json`` with the SHA-256 of each. Flower's own state (``STORE/flower/``) is left out:
a SuperLink started on a restored store registers every enrolled site's node key again.

**Restore** checks every file against the manifest, writes the store beside the target and
renames it into place only when complete, then checks the audit chain.

**Rotation**: :func:`rotate_signing_key` replaces the coordinator's Ed25519 key and publishes
the current composite again, signed by the new key, as the next generation (sites then pin the
new ``coordinator.pub``); :func:`renew_server_certificate` issues a new TLS server certificate
(optionally under a new CA). Old keys and certificates are kept in ``STORE/retired/``. Both are
meant to run while the coordinator's services are stopped, and both can be run again after an
interruption to finish the job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedatlas.coordinator.registry import Registry, RegistryError, StoreLayout
from fedatlas.coordinator.store import BUSY_TIMEOUT_S, CompositeRecord, SQLiteStore, utc_now
from fedatlas.coordinator.tls import DEFAULT_HOSTS, Issued, issue, make_ca
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.wire.composite import CompositeStatement, sign_composite
from fedatlas.shared.wire.signing import (
    fingerprint,
    load_public_key,
    load_signing_key,
    public_bytes,
    public_pem,
    write_keypair,
    write_private_file,
)

BACKUP_KIND = "fedatlas-store-backup"
BACKUP_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "registry.sqlite"
# files of a store besides the registry: name -> private (mode 0600)
KEY_FILES = {
    "coordinator.key": True,
    "coordinator.pub": False,
    "ca.pem": False,
    "ca.key": True,
    "server.pem": False,
    "server.key": True,
}
KEY_META = "coordinator_key"  # audited meta entry naming the key in force after a rotation
MAX_MEMBER_BYTES = 8 << 30  # refuse absurd archive members before reading them


class BackupError(RegistryError):
    """A backup cannot be written, or a backup file cannot be restored."""


# ----------------------------------------------------------------------------- backup
def backup_store(store: Path, out: Path) -> dict[str, Any]:
    """Write a consistent backup of ``store`` to the new file ``out``; a summary of it."""
    layout = StoreLayout(store)
    if not layout.database.is_file():
        raise BackupError(f"{store}: not a coordinator store (no {DATABASE})")
    if out.exists():
        raise BackupError(f"{out}: already exists; choose a new --out (backups are never replaced)")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent}: no such directory for --out")
    with _scratch(out.parent, ".fedatlas-backup-") as scratch:
        _snapshot_database(layout.database, scratch / DATABASE)
        summary = _describe(scratch / DATABASE)
        _single_file(scratch / DATABASE)
        files = {DATABASE: (scratch / DATABASE).read_bytes()}
        for name in KEY_FILES:
            try:
                files[name] = (store / name).read_bytes()
            except OSError as exc:
                raise BackupError(f"{store / name}: cannot read it ({exc.strerror})") from None
        manifest = {
            "kind": BACKUP_KIND,
            "version": BACKUP_VERSION,
            "created_at": utc_now(),
            "source": str(store.resolve()),
            "files": {name: _sha256(data) for name, data in sorted(files.items())},
            **summary,
        }
        archive = scratch / "backup.tar.gz"
        fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w:gz") as tar:
                _add_member(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
                for name, data in files.items():
                    _add_member(tar, name, data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(archive, out)  # fails rather than replace a file created meanwhile
        except FileExistsError:
            raise BackupError(
                f"{out}: appeared while the backup was written; not replaced"
            ) from None
    return {"backup": str(out), "bytes": out.stat().st_size, **manifest}


def _snapshot_database(database: Path, copy: Path) -> None:
    """A transactionally consistent copy of a (possibly busy) registry, via SQLite's backup
    API (WAL mode: the services go on writing meanwhile)."""
    try:
        source = sqlite3.connect(
            database.absolute().as_uri() + "?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S
        )
    except sqlite3.Error as exc:
        raise BackupError(f"{database}: cannot open the registry ({exc})") from None
    target = sqlite3.connect(copy)
    try:
        source.backup(target)  # all pages in one step: one read transaction, one snapshot
        problems = [str(r[0]) for r in target.execute("PRAGMA integrity_check")]
    except sqlite3.Error as exc:
        raise BackupError(f"{database}: the online backup failed ({exc})") from None
    finally:
        target.close()
        source.close()
    if problems != ["ok"]:
        raise BackupError(f"{database}: the copy is damaged: {'; '.join(problems[:3])}")
    copy.chmod(0o600)


def _single_file(database: Path) -> None:
    """Switch a closed copy to a rollback journal, so the file alone holds all of it."""
    connection = sqlite3.connect(database)
    try:
        mode = connection.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    finally:
        connection.close()
    if str(mode).lower() != "delete" or Path(f"{database}-wal").exists():
        raise BackupError(f"{database}: the copy could not be made a single file ({mode})")


def _describe(database: Path) -> dict[str, Any]:
    """What a registry file holds (for manifests and reports)."""
    with SQLiteStore.open(database) as db:
        problems = db.verify_audit()
        latest = db.latest_composite()
        current = db.current_release()
        return {
            "audit_entries": len(db.audit_entries()),
            "audit_intact": not problems,
            "audit_problems": problems,
            "sites": [s.site_id for s in db.list_sites()],
            "bundles": len(db.list_bundles()),
            "release": current.release_id if current else "",
            "composite_generation": latest.generation if latest else 0,
        }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(dt.datetime.now(dt.UTC).timestamp())
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- restore
def restore_store(backup: Path, store: Path) -> dict[str, Any]:
    """Restore the backup file ``backup`` as the new store directory ``store``; a summary,
    whose ``audit_intact`` says whether the restored audit chain verifies."""
    if store.exists() and (not store.is_dir() or any(store.iterdir())):
        raise BackupError(f"{store}: already exists and is not empty; restore into a new --store")
    files = _read_backup(backup)
    store.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(store.parent, f".{store.name}.restore-") as scratch:
        staged = scratch / "store"
        staged.mkdir(mode=0o700)
        for name, data in files.items():
            if name == DATABASE or KEY_FILES.get(name, False):
                write_private_file(staged / name, data)
            else:
                (staged / name).write_bytes(data)
        _check_key_pair(staged, source=backup)
        summary = _describe(staged / DATABASE)
        if store.exists():
            store.rmdir()  # empty (checked above)
        staged.rename(store)
    return {"store": str(store), "backup": str(backup), **summary}


def _read_backup(backup: Path) -> dict[str, bytes]:
    """The files of a backup, each checked against its manifest."""
    expected = {MANIFEST, DATABASE, *KEY_FILES}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(backup, mode="r:gz") as tar:
            for info in tar:
                if info.name not in expected or not info.isfile():
                    raise BackupError(
                        f"{backup}: unexpected archive member {info.name!r}; not a fedatlas "
                        f"store backup (expected only {', '.join(sorted(expected))})"
                    )
                if info.name in members:
                    raise BackupError(f"{backup}: member {info.name!r} appears twice")
                if info.size > MAX_MEMBER_BYTES:
                    raise BackupError(f"{backup}: member {info.name!r} is {info.size} bytes")
                handle = tar.extractfile(info)
                assert handle is not None  # a regular file
                members[info.name] = handle.read()
    except FileNotFoundError:
        raise BackupError(f"{backup}: no such backup file") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{backup}: not a readable tar.gz backup ({exc})") from None
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except KeyError:
        raise BackupError(f"{backup}: no {MANIFEST}; not a fedatlas store backup") from None
    except ValueError as exc:
        raise BackupError(f"{backup}: {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BACKUP_KIND:
        raise BackupError(f"{backup}: {MANIFEST} has no kind {BACKUP_KIND!r}")
    if manifest.get("version") != BACKUP_VERSION:
        raise BackupError(
            f"{backup}: backup format version {manifest.get('version')!r}; this fedatlas reads "
            f"version {BACKUP_VERSION}"
        )
    hashes = manifest.get("files")
    if not isinstance(hashes, dict) or set(hashes) != expected - {MANIFEST}:
        raise BackupError(f"{backup}: {MANIFEST} 'files' must list {sorted(expected - {MANIFEST})}")
    for name, wanted in sorted(hashes.items()):
        if name not in members:
            raise BackupError(f"{backup}: {name} is listed in {MANIFEST} but missing")
        if _sha256(members[name]) != wanted:
            raise BackupError(f"{backup}: {name} does not match its SHA-256 in {MANIFEST}")
    return members


def _check_key_pair(store: Path, *, source: Path) -> None:
    layout = StoreLayout(store)
    if public_bytes(load_signing_key(layout.signing_key)) != load_public_key(layout.public_key):
        raise BackupError(f"{source}: coordinator.pub is not the public half of coordinator.key")


# ----------------------------------------------------------------------------- rotation
def rotate_signing_key(store: Path) -> dict[str, Any]:
    """Replace the coordinator's signing key and sign the current composite with it.

    The old key pair moves to ``STORE/retired/``; the current composite is published again
    as the next generation, signed by the new key (its content is unchanged), and the change
    is recorded in the audit log. When an earlier rotation was interrupted (the latest
    composite is not signed by the key in force), only the missing steps are done.
    """
    layout = StoreLayout(store)
    with Registry(store) as registry:
        _repair_public_key(layout)
        key = load_signing_key(layout.signing_key)
        latest = registry.store.latest_composite()
        signer = _signer(latest)
    previous = public_bytes(key)
    rotated = signer is None or signer == previous
    if rotated:
        _retire(layout, ["coordinator.key", "coordinator.pub"])
        pair = write_keypair(store, ".coordinator-new", overwrite=True)
        os.replace(pair.private, layout.signing_key)
        os.replace(pair.public, layout.public_key)
    else:
        previous = signer or previous
        if previous not in layout.coordinator_keys():  # its key file was lost in the crash
            _retire_public_key(layout, previous)
    key = load_signing_key(layout.signing_key)
    new = public_bytes(key)
    generation = 0
    with Registry(store) as registry:
        if registry.store.current_release() is not None:
            record, composite, _ = registry.current_composite()
            generation = record.generation
            if _signer(record) != new:
                created = utc_now()
                statement = sign_composite(
                    key, composite, generation=record.generation + 1,
                    base_release_id=record.base_release_id, bundle_ids=record.bundle_ids,
                    created_at=created, audit_head=registry.store.audit_head(),
                )  # fmt: skip
                stored = registry.store.add_composite(
                    CompositeRecord(
                        record.generation + 1, record.content_hash, record.base_release_id,
                        record.bundle_ids, record.manifest_json, statement.statement_json,
                        statement.signature, created,
                    ),
                    actor="admin store rotate-key",
                )  # fmt: skip
                generation = stored.generation
        registry.store.set_meta(
            KEY_META,
            json.dumps({"fingerprint": fingerprint(new), "previous": fingerprint(previous)}),
            actor="admin store rotate-key",
        )
    return {
        "store": str(store),
        "coordinator_key": fingerprint(new),
        "previous_key": fingerprint(previous),
        "new_key_generated": rotated,
        "public_key_file": str(layout.public_key),
        "composite_generation": generation,
    }


def _signer(record: CompositeRecord | None) -> bytes | None:
    """The key that signed a stored composite's statement (None: no composite)."""
    if record is None:
        return None
    return CompositeStatement(record.statement_json, record.signature).coordinator_key


def _repair_public_key(layout: StoreLayout) -> None:
    """Rewrite coordinator.pub from coordinator.key when they differ (interrupted rotation)."""
    key = load_signing_key(layout.signing_key)
    with contextlib.suppress(FedatlasError):
        if load_public_key(layout.public_key) == public_bytes(key):
            return
    _write_atomic(
        layout.public_key,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def renew_server_certificate(
    store: Path, hosts: list[str] | None = None, *, new_ca: bool = False
) -> dict[str, Any]:
    """Issue a new TLS server certificate for ``hosts`` (default: the names of the current
    one; loopback names are always added), signed by the store's CA or by a new CA."""
    layout = StoreLayout(store)
    if not layout.database.is_file():
        raise RegistryError(f"{store}: not a coordinator store (no {DATABASE})")
    names = list(hosts or _certificate_hosts(layout.server_certificate))
    names = list(dict.fromkeys([*names, *DEFAULT_HOSTS]))
    retired = ["server.pem", "server.key"] + (["ca.pem", "ca.key"] if new_ca else [])
    with _scratch(store, ".tls-") as scratch:
        ca = (
            make_ca(scratch, "fedatlas coordinator CA")
            if new_ca
            else Issued(layout.ca_certificate, layout.ca_key)
        )
        issued = issue(
            ca, scratch / "server.pem", scratch / "server.key",
            common_name="fedatlas coordinator", hosts=names,
        )  # fmt: skip
        _retire(layout, retired)
        # keys first: a crash in between leaves a pair that a second run replaces
        if new_ca:
            os.replace(ca.key, layout.ca_key)
            os.replace(ca.certificate, layout.ca_certificate)
        os.replace(issued.key, layout.server_key)
        os.replace(issued.certificate, layout.server_certificate)
    certificate = x509.load_pem_x509_certificate(layout.server_certificate.read_bytes())
    return {
        "store": str(store),
        "hosts": names,
        "new_ca": new_ca,
        "ca": str(layout.ca_certificate),
        "not_after": certificate.not_valid_after_utc.isoformat(timespec="seconds"),
    }


def _certificate_hosts(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is issued for."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise RegistryError(
            f"{path}: cannot read the names of the current certificate ({exc}); pass --host"
        ) from None
    return [
        *names.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in names.get_values_for_type(x509.IPAddress)),
    ]


def _retire(layout: StoreLayout, names: list[str]) -> None:
    """Copy ``names`` into STORE/retired/ with a timestamp before they are replaced."""
    retired = layout.retired
    retired.mkdir(mode=0o700, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    for name in names:
        source = layout.root / name
        if source.exists():
            write_private_file(retired / f"{stamp}-{name}", source.read_bytes())


def _retire_public_key(layout: StoreLayout, public_key: bytes) -> None:
    """Keep a raw public key in STORE/retired/ (the composites it signed stay verifiable)."""
    layout.retired.mkdir(mode=0o700, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    (layout.retired / f"{stamp}-coordinator.pub").write_bytes(public_pem(public_key))


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A private temporary directory in ``parent`` (same file system), always removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
