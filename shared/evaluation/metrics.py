"""scIB-style integration and label-transfer metrics (Luecken et al. 2022 definitions).

Everything here is plain numpy / scipy / scikit-learn. Scores are returned as Python floats so they
can go straight into JSON reports.

Integration scores (:func:`integration_scores`):

* ``nmi`` / ``ari``: KMeans on the latent with k = number of distinct labels, compared to the labels
  (normalised mutual information with arithmetic normalisation; adjusted Rand index).
* ``cell_type_asw``: ``(silhouette(latent, labels) + 1) / 2``.
* ``batch_asw``: scib's ``silhouette_batch``: within each label, per-cell silhouette with batches as
  the clusters, scored ``1 - |s|``, averaged per label, then averaged over labels.
* ``graph_connectivity``: for each label, the fraction of its cells in the largest connected
  component of the kNN graph restricted to that label; averaged over labels.
* ``bio`` = mean(nmi, ari, cell_type_asw), ``batch`` = mean(batch_asw, graph_connectivity),
  ``overall`` = 0.6 * bio + 0.4 * batch.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from numpy.typing import ArrayLike
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
    roc_auc_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

from fedatlas.shared.errors import ConfigError

__all__ = [
    "integration_scores",
    "knn_purity",
    "label_transfer_scores",
    "unknown_auroc",
]

FloatArray = npt.NDArray[np.float64]
StrArray = npt.NDArray[np.str_]

# --------------------------------------------------------------------------------------------------
# input validation helpers


def _as_latent(latent: ArrayLike, name: str) -> FloatArray:
    """Return ``latent`` as a finite 2-D float64 array with at least one row, else ConfigError."""
    try:
        arr = np.asarray(latent, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a numeric 2-D array (cells x dims): {exc}") from exc
    if arr.ndim != 2:
        raise ConfigError(
            f"{name} must be a 2-D array (cells x dims); expected shape (n_cells, n_dims), "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(
            f"{name} must have at least one cell and one dimension; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ConfigError(f"{name} must be finite; it holds {n_bad} NaN or infinite value(s)")
    return arr


def _as_labels(values: ArrayLike, name: str, n_expected: int | None = None) -> StrArray:
    """Return ``values`` as a 1-D array of strings (pandas Categoricals/Series work too)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be 1-D (one entry per cell); got shape {arr.shape}")
    if n_expected is not None and arr.shape[0] != n_expected:
        raise ConfigError(
            f"{name} must have one entry per cell: expected shape ({n_expected},), "
            f"got shape {arr.shape}"
        )
    return arr.astype(str)


def _check_n_neighbors(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


# --------------------------------------------------------------------------------------------------
# individual integration metrics


def _cell_type_asw(latent: FloatArray, labels: StrArray) -> float:
    n_labels = np.unique(labels).size
    if not 2 <= n_labels <= latent.shape[0] - 1:  # silhouette is undefined otherwise
        return math.nan
    return float((silhouette_score(latent, labels, metric="euclidean") + 1.0) / 2.0)


def _batch_asw(latent: FloatArray, labels: StrArray, batches: StrArray) -> float:
    per_label: list[float] = []
    for label in np.unique(labels):
        mask = labels == label
        batch_of_label = batches[mask]
        n_batches = np.unique(batch_of_label).size
        # One batch: nothing to mix. As many batches as cells: silhouette is undefined.
        if n_batches < 2 or n_batches > batch_of_label.size - 1:
            continue
        s = silhouette_samples(latent[mask], batch_of_label, metric="euclidean")
        per_label.append(float(np.mean(1.0 - np.abs(s))))
    if not per_label:
        return math.nan
    return float(np.mean(per_label))


def _knn_graph(latent: FloatArray, n_neighbors: int) -> sp.csr_matrix:
    """Undirected exact kNN graph (self excluded) as a symmetric CSR adjacency matrix."""
    n = latent.shape[0]
    k = min(n_neighbors, n - 1)
    if k < 1:
        return sp.csr_matrix((n, n), dtype=np.float64)
    nn = NearestNeighbors(n_neighbors=k).fit(latent)
    # kneighbors() without X excludes each point itself (by index, so duplicates are safe).
    neighbors = nn.kneighbors(return_distance=False)
    rows = np.repeat(np.arange(n), k)
    data = np.ones(rows.size, dtype=np.float64)
    adj = sp.csr_matrix((data, (rows, neighbors.ravel())), shape=(n, n))
    sym: sp.csr_matrix = ((adj + adj.T) > 0).astype(np.float64).tocsr()
    return sym


def _graph_connectivity(latent: FloatArray, labels: StrArray, n_neighbors: int) -> float:
    graph = _knn_graph(latent, n_neighbors)
    per_label: list[float] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        sub = graph[idx][:, idx]
        _, component = connected_components(sub, directed=False)
        largest = int(np.bincount(component).max())
        per_label.append(largest / idx.size)
    return float(np.mean(per_label))


# --------------------------------------------------------------------------------------------------
# public API


def integration_scores(
    latent: np.ndarray,
    labels: ArrayLike,
    batches: ArrayLike,
    *,
    n_neighbors: int = 15,
    seed: int = 0,
    max_cells: int = 20_000,
) -> dict[str, float]:
    """scIB-style bio-conservation and batch-correction scores of an integrated latent space.

    Returns ``nmi``, ``ari``, ``cell_type_asw``, ``batch_asw``, ``graph_connectivity``,
    ``bio`` (mean of the first three), ``batch`` (mean of batch_asw and graph_connectivity) and
    ``overall`` (0.6 * bio + 0.4 * batch); all are in [0, 1], higher is better.

    If there are more than ``max_cells`` cells, every score is computed on a random subsample of
    ``max_cells`` cells drawn with ``seed`` (so large benchmarks stay fast); the KMeans behind
    NMI/ARI is seeded with ``seed`` as well, so results are deterministic.

    ``batch_asw`` skips labels whose cells come from a single batch; if no label has cells from two
    or more batches it is NaN (and so are ``batch`` and ``overall``). ``cell_type_asw`` is NaN
    when the silhouette is undefined (as many labels as cells).
    """
    X = _as_latent(latent, "latent")
    n = X.shape[0]
    y = _as_labels(labels, "labels", n)
    b = _as_labels(batches, "batches", n)
    _check_n_neighbors(n_neighbors, "n_neighbors")
    if isinstance(max_cells, bool) or not isinstance(max_cells, int | np.integer) or max_cells < 2:
        raise ConfigError(f"max_cells must be an integer >= 2; got {max_cells!r}")

    note = ""
    if n > max_cells:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(n, size=int(max_cells), replace=False))
        X, y, b = X[keep], y[keep], b[keep]
        note = f" (after subsampling {n} cells to max_cells={max_cells})"

    n_labels = np.unique(y).size
    if n_labels < 2:
        raise ConfigError(
            f"integration_scores needs at least 2 distinct labels; got {n_labels}{note}"
        )

    clusters = KMeans(n_clusters=n_labels, n_init=10, random_state=seed).fit_predict(X)
    nmi = float(normalized_mutual_info_score(y, clusters, average_method="arithmetic"))
    ari = float(adjusted_rand_score(y, clusters))
    cell_type_asw = _cell_type_asw(X, y)
    batch_asw = _batch_asw(X, y, b)
    graph_conn = _graph_connectivity(X, y, int(n_neighbors))

    bio = (nmi + ari + cell_type_asw) / 3.0
    batch = (batch_asw + graph_conn) / 2.0
    overall = 0.6 * bio + 0.4 * batch
    return {
        "nmi": nmi,
        "ari": ari,
        "cell_type_asw": cell_type_asw,
        "batch_asw": batch_asw,
        "graph_connectivity": graph_conn,
        "bio": bio,
        "batch": batch,
        "overall": overall,
    }


