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
from fedatlas.shared.preprocessing import log_normalize, maxabs_scales
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
    method = transfer or release.content["transfer"]["method"]
    threshold = (
        release.content["transfer"]["unknown_threshold"]
        if unknown_threshold is None
        else unknown_threshold
    )
    alignment = align_genes(cells.genes, release.genes, min_overlap=min_gene_overlap, source=source)
    counts = alignment.apply(cells.counts)
    if alignment.n_missing:
        log.warning(
            "%s: %d of %d release genes are missing and were zero-filled",
            source,
            alignment.n_missing,
            alignment.n_release_genes,
        )
    assignments, conditions = _assign_conditions(release, cells.batches, site_id)
    new = [a for a in assignments if not a.known]
    timings["prepare"] = time.perf_counter() - t0

    model = operate(release, len(new))
    recipe = release.recipe
    site_labels = list(cells.labels.values())
    catalogue = [release.prototypes(lv) for lv in levels]
    new_labels = [
        sorted({str(v) for v in labels} - {UNLABELED} - set(catalogue[i].labels))
        for i, labels in enumerate(site_labels)
    ]
    targets = [
        label_targets(labels, list(catalogue[i].labels) + new_labels[i])
        for i, labels in enumerate(site_labels)
    ]
    scales = None
    if recipe.input_transform == "log_normalized_maxabs":
        scales = maxabs_scales(
            log_normalize(counts, recipe.target_sum), conditions, model.n_conditions
        )
    data = TrainingData(
        counts, conditions, targets, scales, conditions if scales is not None else None
    )

    train = (
        release.mapping_defaults if epochs is None else release.mapping_defaults.scaled_to(epochs)
    )
    if train_overrides:
        train = TrainConfig.from_dict({**train.to_dict(), **train_overrides})
    fit_result = None
    t1 = time.perf_counter()
    if new:
        if model.dsbn is not None:  # the new branches' statistics, before anything uses them
            estimate_dsbn_statistics(model, data, recipe, latent_means(model, data, recipe))
        fresh = conditions >= len(release.condition_names)
        train_data = _subset(data, np.flatnonzero(fresh))
        prototypes = PrototypeTargets(
            [torch.from_numpy(c.means) for c in catalogue[: len(site_labels)]],
            [len(catalogue[i]) + len(n) for i, n in enumerate(new_labels)],
            model.config.latent_dim,
        )
        reporter = Progress(
            f"training adaptor ({len(new)} new condition{'s' if len(new) > 1 else ''})",
            train.epochs,
            "epoch",
            enabled=progress and train.epochs > 0,
        )
        fit_result = fit(
            model,
            train_data,
            train,
            recipe,
            mode="mapping",
            prototypes=prototypes,
            seed=seed,
            progress=reporter,
        )
        if train.epochs:
            reporter.finish("stopped early" if fit_result.stopped_early else "")
    timings["train"] = time.perf_counter() - t1
    assert_frozen(release, model)

    t2 = time.perf_counter()
    reporter = Progress("projecting", data.n_cells, "cell", enabled=progress)
    latent = latent_means(model, data, recipe, progress=reporter)
    timings["project"] = time.perf_counter() - t2

    adaptor = None
    dropped: dict[str, dict[str, int]] = {}
    site_sets: list[PrototypeSet] = []
    if new:
        fresh_rows = np.isin(cells.batches, [a.batch for a in new])
        for i, lv in enumerate(levels):
            labels = site_labels[i] if i < len(site_labels) else None
            if labels is None:
                site_sets.append(PrototypeSet.empty(model.config.latent_dim))
                continue
            pset, too_small = PrototypeSet.from_latents(
                latent[fresh_rows], labels[fresh_rows], site_id, min_cells=min_prototype_cells
            )
            site_sets.append(pset)
            if too_small:
                dropped[lv] = too_small
                log.warning(
                    "labels with fewer than %d cells stay at the site (no prototype): %s",
                    min_prototype_cells,
                    ", ".join(f"{k} ({v})" for k, v in too_small.items()),
                )
        adaptor = extract_adaptor(
            release,
            model,
            site_id=site_id,
            conditions=[(a.condition, a.n_cells) for a in new],
            prototypes=site_sets,
            training=_training_summary(fit_result, train, data.n_cells),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )

    t3 = time.perf_counter()
    transfers: dict[str, Transfer] = {}
    for i, lv in enumerate(levels):
        merged = merge_prototype_sets([catalogue[i], *site_sets[i : i + 1]])
        if method == "knn":
            ref = release.reference_latents()
            ref_labels = release.reference_labels(lv)
            if ref is None or ref_labels is None:
                raise ConfigError("kNN transfer needs reference latents, which this release lacks")
            transfers[lv] = knn_transfer(latent, ref[0], ref_labels, threshold=threshold)
        elif len(merged):
            transfers[lv] = prototype_transfer(latent, merged, threshold=threshold)
    if not levels and (clusters := release.unlabeled_prototypes()) is not None:
        transfers["cluster"] = prototype_transfer(latent, clusters, threshold=threshold)
    timings["transfer"] = time.perf_counter() - t3
    trained = fit_result.trained_parameters if fit_result else 0
    return MappingResult(
        release=release,
        latent=latent,
        transfers=transfers,
        assignments=assignments,
        alignment=alignment,
        adaptor=adaptor,
        fit=fit_result,
        trained_parameters=trained,
        total_parameters=model.total_parameter_count(),
        model=model,
        transfer_method=method,
        unknown_threshold=float(threshold),
        seconds=timings,
        dropped_prototypes=dropped,
    )


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


def _subset(data: TrainingData, rows: NDArray[np.int64]) -> TrainingData:
    return TrainingData(
        data.counts[rows],
        data.conditions[rows],
        [t[rows] for t in data.targets],
        data.scales,
        None if data.scale_index is None else data.scale_index[rows],
    )


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
