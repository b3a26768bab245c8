"""Reading a large ``.h5ad`` file a block of cells at a time, without loading it.

The batch and label columns of obs and the var table are read with anndata's element reader;
the count matrix (X or a layer, stored as CSR or dense; not CSC) through h5py, a block of rows
at a time, each checked like a loaded matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem
from numpy.typing import NDArray

from fedatlas.shared.data.dataset import (
    extract_annotations,
    refuse_empty_cells,
    require_obs_columns,
)
from fedatlas.shared.data.h5ad import open_h5ad
from fedatlas.shared.data.preprocessing import as_count_matrix
from fedatlas.shared.errors import InputDataError

Annotations = tuple[list[str], NDArray[np.str_], dict[str, NDArray[np.object_]]]


class CountMatrix:
    """The count matrix (X or a layer) of an open ``.h5ad`` file, read a block of rows at a
    time; nothing is loaded until :meth:`rows` is called."""

    def __init__(self, file: h5py.File, layer: str | None, source: str) -> None:
        self.element, self.where = _locate(file, layer, source)
        self.source = source
        if isinstance(self.element, h5py.Dataset):
            self.n_cells, self.n_genes = (int(n) for n in self.element.shape)
            return
        encoding = str(self.element.attrs.get("encoding-type", ""))
        if encoding != "csr_matrix":
            raise InputDataError(
                f"{source}: {self.where} is stored as {encoding or 'an unknown encoding'}; "
                "reading it in chunks needs rows (CSR or dense): save it with "
                "adata.X = adata.X.tocsr() (or the layer likewise), or pass --chunk-size 0 to "
                "load the file whole"
            )
        self.n_cells, self.n_genes = (int(n) for n in self.element.attrs["shape"])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as checked counts (CSR float32, as
        :func:`~fedatlas.shared.data.preprocessing.as_count_matrix` gives them)."""
        where = f"{self.source} ({self.where}, cells {start:,}-{stop - 1:,})"
        try:
            if isinstance(self.element, h5py.Dataset):
                matrix = self.element[start:stop]
            else:
                matrix = self._csr_rows(start, stop, where)
        except (OSError, KeyError) as exc:
            raise InputDataError(
                f"{where}: cannot be read ({exc}); the file may be damaged or truncated"
            ) from None
        counts = as_count_matrix(matrix, where)
        refuse_empty_cells(counts, where, first_row=start)
        return counts

    def _csr_rows(self, start: int, stop: int, where: str) -> sp.csr_matrix:
        group = self.element
        indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
        first, last = int(indptr[0]), int(indptr[-1])
        if (np.diff(indptr) < 0).any() or first < 0 or last > group["data"].shape[0]:
            raise InputDataError(f"{where}: damaged row pointers (indptr); re-save the file")
        indices = group["indices"][first:last]
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_genes):
            raise InputDataError(
                f"{where}: column indices outside 0-{self.n_genes - 1}; the file is damaged"
            )
        offsets = (indptr - first).astype(indices.dtype if last - first < 2**31 else np.int64)
        return sp.csr_matrix(
            (group["data"][first:last], indices, offsets), shape=(stop - start, self.n_genes)
        )


def stored_values(path: Path, layer: str | None) -> int:
    """Values the count matrix of the ``.h5ad`` file ``path`` stores (non-zeros if sparse)."""
    with open_h5ad(path) as file:
        element, where = _locate(file, layer, str(path))
        if isinstance(element, h5py.Dataset):
            return int(element.size)
        data = element.get("data")
        if not isinstance(data, h5py.Dataset):
            raise InputDataError(f"{path}: {where} is not a count matrix (no values stored)")
        return int(data.shape[0])


def read_annotations(
    path: Path, *, batch_key: str, label_keys: Sequence[str] = (), gene_key: str | None = None
) -> Annotations:
    """Gene names, batches and labels of the ``.h5ad`` file ``path`` (checked as
    :func:`~fedatlas.shared.data.dataset.extract_cells` checks them), reading only those columns."""
    with open_h5ad(path) as file:
        return file_annotations(file, str(path), batch_key, label_keys, gene_key)


def _locate(
    file: h5py.File, layer: str | None, source: str
) -> tuple[h5py.Group | h5py.Dataset, str]:
    """The count matrix's element and a readable name for it."""
    if layer is None:
        if "X" not in file:
            raise InputDataError(f"{source}: X is empty; pass --layer NAME with the raw counts")
        return file["X"], "X"
    layers = file.get("layers", {})
    if layer not in layers:
        present = ", ".join(str(k) for k in layers) or "(none)"
        raise InputDataError(f"{source}: no layer {layer!r}; layers present: {present}")
    return layers[layer], f"layer {layer!r}"


def file_annotations(
    file: h5py.File,
    source: str,
    batch_key: str,
    label_keys: Sequence[str],
    gene_key: str | None,
) -> Annotations:
    """:func:`read_annotations` of an open file."""
    obs = file.get("obs")
    if not isinstance(obs, h5py.Group) or obs.attrs.get("encoding-type") != "dataframe":
        raise InputDataError(
            f"{source}: obs is not stored as an AnnData dataframe (a file written by anndata "
            "older than 0.8, or not by anndata); re-save it with a current anndata, or pass "
            "--chunk-size 0 to load it whole"
        )
    columns = [str(c) for c in obs.attrs["column-order"]]
    require_obs_columns(columns, source=source, batch_key=batch_key, label_keys=label_keys)
    keys = dict.fromkeys([batch_key, *label_keys])
    frame = pd.DataFrame({key: read_elem(obs[key]) for key in keys})
    return extract_annotations(
        frame, read_elem(file["var"]), source=source, batch_key=batch_key,
        label_keys=label_keys, gene_key=gene_key,
    )  # fmt: skip
