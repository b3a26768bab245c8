"""Prototype and kNN label transfer, uncertainty in [0, 1], unknown calls; prototype merging."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.label_transfer import (
    UNKNOWN,
    calibrate_knn_threshold,
    knn_transfer,
    prototype_transfer,
)
from fedatlas.shared.model.prototypes import PrototypeSet, merge_prototype_sets


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = {"T": np.zeros(5), "B": np.full(5, 6.0), "NK": np.r_[6.0, -6.0, 0, 0, 0]}
    latent = np.vstack([c + rng.normal(0, 1, (200, 5)) for c in centres.values()])
    labels = np.repeat(list(centres), 200).astype(object)
    return latent.astype(np.float32), labels


def test_prototype_transfer_labels_and_flags_the_unseen() -> None:
    latent, labels = _clusters()
    prototypes, _ = PrototypeSet.from_latents(latent, labels, "ref")
    query, truth = _clusters(seed=1)
    stranger = np.full((50, 5), -8.0, np.float32) + np.random.default_rng(2).normal(0, 1, (50, 5))
    result = prototype_transfer(np.vstack([query, stranger]), prototypes, threshold=0.5)
    seen = slice(0, len(query))
    assert np.mean(result.labels[seen] == truth) > 0.99
    assert np.all((result.uncertainty >= 0) & (result.uncertainty <= 1))
    # at most ~1 % of a type's own cells lie beyond its radius, where uncertainty passes 0.5
    assert np.mean(result.unknown[seen]) < 0.03
    assert np.all(result.unknown[len(query) :])
    assert set(result.called[len(query) :]) == {UNKNOWN}
    # uncertainty is 0 at a prototype and grows with distance from it
    at_centre = prototype_transfer(prototypes.means, prototypes, threshold=0.5)
    assert np.all(at_centre.uncertainty < 1e-3)
    path = np.linspace(0, 1, 20)[:, None] * np.array([[-12.0, 0, 0, 0, 0]], np.float32)
    along = prototype_transfer(path.astype(np.float32), prototypes, threshold=0.5).uncertainty
    assert np.all(np.diff(along) >= 0)


def test_a_small_diffuse_type_does_not_capture_shifted_cells() -> None:
    # A common type (1,000 cells, unit spread) and a rare diffuse one (36 cells, spread 3 per
    # dimension, 10 units away). A condition shift moves the common type's cells 8 units off
    # both: in each prototype's own spread the diffuse one is nearer (164 / 9 = 18 against 64),
    # in the shared scale the common one (64 against 164, both over ~1.3).
    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, (1000, 4))
    rare = np.r_[10.0, 0, 0, 0] + rng.normal(0, 3, (36, 4))
    latent = np.vstack([common, rare]).astype(np.float32)
    labels = np.array(["CD4 T"] * 1000 + ["rare"] * 36, dtype=object)
    prototypes, _ = PrototypeSet.from_latents(latent, labels, "ref")
    shifted = (common[:200] + np.r_[0, 8.0, 0, 0]).astype(np.float32)
    result = prototype_transfer(shifted, prototypes, threshold=0.5)
    assert np.mean(result.labels == "CD4 T") > 0.95
    # ... and being far from its type, each shifted cell is uncertain
    assert np.median(result.uncertainty) > 0.5


def test_knn_transfer_follows_scarches() -> None:
    latent, labels = _clusters()
    query, truth = _clusters(seed=1)
    result = knn_transfer(query, latent, labels, threshold=0.5, k=15)
    assert np.mean(result.labels == truth) > 0.99
    # a cell halfway between two types has neighbours of both: uncertain
    middle = knn_transfer(np.full((1, 5), 3.0, np.float32), latent, labels, k=30)
    assert middle.uncertainty[0] > 0.2
    unlabelled = labels.copy()
    unlabelled[:] = ""
    with pytest.raises(ConfigError, match="no labelled reference cells"):
        knn_transfer(query, latent, unlabelled)


def test_knn_uncertainty_is_exactly_zero_among_neighbours_of_one_label() -> None:
    latent, labels = _clusters()
    inside = knn_transfer(latent[:10], latent[:200], labels[:200], k=50)  # T cells only
    assert np.all(inside.uncertainty == 0.0)  # not 1 - 0.9999999: a 0 threshold stays usable


def _two_batches(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two conditions of the same three types; the second shifted and noisier, so that
    some of its cells sit between types."""
    first, labels = _clusters(seed)
    second, _ = _clusters(seed + 10)
    first, second = first / 2, second / 2 + 0.4 + np.random.default_rng(seed).normal(0, 1, (600, 5))
    conditions = np.repeat([0, 1], len(labels))
    return np.vstack([first, second]), np.concatenate([labels, labels]), conditions


