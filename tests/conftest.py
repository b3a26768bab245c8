"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
from anndata import AnnData

from fedatlas.benchmarks.cellbench import default_cellbench_dir, find_cellbench_dir
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.model.reference import BuildResult, train_reference


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip a test whose prerequisite is missing on this machine; under CI (``CI=true``) fail
    instead, so nothing is skipped silently there."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: this test must run in CI)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cellbench_dir() -> Path:
    """The real CellBench data directory; skips the test when it is absent (fails under CI)."""
    path = find_cellbench_dir()
    if path is None:
        skip_unless_ci(
            f"CellBench data not found at {default_cellbench_dir()}; set FEDATLAS_CELLBENCH to the "
            "directory holding the STEM.count.csv.gz and STEM.metadata.csv.gz files"
        )
    return path


# --------------------------------------------------------------------------- small synthetic data
# A small synthetic world (400 genes, four cell types): the reference holds three batches and
# three types; the query adds type "D", which the reference never saw.
TINY_PRESET_EPOCHS = {"scpoli": 12, "scarches": 12, "scalex": 8}


@pytest.fixture(scope="session")
def world() -> SyntheticWorld:
    """The synthetic world shared by the fast tests."""
    return SyntheticWorld(seed=7, n_genes=400, cell_types=("A", "B", "C", "D"))


@pytest.fixture(scope="session")
def reference_adata(world: SyntheticWorld) -> AnnData:
    """360 reference cells in three batches, types A-C."""
    return world.sample(360, batches=("r1", "r2", "r3"), cell_types=("A", "B", "C"), seed=1)


@pytest.fixture(scope="session")
def query_adata(world: SyntheticWorld) -> AnnData:
    """160 query cells in two batches, types A-D (D is unseen by the reference)."""
    return world.sample(160, batches=("q1", "q2"), seed=2)


def cells_of(adata: AnnData, label_key: str | None = "cell_type") -> CellTable:
    """The cells of a synthetic AnnData, labelled or not."""
    return extract_cells(
        adata, source="test", batch_key="batch", label_keys=[label_key] if label_key else []
    )


@pytest.fixture(scope="session")
def tiny_builds(reference_adata: AnnData) -> dict[str, BuildResult]:
    """One small reference per preset (few epochs, 200 genes), built once per session."""
    return {
        preset: train_reference(
            cells_of(reference_adata),
            preset=preset,
            epochs=epochs,
            n_top_genes=200,
            seed=0,
            progress=False,
        )
        for preset, epochs in TINY_PRESET_EPOCHS.items()
    }
