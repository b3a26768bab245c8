"""Aligning a dataset's genes to a release's ordered gene list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from fedatlas.shared.errors import InputDataError

DEFAULT_MIN_GENE_OVERLAP = 0.5


@dataclass(frozen=True)
class GeneAlignment:
    """Where each release gene sits in a dataset (-1: absent, zero-filled)."""

    source_columns: NDArray[np.int64]
    n_dataset_genes: int

    @property
    def n_release_genes(self) -> int:
        """Length of the release's gene list."""
        return int(self.source_columns.size)

    @property
    def n_found(self) -> int:
        """Release genes present in the dataset."""
        return int(np.count_nonzero(self.source_columns >= 0))

    @property
    def n_missing(self) -> int:
        """Release genes absent from the dataset (zero-filled)."""
        return self.n_release_genes - self.n_found

    @property
    def overlap(self) -> float:
        """Fraction of the release's genes found in the dataset."""
        return self.n_found / self.n_release_genes if self.n_release_genes else 0.0

    def summary(self) -> dict[str, Any]:
        """Numbers for provenance records and logs."""
        return {
            "n_release_genes": self.n_release_genes,
            "n_found": self.n_found,
            "n_missing": self.n_missing,
            "n_dataset_genes": self.n_dataset_genes,
            "overlap": round(self.overlap, 6),
        }

    def apply(self, counts: sp.csr_matrix, rows_per_chunk: int = 8192) -> sp.csr_matrix:
        """Reorder ``counts`` (cells x dataset genes) into release order, zero-filling gaps.

        Works through ``rows_per_chunk`` cells at a time, so besides the result it needs only
        small temporary arrays, however many cells and genes the dataset has.
        """
        if counts.shape[1] != self.n_dataset_genes:
            raise ValueError("matrix does not have the dataset's number of genes")
        identity = self.n_release_genes == self.n_dataset_genes and np.array_equal(
            self.source_columns, np.arange(self.n_dataset_genes)
        )
        if identity:
            return counts
        target = np.full(self.n_dataset_genes, -1, dtype=np.int32)
        found = self.source_columns >= 0
        target[self.source_columns[found]] = np.flatnonzero(found)
        n_rows = counts.shape[0]
        chunks = [(r, min(r + rows_per_chunk, n_rows)) for r in range(0, n_rows, rows_per_chunk)]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        for r0, r1 in chunks:  # pass 1: how many entries each cell keeps
            a, b = counts.indptr[r0], counts.indptr[r1]
            kept = np.concatenate([[0], np.cumsum(target[counts.indices[a:b]] >= 0)])
            indptr[r0 + 1 : r1 + 1] = indptr[r0] + kept[counts.indptr[r0 + 1 : r1 + 1] - a]
        data = np.empty(int(indptr[-1]), dtype=np.float32)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        for r0, r1 in chunks:  # pass 2: copy them, renumbered
            a, b = counts.indptr[r0], counts.indptr[r1]
            columns = target[counts.indices[a:b]]
            kept = columns >= 0
            data[indptr[r0] : indptr[r1]] = counts.data[a:b][kept]
            indices[indptr[r0] : indptr[r1]] = columns[kept]
        out = sp.csr_matrix(
            (data, indices, indptr), shape=(n_rows, self.n_release_genes), copy=False
        )
        out.sort_indices()
        return out


def align_genes(
    dataset_genes: Sequence[str],
    release_genes: Sequence[str],
    *,
    min_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    source: str = "dataset",
) -> GeneAlignment:
    """Match genes by name; refuse when fewer than ``min_overlap`` of the release's genes exist.

    ``source`` names the data (file and gene field) in error messages. A name that occurs twice
    in the dataset and is a release gene is ambiguous and refused.
    """
    names = [str(g) for g in dataset_genes]
    position: dict[str, int] = {}
    duplicated: set[str] = set()
    release_set = set(release_genes)
    for i, name in enumerate(names):
        if name in position and name in release_set:
            duplicated.add(name)
        position.setdefault(name, i)
    if duplicated:
        shown = ", ".join(sorted(duplicated)[:5])
        raise InputDataError(
            f"{source}: {len(duplicated)} release gene(s) occur more than once ({shown}); make "
            "gene names unique or pick another --gene-key"
        )
    columns = np.array([position.get(g, -1) for g in release_genes], dtype=np.int64)
    alignment = GeneAlignment(columns, len(names))
    if alignment.overlap < min_overlap:
        raise InputDataError(
            f"{source}: only {alignment.n_found} of the release's {alignment.n_release_genes} "
            f"genes ({alignment.overlap:.1%}) are present; at least {min_overlap:.0%} are "
            f"required. Release genes look like {_examples(release_genes)}; this dataset's look "
            f"like {_examples(names)}. If the dataset keeps the matching identifiers in a var "
            "column, pass it with --gene-key."
        )
    return alignment


def _examples(genes: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(str(g)) for g in list(genes)[:n]) or "(none)"