def label_transfer_scores(true: ArrayLike, predicted: ArrayLike) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted-F1 of predicted vs true labels (compared as strings).

    F1 is computed over the sorted union of true and predicted labels, so a label that is only ever
    predicted (never true) counts in the macro average with F1 0; classes with no true and no
    predicted cells cannot occur, and undefined precision/recall count as 0.
    """
    t = _as_labels(true, "true")
    p = _as_labels(predicted, "predicted", t.shape[0])
    if t.size == 0:
        raise ConfigError("label_transfer_scores needs at least one cell; got empty arrays")
    union = np.union1d(t, p)  # sorted
    return {
        "accuracy": float(np.mean(t == p)),
        "macro_f1": float(f1_score(t, p, labels=union, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(t, p, labels=union, average="weighted", zero_division=0)),
    }


def unknown_auroc(uncertainty: ArrayLike, is_unseen: ArrayLike) -> float:
    """AUROC of ``uncertainty`` for separating unseen (positive) from seen cells.

    1.0 means every unseen cell is more uncertain than every seen cell; 0.5 is chance. Raises
    ConfigError if only one of the two classes is present.
    """
    u = np.asarray(uncertainty)
    if u.ndim != 1:
        raise ConfigError(f"uncertainty must be 1-D (one value per cell); got shape {u.shape}")
    try:
        u = u.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"uncertainty must be numeric: {exc}") from exc
    if not np.all(np.isfinite(u)):
        raise ConfigError("uncertainty must be finite; it holds NaN or infinite values")
    flags = np.asarray(is_unseen)
    if flags.ndim != 1 or flags.shape[0] != u.shape[0]:
        raise ConfigError(
            f"is_unseen must have one entry per cell: expected shape ({u.shape[0]},), "
            f"got shape {flags.shape}"
        )
    if flags.dtype != np.bool_:
        if flags.dtype.kind not in "iuf" or not np.all(np.isin(flags, (0, 1))):
            raise ConfigError("is_unseen must be boolean (or 0/1) per cell")
        flags = flags.astype(bool)
    n_pos = int(np.count_nonzero(flags))
    if n_pos == 0 or n_pos == flags.size:
        kind = "unseen" if n_pos else "seen"
        raise ConfigError(
            f"unknown_auroc needs both seen and unseen cells; all {flags.size} cells are {kind}"
        )
    return float(roc_auc_score(flags, u))


def knn_purity(
    query_latent: np.ndarray,
    query_labels: ArrayLike,
    reference_latent: np.ndarray,
    reference_labels: ArrayLike,
    *,
    k: int = 15,
) -> float:
    """Mean over query cells of the fraction of their k nearest reference cells with the same label.

    Neighbours are exact Euclidean nearest neighbours in ``reference_latent``; if the reference has
    fewer than ``k`` cells, all reference cells are used.
    """
    Q = _as_latent(query_latent, "query_latent")
    R = _as_latent(reference_latent, "reference_latent")
    if Q.shape[1] != R.shape[1]:
        raise ConfigError(
            f"query_latent and reference_latent must have the same number of dimensions: "
            f"expected reference_latent shape (n, {Q.shape[1]}), got {R.shape}"
        )
    qy = _as_labels(query_labels, "query_labels", Q.shape[0])
    ry = _as_labels(reference_labels, "reference_labels", R.shape[0])
    _check_n_neighbors(k, "k")
    k_eff = min(int(k), R.shape[0])
    nn = NearestNeighbors(n_neighbors=k_eff).fit(R)
    neighbors = nn.kneighbors(Q, return_distance=False)
    same = ry[neighbors] == qy[:, None]
    return float(same.mean())
