"""Streaming ``site map``: same results as in memory, the input kept intact, nothing half-written
on failure, and memory that does not grow with the count matrix."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import cells_of

import fedatlas.shared.model.streaming as streaming
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.shared.data.dataset import DataSource
from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.errors import InputDataError
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.streaming import map_h5ad, training_rows

# Streamed chunks go through the encoder in other groupings than one in-memory pass, so float32
# results may differ in the last bits (observed: <= 6e-7 in latents, <= 2e-6 in uncertainties).
ATOL = 1e-5
ADDED_OBS = ["fedatlas_label", "fedatlas_uncertainty", "fedatlas_unknown"]


def _stream(
    release: Release,
    data: Path,
    out: Path | None,
    *,
    chunk_cells: int = 7,
    label_keys: tuple[str, ...] = ("cell_type",),
    layer: str | None = None,
    **options: Any,
) -> MappingResult:
    source = DataSource(data, "batch", label_keys, layer=layer)
    settings = MappingOptions(**{"site_id": "s", "epochs": 3, "seed": 1, **options})
    return map_h5ad(release, source, settings, out=out, chunk_cells=chunk_cells, progress=False)


@pytest.fixture
def query_file(query_adata: AnnData, tmp_path: Path) -> Path:
    """The query with extras a site's file may carry: a layer, an obsm entry, uns, obs columns."""
    adata = query_adata.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.arange(adata.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    adata.obs["donor"] = [f"d{i % 3}" for i in range(adata.n_obs)]
    adata.uns["study"] = {"name": "test"}
    path = tmp_path / "query.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("preset", ["scpoli", "scarches", "scalex"])
def test_streaming_matches_in_memory(
    preset: str, tiny_builds: dict[str, BuildResult], query_file: Path, tmp_path: Path
) -> None:
    release = tiny_builds[preset].release
    cells = cells_of(read_h5ad(query_file))
    loaded = map_onto(release, cells, MappingOptions(site_id="s", epochs=3, seed=1), progress=False)
    streamed = _stream(release, query_file, tmp_path / "out.h5ad")

    np.testing.assert_allclose(streamed.latent, loaded.latent, rtol=0, atol=ATOL)
    assert list(streamed.transfers) == list(loaded.transfers)
    for level, transfer in loaded.transfers.items():
        assert np.array_equal(streamed.transfers[level].labels, transfer.labels)
        np.testing.assert_allclose(
            streamed.transfers[level].uncertainty, transfer.uncertainty, rtol=0, atol=ATOL
        )
    assert streamed.adaptor is not None
    assert loaded.adaptor is not None
    for name, rows in loaded.adaptor.table_rows().items():
        np.testing.assert_allclose(streamed.adaptor.table_rows()[name], rows, rtol=0, atol=ATOL)
    assert streamed.adaptor.content["training"] == loaded.adaptor.content["training"]

    out = read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(out.obsm["X_fedatlas"], loaded.latent, rtol=0, atol=ATOL)
    level = next(iter(loaded.transfers))
    assert np.array_equal(out.obs["fedatlas_label"].astype(str), loaded.transfers[level].called)


def test_output_keeps_the_input_and_rewrites_only_fedatlas_keys(
    tiny_builds: dict[str, BuildResult], query_file: Path, tmp_path: Path
) -> None:
    release = tiny_builds["scpoli"].release
    out = tmp_path / "out.h5ad"
    _stream(release, query_file, out)
    before, after = read_h5ad(query_file), read_h5ad(out)
    assert (before.X != after.X).nnz == 0
    assert (before.layers["counts"] != after.layers["counts"]).nnz == 0
    assert after.var.equals(before.var)
    assert after.obs[list(before.obs.columns)].equals(before.obs)
    assert list(after.obs.columns) == [*before.obs.columns, *ADDED_OBS]
    np.testing.assert_array_equal(after.obsm["X_pca"], before.obsm["X_pca"])
    assert after.uns["study"] == {"name": "test"}
    assert after.uns["fedatlas"]["release_id"] == release.content_hash
    with h5py.File(query_file) as src, h5py.File(out) as dst:  # X is copied, never re-encoded
        for key in ("data", "indices", "indptr"):
            assert src[f"X/{key}"].dtype == dst[f"X/{key}"].dtype
            assert np.array_equal(src[f"X/{key}"][:], dst[f"X/{key}"][:])

    # Mapping the annotated file again replaces fedatlas' entries in place (no duplicates).
    again = tmp_path / "again.h5ad"
    _stream(release, out, again, seed=2)
    remapped = read_h5ad(again)
    assert list(remapped.obs.columns) == list(after.obs.columns)
    assert remapped.obsm["X_fedatlas"].shape == after.obsm["X_fedatlas"].shape


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_corrupt_chunk_leaves_no_output_and_names_the_cells(
    tiny_builds: dict[str, BuildResult], query_file: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged.h5ad"
    damaged.write_bytes(query_file.read_bytes())
    with h5py.File(damaged, "r+") as file:  # a negative count in cell 100 (chunk 98-104)
        file["X/data"][int(file["X/indptr"][100])] = -3
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    out = out_dir / "out.h5ad"
    out.write_bytes(b"previous result")
    with pytest.raises(InputDataError, match=r"damaged\.h5ad \(X, cells 98-104\): 1 negative"):
        _stream(tiny_builds["scpoli"].release, damaged, out)
    assert out.read_bytes() == b"previous result"  # the old OUT is untouched
    assert _leftovers(out_dir) == []

    with h5py.File(damaged, "r+") as file:  # row pointers that run backwards
        file["X/data"][int(file["X/indptr"][100])] = 3
        file["X/indptr"][50] = file["X/indptr"][49] - 1
    with pytest.raises(InputDataError, match=r"cells 49-55\): damaged row pointers"):
        _stream(tiny_builds["scpoli"].release, damaged, out)
    assert _leftovers(out_dir) == []


def test_a_failure_after_the_copy_leaves_no_output(
    tiny_builds: dict[str, BuildResult],
    query_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "annotate_file", broken)
    with pytest.raises(OSError, match="No space left"):
        _stream(tiny_builds["scpoli"].release, query_file, tmp_path / "out.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query.h5ad"]


def test_unwritable_output_fails_before_any_work(
    tiny_builds: dict[str, BuildResult], query_file: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputDataError, match=r"a_file/out\.h5ad: cannot write the output"):
        _stream(tiny_builds["scpoli"].release, query_file, blocker / "out.h5ad")


def test_csc_matrix_is_refused_with_a_way_out(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData, tmp_path: Path
) -> None:
    adata = query_adata.copy()
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputDataError, match=r"csc_matrix.*--chunk-size 0"):
        _stream(tiny_builds["scpoli"].release, tmp_path / "csc.h5ad", tmp_path / "out.h5ad")
    assert _leftovers(tmp_path) == []


def test_dense_counts_in_a_layer_stream(
    tiny_builds: dict[str, BuildResult], query_adata: AnnData, tmp_path: Path
) -> None:
    adata = query_adata.copy()
    adata.layers["raw"] = adata.X.toarray()
    adata.X = None
    adata.write_h5ad(tmp_path / "dense.h5ad")
    release = tiny_builds["scpoli"].release
    streamed = _stream(release, tmp_path / "dense.h5ad", tmp_path / "out.h5ad", layer="raw")
    cells = cells_of(query_adata)
    loaded = map_onto(release, cells, MappingOptions(site_id="s", epochs=3, seed=1), progress=False)
    np.testing.assert_allclose(streamed.latent, loaded.latent, rtol=0, atol=ATOL)


def test_training_sample_is_capped_and_shared_among_new_batches() -> None:
    conditions = np.repeat([0, 1, 2, 3], [50, 5, 100, 1000]).astype(np.int64)  # 0 is known
    rows = training_rows(conditions, 1, 300, seed=0)
    assert rows.size == 300
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(conditions[rows], minlength=4).tolist() == [0, 5, 100, 195]
    assert np.array_equal(rows, training_rows(conditions, 1, 300, seed=0))
    assert np.array_equal(training_rows(conditions, 1, 2000, seed=0), np.arange(50, 1155))


def test_a_capped_sample_is_recorded_in_the_adaptor(
    tiny_builds: dict[str, BuildResult], query_file: Path, tmp_path: Path
) -> None:
    result = _stream(tiny_builds["scpoli"].release, query_file, tmp_path / "o.h5ad", train_cells=50)
    assert result.adaptor is not None
    training = result.adaptor.content["training"]
    assert training["sampled_cells"] == 50  # of the 160 cells of the two new batches
    assert training["n_cells"] == 160


def test_cli_streams_above_the_threshold_and_matches_loading(
    tiny_builds: dict[str, BuildResult],
    query_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release_dir = tiny_builds["scpoli"].release.save(tmp_path / "release")
    common = [
        "-q", "site", "map", "--reference", str(release_dir), "--data", str(query_file),
        "--batch-key", "batch", "--epochs", "2", "--json",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "loaded.h5ad")]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_cells"] == 0  # small: loaded whole
    monkeypatch.setattr(streaming, "STREAM_ABOVE_VALUES", 10)
    assert main([*common, "--out", str(tmp_path / "streamed.h5ad")]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_cells"] == streaming.DEFAULT_CHUNK_CELLS
    loaded, streamed = read_h5ad(tmp_path / "loaded.h5ad"), read_h5ad(tmp_path / "streamed.h5ad")
    np.testing.assert_allclose(
        streamed.obsm["X_fedatlas"], loaded.obsm["X_fedatlas"], rtol=0, atol=ATOL
    )
    assert streamed.obs["fedatlas_label"].equals(loaded.obs["fedatlas_label"])
    assert main([*common, "--out", str(tmp_path / "x.h5ad"), "--chunk-size", "-1"]) == 2
    assert "chunk size must be >= 0" in capsys.readouterr().err


# Per-cell state a streaming map keeps: latent (10 x 4 B), label pointer (8 B), uncertainty (4 B),
# condition (8 B), plus transient copies while labels are written (measured: ~52 B per cell).
# Loading the file keeps the count matrix instead: here ~150 stored values per cell, 8 B each,
# several times over (measured: ~4,500 B per cell).
STREAM_BYTES_PER_CELL = 200
N_CELLS = 3000


def _peak_bytes(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_count_matrix(
    world: SyntheticWorld, tiny_builds: dict[str, BuildResult], tmp_path: Path
) -> None:
    """Peak numpy/Python allocations (tracemalloc) for N and 2N cells: streaming grows by at
    most STREAM_BYTES_PER_CELL per added cell; loading whole, the same measure grows by more
    (the check would catch a streaming path that kept the matrix)."""
    release = tiny_builds["scpoli"].release
    files = {}
    for n in (N_CELLS, 2 * N_CELLS):
        files[n] = tmp_path / f"site_{n}.h5ad"
        world.write_h5ad(files[n], n, ("q1", "q2"), seed=5, block_cells=1000)

    def stream(n: int) -> int:
        return _peak_bytes(
            lambda: _stream(
                release, files[n], tmp_path / "out.h5ad", label_keys=(), chunk_cells=500,
                train_cells=300, epochs=1,
            )
        )  # fmt: skip

    def load(n: int) -> int:
        def run() -> None:
            cells = cells_of(ad.read_h5ad(files[n]), None)
            map_onto(release, cells, MappingOptions(site_id="s", epochs=1), progress=False)

        return _peak_bytes(run)

    streamed = stream(2 * N_CELLS) - stream(N_CELLS)
    loaded = load(2 * N_CELLS) - load(N_CELLS)
    assert streamed <= STREAM_BYTES_PER_CELL * N_CELLS, streamed / N_CELLS
    assert loaded > 2 * STREAM_BYTES_PER_CELL * N_CELLS, loaded / N_CELLS
