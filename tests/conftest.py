"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedatlas.shared.cellbench import default_cellbench_dir, find_cellbench_dir


@pytest.fixture(scope="session")
def cellbench_dir() -> Path:
    """The real CellBench data directory; skips the test when it is absent (fails under CI)."""
    path = find_cellbench_dir()
    if path is None:
        msg = (
            f"CellBench data not found at {default_cellbench_dir()}; set FEDATLAS_CELLBENCH to the "
            "directory holding the STEM.count.csv.gz and STEM.metadata.csv.gz files"
        )
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{msg} (CI=true: the CellBench tests must run in CI)", pytrace=False)
        pytest.skip(msg)
    return path
