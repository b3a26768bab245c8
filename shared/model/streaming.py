"""Mapping a large ``.h5ad`` file in bounded memory (``fedatlas site map`` above a size).

The file is never loaded whole. The batch and label columns of obs and the var table are read
with anndata's element reader; the count matrix (X or a layer, stored as CSR or dense; not CSC)
through h5py, ``chunk_cells`` rows at a time. Each chunk is checked like a loaded matrix,
aligned to the release's genes and projected with the encoder.

When the site has new batches, a first pass draws the adaptor's training cells: every cell of
the new batches when they are at most ``train_cells``, else ``train_cells`` of them at random,
shared equally among the new batches (a batch with fewer cells than its share gives all of
them). The same pass finds the per-batch MaxAbs scales for the SCALEX recipe. The second pass
projects every cell; labels are then transferred from the latent means as in memory.

The output is a copy of the input file, written under a temporary name beside OUT, to which
the annotations are added in place (:func:`~fedatlas.shared.model.annotations.annotate_file`): X,
layers and every other entry are copied byte for byte, never decoded. It replaces OUT only when
complete, so a failure leaves no partial OUT. Memory holds one chunk (its dense encoder input
4,096 cells at a time), the training sample and, per cell, what the output holds (latent,
label, uncertainty) plus the cell's condition and given labels.

When the training sample is every cell of the new batches, the results equal those of
:func:`~fedatlas.shared.model.mapping.map_cells` up to float rounding.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem
from numpy.typing import NDArray

from fedatlas.shared.config import TransferMethod
from fedatlas.shared.data.dataset import extract_annotations, require_obs_columns
from fedatlas.shared.data.genes import DEFAULT_MIN_GENE_OVERLAP
from fedatlas.shared.data.h5ad import open_h5ad, replacing
from fedatlas.shared.data.preprocessing import as_count_matrix, maxabs_maxima
from fedatlas.shared.errors import ConfigError, InputDataError
from fedatlas.shared.model.annotations import annotate_file
from fedatlas.shared.model.mapping import (
    DEFAULT_MIN_PROTOTYPE_CELLS,
    DEFAULT_SITE,
    MappingPlan,
    MappingResult,
    finish_mapping,
    plan_mapping,
    train_adaptor,
)
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.training import TrainingData, estimate_dsbn_statistics, latent_means
from fedatlas.shared.progress import Progress

DEFAULT_CHUNK_CELLS = 10_000
DEFAULT_TRAIN_CELLS = 50_000
# `site map` streams a count matrix with more stored values than this (loaded, about 0.8 GB as
# float32 values and int32 column indices, and a few times that while mapping).
STREAM_ABOVE_VALUES = 100_000_000

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
                return as_count_matrix(self.element[start:stop], where)
            matrix = self._csr_rows(start, stop, where)
        except (OSError, KeyError) as exc:
            raise InputDataError(
                f"{where}: cannot be read ({exc}); the file may be damaged or truncated"
            ) from None
        return as_count_matrix(matrix, where)

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


def chunk_cells_for(path: Path, layer: str | None, requested: int | None) -> int:
    """Cells per chunk for mapping ``path``, 0 meaning "load it whole": ``requested`` when
    given, else :data:`DEFAULT_CHUNK_CELLS` above :data:`STREAM_ABOVE_VALUES` stored values."""
    if requested is not None:
        if requested < 0:
            raise ConfigError(
                f"--chunk-size must be >= 0 (0 loads the file whole), got {requested}"
            )
        return requested
    return DEFAULT_CHUNK_CELLS if stored_values(path, layer) > STREAM_ABOVE_VALUES else 0


def read_annotations(
    path: Path, *, batch_key: str, label_keys: Sequence[str] = (), gene_key: str | None = None
) -> Annotations:
    """Gene names, batches and labels of the ``.h5ad`` file ``path`` (checked as
    :func:`~fedatlas.shared.data.dataset.extract_cells` checks them), reading only those columns."""
    with open_h5ad(path) as file:
        return _annotations(file, str(path), batch_key, label_keys, gene_key)


def map_h5ad(
    release: Release,
    data: Path,
    out: Path,
    *,
    batch_key: str,
    label_keys: Sequence[str] = (),
    layer: str | None = None,
    gene_key: str | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    train_cells: int = DEFAULT_TRAIN_CELLS,
    site_id: str = DEFAULT_SITE,
    epochs: int | None = None,
    seed: int = 0,
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    transfer: TransferMethod | None = None,
    unknown_threshold: float | None = None,
    min_prototype_cells: int = DEFAULT_MIN_PROTOTYPE_CELLS,
    progress: bool = True,
) -> MappingResult:
    """Map the cells of the ``.h5ad`` file ``data`` onto ``release`` in chunks and write the
    annotated copy to ``out`` (see the module docstring). Mapping options as for
    :func:`~fedatlas.shared.model.mapping.map_cells`."""
    if chunk_cells < 1 or train_cells < 1:
        raise ConfigError(
            f"streaming needs --chunk-size >= 1 and --train-cells >= 1, got {chunk_cells} and "
            f"{train_cells}"
        )
    source = str(data)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_h5ad(data) as file, replacing(out) as tmp:
        counts = CountMatrix(file, layer, source)
        genes, batches, labels = _annotations(file, source, batch_key, label_keys, gene_key)
        if batches.size != counts.n_cells:
            raise InputDataError(
                f"{source}: obs has {batches.size:,} cells but {counts.where} has "
                f"{counts.n_cells:,} rows; the file is inconsistent"
            )
        plan = plan_mapping(
            release, genes, batches, labels, site_id=site_id, epochs=epochs, seed=seed,
            min_gene_overlap=min_gene_overlap, transfer=transfer,
            unknown_threshold=unknown_threshold, min_prototype_cells=min_prototype_cells,
            source=source,
        )  # fmt: skip
        del batches, labels
        timings["prepare"] = time.perf_counter() - t0
        t_copy = time.perf_counter()
        shutil.copyfile(data, tmp)  # early: a full disk shows before the work, not after
        timings["copy"] = time.perf_counter() - t_copy

        t1 = time.perf_counter()
        scales, sample = _scan(plan, counts, chunk_cells, train_cells, progress)
        timings["scan"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        if sample is not None and plan.model.dsbn is not None and plan.new:
            sample_latent = latent_means(plan.model, sample, release.recipe)
            estimate_dsbn_statistics(plan.model, sample, release.recipe, sample_latent)
        fit_result = train_adaptor(plan, sample, progress=progress)
        timings["train"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        latent = _project(plan, counts, scales, chunk_cells, progress)
        timings["project"] = time.perf_counter() - t3
        n_fresh = int(np.count_nonzero(plan.conditions >= plan.n_known))
        sampled = sample.n_cells if sample is not None and sample.n_cells < n_fresh else None
        result = finish_mapping(plan, latent, fit_result, timings, sampled_cells=sampled)
        annotate_file(tmp, result)
    return result


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


def _annotations(
    file: h5py.File,
    source: str,
    batch_key: str,
    label_keys: Sequence[str],
    gene_key: str | None,
) -> Annotations:
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


def _chunks(
    plan: MappingPlan, counts: CountMatrix, chunk_cells: int, reporter: Progress
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """``(start, stop, counts in release gene order)`` for every chunk, reporting progress."""
    for start in range(0, counts.n_cells, chunk_cells):
        stop = min(start + chunk_cells, counts.n_cells)
        yield start, stop, plan.alignment.apply(counts.rows(start, stop))
        reporter.advance(stop - start)
    reporter.finish()


def _scan(
    plan: MappingPlan, counts: CountMatrix, chunk_cells: int, train_cells: int, progress: bool
) -> tuple[NDArray[np.float32] | None, TrainingData | None]:
    """First pass, when needed: the MaxAbs scales of all cells (SCALEX recipe) and the
    adaptor's training cells (when the site has new batches to train or estimate)."""
    recipe = plan.release.recipe
    maxabs = recipe.input_transform == "log_normalized_maxabs"
    needs_sample = bool(plan.new) and (plan.train.epochs > 0 or plan.model.dsbn is not None)
    if not maxabs and not needs_sample:
        return None, None
    rows = (
        training_rows(plan.conditions, plan.n_known, train_cells, plan.seed)
        if needs_sample
        else np.zeros(0, dtype=np.int64)
    )
    n_conditions = int(plan.conditions.max()) + 1
    maxima = (
        np.zeros((n_conditions, plan.alignment.n_release_genes), dtype=np.float32)
        if maxabs
        else None
    )
    pieces = []
    what = f"reading the training sample ({rows.size:,} cells)" if rows.size else "reading"
    reporter = Progress(what, counts.n_cells, "cell", enabled=progress, rate=True)
    for start, stop, block in _chunks(plan, counts, chunk_cells, reporter):
        if maxima is not None:
            conditions = plan.conditions[start:stop]
            maxabs_maxima(block, conditions, n_conditions, recipe.target_sum, out=maxima)
        first, last = np.searchsorted(rows, [start, stop])
        if last > first:
            pieces.append(block[rows[first:last] - start])
    scales = None
    if maxima is not None:
        maxima[maxima <= 0] = 1.0  # as maxabs_scales: 1 where a gene is absent
        scales = maxima
    if not rows.size:
        return scales, None
    conditions = plan.conditions[rows]
    sample = TrainingData(
        sp.vstack(pieces, format="csr"),
        conditions,
        plan.targets(rows),
        scales,
        None if scales is None else conditions,
    )
    return scales, sample


