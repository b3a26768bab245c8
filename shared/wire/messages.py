"""fedatlas' Flower messages: what each one carries, in both directions.

Every Flower message of fedatlas holds ``ConfigRecord`` entries only: strings, numbers and
bytes, read back with the typed accessors below, which refuse anything else. Tensors travel as
:func:`~fedatlas.shared.wire.codec.encode_tensors` bytes, a composite as
:meth:`~fedatlas.shared.wire.composite.SignedComposite.encode` bytes. No entry has a per-cell
dimension: what a site sends does not grow with its number of cells.

Adaptor campaign (``train``):
    coordinator -> site   ``composite``: ``{"composite": SignedComposite bytes}``
    site -> coordinator   ``bundle``: ``{"bundle": serialised Bundle, "site-id": str}``

Federated reference build (every message also carries ``federated.plan``, the plan as JSON):
    ``query.genes``   site -> ``federated``: ``{"site-id", "genes": [gene names]}``
    ``query.votes``   coordinator -> ``federated.universe`` (gene names); site ->
                      ``trunk.tensors``: ``{"detected", "dispersions"}`` per batch x gene
    ``train.round``   coordinator -> ``federated.genes``, ``federated.round``,
                      ``trunk.tensors`` (the trunk); site -> ``trunk.tensors`` (its trained
                      trunk), ``federated``: ``{"site-id", "n-cells", "loss"}``
    ``train.finish``  coordinator -> ``composite`` (the signed federated release); site ->
                      ``bundle`` as in a campaign
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedatlas.shared.wire.codec import WireError

COMPOSITE_RECORD = "composite"  # the signed composite sent to sites
BUNDLE_RECORD = "bundle"  # a site's signed bundle
FEDERATED_RECORD = "federated"  # a federated build's plan and per-step settings or answers
TRUNK_RECORD = "trunk"  # a federated build's tensors: the trunk, or a site's gene votes
TENSORS = "tensors"  # the field of TRUNK_RECORD holding encode_tensors() bytes


def _field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise WireError(f"the message has no {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireError(f"{key!r} is {type(value).__name__}, expected {what}")
    return value


def bytes_field(record: Mapping[str, Any], key: str) -> bytes:
    """``record[key]``, which must be bytes (:class:`WireError` otherwise)."""
    return bytes(_field(record, key, bytes, "bytes"))


def str_field(record: Mapping[str, Any], key: str) -> str:
    """``record[key]``, which must be a string."""
    return str(_field(record, key, str, "a string"))


def int_field(record: Mapping[str, Any], key: str) -> int:
    """``record[key]``, which must be an integer."""
    return int(_field(record, key, int, "an integer"))


def float_field(record: Mapping[str, Any], key: str) -> float:
    """``record[key]``, which must be a number."""
    return float(_field(record, key, (int, float), "a number"))


def strings_field(record: Mapping[str, Any], key: str) -> list[str]:
    """``record[key]``, which must be a list of strings."""
    value = _field(record, key, list, "a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise WireError(f"{key!r} is not a list of strings")
    return [str(v) for v in value]
