"""Release directories: pickle-free, content-hashed, verified on load."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from anndata import AnnData

from fedatlas.shared.errors import ConfigError, ReleaseError
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.release import MANIFEST_FILE, WEIGHTS_FILE, Release


@pytest.fixture
def saved(tiny_builds: dict[str, BuildResult], tmp_path: Path) -> tuple[Release, Path]:
    release = tiny_builds["scpoli"].release
    return release, release.save(tmp_path / "release")


def test_round_trip(saved: tuple[Release, Path]) -> None:
    release, path = saved
    loaded = Release.load(path)
    assert loaded.content_hash == release.content_hash
    assert loaded.genes == release.genes
    assert len(loaded.genes) == 200
    assert loaded.condition_names == ["reference/r1", "reference/r2", "reference/r3"]
    assert loaded.label_levels == ["cell_type"]
    assert loaded.prototypes("cell_type").labels == ("A", "B", "C")
    assert loaded.content["preprocessing"]["n_top_genes"] == 200
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["content_hash"] == release.content_hash
    assert set(manifest["content"]["tensors"]) == set(release.tensors)
    assert all(len(e["sha256"]) == 71 for e in manifest["content"]["tensors"].values())
    model = loaded.build_model()
    assert not model.training
    assert model.trainable_parameters() == []


def test_a_changed_weight_is_detected(saved: tuple[Release, Path]) -> None:
    release, path = saved
    tensors = dict(release.tensors)
    tensors["model.output.bias"] = tensors["model.output.bias"].clone()
    tensors["model.output.bias"][3] += 0.5
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(ReleaseError, match=r"tensor 'model.output.bias' does not match"):
        Release.load(path)


def test_a_changed_manifest_is_detected(saved: tuple[Release, Path]) -> None:
    _, path = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["content"]["genes"][0] = "SOMETHING_ELSE"
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ReleaseError, match="content hash mismatch"):
        Release.load(path)


def test_pickled_weights_are_never_loaded(saved: tuple[Release, Path]) -> None:
    _, path = saved
    (path / WEIGHTS_FILE).write_bytes(pickle.dumps({"model.output.bias": torch.zeros(3)}))
    with pytest.raises(ReleaseError, match="cannot be read"):
        Release.load(path)


def test_missing_or_existing_directories(saved: tuple[Release, Path], tmp_path: Path) -> None:
    release, path = saved
    with pytest.raises(ReleaseError, match=r"manifest\.json is missing"):
        Release.load(tmp_path / "nowhere")
    with pytest.raises(ReleaseError, match="already exists"):
        release.save(path)
    assert Release.load(release.save(path, overwrite=True)).content_hash == release.content_hash


def test_same_seed_same_release(
    tiny_builds: dict[str, BuildResult], reference_adata: AnnData
) -> None:
    from conftest import cells_of

    from fedatlas.shared.model.reference import train_reference

    again = train_reference(
        cells_of(reference_adata),
        preset="scpoli",
        epochs=12,
        n_top_genes=200,
        seed=0,
        progress=False,
    )
    assert again.release.content_hash == tiny_builds["scpoli"].release.content_hash


def test_condition_embeddings_are_retrievable(tiny_builds: dict[str, BuildResult]) -> None:
    release = tiny_builds["scpoli"].release
    found = release.condition_embeddings()
    assert found is not None
    names, table = found
    assert names == release.condition_names
    assert table.shape == (3, 10)
    assert not np.allclose(table[0], table[1])  # each batch learnt its own embedding
    assert tiny_builds["scarches"].release.condition_embeddings() is None


def test_release_records_the_presets_transfer_method(
    tiny_builds: dict[str, BuildResult], reference_adata: AnnData
) -> None:
    from conftest import cells_of

    from fedatlas.shared.model.reference import train_reference

    methods = {p: b.release.content["transfer"]["method"] for p, b in tiny_builds.items()}
    assert methods == {"scpoli": "prototype", "scarches": "knn", "scalex": "knn"}
    # without reference latents kNN is impossible: the release falls back to prototypes
    lean = train_reference(
        cells_of(reference_adata),
        preset="scalex",
        epochs=2,
        n_top_genes=200,
        seed=0,
        keep_latents=False,
        progress=False,
    ).release
    assert lean.content["transfer"]["method"] == "prototype"
    assert lean.content["reference"]["keeps_latents"] is False
    assert lean.content["transfer"]["unknown_thresholds"] == {"prototype": {"cell_type": 0.5}}
    with pytest.raises(ConfigError, match=r"knn transfer is not available.*reference latents"):
        lean.unknown_thresholds("knn")
    # a release written before thresholds were kept per level recorded one number per method
    content = copy.deepcopy(lean.content)
    content["transfer"]["unknown_thresholds"] = {"prototype": 0.4}
    earlier = Release(content, lean.tensors, lean.provenance)
    assert earlier.unknown_thresholds("prototype") == {"cell_type": 0.4}


def test_release_calibrates_the_knn_unknown_threshold(
    tiny_builds: dict[str, BuildResult], reference_adata: AnnData, query_adata: AnnData
) -> None:
    from conftest import cells_of

    from fedatlas.shared.model.label_transfer import calibrate_knn_threshold
    from fedatlas.shared.model.mapping import MappingOptions, map_onto
    from fedatlas.shared.model.reference import train_reference

    built = tiny_builds["scarches"]
    transfer = built.release.content["transfer"]
    labels = cells_of(reference_adata).labels["cell_type"]
    expected, record = calibrate_knn_threshold(built.latent, labels, built.conditions)
    assert transfer["unknown_thresholds"] == {
        "prototype": {"cell_type": 0.5},
        "knn": {"cell_type": expected},
    }
    assert transfer["knn_calibration"] == {"cell_type": record}
    assert record["scheme"] == "other conditions"
    assert record["quantile"] == 0.99
    # a prototype preset keeps latents too, so a site may still choose kNN with its threshold
    assert set(tiny_builds["scpoli"].release.content["transfer"]["unknown_thresholds"]) == {
        "prototype",
        "knn",
    }
    # sites use the threshold of the method they transfer with, unless they set their own
    query = cells_of(query_adata, label_key=None)
    mapped = map_onto(built.release, query, MappingOptions(epochs=2), progress=False)
    assert mapped.unknown_thresholds == {"cell_type": expected}
    assert mapped.transfers["cell_type"].threshold == expected
    by_prototype = map_onto(
        built.release, query, MappingOptions(epochs=2, transfer="prototype"), progress=False
    )
    assert by_prototype.unknown_thresholds == {"cell_type": 0.5}
    own = map_onto(
        built.release, query, MappingOptions(epochs=2, unknown_threshold=0.3), progress=False
    )
    assert own.unknown_thresholds == {"cell_type": 0.3}
    # an operator's threshold replaces the default method's, and must be a probability
    fixed = train_reference(
        cells_of(reference_adata), preset="scarches", epochs=2, n_top_genes=200, seed=0,
        unknown_threshold=0.25, progress=False,
    ).release  # fmt: skip
    assert fixed.unknown_thresholds("knn") == {"cell_type": 0.25}
    assert fixed.unknown_thresholds("prototype") == {"cell_type": 0.5}
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        train_reference(
            cells_of(reference_adata), preset="scarches", epochs=1, n_top_genes=200,
            unknown_threshold=2.0, progress=False,
        )  # fmt: skip


def test_knn_thresholds_are_calibrated_per_label_level(
    reference_adata: AnnData, query_adata: AnnData
) -> None:
    """A finer level that splits every type at random has mixed neighbourhoods, so its kNN
    uncertainty runs far above the primary level's: it gets a threshold of its own, and with it
    a site's seen cells keep their fine labels instead of nearly all being called unknown."""
    from conftest import cells_of

    from fedatlas.shared.data.dataset import extract_cells
    from fedatlas.shared.model.label_transfer import calibrate_knn_threshold
    from fedatlas.shared.model.mapping import MappingOptions, map_onto
    from fedatlas.shared.model.reference import train_reference

    adata = reference_adata.copy()
    halves = np.random.default_rng(0).choice(["1", "2"], adata.n_obs)
    adata.obs["subtype"] = [f"{t}{h}" for t, h in zip(adata.obs["cell_type"], halves, strict=True)]
    levels = ["cell_type", "subtype"]
    cells = extract_cells(adata, source="test", batch_key="batch", label_keys=levels)
    built = train_reference(
        cells, preset="scarches", epochs=12, n_top_genes=200, seed=0, progress=False
    )
    thresholds = built.release.unknown_thresholds("knn")
    records = built.release.content["transfer"]["knn_calibration"]
    for level in levels:
        expected, record = calibrate_knn_threshold(
            built.latent, cells.labels[level], built.conditions
        )
        assert thresholds[level] == expected
        assert records[level] == record
    assert built.release.unknown_thresholds("prototype") == dict.fromkeys(levels, 0.5)
    # measured: cell_type 0.020, subtype 0.500 (each neighbourhood is about half the other half)
    assert thresholds["subtype"] > thresholds["cell_type"] + 0.3

    mapped = map_onto(
        built.release, cells_of(query_adata, None), MappingOptions(epochs=2), progress=False
    )
    assert mapped.unknown_thresholds == thresholds
    seen = query_adata.obs["cell_type"].to_numpy() != "D"
    fine = mapped.transfers["subtype"]
    assert fine.threshold == thresholds["subtype"]
    # measured: 3.4 % of seen cells unknown at the subtype's threshold, 100 % at cell_type's
    assert fine.unknown[seen].mean() <= 0.15
    assert (fine.uncertainty[seen] > thresholds["cell_type"]).mean() >= 0.9
