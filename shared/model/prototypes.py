"""Cell-type prototypes: per-label latent mean, spread and cell count, and how they merge.

A prototype is an aggregate over at least ``min_cells`` cells (mean, per-dimension variance and
count of their latent positions); it never carries an individual cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedatlas.shared.data.dataset import UNLABELED
from fedatlas.shared.hashing import canonical_json, digest
from fedatlas.shared.validation import ListOf, Record, Str

# the manifest entry of one level's prototypes (:meth:`PrototypeSet.describe`)
PROTOTYPE_META = Record(
    {"labels": ListOf(Str(256), 100_000), "sources": ListOf(ListOf(Str(256), 10_000), 100_000)}
)
VARIANCE_FLOOR = 0.01  # per-dimension variances are floored at this share of their mean
TAIL_Z = 2.326  # standard-normal quantile of 99 %: where a type's own cells mostly end


def floored_variances(variances: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """Per-prototype variances with a floor, so tight or single-cell prototypes stay usable."""
    v = np.asarray(variances, dtype=np.float64)
    floor = np.maximum(VARIANCE_FLOOR * v.mean(axis=-1, keepdims=True), 1e-6)
    return np.maximum(v, floor)


def standardized_sq_distances(
    latent: NDArray[np.floating[Any]],
    means: NDArray[np.floating[Any]],
    variances: NDArray[np.floating[Any]],
) -> NDArray[np.float64]:
    """Squared distance of every cell to every prototype in units of that prototype's spread
    (diagonal Mahalanobis): cells x prototypes."""
    z = np.asarray(latent, dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    inv = 1.0 / floored_variances(variances)
    # sum_d (z - m)^2 / v  =  z^2 . inv  -  2 z . (m inv)  +  m^2 . inv
    out = (z**2) @ inv.T - 2.0 * z @ (m * inv).T + ((m**2) * inv).sum(axis=1)
    return np.maximum(out, 0.0)


@dataclass(frozen=True)
class PrototypeSet:
    """Prototypes of one label level, labels in sorted order.

    Per prototype: latent mean and per-dimension variance of its cells, their count, and the
    mean and variance of log d^2, where d^2 is each of those cells' standardised squared
    distance to the prototype (how far its own cells spread, used to calibrate uncertainty).
    """

    labels: tuple[str, ...]
    means: NDArray[np.float32]  # labels x latent
    variances: NDArray[np.float32]  # labels x latent (population variance)
    counts: NDArray[np.int64]  # cells behind each prototype
    log_d2: NDArray[np.float32]  # labels x 2: mean and variance of log d^2 of its cells
    sources: tuple[tuple[str, ...], ...]  # who contributed each prototype (sorted)

    @property
    def latent_dim(self) -> int:
        """Latent dimension."""
        return int(self.means.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def radii(self) -> NDArray[np.float64]:
        """Standardised squared distance within which about 99 % of each type's own cells lie
        (log-normal fit of their d^2)."""
        mean, var = self.log_d2[:, 0].astype(np.float64), self.log_d2[:, 1].astype(np.float64)
        return np.exp(mean + TAIL_Z * np.sqrt(np.maximum(var, 0.0)))

    @classmethod
    def empty(cls, latent_dim: int) -> PrototypeSet:
        """A set with no prototypes."""
        return cls(
            (),
            np.zeros((0, latent_dim), np.float32),
            np.zeros((0, latent_dim), np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, 2), np.float32),
            (),
        )

    @classmethod
    def from_latents(
        cls,
        latent: NDArray[np.float32],
        labels: NDArray[np.object_],
        source: str,
        min_cells: int = 1,
    ) -> tuple[PrototypeSet, dict[str, int]]:
        """Prototypes of every label with at least ``min_cells`` labelled cells.

        Returns the set and the labels left out for having too few cells (label -> count).
        """
        values = np.asarray(labels, dtype=object)
        names = sorted({str(v) for v in values if v != UNLABELED})
        kept: list[str] = []
        dropped: dict[str, int] = {}
        means, variances, counts, log_d2 = [], [], [], []
        for name in names:
            rows = latent[values == name].astype(np.float64)
            if rows.shape[0] < min_cells:
                dropped[name] = int(rows.shape[0])
                continue
            mean, var = rows.mean(axis=0), rows.var(axis=0)
            logs = np.log(standardized_sq_distances(rows, mean[None], var[None])[:, 0] + 1e-6)
            kept.append(name)
            means.append(mean)
            variances.append(var)
            counts.append(rows.shape[0])
            log_d2.append((logs.mean(), logs.var()))
        if not kept:
            return cls.empty(latent.shape[1]), dropped
        pset = cls(
            tuple(kept),
            np.asarray(means, np.float32),
            np.asarray(variances, np.float32),
            np.asarray(counts, np.int64),
            np.asarray(log_d2, np.float32),
            tuple((source,) for _ in kept),
        )
        return pset, dropped

    def digest(self) -> str:
        """Content hash (labels, numbers and sources)."""
        body = canonical_json(
            {"labels": list(self.labels), "sources": [list(s) for s in self.sources]}
        )
        numbers = b"".join(
            a.tobytes() for a in (self.means, self.variances, self.counts, self.log_d2)
        )
        return digest(body + numbers)

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Tensors ``PREFIX.{mean,var,count,log_d2}`` for a weights file."""
        return {
            f"{prefix}.mean": torch.from_numpy(self.means.copy()),
            f"{prefix}.var": torch.from_numpy(self.variances.copy()),
            f"{prefix}.count": torch.from_numpy(self.counts.copy()),
            f"{prefix}.log_d2": torch.from_numpy(self.log_d2.copy()),
        }

    def describe(self) -> dict[str, Any]:
        """Manifest entry: labels and sources (the numbers live in the weights file)."""
        return {"labels": list(self.labels), "sources": [list(s) for s in self.sources]}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]
    ) -> PrototypeSet:
        """Inverse of :meth:`to_tensors` + :meth:`describe`."""
        labels = tuple(str(x) for x in meta["labels"])
        sources = tuple(tuple(str(s) for s in src) for src in meta["sources"])
        pset = cls(
            labels,
            tensors[f"{prefix}.mean"].numpy().astype(np.float32),
            tensors[f"{prefix}.var"].numpy().astype(np.float32),
            tensors[f"{prefix}.count"].numpy().astype(np.int64),
            tensors[f"{prefix}.log_d2"].numpy().astype(np.float32),
            sources,
        )
        sizes = {
            len(labels),
            len(sources),
            *(len(a) for a in (pset.means, pset.variances, pset.counts, pset.log_d2)),
        }
        if len(sizes) != 1:
            raise ValueError(f"prototype set {prefix!r}: labels and tensors disagree in length")
        return pset


