"""Mapping a site's cells onto a release: surgery, adaptor training, projection, labels.

Batches the release already knows (``<site_id>/<batch>`` is in its condition table) are only
embedded. Every other batch becomes a new condition: the network gets fresh condition rows, only
those rows are trained on the site's cells, and the result is checked to have left every release
tensor bit-identical. The trained rows and the site's prototypes form its adaptor.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

import fedatlas.shared as fs
from fedatlas.shared.adaptor import Adaptor, extract_adaptor
from fedatlas.shared.config import TrainConfig, TransferMethod
from fedatlas.shared.dataset import UNLABELED, CellTable, condition_name, label_targets
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.genes import DEFAULT_MIN_GENE_OVERLAP, GeneAlignment, align_genes
from fedatlas.shared.label_transfer import Transfer, knn_transfer, prototype_transfer
from fedatlas.shared.nn.vae import CondVAE
from fedatlas.shared.progress import Progress
from fedatlas.shared.prototypes import PrototypeSet, merge_prototype_sets
from fedatlas.shared.release import Release
from fedatlas.shared.surgery import assert_frozen, operate
from fedatlas.shared.training import (
    FitResult,
    PrototypeTargets,
    TrainingData,
    estimate_dsbn_statistics,
    fit,
    latent_means,
)

log = logging.getLogger(__name__)

DEFAULT_SITE = "query"
DEFAULT_MIN_PROTOTYPE_CELLS = 10


@dataclass(frozen=True)
class ConditionAssignment:
    """How one of the site's batches entered the network."""

    batch: str
    condition: str
    known: bool  # the release already had this condition (embedded without training)
    n_cells: int


