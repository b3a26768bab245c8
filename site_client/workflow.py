"""A site's work, done one way whichever way it is started: by the site commands, by the site's
Flower ClientApp in an adaptor campaign or a federated build, or by the demo's third party.

* :func:`map_site` maps the site's ``.h5ad`` file onto a release with one set of
  :class:`~fedatlas.shared.model.mapping.MappingOptions`: loaded whole, or read in chunks in
  bounded memory (a large file, or any file given a chunk size), writing the annotated copy
  when asked;
* :func:`prepare_bundle` does the same, then signs the site's adaptor into a bundle;
* :func:`~fedatlas.site_client.trust.accept` checks a received composite against the key the
  site trusts, whichever way it came.

Nothing here sends anything: the callers carry the bundle (gRPC, a Flower reply) and nothing
else leaves the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import Tensor

from fedatlas.shared.data.chunked import read_annotations
from fedatlas.shared.data.dataset import DataSource, condition_name
from fedatlas.shared.data.h5ad import write_h5ad
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.annotations import annotate
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.streaming import chunk_cells_for, map_h5ad
from fedatlas.shared.wire.bundle import SignedBundle, make_bundle


@dataclass(frozen=True)
class SiteMapping:
    """One mapping of a site's file: the result, and how the file was read."""

    result: MappingResult
    chunk_cells: int  # cells per chunk; 0 when the file was loaded whole


class NoAdaptorError(ConfigError):
    """Every batch of the site's data is a condition the reference already has."""


def map_site(
    release: Release,
    source: DataSource,
    options: MappingOptions,
    *,
    out: Path | None = None,
    require_adaptor: bool = False,
    initial_rows: Mapping[str, Tensor] | None = None,
    progress: bool = True,
) -> SiteMapping:
    """Map the cells of ``source`` onto ``release`` and write the annotated copy to ``out``
    when given. ``require_adaptor`` refuses, before any mapping work, data whose every batch
    the release already has (:class:`NoAdaptorError`). ``initial_rows`` start the new condition
    rows from rows the site kept (a federated build's)."""
    chunk_cells = chunk_cells_for(source.path, source.layer, options.chunk_size)
    if chunk_cells:
        if require_adaptor:
            _, batches, _ = read_annotations(
                source.path, batch_key=source.batch_key, label_keys=source.label_keys,
                gene_key=source.gene_key,
            )  # fmt: skip
            _require_new_batch(release, source, options, set(batches.tolist()))
        result = map_h5ad(
            release, source, options, out=out, chunk_cells=chunk_cells,
            initial_rows=initial_rows, progress=progress,
        )  # fmt: skip
        return SiteMapping(result, chunk_cells)
    adata, cells = source.load()
    if require_adaptor:
        _require_new_batch(release, source, options, set(cells.batches.tolist()))
    result = map_onto(
        release, cells, options, initial_rows=initial_rows, source=str(source.path),
        progress=progress,
    )  # fmt: skip
    if out is not None:
        annotate(adata, result)
        write_h5ad(adata, out)
    return SiteMapping(result, 0)


def prepare_bundle(
    release: Release,
    source: DataSource,
    options: MappingOptions,
    key: Ed25519PrivateKey,
    *,
    out: Path | None = None,
    initial_rows: Mapping[str, Tensor] | None = None,
    progress: bool = True,
) -> tuple[SignedBundle, SiteMapping]:
    """Map the site's cells (as :func:`map_site`) and sign its adaptor with ``key``."""
    mapped = map_site(
        release, source, options, out=out, require_adaptor=True, initial_rows=initial_rows,
        progress=progress,
    )  # fmt: skip
    adaptor = mapped.result.adaptor
    assert adaptor is not None  # require_adaptor: some batch is new
    return make_bundle(adaptor, key), mapped


def write_bundle(bundle: SignedBundle, path: Path) -> None:
    """Write a bundle file atomically (``site send`` sends it later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(bundle.raw)
    tmp.replace(path)


def _require_new_batch(
    release: Release, source: DataSource, options: MappingOptions, batches: set[str]
) -> None:
    known = set(release.condition_names)
    if all(condition_name(options.site_id, b) in known for b in batches):
        raise NoAdaptorError(
            f"{source.path}: every batch is already a condition of the release (as "
            f"{options.site_id}/BATCH), so there is no adaptor to train; map them as new "
            "conditions under another site id"
        )
