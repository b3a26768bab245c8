"""Virtual sites of a simulated Flower federation (``fedatlas coordinator simulate``).

In Flower's Simulation Engine a ClientApp's node configuration holds only its partition id, so
the site it plays comes from a *federation file*: one entry per partition, with exactly the
settings ``fedatlas site node`` gives a real SuperNode (site id, data path, batch and label
keys, signing key, coordinator key). The operator writes a *sites file* — a JSON list of
objects, one per virtual site::

    [{"site-id": "v01", "data": "v01.h5ad", "batch-key": "batch",
      "label-key": "cell_type", "key": "keys/v01/site.key"}, ...]

optionally with ``coordinator-key``, ``out`` (write the mapped cells there), ``seed``,
``epochs`` (mapping epochs; default: the release's), ``chunk-size`` (read the data this many
cells at a time; default: only a file too large to load) and ``train-cells``. Relative paths
are relative to the sites file. :func:`read_sites_file` checks it; :func:`write_federation`
writes the resolved entries that :func:`virtual_site` hands to the ClientApp of partition
``i``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedatlas.shared.errors import ConfigError

REQUIRED = ("site-id", "data", "batch-key", "key")
OPTIONAL = {"label-key": "", "coordinator-key": "", "out": "", "seed": 0, "epochs": 0,
            "chunk-size": None, "train-cells": 50_000}  # fmt: skip
PATHS = ("data", "key", "coordinator-key", "out")  # resolved against the sites file
INTEGERS = ("seed", "epochs", "chunk-size", "train-cells")


def read_sites_file(path: Path) -> list[dict[str, Any]]:
    """The virtual sites listed in ``path``, checked (required fields, unique site ids, data and
    key files present) and with absolute paths and every optional field filled in."""
    try:
        entries = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sites file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty JSON list of site objects")
    sites = [_site(path, i, entry) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for site in sites:
        if site["site-id"] in seen:
            raise ConfigError(f"{path}: site-id {site['site-id']!r} appears more than once")
        seen.add(site["site-id"])
    return sites


def _site(path: Path, index: int, entry: object) -> dict[str, Any]:
    where = f"{path}: site {index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if not entry.get(k)]
    unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown fields {unknown}"
        raise ConfigError(f"{where}: {problem} (fields: {[*REQUIRED, *OPTIONAL]})")
    site = {**OPTIONAL, **entry}
    if site["chunk-size"] is None:
        del site["chunk-size"]  # chunks only for a file too large to load
    for key in INTEGERS:
        if key in site and (not isinstance(site[key], int) or site[key] < 0):
            raise ConfigError(f"{where}: {key} must be a non-negative integer")
    for key in set(site) - set(INTEGERS):
        if not isinstance(site[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    for key in PATHS:
        if site[key]:
            site[key] = str((path.parent / site[key]).resolve())
    for key in ("data", "key"):
        if not Path(site[key]).is_file():
            raise ConfigError(f"{where} ({site['site-id']}): {key} file {site[key]} not found")
    return site


def write_federation(path: Path, sites: list[dict[str, Any]]) -> None:
    """Write the federation file the simulated ClientApps read (entry i = partition i)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sites, indent=1, sort_keys=True))


def virtual_site(federation: Path, partition: int) -> dict[str, Any]:
    """The configuration of the virtual site that plays ``partition``."""
    try:
        sites = json.loads(federation.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{federation}: cannot read the simulation federation ({exc})") from None
    if not 0 <= partition < len(sites):
        raise ConfigError(
            f"{federation}: no virtual site for partition {partition} ({len(sites)} sites)"
        )
    site: dict[str, Any] = sites[partition]
    return site