def _project(
    plan: MappingPlan,
    counts: CountMatrix,
    scales: NDArray[np.float32] | None,
    chunk_cells: int,
    progress: bool,
) -> NDArray[np.float32]:
    """Latent means of every cell, chunk by chunk."""
    latent = np.empty((counts.n_cells, plan.model.config.latent_dim), dtype=np.float32)
    reporter = Progress("mapping", counts.n_cells, "cell", enabled=progress, rate=True)
    for start, stop, block in _chunks(plan, counts, chunk_cells, reporter):
        conditions = plan.conditions[start:stop]
        data = TrainingData(block, conditions, [], scales, None if scales is None else conditions)
        latent[start:stop] = latent_means(plan.model, data, plan.release.recipe)
    return latent


def training_rows(
    conditions: NDArray[np.int64], n_known: int, cap: int, seed: int
) -> NDArray[np.int64]:
    """Rows (ascending) the adaptor trains on: every cell of a new condition (index at least
    ``n_known``) when there are at most ``cap``, else ``cap`` of them at random, shared
    equally among the new conditions (one with fewer cells than its share gives all of them and
    the rest goes to the others)."""
    fresh = np.flatnonzero(conditions >= n_known)
    if fresh.size <= cap:
        return fresh
    rng = np.random.default_rng(seed)
    groups = [fresh[conditions[fresh] == c] for c in np.unique(conditions[fresh])]
    left, quotas = cap, dict[int, int]()
    for k, i in enumerate(sorted(range(len(groups)), key=lambda i: groups[i].size)):
        quotas[i] = min(groups[i].size, left // (len(groups) - k))
        left -= quotas[i]
    chosen = [rng.choice(group, quotas[i], replace=False) for i, group in enumerate(groups)]
    return np.sort(np.concatenate(chosen))
