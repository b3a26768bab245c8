"""Tests of fedatlas.shared.evaluation.metrics on small constructed data with known answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedatlas.shared.errors import ConfigError, FedatlasError
from fedatlas.shared.evaluation.metrics import (
    integration_scores,
    knn_purity,
    label_transfer_scores,
    unknown_auroc,
)

KEYS = {
    "nmi",
    "ari",
    "cell_type_asw",
    "batch_asw",
    "graph_connectivity",
    "bio",
    "batch",
    "overall",
}


def _blobs(
    n_per_label: int = 100, n_labels: int = 3, dims: int = 10, sep: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-separated Gaussian label clusters, batches 'x'/'y' assigned at random (mixed)."""
    rng = np.random.default_rng(seed)
    which = np.repeat(np.arange(n_labels), n_per_label)
    centers = np.eye(n_labels, dims) * sep
    latent = centers[which] + rng.normal(size=(which.size, dims))
    labels = np.array([f"type{i}" for i in which])
    batches = rng.choice(np.array(["x", "y"]), size=which.size)
    return latent, labels, batches


def _naive_silhouette(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-cell silhouette straight from the definition (singleton groups score 0)."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    out = np.zeros(len(x))
    for i in range(len(x)):
        own = groups == groups[i]
        if own.sum() == 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, groups == g].mean() for g in np.unique(groups) if g != groups[i])
        out[i] = (b - a) / max(a, b)
    return out


# --------------------------------------------------------------------------------------------------
# integration_scores


def test_mixed_batches_in_separated_clusters_score_high() -> None:
    latent, labels, batches = _blobs()
    s = integration_scores(latent, labels, batches)
    assert set(s) == KEYS
    assert s["nmi"] == pytest.approx(1.0)
    assert s["ari"] == pytest.approx(1.0)
    assert s["cell_type_asw"] > 0.8
    assert s["batch_asw"] > 0.9
    assert s["graph_connectivity"] == 1.0
    assert all(isinstance(v, float) for v in s.values())


def test_separated_batches_score_lower_on_batch_metrics() -> None:
    latent, labels, batches = _blobs()
    mixed = integration_scores(latent, labels, batches)
    shifted = latent.copy()
    shifted[batches == "y", 5] += 50.0  # batch y lies far away from batch x
    split = integration_scores(shifted, labels, batches)
    assert split["batch_asw"] < 0.3 < mixed["batch_asw"]
    # each label's cells fall into two disconnected kNN groups, one per batch
    assert split["graph_connectivity"] < 1.0
    assert split["graph_connectivity"] == pytest.approx(0.5, abs=0.1)
    assert split["batch"] < mixed["batch"] - 0.4
    assert split["overall"] < mixed["overall"]


def test_random_latent_has_nmi_near_zero() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(400, 8))
    labels = rng.choice(np.array(["a", "b", "c", "d"]), size=400)
    batches = rng.choice(np.array(["x", "y"]), size=400)
    s = integration_scores(latent, labels, batches)
    assert s["nmi"] < 0.05
    assert abs(s["ari"]) < 0.05
    assert s["cell_type_asw"] == pytest.approx(0.5, abs=0.05)


def test_aggregates_follow_their_definitions() -> None:
    latent, labels, batches = _blobs(n_per_label=60, sep=4.0, seed=3)
    s = integration_scores(latent, labels, batches)
    assert s["bio"] == pytest.approx((s["nmi"] + s["ari"] + s["cell_type_asw"]) / 3, rel=1e-12)
    assert s["batch"] == pytest.approx((s["batch_asw"] + s["graph_connectivity"]) / 2, rel=1e-12)
    assert s["overall"] == 0.6 * s["bio"] + 0.4 * s["batch"]


def test_asw_scores_match_definition_from_scratch() -> None:
    # label 'c' only comes from batch 'x', so batch_asw must skip it
    rng = np.random.default_rng(5)
    latent = rng.normal(size=(45, 3))
    latent[15:30] += 3.0
    latent[30:] -= 3.0
    labels = np.repeat(np.array(["a", "b", "c"]), 15)
    batches = np.where(rng.random(45) < 0.5, "x", "y")
    batches[30:] = "x"
    s = integration_scores(latent, labels, batches)

    expected_ct = (_naive_silhouette(latent, labels).mean() + 1) / 2
    assert s["cell_type_asw"] == pytest.approx(expected_ct, rel=1e-9)

    per_label = []
    for lab in ("a", "b"):
        m = labels == lab
        per_label.append(np.mean(1 - np.abs(_naive_silhouette(latent[m], batches[m]))))
    assert s["batch_asw"] == pytest.approx(np.mean(per_label), rel=1e-9)


