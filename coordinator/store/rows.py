"""Records to SQLite rows and back, and to the audit payloads that pin them, derived from fields.

A record is a dataclass whose field names are the columns of its table. Each field's annotated
type says how its value is stored and how the audit log describes it:

- ``str``, ``int``: stored and described as they are;
- ``bytes``: stored as a BLOB, described as hex;
- ``tuple[str, ...]``: stored as a JSON list of strings, described as a list.

A field declared with ``field(metadata=AUDIT_BY_HASH)`` (a large ``str`` or ``bytes`` value) is
described by the SHA-256 of its bytes (UTF-8 for text) under ``<name>_sha256``, where a ``_json``
suffix of the name is dropped: ``blob`` -> ``blob_sha256``, ``manifest_json`` ->
``manifest_sha256``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sqlite3
import typing
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from fedatlas.shared.hashing import canonical_json, digest

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_AUDIT = "audit"
_BY_HASH = "sha256"
AUDIT_BY_HASH: Mapping[str, str] = MappingProxyType({_AUDIT: _BY_HASH})

RecordT = TypeVar("RecordT", bound="DataclassInstance")


@dataclasses.dataclass(frozen=True)
class _Column:
    """How one record field is read from its column, stored in it and described in the audit."""

    name: str
    audit_key: str
    read: Callable[[Any], Any]
    store: Callable[[Any], Any]
    describe: Callable[[Any], Any]


def _as_is(value: Any) -> Any:
    return value


def _str_tuple(text: Any, what: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} is not a JSON list of strings")
    return tuple(value)


def _json_str_list(value: tuple[str, ...]) -> str:
    return canonical_json(list(value)).decode("utf-8")


def _sha256(value: str | bytes) -> str:
    return digest(value if isinstance(value, bytes) else value.encode("utf-8"))


def _column(field: dataclasses.Field[Any], annotation: Any) -> _Column:
    read: Callable[[Any], Any]
    store: Callable[[Any], Any] = _as_is
    describe: Callable[[Any], Any] = _as_is
    if annotation in (str, int):
        read = annotation
    elif annotation is bytes:
        read, describe = bytes, bytes.hex
    elif annotation == tuple[str, ...]:
        read = functools.partial(_str_tuple, what=field.name)
        store, describe = _json_str_list, list
    else:
        raise TypeError(f"field {field.name}: no SQLite column type for {annotation!r}")
    if field.metadata.get(_AUDIT) == _BY_HASH:
        audit_key = f"{field.name.removesuffix('_json')}_sha256"
        return _Column(field.name, audit_key, read, store, _sha256)
    return _Column(field.name, field.name, read, store, describe)


@functools.cache
def _columns(record_type: type[DataclassInstance]) -> tuple[_Column, ...]:
    annotations = typing.get_type_hints(record_type)
    return tuple(_column(f, annotations[f.name]) for f in dataclasses.fields(record_type))


def record_from_row(record_type: type[RecordT], row: sqlite3.Row) -> RecordT:
    """The record of ``record_type`` in ``row`` (ValueError or TypeError for a malformed value)."""
    return record_type(**{c.name: c.read(row[c.name]) for c in _columns(record_type)})


def insert_record(
    connection: sqlite3.Connection, table: str, record: DataclassInstance, **columns: Any
) -> None:
    """Insert ``record`` into ``table``, with ``columns`` that are not record fields."""
    values = {c.name: c.store(getattr(record, c.name)) for c in _columns(type(record))}
    values.update(columns)
    connection.execute(
        f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
        tuple(values.values()),
    )


def describe(record: DataclassInstance, **extra: Any) -> dict[str, Any]:
    """The audit payload pinning every field of ``record``, plus ``extra`` entries."""
    payload = {c.audit_key: c.describe(getattr(record, c.name)) for c in _columns(type(record))}
    payload.update(extra)
    return payload