@dataclass
class MappingResult:
    """Everything a mapping produced."""

    release: Release
    latent: NDArray[np.float32]
    transfers: dict[str, Transfer]  # by release label level
    assignments: list[ConditionAssignment]
    alignment: GeneAlignment
    adaptor: Adaptor | None
    fit: FitResult | None
    trained_parameters: int
    total_parameters: int
    model: CondVAE
    transfer_method: str
    unknown_threshold: float
    seconds: dict[str, float] = field(default_factory=dict)
    dropped_prototypes: dict[str, dict[str, int]] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """Record for ``uns['fedatlas']`` (plain types only)."""
        return {
            "release_id": self.release.content_hash,
            "adaptor_id": self.adaptor.content_hash if self.adaptor else "",
            "fedatlas_version": fs.__version__,
            "torch_version": str(torch.__version__),
            "preset": self.release.content.get("preset", ""),
            "gene_overlap": self.alignment.summary(),
            "conditions": {
                a.batch: {"condition": a.condition, "known": a.known, "n_cells": a.n_cells}
                for a in self.assignments
            },
            "trained_parameters": self.trained_parameters,
            "total_parameters": self.total_parameters,
            "frozen_tensors_verified": True,
            "label_levels": list(self.transfers),
            "unknown_threshold": self.unknown_threshold,
            "transfer_method": self.transfer_method,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


def map_cells(
    release: Release,
    cells: CellTable,
    *,
    site_id: str = DEFAULT_SITE,
    epochs: int | None = None,
    seed: int = 0,
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    transfer: TransferMethod | None = None,
    unknown_threshold: float | None = None,
    min_prototype_cells: int = DEFAULT_MIN_PROTOTYPE_CELLS,
    train_overrides: Mapping[str, Any] | None = None,
    source: str = "dataset",
    progress: bool = True,
) -> MappingResult:
    """Map ``cells`` onto ``release``; see the module docstring.

    ``cells.labels`` (optional) correspond, in order, to the release's label levels; labelled
    cells of new batches steer adaptor training with the prototype loss and give the site's
    prototypes (only labels with at least ``min_prototype_cells`` cells leave the site).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    levels = release.label_levels
    if len(cells.labels) > len(levels):
        raise ConfigError(
            f"{len(cells.labels)} label keys given but the release has {len(levels)} label "
            f"level(s) ({', '.join(levels) or 'none'})"
        )
    transfer_defaults = release.content["transfer"]
    method = transfer or transfer_defaults["method"]
    threshold = (
        transfer_defaults["unknown_threshold"] if unknown_threshold is None else unknown_threshold
    )
    alignment = align_genes(cells.genes, release.genes, min_overlap=min_gene_overlap, source=source)
    if alignment.n_missing:
        log.warning(
            "%s: %d of %d release genes are missing and were zero-filled",
            source, alignment.n_missing, alignment.n_release_genes,
        )  # fmt: skip
    assignments, conditions = _assign_conditions(release, cells.batches, site_id)
    new = [a for a in assignments if not a.known]
    model = operate(release, len(new))
    catalogue = [release.prototypes(lv) for lv in levels]
    site_labels = list(cells.labels.values())
    data, new_labels = _training_data(
        release, alignment.apply(cells.counts), conditions, site_labels, catalogue
    )
    timings["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    train = (
        release.mapping_defaults if epochs is None else release.mapping_defaults.scaled_to(epochs)
    )
    if train_overrides:
        train = TrainConfig.from_dict({**train.to_dict(), **train_overrides})
    latent = None
    if model.dsbn is not None and new:
        # The encoder never sees the condition: the latent is final before any training, and
        # the new branches' statistics are estimated from it in one pass.
        latent = latent_means(model, data, release.recipe)
        estimate_dsbn_statistics(model, data, release.recipe, latent)
    fit_result = None
    if new and train.epochs > 0:
        n_known = len(release.condition_names)
        prototypes = PrototypeTargets(
            [torch.from_numpy(c.means) for c in catalogue[: len(site_labels)]],
            [len(catalogue[i]) + len(n) for i, n in enumerate(new_labels)],
            model.config.latent_dim,
        )
        reporter = Progress(
            f"training adaptor ({len(new)} new condition{'s' if len(new) > 1 else ''})",
            train.epochs, "epoch", enabled=progress,
        )  # fmt: skip
        fit_result = fit(
            model, _fresh_cells(data, n_known), train, release.recipe, mode="mapping",
            prototypes=prototypes, seed=seed, progress=reporter,
        )  # fmt: skip
        reporter.finish("stopped early" if fit_result.stopped_early else "")
    timings["train"] = time.perf_counter() - t1
    assert_frozen(release, model)

    t2 = time.perf_counter()
    if latent is None:
        reporter = Progress("projecting", data.n_cells, "cell", enabled=progress)
        latent = latent_means(model, data, release.recipe, progress=reporter)
    timings["project"] = time.perf_counter() - t2

    adaptor = None
    site_sets: list[PrototypeSet] = []
    dropped: dict[str, dict[str, int]] = {}
    if new:
        fresh_rows = conditions >= len(release.condition_names)
        site_sets, dropped = _site_prototypes(
            levels, site_labels, latent, fresh_rows, site_id, min_prototype_cells
        )
        adaptor = extract_adaptor(
            release,
            model,
            site_id=site_id,
            conditions=[(a.condition, a.n_cells) for a in new],
            prototypes=site_sets,
            training=_training_summary(fit_result, train, int(fresh_rows.sum())),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )

    t3 = time.perf_counter()
    transfers = _transfer(release, latent, catalogue, site_sets, method, threshold)
    timings["transfer"] = time.perf_counter() - t3
    return MappingResult(
        release=release,
        latent=latent,
        transfers=transfers,
        assignments=assignments,
        alignment=alignment,
        adaptor=adaptor,
        fit=fit_result,
        trained_parameters=fit_result.trained_parameters if fit_result else 0,
        total_parameters=model.total_parameter_count(),
        model=model,
        transfer_method=method,
        unknown_threshold=float(threshold),
        seconds=timings,
        dropped_prototypes=dropped,
    )


def _training_data(
    release: Release,
    counts: sp.csr_matrix,
    conditions: NDArray[np.int64],
    site_labels: list[NDArray[np.object_]],
    catalogue: list[PrototypeSet],
) -> tuple[TrainingData, list[list[str]]]:
    """Cells with prototype targets: labels the release knows point at its prototypes, labels
    new to it at prototypes learnt from the site's cells (returned as ``new_labels``)."""
    new_labels = [
        sorted({str(v) for v in labels} - {UNLABELED} - set(catalogue[i].labels))
        for i, labels in enumerate(site_labels)
    ]
    targets = [
        label_targets(labels, list(catalogue[i].labels) + new_labels[i])
        for i, labels in enumerate(site_labels)
    ]
    return TrainingData.for_recipe(counts, conditions, targets, release.recipe), new_labels


def _fresh_cells(data: TrainingData, n_known: int) -> TrainingData:
    """The cells of new conditions (all of ``data`` without a copy when that is every cell)."""
    rows = np.flatnonzero(data.conditions >= n_known)
    if rows.size == data.n_cells:
        return data
    return TrainingData(
        data.counts[rows],
        data.conditions[rows],
        [t[rows] for t in data.targets],
        data.scales,
        None if data.scale_index is None else data.scale_index[rows],
    )


def _site_prototypes(
    levels: list[str],
    site_labels: list[NDArray[np.object_]],
    latent: NDArray[np.float32],
    fresh_rows: NDArray[np.bool_],
    site_id: str,
    min_cells: int,
) -> tuple[list[PrototypeSet], dict[str, dict[str, int]]]:
    """The site's prototypes per level (from its labelled cells of new conditions)."""
    sets: list[PrototypeSet] = []
    dropped: dict[str, dict[str, int]] = {}
    for i, level in enumerate(levels):
        if i >= len(site_labels):
            sets.append(PrototypeSet.empty(latent.shape[1]))
            continue
        labels = site_labels[i][fresh_rows]
        pset, too_small = PrototypeSet.from_latents(latent[fresh_rows], labels, site_id, min_cells)
        sets.append(pset)
        if too_small:
            dropped[level] = too_small
            log.warning(
                "labels with fewer than %d cells stay at the site (no prototype): %s",
                min_cells, ", ".join(f"{k} ({v})" for k, v in too_small.items()),
            )  # fmt: skip
    return sets, dropped


def _transfer(
    release: Release,
    latent: NDArray[np.float32],
    catalogue: list[PrototypeSet],
    site_sets: list[PrototypeSet],
    method: str,
    threshold: float,
) -> dict[str, Transfer]:
    """Labels per level, from the release's catalogue merged with the site's own prototypes
    (what the composite will hold), or by kNN on the release's reference latents."""
    transfers: dict[str, Transfer] = {}
    for i, level in enumerate(release.label_levels):
        if method == "knn":
            ref = release.reference_latents()
            ref_labels = release.reference_labels(level)
            if ref is None or ref_labels is None:
                raise ConfigError("kNN transfer needs reference latents, which this release lacks")
            transfers[level] = knn_transfer(latent, ref[0], ref_labels, threshold=threshold)
            continue
        merged = merge_prototype_sets([catalogue[i], *site_sets[i : i + 1]])
        if len(merged):
            transfers[level] = prototype_transfer(latent, merged, threshold=threshold)
    clusters = release.unlabeled_prototypes()
    if not release.label_levels and clusters is not None:
        transfers["cluster"] = prototype_transfer(latent, clusters, threshold=threshold)
    return transfers


def _assign_conditions(
    release: Release, batches: NDArray[np.str_], site_id: str
) -> tuple[list[ConditionAssignment], NDArray[np.int64]]:
    known_index = {name: i for i, name in enumerate(release.condition_names)}
    names, inverse, counts = np.unique(batches, return_inverse=True, return_counts=True)
    assignments: list[ConditionAssignment] = []
    index = np.empty(len(names), dtype=np.int64)
    n_new = 0
    for j, batch in enumerate(names.tolist()):
        cond = condition_name(site_id, batch)
        known = cond in known_index
        if known:
            index[j] = known_index[cond]
        else:
            index[j] = len(known_index) + n_new
            n_new += 1
        assignments.append(ConditionAssignment(batch, cond, known, int(counts[j])))
    for a in assignments:
        log.info(
            "batch %r -> condition %r (%s, %d cells)",
            a.batch,
            a.condition,
            "known: embedded only" if a.known else "new: adaptor trained",
            a.n_cells,
        )
    return assignments, index[inverse.ravel()]


def _training_summary(
    fit_result: FitResult | None, train: TrainConfig, n_cells: int
) -> dict[str, Any]:
    if fit_result is None or not fit_result.history:
        return {"epochs": 0, "n_cells": n_cells, "trained_parameters": 0}
    last = fit_result.history[-1]
    return {
        "n_cells": n_cells,
        "epochs": fit_result.epochs,
        "iterations": fit_result.iterations,
        "stopped_early": fit_result.stopped_early,
        "trained_parameters": fit_result.trained_parameters,
        "final_loss": round(float(last.get("loss", 0.0)), 6),
        "recipe": train.to_dict(),
    }
