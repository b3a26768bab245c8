"""Gene alignment: reorder by name, zero-fill gaps, refuse too little overlap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fedatlas.shared.data.genes import align_genes
from fedatlas.shared.errors import InputDataError


def test_reorders_and_zero_fills() -> None:
    release = ["g1", "g2", "g3", "g4"]
    dataset = ["g3", "x", "g1", "g2"]
    counts = sp.csr_matrix(np.array([[3, 9, 1, 2], [0, 5, 4, 0]], dtype=np.float32))
    alignment = align_genes(dataset, release, min_overlap=0.5)
    assert (alignment.n_found, alignment.n_missing, alignment.n_release_genes) == (3, 1, 4)
    assert alignment.overlap == pytest.approx(0.75)
    aligned = alignment.apply(counts).toarray()
    np.testing.assert_array_equal(aligned, [[1, 2, 3, 0], [4, 0, 0, 0]])
    assert alignment.summary()["n_dataset_genes"] == 4


def test_identity_alignment_returns_the_same_matrix() -> None:
    counts = sp.csr_matrix(np.eye(3, dtype=np.float32))
    alignment = align_genes(["a", "b", "c"], ["a", "b", "c"])
    assert alignment.apply(counts) is counts


def test_too_little_overlap_is_refused_with_the_numbers() -> None:
    release = [f"ENSG{i:011d}" for i in range(100)]
    dataset = [f"SYMBOL{i}" for i in range(90)] + release[:10]
    with pytest.raises(InputDataError) as err:
        align_genes(dataset, release, min_overlap=0.5, source="site.h5ad (var_names)")
    message = str(err.value)
    for piece in (
        "site.h5ad (var_names)",
        "only 10 of the release's 100",
        "10.0%",
        "50%",
        "--gene-key",
        "'ENSG00000000000'",
    ):
        assert piece in message
    assert align_genes(dataset, release, min_overlap=0.1).n_found == 10


def test_no_shared_gene_at_all() -> None:
    with pytest.raises(InputDataError, match="only 0 of the release's 2 genes"):
        align_genes(["x", "y"], ["a", "b"])


def test_duplicated_release_genes_are_ambiguous() -> None:
    with pytest.raises(InputDataError, match=r"1 release gene\(s\) occur more than once \(a\)"):
        align_genes(["a", "a", "b"], ["a", "b"])
    # duplicates the release does not use are harmless
    assert align_genes(["a", "b", "z", "z"], ["a", "b"]).n_found == 2