def merge_prototype_sets(sets: Sequence[PrototypeSet]) -> PrototypeSet:
    """Merge sets label by label: counts add; means, variances and the log d^2 moments are
    pooled with cell-count weights (the pooled spread is an approximation when the sources'
    standardisations differ).

    The result does not depend on the order of ``sets``: contributions are combined in float64
    in an order fixed by their content hashes.
    """
    non_empty = [s for s in sets if len(s)]
    if not non_empty:
        return PrototypeSet.empty(sets[0].latent_dim if sets else 0)
    totals: dict[str, _Pool] = {}
    for s in sorted(non_empty, key=lambda s: s.digest()):
        for i, label in enumerate(s.labels):
            totals.setdefault(label, _Pool()).add(s, i)
    labels = sorted(totals)
    pooled = [totals[label].result() for label in labels]
    return PrototypeSet(
        tuple(labels),
        np.asarray([p[0] for p in pooled], np.float32),
        np.asarray([p[1] for p in pooled], np.float32),
        np.asarray([p[2] for p in pooled], np.int64),
        np.asarray([p[3] for p in pooled], np.float32),
        tuple(totals[label].sources for label in labels),
    )


ROBUST_MIN_SOURCES = 3  # from this many sources on, a label's mean is a weighted median
# ... and each source's variances are clipped to within this factor of their weighted median
# (honest sites' spreads were up to 3.35 times the reference's: see Policy.spread_factor)
MERGE_SPREAD_CLIP = 3.0


