"""The coordinator's registry: sites, releases, bundles, composites and a hash-chained audit log.

One SQLite file shared by the gRPC server and the operator's admin CLI; every write commits its
row and the audit entry describing it together. :class:`Store` is the interface the coordinator
programs against, so that another database (e.g. PostgreSQL) can replace :class:`SQLiteStore`.

- ``records``: the records, the registry's rules, the :class:`Store` interface and its errors
  (:class:`StoreError` and its subclasses for conflicts, unknown records and a busy registry);
- ``rows``: records to SQLite rows and back, and to audit payloads, derived from their fields;
- ``sqlite``: :class:`SQLiteStore`, the schema, opening, transactions, reads and writes;
- ``audit``: the audit log's hash chain and the verifier behind
  :meth:`SQLiteStore.verify_audit`.
"""

from fedatlas.coordinator.store.audit import GENESIS_HASH, audit_entry_hash
from fedatlas.coordinator.store.records import (
    AuditEntry,
    BundleRecord,
    CompositeRecord,
    RejectionRecord,
    SiteRecord,
    Store,
    StoreBusyError,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
    utc_now,
)
from fedatlas.coordinator.store.sqlite import BUSY_TIMEOUT_S, SQLiteStore

__all__ = [
    "BUSY_TIMEOUT_S",
    "GENESIS_HASH",
    "AuditEntry",
    "BundleRecord",
    "CompositeRecord",
    "RejectionRecord",
    "SQLiteStore",
    "SiteRecord",
    "Store",
    "StoreBusyError",
    "StoreConflictError",
    "StoreError",
    "StoreNotFoundError",
    "audit_entry_hash",
    "utc_now",
]
