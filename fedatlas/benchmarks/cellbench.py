"""Loader for the real CellBench cell-line mixture data (Tian et al., Nature Methods 2019).

Each file stem is one batch ("site"): ``STEM.count.csv.gz`` holds raw UMI counts (genes × cells,
first column the gene id) and ``STEM.metadata.csv.gz`` one row per cell. Only demuxlet singlets
are kept; their cell-line labels are genotype-based ground truth. See ``../shared/data/README.md``.

Parsed stems are cached in-process (callers get copies) and on disk as ``.h5ad`` under
``$XDG_CACHE_HOME/fedatlas`` (default ``~/.cache/fedatlas``), keyed by the source files' path, size
and mtime; set ``FEDATLAS_DISK_CACHE=0`` to turn the disk cache off.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from fedatlas.shared.errors import ConfigError, InputDataError

__all__ = [
    "EXPECTED_SINGLETS",
    "PROTOCOLS",
    "QUERY_STEMS",
    "REFERENCE_STEMS",
    "SCENARIOS",
    "STEMS",
    "UNSEEN_IN_S2",
    "Scenario",
    "default_cellbench_dir",
    "find_cellbench_dir",
    "load_scenario",
    "load_stem",
]

STEMS: tuple[str, ...] = (
    "sc_celseq2",
    "sc_dropseq",
    "sc_celseq2_5cl_p1",
    "sc_celseq2_5cl_p2",
    "sc_celseq2_5cl_p3",
)
REFERENCE_STEMS: tuple[str, ...] = ("sc_celseq2", "sc_dropseq", "sc_celseq2_5cl_p1")
QUERY_STEMS: tuple[str, ...] = ("sc_celseq2_5cl_p2", "sc_celseq2_5cl_p3")
UNSEEN_IN_S2: frozenset[str] = frozenset({"A549", "H838"})
SCENARIOS: tuple[str, ...] = ("S1", "S2")

#: Sequencing protocol of each stem (the README's table).
PROTOCOLS: dict[str, str] = {
    "sc_celseq2": "CEL-seq2",
    "sc_dropseq": "Drop-seq",
    "sc_celseq2_5cl_p1": "CEL-seq2",
    "sc_celseq2_5cl_p2": "CEL-seq2",
    "sc_celseq2_5cl_p3": "CEL-seq2",
}
#: Metadata column holding the cell-line label of each stem (the README's table).
_LABEL_COLUMN: dict[str, str] = {
    "sc_celseq2": "cell_line",
    "sc_dropseq": "cell_line",
    "sc_celseq2_5cl_p1": "cell_line_demuxlet",
    "sc_celseq2_5cl_p2": "cell_line_demuxlet",
    "sc_celseq2_5cl_p3": "cell_line_demuxlet",
}
#: Singlets per stem in the published files (for checks and reports; not enforced by the loader).
EXPECTED_SINGLETS: dict[str, int] = {
    "sc_celseq2": 240,
    "sc_dropseq": 210,
    "sc_celseq2_5cl_p1": 156,
    "sc_celseq2_5cl_p2": 163,
    "sc_celseq2_5cl_p3": 252,
}

_ENV_DIR = "FEDATLAS_CELLBENCH"
_ENV_DISK_CACHE = "FEDATLAS_DISK_CACHE"
_SPIKE_IN_PREFIX = "ERCC-"
# Bump when the processed form of a stem changes, so stale disk-cache entries are not reused.
_CACHE_FORMAT = 1


def _count_path(data_dir: Path, stem: str) -> Path:
    return data_dir / f"{stem}.count.csv.gz"


def _metadata_path(data_dir: Path, stem: str) -> Path:
    return data_dir / f"{stem}.metadata.csv.gz"


def default_cellbench_dir() -> Path:
    """Where the CellBench files are looked for: ``$FEDATLAS_CELLBENCH`` if set, else
    ``<repository root>/../shared/data/cellbench``. The directory may not exist."""
    env = os.environ.get(_ENV_DIR)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "cellbench"


def find_cellbench_dir() -> Path | None:
    """The CellBench directory (see `default_cellbench_dir`), or None when it or any of its ten
    files is absent."""
    data_dir = default_cellbench_dir()
    if not data_dir.is_dir():
        return None
    for stem in STEMS:
        if not (_count_path(data_dir, stem).is_file() and _metadata_path(data_dir, stem).is_file()):
            return None
    return data_dir


# ----------------------------------------------------------------------------------------- parsing


def _check_stem(stem: str) -> None:
    if stem not in STEMS:
        raise ConfigError(f"unknown CellBench stem {stem!r}; expected one of {', '.join(STEMS)}")


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputDataError(f"CellBench {what} file is missing: {path}")
    try:
        # The first column is the row name; its header cell is empty or (R's write.csv without
        # row-name header) absent. pandas handles both with index_col=0.
        df = pd.read_csv(path, index_col=0)
    except (
        OSError,
        EOFError,
        UnicodeDecodeError,
        zlib.error,
        gzip.BadGzipFile,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
    ) as exc:
        raise InputDataError(
            f"{path}: cannot be read as a gzip-compressed CSV file ({exc})"
        ) from exc
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputDataError(f"{path}: the {what} table is empty (shape {df.shape})")
    return df


def _first(values: pd.Index | np.ndarray, n: int = 3) -> str:
    items = [str(v) for v in list(values)[:n]]
    return ", ".join(items) + (", ..." if len(values) > n else "")


def _parse_stem(data_dir: Path, stem: str, keep_spike_ins: bool) -> anndata.AnnData:
    count_path = _count_path(data_dir, stem)
    meta_path = _metadata_path(data_dir, stem)
    # Check both files exist before spending time on parsing either.
    for path, what in ((count_path, "count"), (meta_path, "metadata")):
        if not path.is_file():
            raise InputDataError(f"CellBench {what} file is missing: {path}")
    meta = _read_csv(meta_path, "metadata")
    counts = _read_csv(count_path, "count")

    # --- metadata
    label_col = _LABEL_COLUMN[stem]
    for col in ("demuxlet_cls", label_col):
        if col not in meta.columns:
            raise InputDataError(
                f"{meta_path}: column {col!r} is missing (found: {_first(meta.columns, 20)})"
            )
    meta.index = meta.index.astype(str)
    if not meta.index.is_unique:
        dup = meta.index[meta.index.duplicated()]
        raise InputDataError(f"{meta_path}: duplicated cell barcodes ({_first(dup)})")

    # --- counts
    counts.index = counts.index.astype(str)
    counts.columns = counts.columns.astype(str)
    if not counts.index.is_unique:
        dup = counts.index[counts.index.duplicated()]
        raise InputDataError(f"{count_path}: duplicated gene ids ({_first(dup)})")
    if not counts.columns.is_unique:
        dup = counts.columns[counts.columns.duplicated()]
        raise InputDataError(f"{count_path}: duplicated cell barcodes ({_first(dup)})")
    non_numeric = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if non_numeric:
        raise InputDataError(
            f"{count_path}: non-numeric values in the columns of cells {_first(non_numeric)}; "
            "expected integer UMI counts"
        )

    # --- the two files must describe the same cells
    if len(meta.index) != len(counts.columns) or set(meta.index) != set(counts.columns):
        only_meta = meta.index.difference(counts.columns)
        only_counts = counts.columns.difference(meta.index)
        raise InputDataError(
            f"{stem}: metadata rows and count columns do not match "
            f"({len(meta.index)} metadata rows, {len(counts.columns)} count columns; "
            f"only in metadata: [{_first(only_meta)}], only in counts: [{_first(only_counts)}])"
        )

    singlets = meta.index[meta["demuxlet_cls"].astype(str) == "SNG"]
    if len(singlets) == 0:
        raise InputDataError(f"{meta_path}: no singlets (demuxlet_cls == 'SNG')")
    labels = meta.loc[singlets, label_col]
    if labels.isna().any():
        bad = labels.index[labels.isna()]
        raise InputDataError(f"{meta_path}: singlets without a {label_col!r} label ({_first(bad)})")

    genes = counts.index
    if not keep_spike_ins:
        genes = genes[~genes.str.startswith(_SPIKE_IN_PREFIX)]
    genes = genes.sort_values()  # deterministic gene order, independent of the file's row order
    values = counts.loc[genes, singlets].to_numpy(dtype=np.float64).T  # cells × genes
    if not np.isfinite(values).all():
        raise InputDataError(f"{count_path}: missing or non-finite counts")
    if (values < 0).any() or (values != np.round(values)).any():
        raise InputDataError(f"{count_path}: counts must be non-negative integers")

    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([stem] * len(singlets), categories=[stem]),
            "cell_line": pd.Categorical(labels.astype(str).to_numpy()),
            "protocol": pd.Categorical([PROTOCOLS[stem]] * len(singlets)),
        },
        index=pd.Index([f"{stem}:{b}" for b in singlets], dtype=object),
    )
    var = pd.DataFrame(index=pd.Index(genes.to_numpy(dtype=object), dtype=object))
    X = sp.csr_matrix(values.astype(np.float32))
    return anndata.AnnData(X=X, obs=obs, var=var)


# ------------------------------------------------------------------------------------------ caching


def _file_signature(data_dir: Path, stem: str) -> tuple[tuple[int, int], ...]:
    sig = []
    for path in (_count_path(data_dir, stem), _metadata_path(data_dir, stem)):
        try:
            st = path.stat()
        except OSError:
            return ()  # a file is missing: _parse_stem reports it
        sig.append((st.st_size, st.st_mtime_ns))
    return tuple(sig)


def _disk_cache_dir() -> Path | None:
    if os.environ.get(_ENV_DISK_CACHE, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root / "fedatlas"


def _disk_cache_path(
    cache_dir: Path,
    data_dir: Path,
    stem: str,
    signature: tuple[tuple[int, int], ...],
    keep_spike_ins: bool,
) -> Path:
    key_src = json.dumps(
        [_CACHE_FORMAT, str(data_dir), stem, keep_spike_ins, [list(s) for s in signature]]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    return cache_dir / f"{_disk_cache_prefix(stem, keep_spike_ins)}-{key}.h5ad"


def _disk_cache_prefix(stem: str, keep_spike_ins: bool) -> str:
    return f"cellbench-{stem}" + ("+ercc" if keep_spike_ins else "")


def _read_disk_cache(path: Path) -> anndata.AnnData | None:
    if not path.is_file():
        return None
    try:
        adata = anndata.read_h5ad(path)
    except Exception:  # a truncated or foreign file: ignore it and parse the CSVs again
        return None
    ok = (
        isinstance(adata.X, sp.csr_matrix)
        and adata.X.dtype == np.float32
        and all(c in adata.obs.columns for c in ("batch", "cell_line", "protocol"))
    )
    return adata if ok else None


def _write_disk_cache(path: Path, adata: anndata.AnnData, prefix: str) -> None:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
        tmp = None
        # Keep one entry per stem and variant: older ones (other data versions or directories) go.
        for old in path.parent.glob(f"{prefix}-*.h5ad"):
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
    except Exception:  # the cache is an optimisation: never fail a load because of it
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@functools.lru_cache(maxsize=32)
def _load_stem_cached(
    data_dir: Path, stem: str, signature: tuple[tuple[int, int], ...], keep_spike_ins: bool
) -> anndata.AnnData:
    cache_dir = _disk_cache_dir() if signature else None
    cache_path = (
        _disk_cache_path(cache_dir, data_dir, stem, signature, keep_spike_ins)
        if cache_dir is not None
        else None
    )
    if cache_path is not None:
        cached = _read_disk_cache(cache_path)
        if cached is not None:
            return cached
    adata = _parse_stem(data_dir, stem, keep_spike_ins)
    if cache_path is not None:
        _write_disk_cache(cache_path, adata, _disk_cache_prefix(stem, keep_spike_ins))
    return adata


def load_stem(data_dir: Path, stem: str, *, keep_spike_ins: bool = False) -> anndata.AnnData:
    """Load the singlets of one CellBench stem as an AnnData (cells × genes).

    ``X`` holds raw UMI counts (CSR, float32); ``var_names`` are the gene ids, sorted; ``obs_names``
    are ``"{stem}:{barcode}"``; ``obs`` has categorical ``batch`` (the stem), ``cell_line`` (the
    harmonised label) and ``protocol``. ERCC spike-in rows are dropped unless ``keep_spike_ins``.
    Raises `InputDataError` for missing or malformed files, `ConfigError` for an unknown stem.
    The result is a fresh copy: callers may modify it.
    """
    _check_stem(stem)
    data_dir = Path(data_dir).expanduser().resolve()
    signature = _file_signature(data_dir, stem)
    if not signature:
        _parse_stem(data_dir, stem, keep_spike_ins)  # raises InputDataError naming the file
    return _load_stem_cached(data_dir, stem, signature, keep_spike_ins).copy()


# ---------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True, eq=False)
class Scenario:
    """One standard CellBench mapping scenario: a reference and the query sites to map onto it."""

    name: str
    #: The reference stems concatenated; genes = union over the stems (sorted, zero-filled).
    reference: anndata.AnnData
    #: One AnnData per query stem, each with its own genes.
    queries: dict[str, anndata.AnnData]
    #: Cell lines present in the queries but absent from the reference (empty for S1).
    unseen_labels: frozenset[str] = field(default_factory=frozenset)


def _concat_union_genes(adatas: list[anndata.AnnData]) -> anndata.AnnData:
    """Stack cells of several AnnData; genes = sorted union, missing genes filled with zeros."""
    genes = pd.Index(sorted(set().union(*(a.var_names for a in adatas))), dtype=object)
    blocks = []
    for a in adatas:
        X = sp.csr_matrix(a.X)
        col_map = genes.get_indexer(a.var_names)
        # Each AnnData's genes are sorted and `genes` is sorted, so the map is increasing and the
        # column indices of every row stay sorted.
        remapped = sp.csr_matrix(
            (X.data, col_map[X.indices], X.indptr), shape=(a.n_obs, len(genes)), dtype=np.float32
        )
        remapped.sort_indices()
        blocks.append(remapped)
    X_all = sp.vstack(blocks, format="csr", dtype=np.float32)
    obs = pd.concat([a.obs for a in adatas])
    batch_order = list(dict.fromkeys(str(b) for a in adatas for b in a.obs["batch"].cat.categories))
    obs["batch"] = pd.Categorical(obs["batch"].astype(str), categories=batch_order)
    for col in ("cell_line", "protocol"):
        obs[col] = pd.Categorical(obs[col].astype(str))
    if not obs.index.is_unique:
        raise InputDataError("cell names repeat across the combined stems")
    return anndata.AnnData(X=X_all, obs=obs, var=pd.DataFrame(index=genes))


def load_scenario(data_dir: Path, name: str) -> Scenario:
    """Build a standard scenario from the README.

    ``"S1"``: reference = sc_celseq2 + sc_dropseq + sc_celseq2_5cl_p1, queries = plates 2 and 3.
    ``"S2"``: as S1, with A549 and H838 cells removed from the reference (``unseen_labels``).
    Raises `ConfigError` for an unknown name.
    """
    if name not in SCENARIOS:
        raise ConfigError(
            f"unknown CellBench scenario {name!r}; expected one of {', '.join(SCENARIOS)}"
        )
    reference = _concat_union_genes([load_stem(data_dir, s) for s in REFERENCE_STEMS])
    unseen: frozenset[str] = frozenset()
    if name == "S2":
        unseen = UNSEEN_IN_S2
        keep = ~reference.obs["cell_line"].isin(unseen).to_numpy()
        reference = reference[keep].copy()
        reference.obs["cell_line"] = reference.obs["cell_line"].cat.remove_unused_categories()
    queries = {s: load_stem(data_dir, s) for s in QUERY_STEMS}
    return Scenario(name=name, reference=reference, queries=queries, unseen_labels=unseen)