def capped_merge(
    base: PrototypeSet, contributions: Mapping[str, Sequence[PrototypeSet]]
) -> tuple[PrototypeSet, dict[str, dict[str, int]]]:
    """Merge ``base`` (the reference's catalogue) with the sites' prototypes so that one site
    moves a label only within bounds, whatever counts it claims or however many bundles it
    sends.

    Each site's sets are pooled into one, and its weight for a label is capped at the median
    count the contributing sites give that label (and, for a label of the reference, at the
    reference's count). Variances and spread statistics are pooled with these weights. A label
    with at least :data:`ROBUST_MIN_SOURCES` sources (the reference and the sites) takes the
    weighted coordinate-wise median of their means, which a source of less than half the
    weight cannot move beyond the others' range, and its variances are pooled around that
    centre after clipping each source's to within :data:`MERGE_SPREAD_CLIP` of their weighted
    median; with fewer sources everything is pooled. Returns the merged set (its counts are
    the weights used) and, per label, the weight each source contributed (``"reference"`` or a
    site id).
    """
    pooled = {
        site: merge_prototype_sets(list(sets)) for site, sets in sorted(contributions.items())
    }
    base_counts = dict(zip(base.labels, base.counts.tolist(), strict=True))
    claims: dict[str, list[int]] = {}
    for pset in pooled.values():
        for label, count in zip(pset.labels, pset.counts.tolist(), strict=True):
            claims.setdefault(label, []).append(int(count))
    caps = {label: int(np.median(counts)) for label, counts in claims.items()}
    caps = {label: min(cap, base_counts[label]) if base_counts.get(label, 0) > 0 else cap
            for label, cap in caps.items()}  # fmt: skip
    sources = [("reference", base), *((s, _capped(p, caps)) for s, p in pooled.items())]
    shares: dict[str, dict[str, int]] = {}
    for source, pset in sources:
        for label, count in zip(pset.labels, pset.counts.tolist(), strict=True):
            shares.setdefault(label, {})[source] = int(count)
    merged = [_merge_label(label, [s for _, s in sources if label in s.labels])
              for label in sorted(shares)]  # fmt: skip
    if not merged:
        return PrototypeSet.empty(base.latent_dim), {}
    return _concatenate(merged), dict(sorted(shares.items()))


def _merge_label(label: str, sets: Sequence[PrototypeSet]) -> PrototypeSet:
    """One label's prototype from the sets that have it (see :func:`capped_merge`)."""
    rows = [_only(s, label) for s in sets]
    pooled = merge_prototype_sets(rows)
    if len(rows) < ROBUST_MIN_SOURCES:
        return pooled
    weights = np.asarray([int(r.counts[0]) for r in rows], np.float64)
    means = np.stack([r.means[0].astype(np.float64) for r in rows])
    spreads = np.stack([r.variances[0].astype(np.float64) for r in rows])
    centre = _weighted_median(means, weights)
    typical = _weighted_median(spreads, weights)
    spreads = np.clip(spreads, typical / MERGE_SPREAD_CLIP, typical * MERGE_SPREAD_CLIP)
    # second moments pooled around the centre, each source's variances clipped
    variances = weights @ (spreads + (means - centre) ** 2) / weights.sum()
    return PrototypeSet(
        (label,), centre[None].astype(np.float32), variances[None].astype(np.float32),
        pooled.counts, pooled.log_d2, pooled.sources,
    )  # fmt: skip


