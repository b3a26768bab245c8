"""The command line, end to end on real files: build a release, map a site, and refuse bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.release import Release

FEDATLAS = [sys.executable, "-m", "fedatlas"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, world: SyntheticWorld) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    paths = {"ref": root / "ref.h5ad", "query": root / "query.h5ad"}
    world.sample(300, batches=("r1", "r2"), cell_types=("A", "B", "C"), seed=5).write_h5ad(
        paths["ref"]
    )
    world.sample(120, batches=("plate1",), seed=6).write_h5ad(paths["query"])
    return paths


@pytest.fixture(scope="module")
def release_dir(files: dict[str, Path]) -> Path:
    out = files["ref"].parent / "release"
    run = subprocess.run(
        [
            *FEDATLAS,
            "admin",
            "reference",
            "build",
            "--data",
            str(files["ref"]),
            "--batch-key",
            "batch",
            "--label-key",
            "cell_type",
            "--model",
            "scpoli",
            "--out",
            str(out),
            "--epochs",
            "6",
            "--n-top-genes",
            "150",
            "--seed",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["release_id"] == Release.load(out).content_hash
    assert payload["conditions"] == ["reference/r1", "reference/r2"]
    assert payload["n_genes"] == 150
    transfer = payload["transfer"]  # the thresholds sites will use, calibrated for kNN
    assert transfer["method"] == "prototype"
    assert transfer["unknown_thresholds"]["prototype"] == {"cell_type": 0.5}
    calibrated = transfer["knn_calibration"]["cell_type"]["threshold"]
    assert transfer["unknown_thresholds"]["knn"] == {"cell_type": calibrated}
    assert "[fedatlas] training reference: epoch" in run.stderr  # progress is shown
    return out


def test_site_map_writes_results_and_adaptor(files: dict[str, Path], release_dir: Path) -> None:
    out, adaptor_path = (
        files["query"].parent / "mapped.h5ad",
        files["query"].parent / "site.adaptor",
    )
    run = subprocess.run(
        [
            *FEDATLAS,
            "site",
            "map",
            "--reference",
            str(release_dir),
            "--data",
            str(files["query"]),
            "--batch-key",
            "batch",
            "--out",
            str(out),
            "--adaptor-out",
            str(adaptor_path),
            "--site-id",
            "hospital1",
            "--epochs",
            "4",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "[fedatlas] training adaptor (1 new condition): epoch" in run.stderr
    assert "hospital1/plate1 (new, adaptor trained, 120 cells)" in run.stdout
    source, mapped = ad.read_h5ad(files["query"]), ad.read_h5ad(out)
    assert (mapped.X != source.X).nnz == 0  # the input is kept as it was
    assert mapped.obsm["X_fedatlas"].shape == (120, 10)
    assert set(mapped.obs["fedatlas_label"].cat.categories) <= {"A", "B", "C", "unknown"}
    u = mapped.obs["fedatlas_uncertainty"].to_numpy()
    assert np.all((u >= 0) & (u <= 1))
    assert mapped.obs["fedatlas_unknown"].dtype == bool
    assert np.array_equal(mapped.obs["fedatlas_unknown"].to_numpy(), u > 0.5)
    info = mapped.uns["fedatlas"]
    adaptor = Adaptor.load(adaptor_path)
    assert info["release_id"] == Release.load(release_dir).content_hash
    assert info["adaptor_id"] == adaptor.content_hash
    assert info["gene_overlap"]["n_found"] == 150
    assert info["trained_parameters"] == 10
    assert info["frozen_tensors_verified"]
    assert adaptor.condition_names == ["hospital1/plate1"]


def test_known_batches_have_no_adaptor(
    files: dict[str, Path], release_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = files["ref"].parent / "nothing.adaptor"
    mapped = files["ref"].parent / "ref_mapped.h5ad"
    args = ["site", "map", "--reference", str(release_dir), "--data", str(files["ref"]),
            "--batch-key", "batch", "--site-id", "reference", "--out", str(mapped)]  # fmt: skip
    assert main([*args, "--adaptor-out", str(out)]) == 2
    assert not out.exists()
    assert "already a condition of the release" in capsys.readouterr().err
    assert main(["-q", *args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["trained_parameters"] == 0
    assert payload["adaptor_id"] == ""


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing_batch_key", "no obs column 'batch' for --batch-key; columns: cell_type"),
        ("normalised", "non-integer values"),
        ("negative", "negative values"),
        ("not_hdf5", "not an HDF5 file"),
        ("truncated", "cannot be read as .h5ad"),
        ("missing_file", "no such file"),
        ("missing_layer", "no layer 'counts'; layers present: (none)"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_output(
    make: str,
    message: str,
    files: dict[str, Path],
    release_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "bad.h5ad"
    query = ad.read_h5ad(files["query"])
    extra: list[str] = []
    if make == "missing_batch_key":
        del query.obs["batch"]
        query.write_h5ad(data)
    elif make == "normalised":
        query.X = query.X.multiply(1.0 / query.X.sum(axis=1)).tocsr() * 1e4
        query.write_h5ad(data)
    elif make == "negative":
        query.X = query.X.toarray() - 1
        query.write_h5ad(data)
    elif make == "not_hdf5":
        data.write_text("gene,cell1\nA,1\n")
    elif make == "truncated":
        query.write_h5ad(data)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif make == "missing_layer":
        query.write_h5ad(data)
        extra = ["--layer", "counts"]
    out = tmp_path / "out.h5ad"
    code = main(
        [
            "site",
            "map",
            "--reference",
            str(release_dir),
            "--data",
            str(data),
            "--batch-key",
            "batch",
            "--out",
            str(out),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert str(data) in err
    assert not out.exists()


def test_existing_release_is_not_overwritten(
    files: dict[str, Path], release_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = Release.load(release_dir).content_hash
    code = main(
        [
            "admin",
            "reference",
            "build",
            "--data",
            str(files["ref"]),
            "--batch-key",
            "batch",
            "--model",
            "scpoli",
            "--out",
            str(release_dir),
            "--epochs",
            "1",
        ]
    )
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert Release.load(release_dir).content_hash == before


def test_bad_settings_are_refused_before_training(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "admin",
            "reference",
            "build",
            "--data",
            str(files["ref"]),
            "--batch-key",
            "batch",
            "--model",
            "scarches",
            "--out",
            str(tmp_path / "r"),
            "--set",
            "latent_size=3",
        ]
    )
    assert code == 2
    assert "bad setting 'latent_size=3'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
