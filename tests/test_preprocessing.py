"""Count checks, highly-variable-gene selection and the model input transform."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from fedatlas.shared.config import PreprocessingRecipe
from fedatlas.shared.data.preprocessing import (
    as_count_matrix,
    log_normalize,
    maxabs_scales,
    model_input,
    select_highly_variable_genes,
)
from fedatlas.shared.errors import InputDataError


def test_counts_are_accepted_dense_sparse_and_as_integral_floats() -> None:
    dense = np.array([[0, 2, 5], [1, 0, 0]], dtype=np.float64)
    for matrix in (dense, dense.astype(np.int32), sp.csr_matrix(dense), sp.csc_matrix(dense)):
        out = as_count_matrix(matrix, "x")
        assert sp.isspmatrix_csr(out)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out.toarray(), dense)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([[0.0, -1.0]], "1 negative values"),
        ([[0.5, 2.3]], "2 non-integer values.*normalised or log-transformed"),
        ([[np.nan, 1.0]], "NaN or infinite"),
    ],
)
def test_non_counts_are_refused(values: list[list[float]], message: str) -> None:
    with pytest.raises(InputDataError, match=message) as err:
        as_count_matrix(np.array(values), "site.h5ad (X)")
    assert "site.h5ad (X)" in str(err.value)
    assert "--layer" in str(err.value) or "NaN" in str(err.value)


def test_highly_variable_genes_find_the_variable_ones() -> None:
    rng = np.random.default_rng(0)
    n_cells, n_genes = 400, 300
    groups = rng.integers(0, 2, n_cells)
    base = np.exp(rng.uniform(np.log(0.5), np.log(20), n_genes))  # a range of expression levels
    means = np.vstack([base, base])
    variable = np.sort(rng.choice(n_genes, 20, replace=False))
    means[1, variable] *= 8.0  # 20 genes differ strongly between two groups of cells
    counts = sp.csr_matrix(rng.poisson(means[groups]).astype(np.float32))
    batches = np.where(np.arange(n_cells) < 200, "b1", "b2").astype(str)
    recipe = PreprocessingRecipe(n_top_genes=20)
    chosen = select_highly_variable_genes(counts, batches, recipe)
    # Seurat-style selection z-scores dispersions within bins of similar mean expression, so a
    # few strong genes in sparsely populated bins lose out; scanpy's "seurat" flavour (batch
    # aware) makes exactly the same choice here.
    reference = ad.AnnData(log_normalize(counts, recipe.target_sum))
    reference.obs["batch"] = batches
    sc.pp.highly_variable_genes(reference, n_top_genes=20, flavor="seurat", batch_key="batch")
    assert chosen.tolist() == np.flatnonzero(reference.var["highly_variable"]).tolist()
    assert len(set(chosen.tolist()) & set(variable.tolist())) >= 14
    # a batch of one cell does not vote, and selection is deterministic
    batches_with_single = batches.copy()
    batches_with_single[0] = "lonely"
    again = select_highly_variable_genes(counts, batches_with_single, recipe)
    assert again.tolist() == chosen.tolist()


def test_genes_seen_in_too_few_cells_are_never_selected() -> None:
    counts = sp.csr_matrix(np.array([[5, 1, 0], [0, 2, 0], [0, 1, 0], [0, 3, 7]], np.float32))
    chosen = select_highly_variable_genes(
        counts, np.array(["b"] * 4), PreprocessingRecipe(n_top_genes=3, min_cells_per_gene=2)
    )
    assert chosen.tolist() == [1]


def test_model_input_matches_log_normalisation() -> None:
    counts = sp.csr_matrix(np.array([[1, 3, 0], [0, 0, 0], [4, 0, 4]], np.float32))
    recipe = PreprocessingRecipe(target_sum=100)
    library = np.array([4.0, 0.0, 8.0], np.float32)
    got = model_input(counts, library, recipe).numpy()
    np.testing.assert_allclose(got, log_normalize(counts, 100).toarray(), rtol=1e-6)
    assert np.all(got[1] == 0)  # a cell without counts stays zero instead of dividing by 0
    np.testing.assert_allclose(
        model_input(counts, library, PreprocessingRecipe(input_transform="log_counts")).numpy(),
        np.log1p(counts.toarray()),
        rtol=1e-6,
    )
    scales = maxabs_scales(counts, np.array([0, 0, 1]), 2, 100)
    assert scales.shape == (2, 3)
    lognorm = log_normalize(counts, 100).toarray()
    np.testing.assert_allclose(scales[0], [lognorm[:2, 0].max(), lognorm[:2, 1].max(), 1.0])
    np.testing.assert_allclose(scales[1], [lognorm[2, 0], 1.0, lognorm[2, 2]])
    assert np.all(scales > 0)
    maxabs = PreprocessingRecipe(target_sum=100, input_transform="log_normalized_maxabs")
    scaled = model_input(counts, library, maxabs, scales, np.array([0, 0, 1])).numpy()
    assert float(scaled.max()) == pytest.approx(1.0)
    np.testing.assert_allclose(scaled * scales[[0, 0, 1]], got, rtol=1e-6)
    with pytest.raises(ValueError, match="MaxAbs"):
        model_input(counts, library, maxabs)