def test_knn_threshold_is_the_quantile_of_uncertainty_from_other_conditions() -> None:
    latent, labels, conditions = _two_batches()
    labels[::7] = ""  # unlabelled cells neither vote nor count
    threshold, record = calibrate_knn_threshold(latent, labels, conditions, quantile=0.99, k=20)
    # the same thing by hand: each condition's labelled cells labelled from the other one
    scores = []
    for c in (0, 1):
        own = (conditions == c) & (labels != "")
        other = (conditions != c) & (labels != "")
        scores.append(knn_transfer(latent[own], latent[other], labels[other], k=20).uncertainty)
    expected = np.quantile(np.concatenate(scores), 0.99)
    assert threshold == pytest.approx(expected, rel=1e-6)
    assert record == {
        "quantile": 0.99, "neighbors": 20, "scheme": "other conditions",
        "cells": int((labels != "").sum()), "threshold": threshold,
    }  # fmt: skip
    assert 0.0 < threshold < 0.5  # the few cells between types doubt, none tosses a coin
    # a laxer quantile never gives a higher threshold
    assert calibrate_knn_threshold(latent, labels, conditions, quantile=0.9, k=20)[0] <= threshold


def test_knn_threshold_of_a_single_condition_leaves_each_cell_out() -> None:
    latent, labels, conditions = _two_batches()
    latent, labels = latent[conditions == 1], labels[conditions == 1]
    alone = np.zeros(len(labels), dtype=np.int64)
    threshold, record = calibrate_knn_threshold(latent, labels, alone, quantile=0.99, k=10)
    assert record["scheme"] == "leave one out"
    # by hand: every cell labelled from all the others
    scores = [
        knn_transfer(latent[[i]], np.delete(latent, i, 0), np.delete(labels, i), k=10).uncertainty
        for i in range(len(labels))
    ]
    assert threshold == pytest.approx(np.quantile(np.concatenate(scores), 0.99), rel=1e-6)
    # with its own position among the neighbours every cell would look more certain
    with_self = knn_transfer(latent, latent, labels, k=10).uncertainty
    assert np.quantile(with_self, 0.99) < threshold
    # a large reference is scored on a seeded sample
    capped = calibrate_knn_threshold(latent, labels, alone, k=10, max_cells=100, seed=3)
    assert capped[1]["cells"] == 100
    assert capped == calibrate_knn_threshold(latent, labels, alone, k=10, max_cells=100, seed=3)
    with pytest.raises(ConfigError, match="quantile"):
        calibrate_knn_threshold(latent, labels, alone, quantile=1.0)


def test_threshold_must_be_a_probability() -> None:
    latent, labels = _clusters()
    prototypes, _ = PrototypeSet.from_latents(latent, labels, "ref")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        prototype_transfer(latent, prototypes, threshold=1.5)


def test_small_labels_stay_at_the_site() -> None:
    latent, labels = _clusters()
    labels[:5] = "rare"
    labels[5:200] = ""  # partially labelled
    prototypes, dropped = PrototypeSet.from_latents(latent, labels, "site", min_cells=10)
    assert dropped == {"rare": 5}
    assert prototypes.labels == ("B", "NK")


def test_merging_equals_pooling_the_cells_and_ignores_order() -> None:
    latent, labels = _clusters()
    parts = [slice(0, 150), slice(150, 430), slice(430, 600)]
    sets = [
        PrototypeSet.from_latents(latent[p], labels[p], f"site{i}")[0] for i, p in enumerate(parts)
    ]
    pooled, _ = PrototypeSet.from_latents(latent, labels, "all")
    merged = {merge_prototype_sets(list(p)).digest() for p in itertools.permutations(sets)}
    assert len(merged) == 1
    result = merge_prototype_sets(sets)
    assert result.labels == pooled.labels
    np.testing.assert_array_equal(result.counts, pooled.counts)
    np.testing.assert_allclose(result.means, pooled.means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.variances, pooled.variances, rtol=1e-4)
    assert result.sources[result.labels.index("NK")] == ("site1", "site2")
    assert result.sources[result.labels.index("B")] == ("site1",)
