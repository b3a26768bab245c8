"""The preprocessing recipe: count checks, gene selection and the model's input transform.

The same functions run when a reference is built and when a site maps its cells, driven by the
:class:`~fedatlas.shared.config.PreprocessingRecipe` stored in the release, so every site
preprocesses exactly like the reference did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedatlas.shared.config import PreprocessingRecipe
from fedatlas.shared.errors import InputDataError

log = logging.getLogger(__name__)

N_DISPERSION_BINS = 20


def as_count_matrix(matrix: object, source: str) -> sp.csr_matrix:
    """Return raw counts as CSR float32, refusing anything that is not a count matrix.

    ``source`` names where the matrix came from (file and layer) for error messages. Dense and
    sparse inputs are accepted; float values are fine as long as they are whole numbers.
    """
    if sp.issparse(matrix):
        original = sp.csr_matrix(matrix)
    else:
        dense = np.asarray(matrix)
        if dense.ndim != 2:
            raise InputDataError(f"{source}: expected a 2-D matrix of counts")
        original = sp.csr_matrix(dense)
    if not np.issubdtype(original.dtype, np.number) or np.issubdtype(
        original.dtype, np.complexfloating
    ):
        raise InputDataError(f"{source}: expected numeric counts, found {original.dtype}")
    _check_count_values(original.data, source)  # before any cast, in the file's own precision
    csr = original.astype(np.float32, copy=False)
    csr.sort_indices()
    return csr


def _check_count_values(values: NDArray[Any], source: str, chunk: int = 1 << 22) -> None:
    """Refuse non-finite, negative or fractional values (checked in chunks to bound memory)."""
    n_bad_finite = n_negative = n_fractional = 0
    minimum, example = 0.0, 0.0
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        n_bad_finite += int(np.count_nonzero(~np.isfinite(part)))
        negative = part < 0
        if negative.any():
            n_negative += int(negative.sum())
            minimum = min(minimum, float(part.min()))
        fractional = part != np.round(part)
        if fractional.any():
            if not n_fractional:
                example = float(part[np.argmax(fractional)])
            n_fractional += int(fractional.sum())
    if n_bad_finite:
        raise InputDataError(f"{source}: contains NaN or infinite values; raw counts expected")
    if n_negative:
        raise InputDataError(
            f"{source}: {n_negative} negative values (minimum {minimum:g}); raw counts are "
            "expected (pass --layer NAME if the counts are in a layer)"
        )
    if n_fractional:
        raise InputDataError(
            f"{source}: {n_fractional} non-integer values (e.g. {example:g}); this looks "
            "normalised or log-transformed, but raw counts are expected (pass --layer NAME if "
            "the counts are in a layer)"
        )


def library_sizes(counts: sp.csr_matrix) -> NDArray[np.float32]:
    """Total counts per cell (the observed library size)."""
    return np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()


def log_normalize(counts: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """log1p(counts / total * target_sum) per cell; cells without counts stay zero."""
    out = sp.csr_matrix(counts, copy=True)
    out.data = _log_normalized_values(counts, library_sizes(counts), target_sum)
    return out


def _per_entry(row_values: NDArray[Any], counts: sp.csr_matrix) -> NDArray[Any]:
    """``row_values`` (one per row) repeated for every stored entry of that row of ``counts``."""
    return np.repeat(row_values, np.diff(counts.indptr))


def _normalized_values(
    counts: sp.csr_matrix, library: NDArray[np.float32], target_sum: float
) -> NDArray[np.float32]:
    """count / library * target_sum of every stored entry (cells without counts: 0)."""
    factor = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    values = counts.data * _per_entry(factor.astype(np.float32), counts)
    return values.astype(np.float32, copy=False)


def _log_normalized_values(
    counts: sp.csr_matrix, library: NDArray[np.float32], target_sum: float
) -> NDArray[np.float32]:
    """log1p(count / library * target_sum) of every stored entry (cells without counts: 0)."""
    values = _normalized_values(counts, library, target_sum)
    return np.log1p(values, out=values)


@dataclass(frozen=True)
class GeneVotes:
    """What one holder of cells contributes to highly-variable-gene selection.

    Gene-level aggregates only (no cell's values): per gene, the number of cells it is detected
    in, and for every voting batch its normalised dispersion. A federated build collects one per
    site; a central build makes one for all its cells.
    """

    detected: NDArray[np.int64]  # cells with a nonzero count, per gene
    dispersions: NDArray[np.float64]  # voters x genes, normalised dispersion (NaN: undefined)


def gene_votes(
    counts: sp.csr_matrix, batches: NDArray[np.str_], recipe: PreprocessingRecipe
) -> GeneVotes:
    """Per-batch normalised dispersions of ``counts`` (see :func:`select_highly_variable_genes`).

    Batches with fewer than ``recipe.hvg_min_batch_cells`` cells do not vote; if none is large
    enough, all cells vote together.
    """
    detected = np.asarray((counts > 0).sum(axis=0)).ravel().astype(np.int64)
    lognorm = log_normalize(counts, recipe.target_sum)
    groups = [np.flatnonzero(batches == b) for b in np.unique(batches)]
    voters = [g for g in groups if g.size >= recipe.hvg_min_batch_cells] or [
        np.arange(counts.shape[0])
    ]
    dispersions = np.vstack([_normalized_dispersion(lognorm[rows]) for rows in voters])
    return GeneVotes(detected=detected, dispersions=dispersions)


def select_highly_variable_genes(
    counts: sp.csr_matrix, batches: NDArray[np.str_], recipe: PreprocessingRecipe
) -> NDArray[np.int64]:
    """Indices (ascending) of the recipe's highly variable genes.

    Dispersion-based selection (Seurat style): per batch, genes are binned by mean expression and
    their log dispersion is z-scored within the bin; a gene's rank is the number of batches in
    which it is among the top ``n_top_genes``, ties broken by its mean normalised dispersion.
    Batches with fewer than ``recipe.hvg_min_batch_cells`` cells do not vote (all cells vote
    together if no batch is large enough). Genes seen in fewer than
    ``recipe.min_cells_per_gene`` cells are never selected.
    """
    return combine_gene_votes([gene_votes(counts, batches, recipe)], recipe)


def combine_gene_votes(votes: list[GeneVotes], recipe: PreprocessingRecipe) -> NDArray[np.int64]:
    """The highly variable genes (ascending indices) elected by ``votes`` over the same genes."""
    detected = np.sum([v.detected for v in votes], axis=0)
    dispersions = np.vstack([v.dispersions for v in votes])
    n_genes = detected.size
    eligible = detected >= recipe.min_cells_per_gene
    n_eligible = int(eligible.sum())
    if n_eligible == 0:
        raise InputDataError(
            f"no gene is detected in at least {recipe.min_cells_per_gene} cells; cannot select "
            "highly variable genes"
        )
    n_top = min(recipe.n_top_genes, n_eligible)
    if n_top < recipe.n_top_genes:
        log.warning(
            "only %d genes are detected in >= %d cells; using all of them instead of %d",
            n_eligible,
            recipe.min_cells_per_gene,
            recipe.n_top_genes,
        )
    votes_per_gene = np.zeros(n_genes)
    for norm_disp in dispersions:
        ranked = np.where(eligible, np.nan_to_num(norm_disp, nan=-np.inf), -np.inf)
        votes_per_gene[np.argsort(-ranked, kind="stable")[:n_top]] += 1
    mean_norm = np.nan_to_num(dispersions, nan=0.0, neginf=0.0).sum(axis=0) / len(dispersions)
    order = np.lexsort((np.arange(n_genes), -mean_norm, -votes_per_gene))  # last key is primary
    order = order[eligible[order]][:n_top]
    return np.sort(order).astype(np.int64)


def _normalized_dispersion(lognorm: sp.csr_matrix) -> NDArray[np.float64]:
    """Per-gene log dispersion of expm1(lognorm), z-scored within bins of mean expression."""
    n = lognorm.shape[0]
    linear = sp.csr_matrix(lognorm, copy=True)
    linear.data = np.expm1(linear.data.astype(np.float64))
    mean = np.asarray(linear.sum(axis=0)).ravel() / n
    mean_sq = np.asarray(linear.multiply(linear).sum(axis=0)).ravel() / n
    var = (mean_sq - mean**2) * (n / max(n - 1, 1))
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_disp = np.log(np.where(var > 0, var / mean, np.nan))
    log_mean = np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max() + 1e-9, N_DISPERSION_BINS + 1)
    bins = np.clip(np.digitize(log_mean, edges) - 1, 0, N_DISPERSION_BINS - 1)
    out = np.full(log_mean.shape, np.nan)
    for b in np.unique(bins):
        members = (bins == b) & np.isfinite(log_disp)
        if not members.any():
            continue
        values = log_disp[members]
        std = values.std(ddof=1) if values.size > 1 else np.nan
        # A bin with one gene (or no spread) gives that gene a neutral-high score, as Seurat does.
        out[members] = (values - values.mean()) / std if np.isfinite(std) and std > 0 else 1.0
    return out


def maxabs_scales(
    counts: sp.csr_matrix, conditions: NDArray[np.int64], n_conditions: int, target_sum: float
) -> NDArray[np.float32]:
    """Per-condition, per-gene maximum of the log-normalised values of raw ``counts`` (1 where
    a gene is absent), for SCALEX's per-batch MaxAbs scaling. One pass over the stored
    entries; no normalised copy of the matrix is made."""
    scales = maxabs_maxima(counts, conditions, n_conditions, target_sum)
    scales[scales <= 0] = 1.0
    return scales


def maxabs_maxima(
    counts: sp.csr_matrix,
    conditions: NDArray[np.int64],
    n_conditions: int,
    target_sum: float,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Per-condition, per-gene maximum of the log-normalised values of raw ``counts`` (0 where
    a gene is absent), folded into ``out`` when given: the maxima of row blocks combine into
    those of all rows, and :func:`maxabs_scales` follows as the maxima with 0 replaced by 1."""
    values = _normalized_values(counts, library_sizes(counts), target_sum)
    n_genes = counts.shape[1]
    maxima = np.zeros(n_conditions * n_genes, dtype=np.float32)  # the values are >= 0
    # one flat index per entry: ufunc.at is ~3x faster with it than with a (row, column) pair
    np.maximum.at(maxima, _per_entry(conditions * n_genes, counts) + counts.indices, values)
    # log1p is increasing: the log of the maximum is the maximum of the logs
    maxima = np.log1p(maxima).reshape(n_conditions, n_genes)
    if out is None:
        return maxima
    return np.maximum(out, maxima, out=out)


def input_values(
    counts: sp.csr_matrix,
    library: NDArray[np.float32],
    recipe: PreprocessingRecipe,
    scales: NDArray[np.float32] | None = None,
    scale_index: NDArray[np.int64] | None = None,
) -> NDArray[np.float32]:
    """The encoder's input at the stored entries of raw ``counts`` (every transform maps 0 to 0,
    so the input has the sparsity of the counts).

    log1p(counts / library * target_sum), divided by the MaxAbs row ``scales[scale_index]`` of
    each cell when the recipe asks for per-batch MaxAbs scaling; log1p(counts) for the
    ``log_counts`` transform.
    """
    if recipe.input_transform == "log_counts":
        values = np.log1p(counts.data).astype(np.float32)
    else:
        values = _log_normalized_values(counts, library, recipe.target_sum)
    if recipe.input_transform == "log_normalized_maxabs":
        if scales is None or scale_index is None:
            raise ValueError("per-batch MaxAbs scales are required by this recipe")
        n_genes = scales.shape[1]  # a flat index per entry, as in maxabs_maxima: ~2x faster
        values /= scales.ravel()[_per_entry(scale_index * n_genes, counts) + counts.indices]
    return values


def model_input(
    counts: sp.csr_matrix,
    library: NDArray[np.float32],
    recipe: PreprocessingRecipe,
    scales: NDArray[np.float32] | None = None,
    scale_index: NDArray[np.int64] | None = None,
) -> Tensor:
    """The encoder's input (dense cells x genes) for rows of raw ``counts``: :func:`input_values`
    densified once."""
    values = input_values(counts, library, recipe, scales, scale_index)
    dense = sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape).toarray()
    return torch.from_numpy(dense)
