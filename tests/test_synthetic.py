"""Synthetic counts: layout, determinism, realism and the demo scenario."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from fedatlas.benchmarks.synthetic import (
    DEMO_CELL_TYPES,
    DEMO_REFERENCE_BATCHES,
    DEMO_SITES,
    SyntheticWorld,
    _sample_nb_csr,
    make_counts,
    make_demo_scenario,
)
from fedatlas.shared.errors import ConfigError


def _log_norm(X: sp.csr_matrix) -> np.ndarray:
    dense = np.asarray(X.toarray(), dtype=np.float64)
    dense *= 1e4 / np.maximum(dense.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(dense)


def _pca(adata: AnnData, n_comps: int = 30) -> np.ndarray:
    data = _log_norm(adata.X).astype(np.float32)
    with threadpool_limits(1):  # small matrices: BLAS threads only add synchronisation
        return PCA(n_components=n_comps, svd_solver="randomized", random_state=0).fit_transform(
            data
        )


def _knn_accuracy(Z: np.ndarray, labels: pd.Series) -> float:
    return float(cross_val_score(KNeighborsClassifier(15), Z, labels.to_numpy(), cv=5).mean())


def _assert_counts(X: object) -> None:
    assert isinstance(X, sp.csr_matrix)
    assert X.dtype == np.float32
    X.check_format(full_check=True)
    assert X.has_sorted_indices
    assert (X.data > 0).all()  # explicit zeros are not stored
    assert np.array_equal(X.data, np.round(X.data))


@pytest.fixture(scope="module")
def counts() -> AnnData:
    # 2,000 genes: the default block holds 1,048 cells, so 2,500 cells span three blocks.
    return make_counts(2500, seed=7)


@pytest.fixture(scope="module")
def demo() -> tuple[AnnData, dict[str, AnnData]]:
    return make_demo_scenario(seed=0)


def test_layout() -> None:
    adata = make_counts(601, n_genes=300, n_cell_types=4, batches=("a", "b"), seed=1, n_threads=1)
    assert adata.shape == (601, 300)
    _assert_counts(adata.X)
    assert list(adata.obs.columns) == ["batch", "cell_type"]
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["batch"].cat.categories) == ["a", "b"]
    assert adata.obs["batch"].value_counts().to_dict() == {"a": 301, "b": 300}
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2", "type_3"]
    assert adata.var_names[0] == "gene_00000"
    assert adata.var_names[-1] == "gene_00299"
    assert adata.obs_names.is_unique
    assert adata.obs_names[0] == "a:000000"


def test_counts_are_integers_over_several_blocks(counts: AnnData) -> None:
    _assert_counts(counts.X)
    assert counts.shape == (2500, 2000)
    per_cell = np.asarray(counts.X.sum(axis=1)).ravel()
    assert (per_cell > 0).all()
    assert 200 < np.median(per_cell) < 3000


def test_density_is_droplet_like(counts: AnnData) -> None:
    for adata in (counts, make_counts(600, seed=3)):
        density = adata.X.nnz / (adata.n_obs * adata.n_vars)
        assert 0.05 <= density <= 0.25


def test_deterministic_for_a_seed_and_any_thread_count(counts: AnnData) -> None:
    again = make_counts(2500, seed=7, n_threads=1)
    assert (again.X != counts.X).nnz == 0
    assert again.obs.equals(counts.obs)
    other = make_counts(2500, seed=8)
    assert (other.X != counts.X).nnz > 0


def test_world_structure_is_independent_of_what_is_sampled() -> None:
    six = SyntheticWorld(seed=3)
    two = SyntheticWorld(seed=3, cell_types=("type_4", "type_1"))
    np.testing.assert_array_equal(six.programme("type_1"), two.programme("type_1"))
    np.testing.assert_array_equal(six.baseline, two.baseline)
    np.testing.assert_array_equal(six.dispersion, two.dispersion)
    for name in ("batch0", "site_x/run7"):
        assert np.array_equal(six.batch_effect(name)[0], two.batch_effect(name)[0])
        assert six.batch_effect(name)[1:] == two.batch_effect(name)[1:]
    np.testing.assert_array_equal(
        six.mean_profile("type_4", "lab"), two.mean_profile("type_4", "lab")
    )
    assert not np.array_equal(six.programme("type_1"), SyntheticWorld(seed=4).programme("type_1"))
    assert not np.array_equal(six.batch_effect("a")[0], six.batch_effect("b")[0])


def test_a_stimulated_batch_shows_one_response_in_every_type() -> None:
    world = SyntheticWorld(seed=3, stimulated=("stim",))
    response = world.response()
    up = response > 0
    assert up.sum() == round(world.response_fraction * world.n_genes)
    for cell_type in world.cell_types:
        shift = np.log(
            world.mean_profile(cell_type, "stim") / world.mean_profile(cell_type, "ctrl")
        )
        # the response's genes rise against the rest by the response itself (batch effects
        # of the two names differ too, hence the tolerance)
        lift = shift[up] - np.median(shift[~up])
        assert np.corrcoef(lift, response[up])[0, 1] > 0.8
    # an unstimulated world has the same programmes and no response
    plain = SyntheticWorld(seed=3)
    np.testing.assert_array_equal(
        plain.mean_profile("type_1", "ctrl"), world.mean_profile("type_1", "ctrl")
    )
    with pytest.raises(ConfigError, match="response_fraction"):
        SyntheticWorld(response_fraction=0.0)


def test_samples_of_one_world_share_programmes() -> None:
    world = SyntheticWorld(seed=5, n_genes=500, cell_types=("t0", "t1", "t2"))
    first = world.sample(900, batches=["lab"], seed=1)
    second = world.sample(300, batches=["lab"], cell_types=["t1"], seed=2)
    stranger = SyntheticWorld(seed=6, n_genes=500, cell_types=("t0", "t1", "t2"))
    third = stranger.sample(300, batches=["lab"], cell_types=["t1"], seed=2)

    def mean_profile(adata: AnnData, cell_type: str) -> np.ndarray:
        rows = (adata.obs["cell_type"] == cell_type).to_numpy()
        return np.asarray(_log_norm(adata.X[rows]).mean(axis=0))

    same = np.corrcoef(mean_profile(first, "t1"), mean_profile(second, "t1"))[0, 1]
    other_type = np.corrcoef(mean_profile(first, "t0"), mean_profile(second, "t1"))[0, 1]
    other_world = np.corrcoef(mean_profile(first, "t1"), mean_profile(third, "t1"))[0, 1]
    assert same > 0.97
    assert same > other_type + 0.02
    assert same > other_world + 0.1


def test_cell_types_separable_and_batch_effects_present(counts: AnnData) -> None:
    Z = _pca(counts)
    assert _knn_accuracy(Z, counts.obs["cell_type"]) > 0.9
    one_type = (counts.obs["cell_type"] == "type_0").to_numpy()
    batch_accuracy = _knn_accuracy(Z[one_type], counts.obs["batch"][one_type])
    assert batch_accuracy > 1 / 3 + 0.2  # three batches: chance is 1/3
    # Batch effects are weaker than cell-type differences: type centroids lie further apart.
    types = counts.obs["cell_type"].to_numpy()
    batches = counts.obs["batch"].to_numpy()

    def centroid_spread(labels: np.ndarray, mask: np.ndarray) -> float:
        centroids = np.stack([Z[mask & (labels == v)].mean(axis=0) for v in np.unique(labels)])
        return float(np.linalg.norm(centroids - centroids.mean(axis=0), axis=1).mean())

    assert centroid_spread(types, np.ones(len(Z), bool)) > 1.5 * centroid_spread(batches, one_type)


def test_sample_options_and_errors() -> None:
    world = SyntheticWorld(seed=0, n_genes=200, cell_types=("x", "y", "z"))
    adata = world.sample(300, batches=["b1"], proportions={"x": 1.0, "z": 1.0}, seed=4)
    assert set(adata.obs["cell_type"]) == {"x", "z"}
    assert list(adata.obs["cell_type"].cat.categories) == ["x", "y", "z"]
    subset = world.sample(50, batches=["b1"], cell_types=["y"], seed=4)
    assert set(subset.obs["cell_type"]) == {"y"}
    assert world.sample(0, batches=["b1"]).shape == (0, 200)
    with pytest.raises(ConfigError, match="not in this world"):
        world.sample(10, cell_types=["w"])
    with pytest.raises(ConfigError, match="proportions"):
        world.sample(10, proportions=[0.5, 0.5])
    with pytest.raises(ConfigError, match="repeat"):
        world.sample(10, batches=["a", "a"])
    with pytest.raises(ConfigError):
        SyntheticWorld(cell_types=("a", "a"))
    assert make_counts(20, n_genes=50, cell_types=["p", "q"]).obs["cell_type"].nunique() <= 2


@pytest.mark.parametrize(("mean", "size"), [(0.05, 4.0), (0.8, 2.0), (1.9, 0.5), (25.0, 3.0)])
def test_negative_binomial_sampler_moments(mean: float, size: float) -> None:
    mu = np.full((2000, 100), mean)
    counts, cols, row_nnz = _sample_nb_csr(mu, np.full(100, size), np.random.default_rng(0))
    values = np.zeros(mu.size)
    rows = np.repeat(np.arange(mu.shape[0]), row_nnz)
    values[rows * 100 + cols.astype(np.int64)] = counts
    p_zero = (1 + mean / size) ** -size
    assert values.mean() == pytest.approx(mean, rel=0.03)
    assert values.var() == pytest.approx(mean + mean**2 / size, rel=0.08)
    assert (values == 0).mean() == pytest.approx(p_zero, abs=0.01)


def test_demo_scenario(demo: tuple[AnnData, dict[str, AnnData]]) -> None:
    reference, queries = demo
    novel = DEMO_CELL_TYPES[-1]
    assert reference.n_vars == 2000
    assert reference.n_obs == 1500
    assert list(reference.obs["batch"].cat.categories) == list(DEMO_REFERENCE_BATCHES)
    assert set(reference.obs["cell_type"]) == set(DEMO_CELL_TYPES) - {novel}
    assert list(queries) == list(DEMO_SITES)
    site_a, site_b = (queries[s] for s in DEMO_SITES)
    for site, query in queries.items():
        assert query.n_obs == 500
        assert set(query.obs["batch"]) == {DEMO_SITES[site]}
        assert list(query.var_names) == list(reference.var_names)
        _assert_counts(query.X)
    assert novel not in set(site_a.obs["cell_type"])
    assert novel in set(site_b.obs["cell_type"])
    assert site_b.uns["novel_cell_types"] == [novel]
    assert site_a.uns["novel_cell_types"] == []
    all_names = [*reference.obs_names, *site_a.obs_names, *site_b.obs_names]
    assert len(set(all_names)) == len(all_names)
    again, _ = make_demo_scenario(seed=0)
    assert (again.X != reference.X).nnz == 0


def test_sites_share_an_effect_across_their_batches() -> None:
    world = SyntheticWorld(seed=3, n_genes=500, cell_types=("A", "B"))

    def log_profile(batch: str, site: str) -> np.ndarray:
        return np.log(world.mean_profile("A", batch, site))

    same_site = np.abs(log_profile("b1", "s1") - log_profile("b2", "s1")).mean()
    other_site = np.abs(log_profile("b1", "s1") - log_profile("b1", "s2")).mean()
    assert other_site > 1.2 * same_site  # b1 of s2 is another batch, with s2's own effect
    adata = world.sample(90, batches=("b1", "b2"), seed=1, site="s1")
    assert list(adata.obs.columns) == ["batch", "cell_type", "site"]
    assert set(adata.obs["site"]) == {"s1"}
    assert adata.obs_names[0] == "s1/b1:000000"
    assert adata.uns["synthetic"]["site"] == "s1"
    plain = world.sample(90, batches=("b1", "b2"), seed=1)
    assert (adata.X != plain.X).nnz > 0
    assert (plain.X != world.sample(90, batches=("b1", "b2"), seed=1).X).nnz == 0


def test_write_h5ad_by_blocks(tmp_path: Path) -> None:
    world = SyntheticWorld(seed=3, n_genes=300, cell_types=("A", "B", "C"))
    path = tmp_path / "site.h5ad"
    world.write_h5ad(path, 2500, ("b1", "b2", "b3"), seed=4, site="s1", block_cells=1000)
    adata = ad.read_h5ad(path)
    assert adata.shape == (2500, 300)
    _assert_counts(adata.X)
    assert adata.obs_names.is_unique
    assert adata.obs["batch"].value_counts().to_dict() == {"b1": 835, "b2": 833, "b3": 832}
    assert adata.obs_names[-1] == "s1/b3:000831"  # numbered across blocks per batch
    assert adata.uns["synthetic"]["block_cells"] == 1000
    again = tmp_path / "again.h5ad"
    world.write_h5ad(again, 2500, ("b1", "b2", "b3"), seed=4, site="s1", block_cells=1000)
    assert (ad.read_h5ad(again).X != adata.X).nnz == 0
