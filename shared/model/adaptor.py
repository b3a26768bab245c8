"""Adaptors: a site's condition rows and prototypes, and composing them onto a release.

An adaptor holds, for the site's own (new) conditions only, the rows of every condition table of
the network, plus prototypes of the site's labelled cell types (aggregates over >= k cells). It
has no per-cell field, so its size does not depend on how many cells the site has.

Composition appends each adaptor's rows to the release's condition tables and merges prototype
catalogues, each site's weight capped (:func:`~fedatlas.shared.model.prototypes.capped_merge`);
the composite records, per label level and label, the weight each source contributed
(``contributions``). Rows are appended in condition-name order and prototypes merge in an order
fixed by content hashes, so the composite (and its content hash) is the same for any order of
adaptors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from fedatlas.shared.errors import AdaptorError, AdaptorHashError
from fedatlas.shared.hashing import canonical_json, tensor_digest, tensor_index
from fedatlas.shared.model import surgery
from fedatlas.shared.model.artifact import HASH_TEXT, TENSOR_INDEX, Artifact
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.privacy import PRIVACY_RECORD, epsilon_for
from fedatlas.shared.model.prototypes import PROTOTYPE_META, PrototypeSet, capped_merge
from fedatlas.shared.model.release import MODEL_PREFIX, Release, prototype_prefix
from fedatlas.shared.validation import (
    Int,
    Json,
    ListOf,
    MapOf,
    Record,
    Str,
    ValidationError,
    check,
    load_json,
)

ADAPTOR_FORMAT = "fedatlas-adaptor/1"
METADATA_KEY = "fedatlas_adaptor"
MAX_ID_LENGTH = 128  # site ids; condition names are SITE_ID/BATCH, at most twice that
# what an adaptor's content holds (see extract_adaptor)
ADAPTOR_CONTENT = Record(
    {
        "format": Str(64),
        "site_id": Str(MAX_ID_LENGTH),
        "release_id": HASH_TEXT,
        "trunk_id": HASH_TEXT,
        "conditions": ListOf(
            Record({"name": Str(2 * MAX_ID_LENGTH + 1), "n_cells": Int(0, 2**40)}), 10_000
        ),
        "label_levels": ListOf(Str(256), 32),
        "prototypes": MapOf(PROTOTYPE_META, 32),
        "training": MapOf(Json(), 64),
        "tensors": TENSOR_INDEX,
    },
    {"privacy": PRIVACY_RECORD},
)


def adaptor_content(text: str, *, source: str, max_bytes: int) -> dict[str, Any]:
    """An adaptor's content from its JSON text: strictly parsed, of format
    :data:`ADAPTOR_FORMAT` and of the declared shape (:class:`AdaptorError` otherwise)."""
    try:
        content = load_json(text, source=source, max_bytes=max_bytes)
        if isinstance(content, dict) and content.get("format") != ADAPTOR_FORMAT:
            raise ValidationError(
                f"{source}: format {str(content.get('format'))[:64]!r}, expected {ADAPTOR_FORMAT!r}"
            )
        check(content, ADAPTOR_CONTENT, source)
    except ValidationError as exc:
        raise AdaptorError(str(exc)) from None
    result: dict[str, Any] = content
    return result


@dataclass
class Adaptor(Artifact):
    """A site's adaptor."""

    @property
    def site_id(self) -> str:
        """Site that trained it."""
        return str(self.content["site_id"])

    @property
    def condition_names(self) -> list[str]:
        """Its conditions, in row order."""
        return [c["name"] for c in self.content["conditions"]]

    def prototypes(self, level_index: int) -> PrototypeSet:
        """The site's prototypes of the release's label level ``level_index``."""
        level = self.content["label_levels"][level_index]
        return PrototypeSet.from_tensors(
            self.tensors, prototype_prefix(level_index), self.content["prototypes"][level]
        )

    def table_rows(self) -> dict[str, Tensor]:
        """Condition-table rows by table tensor name (without the ``model.`` prefix)."""
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}

    def to_bytes(self) -> bytes:
        """Serialised form: a safetensors file whose metadata carries the JSON content."""
        header = {
            "content": self.content,
            "content_hash": self.content_hash,
            "provenance": self.provenance,
        }
        return safetensors.torch.save(
            self.tensors, metadata={METADATA_KEY: canonical_json(header).decode("utf-8")}
        )

    def save(self, path: str | Path) -> Path:
        """Write the adaptor file atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(target)
        return target

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "adaptor") -> Adaptor:
        """Parse and verify serialised adaptor bytes (no pickle involved)."""
        try:
            tensors = safetensors.torch.load(data)
            text = _safetensors_metadata(data)[METADATA_KEY]
            header = load_json(text, source=source, max_bytes=len(data))
            content, claimed = header["content"], str(header["content_hash"])
            provenance = dict(header.get("provenance", {}))
        except Exception as exc:  # safetensors raises several types for damaged bytes
            raise AdaptorError(f"{source}: not a fedatlas adaptor file ({exc})") from None
        return cls.verified(content, tensors, claimed, provenance=provenance, source=source)

    @classmethod
    def verified(
        cls,
        content: dict[str, Any],
        tensors: dict[str, Tensor],
        claimed_hash: str,
        *,
        provenance: dict[str, Any] | None = None,
        source: str = "adaptor",
    ) -> Adaptor:
        """An adaptor from its parts, after checking its format and shape, that its tensors are
        exactly those its content lists (by SHA-256) and that the content has
        ``claimed_hash``."""
        if not isinstance(content, dict) or content.get("format") != ADAPTOR_FORMAT:
            found = content.get("format") if isinstance(content, dict) else type(content).__name__
            raise AdaptorError(f"{source}: format {str(found)[:64]!r}, expected {ADAPTOR_FORMAT!r}")
        try:
            check(content, ADAPTOR_CONTENT, source)
        except ValidationError as exc:
            raise AdaptorError(str(exc)) from None
        adaptor = cls(content, tensors, provenance or {})
        index = content["tensors"]
        if set(index) != set(tensors):
            raise AdaptorError(f"{source}: tensors do not match the adaptor's index")
        for name, entry in index.items():
            if tensor_digest(tensors[name]) != entry.get("sha256"):
                raise AdaptorHashError(
                    f"{source}: tensor {name!r} does not match its recorded hash"
                )
        if adaptor.content_hash != claimed_hash:
            raise AdaptorHashError(f"{source}: content hash mismatch; the adaptor was modified")
        return adaptor

    @classmethod
    def load(cls, path: str | Path) -> Adaptor:
        """Read and verify an adaptor file."""
        p = Path(path)
        if not p.is_file():
            raise AdaptorError(f"{p}: no such adaptor file")
        return cls.from_bytes(p.read_bytes(), source=str(p))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors blob (8-byte little-endian header length, then
    a JSON header)."""
    header_len = int.from_bytes(data[:8], "little")
    if not 0 < header_len <= len(data) - 8:
        raise ValueError("bad safetensors header length")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def extract_adaptor(
    release: Release,
    model: CondVAE,
    *,
    site_id: str,
    conditions: Sequence[tuple[str, int]],
    prototypes: Sequence[PrototypeSet],
    training: dict[str, Any],
    created_at: str,
    privacy: dict[str, Any] | None = None,
) -> Adaptor:
    """Cut a site's adaptor out of a mapped ``model``.

    ``conditions`` lists (name, n_cells) of the site's new conditions, in the model's row order
    after the release's known conditions; ``prototypes`` has one set per release label level;
    ``privacy`` is the record of a differentially private release
    (:class:`~fedatlas.shared.model.private_release.PrivateRelease`).
    """
    tensors: dict[str, Tensor] = {}
    for name, rows in surgery.new_rows(model, len(release.condition_names)).items():
        if rows.shape[0] != len(conditions):
            raise AdaptorError(
                f"table {name}: {rows.shape[0]} new rows, expected {len(conditions)}"
            )
        tensors[MODEL_PREFIX + name] = rows
    levels = release.label_levels
    for i, pset in enumerate(prototypes):
        tensors.update(pset.to_tensors(prototype_prefix(i)))
    content = {
        "format": ADAPTOR_FORMAT,
        "site_id": site_id,
        "release_id": release.content_hash,
        "trunk_id": release.trunk_id,
        "conditions": [{"name": n, "n_cells": int(c)} for n, c in conditions],
        "label_levels": levels,
        "prototypes": {levels[i]: p.describe() for i, p in enumerate(prototypes)},
        "training": training,
        "tensors": tensor_index(tensors),
    }
    if privacy is not None:
        content["privacy"] = privacy
    return Adaptor(content, tensors, {"created_at": created_at})