def test_batch_asw_is_nan_with_a_single_batch() -> None:
    latent, labels, _ = _blobs(n_per_label=30)
    s = integration_scores(latent, labels, np.full(len(labels), "only"))
    assert np.isnan(s["batch_asw"])
    assert np.isnan(s["overall"])
    assert s["graph_connectivity"] == 1.0


def test_graph_connectivity_hand_built() -> None:
    # label A: two tight groups of 4 (at 0 and at 100); label B: a chain of 8 points at 50.
    # With k = 3 each A point's neighbours are the other 3 of its group -> A splits 4 + 4 (0.5);
    # B's chain is connected (1.0). Mean over labels: 0.75.
    a1 = np.arange(4) * 0.01
    a2 = 100 + np.arange(4) * 0.01
    chain = 50 + np.arange(8) * 0.1
    latent = np.concatenate([a1, a2, chain])[:, None]
    labels = ["A"] * 8 + ["B"] * 8
    batches = ["x", "y"] * 8
    s = integration_scores(latent, labels, batches, n_neighbors=3)
    assert s["graph_connectivity"] == pytest.approx(0.75)


def test_subsampling_is_close_to_full_computation() -> None:
    latent, labels, batches = _blobs(n_per_label=800, sep=5.0, seed=2)
    full = integration_scores(latent, labels, batches)
    sub = integration_scores(latent, labels, batches, max_cells=1200)
    again = integration_scores(latent, labels, batches, max_cells=1200)
    assert sub == again  # seeded -> deterministic
    assert sub["cell_type_asw"] != full["cell_type_asw"]  # really computed on a subsample
    for key in KEYS:
        assert sub[key] == pytest.approx(full[key], abs=0.05), key
    # max_cells >= n means no subsampling at all
    assert integration_scores(latent, labels, batches, max_cells=len(labels)) == full


def test_pandas_categoricals_are_accepted() -> None:
    latent, labels, batches = _blobs(n_per_label=40)
    plain = integration_scores(latent, labels, batches)
    cat = integration_scores(latent, pd.Categorical(labels), pd.Series(batches, dtype="category"))
    assert cat == plain


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"latent": np.zeros(10)}, "latent"),
        ({"latent": np.full((10, 2), np.nan)}, "finite"),
        ({"labels": ["a", "b"] * 4}, "labels"),
        ({"batches": ["x"] * 11}, "batches"),
        ({"labels": ["a"] * 10}, "2 distinct labels"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"max_cells": 1}, "max_cells"),
    ],
)
def test_integration_scores_validation(kwargs: dict[str, object], needle: str) -> None:
    rng = np.random.default_rng(0)
    args: dict[str, Any] = {
        "latent": rng.normal(size=(10, 2)),
        "labels": ["a", "b"] * 5,
        "batches": ["x"] * 5 + ["y"] * 5,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=needle):
        integration_scores(**args)


def test_shape_error_names_expected_and_actual() -> None:
    with pytest.raises(ConfigError, match=r"labels.*expected shape \(10,\).*got shape \(8,\)"):
        integration_scores(np.zeros((10, 2)), ["a"] * 8, ["x"] * 10)


# --------------------------------------------------------------------------------------------------
# label_transfer_scores


def test_label_transfer_scores_hand_computed() -> None:
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "d", "c"]
    # accuracy: positions 0, 1, 3, 5 match -> 4/6
    # F1 = 2TP / (2TP + FP + FN), over the union {a, b, c, d}:
    #   a: TP 2, FP 0, FN 1 -> 4/5 = 0.8
    #   b: TP 1, FP 1, FN 1 -> 2/4 = 0.5
    #   c: TP 1, FP 0, FN 0 -> 1.0
    #   d: TP 0, FP 1, FN 0 -> 0.0 (predicted only)
    # macro = (0.8 + 0.5 + 1 + 0) / 4 = 0.575
    # weighted by true support (3, 2, 1, 0): (3*0.8 + 2*0.5 + 1*1) / 6 = 4.4 / 6
    s = label_transfer_scores(true, pred)
    assert s == pytest.approx({"accuracy": 4 / 6, "macro_f1": 0.575, "weighted_f1": 4.4 / 6})


