"""Label transfer with an uncertainty in [0, 1] and an "unknown" call.

* :func:`prototype_transfer` (federated default; needs no reference cells): the label of the
  nearest prototype (scPoli), with an uncertainty calibrated per cell type from the prototypes'
  aggregate spread statistics (plain distance to the nearest prototype is what makes scPoli weak
  at flagging unseen types).
* :func:`knn_transfer`: scArches' weighted kNN on reference latents with a Gaussian kernel;
  uncertainty = 1 - p(predicted label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.neighbors import NearestNeighbors

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.prototypes import PrototypeSet, standardized_sq_distances

UNKNOWN = "unknown"
DEFAULT_KNN_NEIGHBORS = 50
DEFAULT_UNKNOWN_THRESHOLD = 0.5


@dataclass(frozen=True)
class Transfer:
    """Predicted labels for a set of cells."""

    labels: NDArray[np.object_]  # best known label of every cell
    uncertainty: NDArray[np.float32]  # in [0, 1]
    threshold: float

    @property
    def unknown(self) -> NDArray[np.bool_]:
        """Cells whose uncertainty exceeds the threshold."""
        return np.asarray(self.uncertainty > self.threshold)

    @property
    def called(self) -> NDArray[np.object_]:
        """Labels with ``unknown`` where the cell is called unknown."""
        return np.where(self.unknown, UNKNOWN, self.labels).astype(object)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"unknown threshold must be in [0, 1], got {threshold}")


def prototype_transfer(
    latent: NDArray[np.float32], prototypes: PrototypeSet, *, threshold: float
) -> Transfer:
    """Nearest-prototype labels with a per-type calibrated uncertainty.

    Distances are standardised squared distances d^2_k to each prototype in that prototype's own
    spread (diagonal Mahalanobis); a cell takes the label of the closest. Two things make it
    uncertain, and u = 1 - p(k) (1 - novelty) combines them:

    * ambiguity: p(k) is the cell's Student-t soft assignment to its type, proportional to
      (1 + d^2_k / D)^(-(D + 1) / 2) over all prototypes (D = latent dimension), which is low
      for a cell between two types;
    * novelty: 1 / (1 + (r_k / d^2_k)^2), where r_k is the radius holding about 99 % of that
      type's own cells: near 0 inside the type, 0.5 at its edge, towards 1 beyond.
    """
    _check_threshold(threshold)
    if len(prototypes) == 0:
        raise ConfigError("the release has no prototypes to transfer labels from")
    d2 = standardized_sq_distances(latent, prototypes.means, prototypes.variances)
    dim = latent.shape[1]
    rows = np.arange(d2.shape[0])
    best = d2.argmin(axis=1)
    nearest = d2[rows, best]
    log_weights = -0.5 * (dim + 1) * np.log1p(d2 / dim)
    log_weights -= log_weights.max(axis=1, keepdims=True)
    weights = np.exp(log_weights)
    assignment = weights[rows, best] / weights.sum(axis=1)
    novelty = 1.0 / (1.0 + (prototypes.radii[best] / np.maximum(nearest, 1e-12)) ** 2)
    uncertainty = (1.0 - assignment * (1.0 - novelty)).astype(np.float32)
    labels = np.asarray(prototypes.labels, dtype=object)[best]
    return Transfer(labels=labels, uncertainty=uncertainty, threshold=threshold)


def knn_transfer(
    latent: NDArray[np.float32],
    reference_latent: NDArray[np.float32],
    reference_labels: NDArray[np.object_],
    *,
    threshold: float = 0.5,
    k: int = DEFAULT_KNN_NEIGHBORS,
) -> Transfer:
    """scArches' weighted kNN label transfer.

    For each cell, its k nearest labelled reference cells at distances d_n; with
    s = sqrt(mean(d_n^2)), neighbour weights exp(-d_n / (2 / s)^2); p(label) is the normalised
    weight of neighbours with that label and the uncertainty is 1 - p(predicted label).
    """
    _check_threshold(threshold)
    labelled = np.asarray(reference_labels != "", dtype=bool)
    if not labelled.any():
        raise ConfigError("the release keeps no labelled reference cells for kNN transfer")
    ref = np.asarray(reference_latent[labelled], dtype=np.float64)
    ref_labels = np.asarray(reference_labels[labelled], dtype=object)
    k = min(k, ref.shape[0])
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(latent)
    spread = np.sqrt((distances**2).mean(axis=1, keepdims=True))
    weights = np.exp(-distances / (2.0 / np.maximum(spread, 1e-12)) ** 2)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    vocab, codes = np.unique(ref_labels.astype(str), return_inverse=True)
    probs = np.zeros((latent.shape[0], vocab.size))
    np.add.at(
        probs,
        (np.repeat(np.arange(latent.shape[0]), k), codes[neighbours].ravel()),
        weights.ravel(),
    )
    best = probs.argmax(axis=1)
    uncertainty = (1.0 - probs[np.arange(latent.shape[0]), best]).clip(0, 1).astype(np.float32)
    labels = vocab.astype(object)[best]  # one string object per label, shared by its cells
    return Transfer(labels=labels, uncertainty=uncertainty, threshold=threshold)
