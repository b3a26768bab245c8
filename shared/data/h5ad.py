"""Reading and writing ``.h5ad`` files with clear errors and atomic writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from fedatlas.shared.errors import InputDataError


def _require_hdf5(path: Path) -> None:
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InputDataError(f"{path}: not an HDF5 file; an AnnData .h5ad file is expected")


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Load an ``.h5ad`` file fully into memory, refusing missing, non-HDF5 or broken files."""
    path = Path(path)
    _require_hdf5(path)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise InputDataError(
            f"{path}: cannot be read as .h5ad ({type(exc).__name__}: {exc}); the file may be "
            "truncated or was not written by AnnData"
        ) from None


def open_h5ad(path: str | Path) -> h5py.File:
    """Open an ``.h5ad`` file for reading with h5py (nothing is loaded), refusing missing or
    non-HDF5 files and files HDF5 cannot open."""
    path = Path(path)
    _require_hdf5(path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputDataError(
            f"{path}: cannot be read as .h5ad (OSError: {exc}); the file may be truncated or "
            "damaged"
        ) from None


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """Write ``adata`` to ``path`` atomically (readers see the old file or the whole new one)."""
    with replacing(path) as tmp:
        adata.write_h5ad(tmp)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (created at once, so an unwritable place fails before
    any work) that replaces ``path`` when the body completes and is removed if it fails."""
    path = Path(path)
    if path.is_dir():
        raise InputDataError(f"{path}: is a folder; give the output a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputDataError(f"{path}: cannot write the output here ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_h5ad_blocks(path: str | Path, blocks: Iterable[ad.AnnData]) -> None:
    """Write the cells of ``blocks`` (AnnData with the same var and a sparse or dense X), one
    after the other, to ``path`` atomically, holding one block's matrix at a time: X (CSR) is
    appended to resizable datasets, obs gathered (it is small) and written at the end with var
    and the first block's uns."""
    remaining = iter(blocks)
    first = next(remaining, None)
    if first is None:
        raise ValueError("no blocks to write")
    obs_parts: list[pd.DataFrame] = []
    indptr = [np.zeros(1, dtype=np.int64)]
    with replacing(path) as tmp, h5py.File(tmp, "w") as file:
        x = file.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        data, indices = (
            x.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(1 << 20,))
            for name, dtype in (("data", first.X.dtype), ("indices", np.int32))
        )
        for block in itertools.chain([first], remaining):
            if not block.var_names.equals(first.var_names):
                raise ValueError("blocks have different var_names")
            matrix = sp.csr_matrix(block.X)
            start = data.shape[0]
            for dataset, values in ((data, matrix.data), (indices, matrix.indices)):
                dataset.resize((start + values.size,))
                dataset[start:] = values
            indptr.append(start + matrix.indptr[1:].astype(np.int64))
            obs_parts.append(block.obs)
        x.create_dataset("indptr", data=np.concatenate(indptr))
        x.attrs["shape"] = (sum(len(o) for o in obs_parts), first.n_vars)
        write_elem(file, "obs", pd.concat(obs_parts))
        write_elem(file, "var", first.var)
        write_elem(file, "uns", dict(first.uns))
        for name in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(file, name, {})
        file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
