"""Writing mapping results under fedatlas' keys (DESIGN §7), into a site's AnnData in memory or
into its ``.h5ad`` file in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

from fedatlas.shared.model.label_transfer import UNKNOWN
from fedatlas.shared.model.mapping import MappingResult
from fedatlas.shared.model.release import EMBEDDING_TABLE

LATENT_KEY = "X_fedatlas"
LABEL_KEY = "fedatlas_label"
UNCERTAINTY_KEY = "fedatlas_uncertainty"
UNKNOWN_KEY = "fedatlas_unknown"
PROVENANCE_KEY = "fedatlas"


def annotate(adata: ad.AnnData, result: MappingResult) -> None:
    """Add the latent embedding, labels, uncertainty, unknown calls and provenance to ``adata``.

    The primary label level goes to ``obs['fedatlas_label']``, ``obs['fedatlas_uncertainty']``
    and ``obs['fedatlas_unknown']``; further levels get the same columns suffixed with
    ``_<level>``. Cells keep their order; nothing else in ``adata`` changes.
    ``uns['fedatlas']`` holds the mapping's provenance, the release's trunk id (which network the
    latent belongs to) and, for the ``embedding`` condition mechanism, the learnt embedding row
    of each of the site's conditions (``condition_embeddings``: ``names`` and ``values``).
    """
    if adata.n_obs != result.latent.shape[0]:
        raise ValueError("result and AnnData have different numbers of cells")
    adata.obsm[LATENT_KEY] = result.latent.astype(np.float32)
    for name, values in _obs_columns(result).items():
        adata.obs[name] = values
    adata.uns[PROVENANCE_KEY] = _provenance_record(result)


def annotate_file(path: str | Path, result: MappingResult) -> None:
    """Add what :func:`annotate` adds to the ``.h5ad`` file at ``path``, in place.

    Only those entries are written (with anndata's element writers); X, layers and every other
    entry of the file are neither read nor rewritten, so this needs no more memory than the
    result, however large the file.
    """
    with h5py.File(path, "r+") as file:
        obs = file["obs"]
        n_obs = obs[obs.attrs["_index"]].shape[0]
        if n_obs != result.latent.shape[0]:
            raise ValueError("result and file have different numbers of cells")
        _put(file, "obsm", LATENT_KEY, result.latent.astype(np.float32, copy=False))
        order = [str(c) for c in obs.attrs["column-order"]]
        for name, values in _obs_columns(result).items():
            _put(file, "obs", name, values)
            if name not in order:
                order.append(name)
        obs.attrs["column-order"] = order
        _put(file, "uns", PROVENANCE_KEY, _provenance_record(result))


def _put(file: h5py.File, group: str, key: str, value: Any) -> None:
    """Write ``value`` as ``group/key``, replacing an entry of that name."""
    if group not in file:
        write_elem(file, group, {})
    if key in file[group]:
        del file[group][key]
    write_elem(file[group], key, value)


def _obs_columns(result: MappingResult) -> dict[str, Any]:
    """The obs columns of :func:`annotate`, in order."""
    columns: dict[str, Any] = {}
    for i, (level, transfer) in enumerate(result.transfers.items()):
        suffix = "" if i == 0 else f"_{level}"
        called = transfer.called
        categories = [*sorted({str(v) for v in called} - {UNKNOWN}), UNKNOWN]
        columns[LABEL_KEY + suffix] = pd.Categorical(called, categories=categories)
        columns[UNCERTAINTY_KEY + suffix] = transfer.uncertainty.astype(np.float32)
        columns[UNKNOWN_KEY + suffix] = transfer.unknown.astype(bool)
    return columns


def _provenance_record(result: MappingResult) -> dict[str, Any]:
    """``uns['fedatlas']`` of :func:`annotate`."""
    record = {**result.provenance(), "trunk_id": result.release.trunk_id}
    embeddings = _site_condition_embeddings(result)
    if embeddings is not None:
        record["condition_embeddings"] = embeddings
    return record


def _site_condition_embeddings(result: MappingResult) -> dict[str, Any] | None:
    """Embedding rows of the site's conditions: the release's rows for conditions it knew, the
    adaptor's for new ones; None when the network has no condition embedding."""
    known = result.release.condition_embeddings()
    if known is None:
        return None
    rows = dict(zip(known[0], known[1], strict=True))
    if result.adaptor is not None:
        fresh = result.adaptor.table_rows()[EMBEDDING_TABLE].numpy()
        rows.update(zip(result.adaptor.condition_names, fresh, strict=True))
    names = [a.condition for a in result.assignments]
    return {"names": names, "values": np.stack([rows[n] for n in names]).astype(np.float32)}
