"""Mapping a large ``.h5ad`` file in bounded memory (``site map`` above a size, or any file
with a chunk size; a campaign's or federated build's site likewise).

The file is never loaded whole (:mod:`fedatlas.shared.data.chunked` reads its annotations and
``chunk_cells`` rows of its count matrix at a time). Each chunk is aligned to the release's
genes and projected with the encoder.

When the site has new batches, a first pass draws the adaptor's training cells: every cell of
the new batches when they are at most ``train_cells``, else ``train_cells`` of them at random,
shared equally among the new batches (a batch with fewer cells than its share gives all of
them). The same pass finds the per-batch MaxAbs scales for the SCALEX recipe. The second pass
projects every cell; labels are then transferred from the latent means as in memory.

The output, when asked for, is a copy of the input file, written under a temporary name beside
OUT, to which the annotations are added in place
(:func:`~fedatlas.shared.model.annotations.annotate_file`): X, layers and every other entry are
copied byte for byte, never decoded. It replaces OUT only when complete, so a failure leaves no
partial OUT. Memory holds one chunk (its dense encoder input
4,096 cells at a time), the training sample and, per cell, what the output holds (latent,
label, uncertainty) plus the cell's condition and given labels.

When the training sample is every cell of the new batches, the results equal those of
:func:`~fedatlas.shared.model.mapping.map_onto` up to float rounding.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from torch import Tensor

from fedatlas.shared.data.chunked import CountMatrix, file_annotations, stored_values
from fedatlas.shared.data.dataset import DataSource
from fedatlas.shared.data.h5ad import open_h5ad, replacing
from fedatlas.shared.data.preprocessing import maxabs_maxima
from fedatlas.shared.errors import ConfigError, InputDataError
from fedatlas.shared.model.annotations import annotate_file
from fedatlas.shared.model.mapping import (
    MappingOptions,
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
# `site map` streams a count matrix with more stored values than this (loaded, about 0.8 GB as
# float32 values and int32 column indices, and a few times that while mapping).
STREAM_ABOVE_VALUES = 100_000_000


def chunk_cells_for(path: Path, layer: str | None, requested: int | None) -> int:
    """Cells per chunk for mapping ``path``, 0 meaning "load it whole": ``requested`` when
    given (:attr:`MappingOptions.chunk_size`), else :data:`DEFAULT_CHUNK_CELLS` above
    :data:`STREAM_ABOVE_VALUES` stored values."""
    if requested is not None:
        return requested
    return DEFAULT_CHUNK_CELLS if stored_values(path, layer) > STREAM_ABOVE_VALUES else 0


def map_h5ad(
    release: Release,
    source: DataSource,
    options: MappingOptions,
    *,
    out: Path | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    initial_rows: Mapping[str, Tensor] | None = None,
    progress: bool = True,
) -> MappingResult:
    """Map the cells of ``source``'s file onto ``release``, ``chunk_cells`` at a time, and write
    the annotated copy to ``out`` when given (see the module docstring). ``initial_rows`` as
    for :func:`~fedatlas.shared.model.mapping.map_onto`."""
    if chunk_cells < 1:
        raise ConfigError(f"reading in chunks needs a chunk size >= 1, got {chunk_cells}")
    where = str(source.path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_h5ad(source.path) as file, _output_copy(out) as tmp:
        counts = CountMatrix(file, source.layer, where)
        if counts.n_cells == 0:
            raise InputDataError(f"{where}: contains no cells")
        genes, batches, labels = file_annotations(
            file, where, source.batch_key, source.label_keys, source.gene_key
        )
        if batches.size != counts.n_cells:
            raise InputDataError(
                f"{where}: obs has {batches.size:,} cells but {counts.where} has "
                f"{counts.n_cells:,} rows; the file is inconsistent"
            )
        plan = plan_mapping(
            release, genes, batches, labels, options, initial_rows=initial_rows, source=where
        )
        del batches, labels
        timings["prepare"] = time.perf_counter() - t0
        if tmp is not None:
            t_copy = time.perf_counter()
            shutil.copyfile(source.path, tmp)  # early: a full disk shows before the work
            timings["copy"] = time.perf_counter() - t_copy

        t1 = time.perf_counter()
        scales, sample = _scan(plan, counts, chunk_cells, options.train_cells, progress)
        timings["scan"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        if sample is not None and plan.model.dsbn is not None and plan.new:
            sample_latent = latent_means(plan.model, sample, release.recipe)
            estimate_dsbn_statistics(
                plan.model, sample, release.recipe, sample_latent, plan.statistics_noise()
            )
        fit_result = train_adaptor(
            plan, sample, progress=progress, sample_cells=options.train_cells
        )
        timings["train"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        latent = _project(plan, counts, scales, chunk_cells, progress)
        timings["project"] = time.perf_counter() - t3
        n_fresh = int(np.count_nonzero(plan.conditions >= plan.n_known))
        sampled = sample.n_cells if sample is not None and sample.n_cells < n_fresh else None
        result = finish_mapping(plan, latent, fit_result, timings, sampled_cells=sampled)
        if tmp is not None:
            annotate_file(tmp, result)
    return result


def _output_copy(out: Path | None) -> contextlib.AbstractContextManager[Path | None]:
    """The temporary file that becomes ``out`` when complete (:func:`replacing`); nothing when
    no output is wanted."""
    return replacing(out) if out is not None else contextlib.nullcontext()


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