def _weighted_median(values: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[Any]:
    """Per column of ``values`` (sources x columns), the smallest value holding at least half
    of the total weight at or below it."""
    table = values.reshape(len(values), -1)
    order = np.argsort(table, axis=0, kind="stable")
    cumulative = np.cumsum(weights[order], axis=0)
    pick = np.argmax(cumulative >= cumulative[-1] / 2.0, axis=0)
    rows = np.take_along_axis(order, pick[None], axis=0)
    return np.take_along_axis(table, rows, axis=0)[0].reshape(values.shape[1:])


def _only(pset: PrototypeSet, label: str) -> PrototypeSet:
    """``pset`` restricted to ``label``."""
    i = pset.labels.index(label)
    return PrototypeSet(
        (label,), pset.means[i : i + 1], pset.variances[i : i + 1], pset.counts[i : i + 1],
        pset.log_d2[i : i + 1], pset.sources[i : i + 1],
    )  # fmt: skip


def _concatenate(sets: Sequence[PrototypeSet]) -> PrototypeSet:
    """One set holding the labels of ``sets`` (each label in one of them), in their order."""
    return PrototypeSet(
        tuple(label for s in sets for label in s.labels),
        np.concatenate([s.means for s in sets]).astype(np.float32),
        np.concatenate([s.variances for s in sets]).astype(np.float32),
        np.concatenate([s.counts for s in sets]).astype(np.int64),
        np.concatenate([s.log_d2 for s in sets]).astype(np.float32),
        tuple(src for s in sets for src in s.sources),
    )


def _capped(pset: PrototypeSet, caps: Mapping[str, int]) -> PrototypeSet:
    """``pset`` with each label's count lowered to its cap."""
    counts = np.asarray(
        [min(int(n), caps[label]) for label, n in zip(pset.labels, pset.counts, strict=True)],
        np.int64,
    )
    return PrototypeSet(pset.labels, pset.means, pset.variances, counts, pset.log_d2, pset.sources)


class _Pool:
    """Count-weighted sums of first and second moments of one label's contributions."""

    def __init__(self) -> None:
        self.n = 0.0
        self.sum1: Any = 0.0
        self.sum2: Any = 0.0
        self.log1 = 0.0
        self.log2 = 0.0
        self.source_set: set[str] = set()

    def add(self, s: PrototypeSet, i: int) -> None:
        n = float(s.counts[i])
        mean = s.means[i].astype(np.float64)
        self.n += n
        self.sum1 = self.sum1 + n * mean
        self.sum2 = self.sum2 + n * (s.variances[i].astype(np.float64) + mean**2)
        log_mean, log_var = float(s.log_d2[i, 0]), float(s.log_d2[i, 1])
        self.log1 += n * log_mean
        self.log2 += n * (log_var + log_mean**2)
        self.source_set.update(s.sources[i])

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(sorted(self.source_set))

    def result(self) -> tuple[Any, Any, int, tuple[float, float]]:
        mean = self.sum1 / self.n
        var = np.maximum(self.sum2 / self.n - mean**2, 0.0)
        log_mean = self.log1 / self.n
        log_var = max(self.log2 / self.n - log_mean**2, 0.0)
        return mean, var, round(self.n), (log_mean, log_var)


def cluster_prototypes(
    latent: NDArray[np.float32],
    *,
    source: str,
    seed: int = 0,
    resolution: float = 1.0,
    min_cells: int = 1,
    max_cells: int = 50_000,
) -> PrototypeSet:
    """Unlabelled prototypes: means of Leiden clusters of ``latent`` (scPoli's unlabelled
    prototypes, for analysis and novel-type annotation; never used in the prototype loss).

    Clusters are found on at most ``max_cells`` cells (a seeded subsample); every cell is then
    assigned to its nearest cluster centre, so the cost stays bounded for large datasets.
    Clusters are named ``cluster-0``, ``cluster-1``, ... by decreasing size.
    """
    # imported when needed: scanpy takes seconds to import, and only unlabelled references
    # (built by the operator) cluster
    import anndata as ad
    import scanpy as sc

    n = latent.shape[0]
    if n < 3:
        return PrototypeSet.empty(latent.shape[1])
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
    holder = ad.AnnData(obsm={"z": latent[sample]}, obs={"i": np.arange(sample.size)})
    sc.pp.neighbors(holder, use_rep="z", n_neighbors=min(15, sample.size - 1), random_state=seed)
    sc.tl.leiden(
        holder,
        resolution=resolution,
        random_state=seed,
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    codes = holder.obs["leiden"].astype(int).to_numpy()
    centres = np.stack([latent[sample][codes == c].mean(axis=0) for c in np.unique(codes)])
    nearest = ((latent[:, None, :] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
    by_size = np.argsort(-np.bincount(nearest, minlength=len(centres)), kind="stable")
    names = np.empty(len(centres), dtype=object)
    names[by_size] = [f"cluster-{i}" for i in range(len(centres))]
    pset, _ = PrototypeSet.from_latents(latent, names[nearest], source, min_cells=min_cells)
    return pset
