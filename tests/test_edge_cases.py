"""Inputs that trip up reference-mapping tools, each handled deliberately."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import cells_of

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.errors import InputDataError
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import BuildResult, train_reference
from fedatlas.shared.model.surgery import moved_tensors


@pytest.mark.parametrize("preset", ["scpoli", "scalex"])
def test_a_batch_with_a_single_cell(
    preset: str, world: SyntheticWorld, tiny_builds: dict[str, BuildResult]
) -> None:
    adata = world.sample(121, batches=("big", "alone"), seed=21)
    adata.obs["batch"] = ["big"] * 120 + ["alone"]
    built = train_reference(
        cells_of(adata), preset=preset, epochs=2, n_top_genes=100, progress=False
    )
    assert "reference/alone" in built.release.condition_names
    assert np.isfinite(built.latent).all()
    release = tiny_builds[preset].release
    query = world.sample(41, batches=("main", "single"), seed=22)
    query.obs["batch"] = ["main"] * 40 + ["single"]
    result = map_onto(release, cells_of(query, None), MappingOptions(epochs=2), progress=False)
    assert np.isfinite(result.latent).all()
    assert result.adaptor is not None
    assert result.adaptor.condition_names == ["query/main", "query/single"]
    assert moved_tensors(release, result.model) == []


def test_missing_batch_values_are_refused(query_adata: AnnData) -> None:
    adata = query_adata.copy()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[[3, 7], adata.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(InputDataError, match=r"no batch for 2 of 160 cells \(e.g. q1:000003"):
        extract_cells(adata, source="site.h5ad", batch_key="batch")


def test_gene_symbols_with_ids_in_a_var_column(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds["scpoli"].release
    adata = query_adata.copy()
    adata.var["gene_ids"] = adata.var_names.to_numpy()
    adata.var_names = [f"SYMBOL{i}" for i in range(adata.n_vars)]
    with pytest.raises(InputDataError, match="pass it with --gene-key"):
        map_onto(release, cells_of(adata, None), MappingOptions(epochs=1), progress=False)
    by_id = extract_cells(adata, source="site", batch_key="batch", gene_key="gene_ids")
    result = map_onto(release, by_id, MappingOptions(epochs=1), progress=False)
    plain = map_onto(release, cells_of(query_adata, None), MappingOptions(epochs=1), progress=False)
    np.testing.assert_array_equal(result.latent, plain.latent)
    with pytest.raises(InputDataError, match="no var column 'ensembl'"):
        extract_cells(adata, source="site", batch_key="batch", gene_key="ensembl")


def test_a_query_sharing_no_gene(tiny_builds: dict[str, BuildResult], query_adata: AnnData) -> None:
    adata = query_adata.copy()
    adata.var_names = [f"other_{i}" for i in range(adata.n_vars)]
    with pytest.raises(InputDataError, match="only 0 of the release's 200 genes"):
        map_onto(tiny_builds["scpoli"].release, cells_of(adata, None), progress=False)


def test_partially_labelled_data(
    world: SyntheticWorld, tiny_builds: dict[str, BuildResult]
) -> None:
    reference = world.sample(240, batches=("r1", "r2"), cell_types=("A", "B", "C"), seed=31)
    labels = reference.obs["cell_type"].astype(object).to_numpy()
    labels[::3] = np.nan  # a third of the cells are unlabelled
    reference.obs["cell_type"] = labels
    built = train_reference(
        cells_of(reference), preset="scpoli", epochs=4, n_top_genes=150, progress=False
    )
    catalogue = built.release.prototypes("cell_type")
    assert catalogue.labels == ("A", "B", "C")
    assert catalogue.counts.sum() == np.sum(~reference.obs["cell_type"].isna())
    clusters = built.release.unlabeled_prototypes()
    assert clusters is not None
    assert clusters.counts.sum() == 80
    query = world.sample(90, batches=("q",), seed=32)
    qlabels = query.obs["cell_type"].astype(object).to_numpy()
    qlabels[1::2] = None
    query.obs["cell_type"] = qlabels
    result = map_onto(
        tiny_builds["scpoli"].release,
        cells_of(query),
        MappingOptions(epochs=2, min_prototype_cells=5),
        progress=False,
    )
    assert result.adaptor is not None
    site = result.adaptor.prototypes(0)
    assert site.counts.sum() == np.sum(~query.obs["cell_type"].isna()) - sum(
        result.dropped_prototypes.get("cell_type", {}).values()
    )


def test_a_query_batch_named_like_a_reference_batch(
    tiny_builds: dict[str, BuildResult], reference_adata: AnnData
) -> None:
    release = tiny_builds["scarches"].release
    lookalike = reference_adata[reference_adata.obs["batch"] == "r1"].copy()
    as_new = map_onto(release, cells_of(lookalike, None), MappingOptions(epochs=1), progress=False)
    assert [a.condition for a in as_new.assignments] == ["query/r1"]
    assert not as_new.assignments[0].known
    assert as_new.trained_parameters > 0
    assert moved_tensors(release, as_new.model) == []  # reference/r1's rows are untouched
    as_same = map_onto(
        release, cells_of(lookalike, None), MappingOptions(site_id="reference"), progress=False
    )
    assert as_same.assignments[0].known
    assert as_same.trained_parameters == 0


def test_sparse_dense_and_float_counts_give_the_same_mapping(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData
) -> None:
    release = tiny_builds["scpoli"].release
    variants = []
    for matrix in (
        query_adata.X,
        query_adata.X.toarray(),
        sp.csc_matrix(query_adata.X).astype(np.float64),
        query_adata.X.astype(np.int64),
    ):
        adata = query_adata.copy()
        adata.X = matrix
        variants.append(
            map_onto(
                release, cells_of(adata, None), MappingOptions(epochs=2), progress=False
            ).latent
        )
    for latent in variants[1:]:
        np.testing.assert_array_equal(latent, variants[0])


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "notes.h5ad").write_text("these are not counts")
    with pytest.raises(InputDataError, match="not an HDF5 file"):
        read_h5ad(tmp_path / "notes.h5ad")
    with pytest.raises(InputDataError, match="no such file"):
        read_h5ad(tmp_path / "absent.h5ad")


def test_several_label_levels() -> None:
    # A world large enough for scPoli's short recipe to learn cell types (the tiny one is not).
    world = SyntheticWorld(seed=7, n_genes=1000, cell_types=("A", "B", "C", "D"))
    reference = world.sample(600, batches=("r1", "r2"), seed=41)
    fine = reference.obs["cell_type"].astype(str)
    reference.obs["lineage"] = fine.map({"A": "AB", "B": "AB", "C": "CD", "D": "CD"}).to_numpy()
    cells = extract_cells(
        reference, source="ref", batch_key="batch", label_keys=["lineage", "cell_type"]
    )
    built = train_reference(
        cells,
        preset="scpoli",
        n_top_genes=500,
        train_overrides={"batch_size": 32},
        progress=False,
    )
    assert built.release.label_levels == ["lineage", "cell_type"]
    assert built.release.prototypes("lineage").labels == ("AB", "CD")
    query = world.sample(200, batches=("q",), seed=42)
    result = map_onto(
        built.release, cells_of(query, None), MappingOptions(epochs=10), progress=False
    )
    assert list(result.transfers) == ["lineage", "cell_type"]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    coarse_truth = np.where(np.isin(truth, ["A", "B"]), "AB", "CD")
    # Measured 0.95 (cell type) and 0.80 (lineage): the synthetic types are equally far apart,
    # so a lineage of two unrelated types is two clusters behind one prototype.
    assert np.mean(result.transfers["cell_type"].labels == truth) >= 0.9
    assert np.mean(result.transfers["lineage"].labels == coarse_truth) >= 0.7


@pytest.mark.parametrize("chunk_size", ["0", "25"])
def test_cells_without_counts_are_refused_and_nothing_is_written(
    query_adata: AnnData, tiny_builds: dict[str, BuildResult], tmp_path: Path, chunk_size: str
) -> None:
    """An all-zero cell cannot be placed: mapping it (called unknown, shaping an adaptor) would
    mislead; loaded whole or read in chunks, the file is refused and no output appears."""
    adata = query_adata.copy()
    counts = sp.csr_matrix(adata.X).tolil()
    counts[[5, 60], :] = 0
    adata.X = counts.tocsr()
    adata.write_h5ad(tmp_path / "site.h5ad")
    tiny_builds["scpoli"].release.save(tmp_path / "release")
    out = tmp_path / "mapped.h5ad"
    args = ["site", "map", "--reference", str(tmp_path / "release"), "--data",
            str(tmp_path / "site.h5ad"), "--batch-key", "batch", "--out", str(out),
            "--chunk-size", chunk_size, "--adaptor-out", str(tmp_path / "a.adaptor")]  # fmt: skip
    assert main(args) == 2
    assert not out.exists()
    assert not (tmp_path / "a.adaptor").exists()
    with pytest.raises(InputDataError, match=r"2 of 160 cells have no counts at all \(e\.g\. q1"):
        extract_cells(adata, source="site.h5ad", batch_key="batch")


def test_a_file_without_cells_is_refused_when_streamed(
    query_adata: AnnData, tiny_builds: dict[str, BuildResult], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    query_adata[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    tiny_builds["scpoli"].release.save(tmp_path / "release")
    for chunk_size in ("0", "25"):
        assert main(["site", "map", "--reference", str(tmp_path / "release"), "--data",
                     str(tmp_path / "empty.h5ad"), "--batch-key", "batch", "--out",
                     str(tmp_path / "o.h5ad"), "--chunk-size", chunk_size]) == 2  # fmt: skip
        assert "contains no cells" in capsys.readouterr().err
