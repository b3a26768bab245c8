"""Scoring a mapping against known truth: integration, label transfer, unknown detection.

Used by the demo, the real-data tests and the benchmarks, so all three report the same numbers:
integration metrics on the joint reference + query latent (reference cells as the release keeps
them), label accuracy and macro F1 on query cells of types the reference knows, AUROC of the
uncertainty for types it does not know, and the share of cells called unknown.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from anndata import AnnData
from numpy.typing import NDArray

from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.evaluation.metrics import (
    integration_scores,
    knn_purity,
    label_transfer_scores,
    unknown_auroc,
)
from fedatlas.shared.model.label_transfer import UNKNOWN
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.release import Release


@dataclass(frozen=True)
class MappedQuery:
    """A query site's mapping result with the truth it is scored against."""

    name: str
    truth: NDArray[np.object_]  # true label per cell
    result: MappingResult
    seconds: float  # wall time of the mapping (adaptor training + projection + transfer)


@dataclass(frozen=True)
class ReferenceCells:
    """Reference cells in the latent space with their labels and batches, for scoring."""

    latent: NDArray[np.float32]
    labels: NDArray[np.object_]  # "" = unlabelled
    batches: NDArray[np.object_]

    @classmethod
    def of_release(cls, release: Release, level: str) -> ReferenceCells:
        """The reference latents a release keeps (a central build's)."""
        ref = release.reference_latents()
        labels = release.reference_labels(level)
        if ref is None or labels is None:
            raise ConfigError(
                "evaluation needs reference cells: this release keeps no reference latents "
                "(a federated release never does), so pass them"
            )
        names = np.asarray(release.condition_names, dtype=object)
        return cls(ref[0], labels, names[ref[1]])

    @classmethod
    def embedded(
        cls, release: Release, sites: Mapping[str, CellTable], label_key: str
    ) -> ReferenceCells:
        """Cells of sites whose conditions ``release`` already holds, embedded with it (a
        federated release keeps no reference cells; for scoring only)."""
        latents, labels, batches = [], [], []
        for site, cells in sites.items():
            result = map_onto(release, cells, MappingOptions(site_id=site), progress=False)
            if result.adaptor is not None:
                raise ConfigError(f"site {site}: its batches are not all in the release")
            latents.append(result.latent)
            labels.append(cells.labels[label_key])
            batches.append(np.full(cells.n_cells, site, dtype=object))
        return cls(np.vstack(latents), np.concatenate(labels), np.concatenate(batches))


def map_and_evaluate(
    release: Release,
    queries: Mapping[str, AnnData],
    *,
    label_key: str,
    batch_key: str = "batch",
    reference: ReferenceCells | None = None,
) -> dict[str, Any]:
    """Map each query (its ``batch_key`` batches as site ``NAME``, labels hidden) onto
    ``release`` and score it against ``obs[label_key]`` with :func:`evaluate`."""
    mapped = []
    for name, query in queries.items():
        started = time.perf_counter()
        cells = extract_cells(query, source=name, batch_key=batch_key)
        result = map_onto(release, cells, MappingOptions(site_id=name), progress=False)
        truth = query.obs[label_key].astype(str).to_numpy(dtype=object)
        mapped.append(MappedQuery(name, truth, result, time.perf_counter() - started))
    return evaluate(release, mapped, reference=reference)


def evaluate(
    release: Release,
    queries: Sequence[MappedQuery],
    *,
    level: str | None = None,
    reference: ReferenceCells | None = None,
) -> dict[str, Any]:
    """Scores of ``queries`` mapped onto ``release`` (see the module docstring).

    Types absent from the release's catalogue for ``level`` count as unseen; seen-type scores use
    each cell's best label (``accuracy``, ``macro_f1``) and, stricter, its call with unknowns
    counted as errors (``accuracy_called``). ``reference`` defaults to the cells the release
    keeps.
    """
    level = level or release.label_levels[0]
    ref = reference or ReferenceCells.of_release(release, level)
    ref_latent, ref_labels = ref.latent, ref.labels
    known_types = set(release.prototypes(level).labels)

    truth = np.concatenate([q.truth for q in queries]).astype(str)
    best = np.concatenate([q.result.transfers[level].labels for q in queries]).astype(str)
    called = np.concatenate([q.result.transfers[level].called for q in queries]).astype(str)
    uncertainty = np.concatenate([q.result.transfers[level].uncertainty for q in queries])
    query_latent = np.vstack([q.result.latent for q in queries])
    query_groups = np.concatenate([np.full(len(q.truth), q.name, dtype=object) for q in queries])
    unseen = ~np.isin(truth, sorted(known_types))
    seen = ~unseen

    labelled_ref = ref_labels != ""
    joint = np.vstack([ref_latent[labelled_ref], query_latent])
    joint_labels = np.concatenate([ref_labels[labelled_ref].astype(str), truth])
    joint_batches = np.concatenate([ref.batches[labelled_ref].astype(str), query_groups])
    scores: dict[str, Any] = {
        "n_reference_cells": len(ref_latent),
        "n_query_cells": len(truth),
        "n_unseen_cells": int(unseen.sum()),
        "integration": integration_scores(joint, joint_labels, joint_batches),
        "knn_purity": knn_purity(
            query_latent[seen], truth[seen], ref_latent[labelled_ref], ref_labels[labelled_ref]
        ),
        **label_transfer_scores(truth[seen], best[seen]),
        "accuracy_called": float(np.mean(called[seen] == truth[seen])),
        "seen_called_unknown": float(np.mean(called[seen] == UNKNOWN)),
        "map_seconds": {q.name: round(q.seconds, 3) for q in queries},
        "trained_parameters": {q.name: q.result.trained_parameters for q in queries},
        "total_parameters": {q.name: q.result.total_parameters for q in queries},
    }
    if unseen.any() and seen.any():
        scores["unknown_auroc"] = unknown_auroc(uncertainty, unseen)
        scores["unseen_called_unknown"] = float(np.mean(called[unseen] == UNKNOWN))
    return scores
