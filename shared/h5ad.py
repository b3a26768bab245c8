"""Reading and writing ``.h5ad`` files with clear errors and atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import anndata as ad
import h5py

from fedatlas.shared.errors import InputDataError


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Load an ``.h5ad`` file fully into memory, refusing missing, non-HDF5 or broken files."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InputDataError(f"{path}: not an HDF5 file; an AnnData .h5ad file is expected")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise InputDataError(
            f"{path}: cannot be read as .h5ad ({type(exc).__name__}: {exc}); the file may be "
            "truncated or was not written by AnnData"
        ) from None


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    """Write ``adata`` to ``path`` atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