def test_label_transfer_scores_perfect_and_mixed_types() -> None:
    s = label_transfer_scores(pd.Categorical(["t", "b", "t"]), np.array(["t", "b", "t"]))
    assert s == {"accuracy": 1.0, "macro_f1": 1.0, "weighted_f1": 1.0}


def test_label_transfer_scores_length_mismatch() -> None:
    with pytest.raises(ConfigError, match="predicted"):
        label_transfer_scores(["a", "b"], ["a"])
    with pytest.raises(ConfigError, match="at least one"):
        label_transfer_scores([], [])


# --------------------------------------------------------------------------------------------------
# unknown_auroc


def test_unknown_auroc_perfect_random_and_inverted() -> None:
    is_unseen = np.array([False] * 50 + [True] * 50)
    uncertainty = np.linspace(0, 1, 100)
    assert unknown_auroc(uncertainty, is_unseen) == 1.0
    assert unknown_auroc(-uncertainty, is_unseen) == 0.0
    assert unknown_auroc(uncertainty, is_unseen.astype(int)) == 1.0
    rng = np.random.default_rng(0)
    random_auc = unknown_auroc(rng.random(2000), rng.random(2000) < 0.3)
    assert random_auc == pytest.approx(0.5, abs=0.05)


def test_unknown_auroc_needs_both_classes() -> None:
    with pytest.raises(ConfigError, match="both seen and unseen"):
        unknown_auroc([0.1, 0.2, 0.3], [False, False, False])
    with pytest.raises(FedatlasError, match="both seen and unseen"):
        unknown_auroc([0.1, 0.2], [True, True])


def test_unknown_auroc_validation() -> None:
    with pytest.raises(ConfigError, match="is_unseen"):
        unknown_auroc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ConfigError, match="finite"):
        unknown_auroc([0.1, np.nan], [True, False])
    with pytest.raises(ConfigError, match="is_unseen"):
        unknown_auroc([0.1, 0.2], [2, 0])


# --------------------------------------------------------------------------------------------------
# knn_purity


def test_knn_purity_separated_clusters_is_one() -> None:
    ref, ref_labels, _ = _blobs(n_per_label=50, seed=0)
    query, query_labels, _ = _blobs(n_per_label=20, seed=1)
    assert knn_purity(query, query_labels, ref, ref_labels) == 1.0


def test_knn_purity_shuffled_labels_is_chance() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 5))
    query = rng.normal(size=(500, 5))
    names = np.array(["a", "b", "c", "d"])
    p = knn_purity(query, rng.choice(names, 500), ref, rng.choice(names, 2000), k=15)
    assert p == pytest.approx(1 / 4, abs=0.03)


def test_knn_purity_hand_built_and_small_reference() -> None:
    ref = np.array([[0.0], [1.0], [2.0], [10.0]])
    ref_labels = ["a", "a", "b", "b"]
    query = np.array([[0.1], [9.0]])
    # query 0 -> neighbours 0, 1 (a, a): 1.0; query 1 -> neighbours 10, 2 (b, b): 1.0 with k=2
    assert knn_purity(query, ["a", "b"], ref, ref_labels, k=2) == 1.0
    # k=3: query 0 -> a, a, b = 2/3; query 1 -> b, b, a = 2/3
    assert knn_purity(query, ["a", "b"], ref, ref_labels, k=3) == pytest.approx(2 / 3)
    # k larger than the reference uses all 4 reference cells: (2/4 + 2/4) / 2
    assert knn_purity(query, ["a", "b"], ref, ref_labels, k=50) == pytest.approx(0.5)


def test_knn_purity_validation() -> None:
    ref = np.zeros((5, 3))
    with pytest.raises(ConfigError, match="same number of dimensions"):
        knn_purity(np.zeros((2, 2)), ["a", "b"], ref, ["a"] * 5)
    with pytest.raises(ConfigError, match="query_labels"):
        knn_purity(np.zeros((2, 3)), ["a"], ref, ["a"] * 5)
    with pytest.raises(ConfigError, match="reference_labels"):
        knn_purity(np.zeros((2, 3)), ["a", "b"], ref, ["a"] * 4)
    with pytest.raises(ConfigError, match="query_latent"):
        knn_purity(np.zeros(3), ["a"], ref, ["a"] * 5)
    with pytest.raises(ConfigError, match="reference_latent"):
        knn_purity(np.zeros((2, 3)), ["a", "b"], np.full((5, 3), np.inf), ["a"] * 5)
    with pytest.raises(ConfigError, match="k must be"):
        knn_purity(np.zeros((2, 3)), ["a", "b"], ref, ["a"] * 5, k=0)
