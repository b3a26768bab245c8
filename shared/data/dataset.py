"""Pulling a site's cells out of an AnnData: raw counts, batches, labels and gene names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.typing import NDArray

from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.data.preprocessing import as_count_matrix
from fedatlas.shared.errors import InputDataError

UNLABELED = ""  # label value of a cell without annotation


@dataclass(frozen=True)
class CellTable:
    """A dataset's cells as the model sees them, before gene alignment."""

    counts: sp.csr_matrix  # cells x genes, raw counts, float32
    genes: list[str]
    batches: NDArray[np.str_]
    labels: dict[str, NDArray[np.object_]]  # label key -> label per cell (UNLABELED if missing)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.counts.shape[0])


@dataclass(frozen=True)
class DataSource:
    """Where a dataset's cells are and how to read them: an ``.h5ad`` file, its batch column,
    its label columns (primary level first), the layer with raw counts (None: X) and the var
    column with gene identifiers (None: var_names)."""

    path: Path
    batch_key: str
    label_keys: tuple[str, ...] = ()
    layer: str | None = None
    gene_key: str | None = None

    def load(self) -> tuple[ad.AnnData, CellTable]:
        """The whole file in memory and its validated cells."""
        adata = read_h5ad(self.path)
        cells = extract_cells(
            adata,
            source=str(self.path),
            batch_key=self.batch_key,
            label_keys=self.label_keys,
            layer=self.layer,
            gene_key=self.gene_key,
        )
        return adata, cells


def extract_cells(
    adata: ad.AnnData,
    *,
    source: str,
    batch_key: str,
    label_keys: Sequence[str] = (),
    layer: str | None = None,
    gene_key: str | None = None,
) -> CellTable:
    """Validate and extract counts, batches, labels and gene names from ``adata``.

    ``source`` (usually the file path) prefixes every error message.
    """
    if adata.n_obs == 0:
        raise InputDataError(f"{source}: contains no cells")
    if layer is None:
        matrix, where = adata.X, "X"
    elif layer in adata.layers:
        matrix, where = adata.layers[layer], f"layer {layer!r}"
    else:
        raise InputDataError(
            f"{source}: no layer {layer!r}; layers present: {_listing(adata.layers.keys())}"
        )
    if matrix is None:
        raise InputDataError(f"{source}: X is empty; pass --layer NAME with the raw counts")
    counts = as_count_matrix(matrix, f"{source} ({where})")
    refuse_empty_cells(counts, f"{source} ({where})", adata.obs_names)
    genes, batches, labels = extract_annotations(
        adata.obs, adata.var, source=source, batch_key=batch_key, label_keys=label_keys,
        gene_key=gene_key,
    )  # fmt: skip
    return CellTable(counts, genes, batches, labels)


def refuse_empty_cells(
    counts: sp.csr_matrix, where: str, names: Sequence[str] | None = None, first_row: int = 0
) -> None:
    """Refuse cells without a single count: nothing can place them (they would map to one
    arbitrary spot, be called unknown and still shape an adaptor). ``names`` are the cells'
    names, else they are shown as row numbers from ``first_row``."""
    empty = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() == 0)
    if empty.size:
        shown = ", ".join(
            str(names[i]) if names is not None else f"row {first_row + i:,}" for i in empty[:3]
        )
        raise InputDataError(
            f"{where}: {empty.size:,} of {counts.shape[0]:,} cells have no counts at all (e.g. "
            f"{shown}); remove empty cells first, e.g. sc.pp.filter_cells(adata, min_counts=1)"
        )


def extract_annotations(
    obs: pd.DataFrame,
    var: pd.DataFrame,
    *,
    source: str,
    batch_key: str,
    label_keys: Sequence[str] = (),
    gene_key: str | None = None,
) -> tuple[list[str], NDArray[np.str_], dict[str, NDArray[np.object_]]]:
    """Validated gene names, batches and labels (as in :class:`CellTable`) from ``obs`` and
    ``var``; ``obs`` needs only the batch and label columns."""
    require_obs_columns(obs.columns, source=source, batch_key=batch_key, label_keys=label_keys)
    batches = _batch_column(obs, batch_key, source)
    labels = {key: _label_column(obs, key) for key in label_keys}
    return _gene_names(var, gene_key, source), batches, labels


def require_obs_columns(
    columns: Sequence[str], *, source: str, batch_key: str, label_keys: Sequence[str] = ()
) -> None:
    """Refuse a batch or label key that is not an obs column, listing the columns there are."""
    for key, option in [(batch_key, "--batch-key"), *((k, "--label-key") for k in label_keys)]:
        if key not in columns:
            raise InputDataError(
                f"{source}: no obs column {key!r} for {option}; columns: {_listing(columns)}"
            )


def condition_name(site_id: str, batch: str) -> str:
    """Globally unique condition name of a site's batch."""
    return f"{site_id}/{batch}"


def label_targets(labels: NDArray[np.object_], vocab: Sequence[str]) -> NDArray[np.int64]:
    """Index of each cell's label in ``vocab`` (-1 for unlabelled or absent labels)."""
    index = {label: i for i, label in enumerate(vocab)}
    return np.asarray([index.get(str(v), -1) for v in labels], dtype=np.int64)


def _batch_column(obs: pd.DataFrame, key: str, source: str) -> NDArray[np.str_]:
    column = obs[key]
    missing = column.isna().to_numpy()
    if missing.any():
        cells = ", ".join(map(str, obs.index[missing][:3]))
        raise InputDataError(
            f"{source}: obs[{key!r}] has no batch for {int(missing.sum())} of {len(obs)} cells "
            f"(e.g. {cells}); give every cell a batch or remove those cells"
        )
    values = column.astype(str).to_numpy()
    if np.any(values == ""):
        raise InputDataError(f"{source}: obs[{key!r}] contains empty batch names")
    return values.astype(np.str_)


def _label_column(obs: pd.DataFrame, key: str) -> NDArray[np.object_]:
    column = obs[key]
    values = column.astype(object).where(column.notna(), UNLABELED).astype(str).to_numpy()
    return values.astype(object)


def _gene_names(var: pd.DataFrame, gene_key: str | None, source: str) -> list[str]:
    if gene_key is None:
        return [str(g) for g in var.index]
    if gene_key not in var.columns:
        raise InputDataError(
            f"{source}: no var column {gene_key!r} for --gene-key; columns: {_listing(var.columns)}"
        )
    return [str(g) for g in var[gene_key].astype(str)]


def _listing(names: object) -> str:
    items = [str(n) for n in names]  # type: ignore[attr-defined]
    return ", ".join(items) if items else "(none)"