def compose(release: Release, adaptors: Sequence[Adaptor]) -> Release:
    """The composite of ``release`` and ``adaptors`` (order-independent).

    Raises AdaptorError when an adaptor was trained on another trunk, has tables that do not
    fit, or claims a condition the release or another adaptor already has.
    """
    owner: dict[str, str] = dict.fromkeys(release.condition_names, "the release")
    base_tables = surgery.split(release.model_tensors())[1]
    rows: dict[str, tuple[Adaptor, int]] = {}
    for adaptor in adaptors:
        label = f"adaptor {adaptor.content_hash[:19]} (site {adaptor.site_id})"
        if adaptor.content["trunk_id"] != release.trunk_id:
            raise AdaptorError(f"{label} was trained against another reference network")
        if adaptor.content["label_levels"] != release.label_levels:
            raise AdaptorError(f"{label}: label levels differ from the release's")
        tables = adaptor.table_rows()
        if set(tables) != set(base_tables):
            raise AdaptorError(
                f"{label}: condition tables {sorted(tables)} do not match the "
                f"release's {sorted(base_tables)}"
            )
        for name, part in tables.items():
            expected = (len(adaptor.condition_names), *base_tables[name].shape[1:])
            if tuple(part.shape) != expected or part.dtype != base_tables[name].dtype:
                raise AdaptorError(
                    f"{label}: table {name} has shape {tuple(part.shape)}, expected {expected}"
                )
        for i, name in enumerate(adaptor.condition_names):
            if name in owner:
                raise AdaptorError(f"{label}: condition {name!r} already belongs to {owner[name]}")
            owner[name] = label
            rows[name] = (adaptor, i)
    new_names = sorted(rows)
    tensors = dict(release.tensors)
    picked = [rows[c] for c in new_names]  # (adaptor, its row) of each new condition, in order
    appended = surgery.append_rows(
        base_tables, [{k: v[i : i + 1] for k, v in a.table_rows().items()} for a, i in picked]
    )
    tensors.update({MODEL_PREFIX + name: table for name, table in appended.items()})
    content = json.loads(canonical_json(release.content))
    content["kind"] = "composite"
    by_name = {c["name"]: c for a in adaptors for c in a.content["conditions"]}
    content["conditions"] = [
        *content["conditions"],
        *(
            {"name": n, "origin": rows[n][0].site_id, "n_cells": by_name[n]["n_cells"]}
            for n in new_names
        ),
    ]
    content["contributions"] = {}
    for i, level in enumerate(release.label_levels):
        by_site: dict[str, list[PrototypeSet]] = {}
        for adaptor in adaptors:
            by_site.setdefault(adaptor.site_id, []).append(adaptor.prototypes(i))
        merged, shares = capped_merge(release.prototypes(level), by_site)
        for key in list(tensors):
            if key.startswith(prototype_prefix(i) + "."):
                del tensors[key]
        tensors.update(merged.to_tensors(prototype_prefix(i)))
        content["prototypes"][level] = merged.describe()
        content["contributions"][level] = shares
    spend = privacy_spend(adaptors)
    if spend:
        content["privacy"] = spend
    content["lineage"] = {
        "base": release.content_hash,
        "adaptors": sorted(a.content_hash for a in adaptors),
    }
    del content["tensors"]
    return Release.assemble(content, tensors, {"composed_from": release.content_hash})


def privacy_spend(adaptors: Sequence[Adaptor]) -> dict[str, dict[str, Any]]:
    """Per contributing site, what its adaptors spent (a composite states it when any adaptor
    was made with differential privacy): zCDP rho summed, epsilon at the largest delta its
    adaptors used, or ``private: false`` with no epsilon for a site with any adaptor made
    without DP. Empty when no adaptor was private."""
    if not any("privacy" in a.content for a in adaptors):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for site in sorted({a.site_id for a in adaptors}):
        records = [a.content.get("privacy") for a in adaptors if a.site_id == site]
        if any(r is None for r in records):
            out[site] = {"private": False, "adaptors": len(records)}
            continue
        rho = sum(float(r["rho"]) for r in records if r is not None)
        delta = max(float(r["delta"]) for r in records if r is not None)
        out[site] = {
            "private": True, "adaptors": len(records), "rho": rho, "delta": delta,
            "epsilon": epsilon_for(rho, delta),
        }  # fmt: skip
    return out
