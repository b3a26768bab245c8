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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

import fedatlas.shared as fs
from fedatlas.shared.config import TrainConfig, TransferMethod
from fedatlas.shared.data.dataset import UNLABELED, CellTable, condition_name, label_targets
from fedatlas.shared.data.genes import DEFAULT_MIN_GENE_OVERLAP, GeneAlignment, align_genes
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.adaptor import Adaptor, extract_adaptor
from fedatlas.shared.model.dp_sgd import private_recipe
from fedatlas.shared.model.label_transfer import Transfer, knn_transfer, prototype_transfer
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.privacy import PrivacySpec
from fedatlas.shared.model.private_release import PrivateRelease
from fedatlas.shared.model.prototypes import PrototypeSet, merge_prototype_sets
from fedatlas.shared.model.release import CLUSTER_LEVEL, Release
from fedatlas.shared.model.surgery import assert_frozen, operate
from fedatlas.shared.model.training import (
    FitResult,
    PrototypeTargets,
    TrainingData,
    estimate_dsbn_statistics,
    fit,
    latent_means,
)
from fedatlas.shared.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_SITE = "query"
DEFAULT_MIN_PROTOTYPE_CELLS = 10
DEFAULT_TRAIN_CELLS = 50_000
TRANSFER_CHUNK_CELLS = 65_536  # cells labelled at a time


@dataclass(frozen=True)
class MappingOptions:
    """How a site's cells are mapped: the one set of options that ``site map``, ``prepare``,
    ``submit`` and ``node``, the Python API, campaigns and federated builds all take.

    Attributes:
        site_id: the site's id; its batches become conditions ``SITE_ID/BATCH``.
        epochs: adaptor training epochs (None: the release's mapping recipe).
        seed: random seed (new rows' initialisation, minibatch order, training sample).
        min_gene_overlap: refuse data with fewer than this share of the release's genes.
        transfer: label transfer method (None: the release's default).
        unknown_threshold: uncertainty above which a cell is called unknown (None: the
            release's thresholds per label level).
        min_prototype_cells: labels with fewer cells give no prototype (they stay at the site).
        chunk_size: read a file this many cells at a time (0: load it whole; None: chunks of
            10,000 cells only for a file too large to load).
        train_cells: when a file is read in chunks, train the new condition rows on at most
            this many of their cells (a random sample shared equally among the new batches).
        privacy: release the adaptor under this (epsilon, delta)-differential privacy
            (:mod:`~fedatlas.shared.model.privacy`); None releases exact aggregates.
    """

    site_id: str = DEFAULT_SITE
    epochs: int | None = None
    seed: int = 0
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP
    transfer: TransferMethod | None = None
    unknown_threshold: float | None = None
    min_prototype_cells: int = DEFAULT_MIN_PROTOTYPE_CELLS
    chunk_size: int | None = None
    train_cells: int = DEFAULT_TRAIN_CELLS
    privacy: PrivacySpec | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.site_id or "/" in self.site_id:
            problems.append(f"site id {self.site_id!r} must be non-empty and without '/'")
        if self.epochs is not None and self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if not 0.0 <= self.min_gene_overlap <= 1.0:
            problems.append(f"min gene overlap must be in [0, 1], got {self.min_gene_overlap}")
        if self.unknown_threshold is not None and not 0.0 <= self.unknown_threshold <= 1.0:
            problems.append(f"unknown threshold must be in [0, 1], got {self.unknown_threshold}")
        if self.min_prototype_cells < 1:
            problems.append(f"min prototype cells must be >= 1, got {self.min_prototype_cells}")
        if self.chunk_size is not None and self.chunk_size < 0:
            problems.append(
                f"chunk size must be >= 0 (0 loads a file whole), got {self.chunk_size}"
            )
        if self.train_cells < 1:
            problems.append(f"train cells must be >= 1, got {self.train_cells}")
        if problems:
            raise ConfigError("; ".join(problems))


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
    unknown_thresholds: dict[str, float]  # by label level, as ``transfers``
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
            "unknown_thresholds": dict(self.unknown_thresholds),
            "transfer_method": self.transfer_method,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


def map_onto(
    release: Release,
    cells: CellTable,
    options: MappingOptions | None = None,
    *,
    train_overrides: Mapping[str, Any] | None = None,
    initial_rows: Mapping[str, torch.Tensor] | None = None,
    source: str = "dataset",
    progress: bool = True,
) -> MappingResult:
    """Map ``cells`` (held in memory) onto ``release``; see the module docstring.

    ``cells.labels`` (optional) correspond, in order, to the release's label levels; labelled
    cells of new batches steer adaptor training with the prototype loss and give the site's
    prototypes (only labels with at least ``options.min_prototype_cells`` cells leave the site).
    ``initial_rows`` (per condition table, one row per new condition in sorted batch order)
    start the adaptor from rows the site already has, e.g. from federated reference training.
    ``train_overrides`` replace fields of the training recipe; ``options`` default to
    :class:`MappingOptions`' defaults.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_mapping(
        release, cells.genes, cells.batches, cells.labels, options or MappingOptions(),
        train_overrides=train_overrides, initial_rows=initial_rows, source=source,
    )  # fmt: skip
    model, recipe = plan.model, release.recipe
    data = TrainingData.for_recipe(
        plan.alignment.apply(cells.counts), plan.conditions, plan.targets(), recipe
    )
    timings["prepare"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    latent = None
    if model.dsbn is not None and plan.new:
        # The encoder never sees the condition: the latent is final before any training, and
        # the new branches' statistics are estimated from it in one pass.
        latent = latent_means(model, data, recipe)
        estimate_dsbn_statistics(model, data, recipe, latent, plan.statistics_noise())
    fit_result = train_adaptor(plan, _fresh_cells(data, plan.n_known), progress=progress)
    timings["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if latent is None:
        reporter = Progress("projecting", data.n_cells, "cell", enabled=progress)
        latent = latent_means(model, data, recipe, progress=reporter)
    timings["project"] = time.perf_counter() - t2
    return finish_mapping(plan, latent, fit_result, timings)


@dataclass
class MappingPlan:
    """What is settled before any cell is projected: the gene alignment, every cell's
    condition, the network after surgery, the label vocabularies and the training recipe."""

    release: Release
    site_id: str
    alignment: GeneAlignment
    assignments: list[ConditionAssignment]
    conditions: NDArray[np.int64]  # per cell: its row in the model's condition tables
    model: CondVAE
    catalogue: list[PrototypeSet]  # the release's prototypes per label level
    site_labels: list[NDArray[np.object_]]  # per label key given: every cell's label
    vocabularies: list[list[str]]  # per label key: the release's labels, then the site's new
    train: TrainConfig
    method: str
    thresholds: dict[str, float]  # unknown threshold per label level
    seed: int
    min_prototype_cells: int
    privacy: PrivateRelease | None = None  # the DP budget, when the adaptor is released so

    @property
    def n_known(self) -> int:
        """Conditions the release already has (condition rows below this index are frozen)."""
        return len(self.release.condition_names)

    @property
    def new(self) -> list[ConditionAssignment]:
        """The site's batches that become new conditions."""
        return [a for a in self.assignments if not a.known]

    def statistics_noise(self) -> tuple[float, np.random.Generator] | None:
        """The DSBN statistics' noise under DP (None: exact statistics)."""
        return None if self.privacy is None else self.privacy.statistics_noise()

    def targets(self, rows: NDArray[np.int64] | None = None) -> list[NDArray[np.int64]]:
        """Per label key, the prototype index each cell of ``rows`` (default all) is pulled
        towards (-1: unlabelled)."""
        return [
            label_targets(labels if rows is None else labels[rows], vocabulary)
            for labels, vocabulary in zip(self.site_labels, self.vocabularies, strict=True)
        ]


def plan_mapping(
    release: Release,
    genes: Sequence[str],
    batches: NDArray[np.str_],
    labels: Mapping[str, NDArray[np.object_]],
    options: MappingOptions,
    *,
    train_overrides: Mapping[str, Any] | None = None,
    initial_rows: Mapping[str, torch.Tensor] | None = None,
    source: str = "dataset",
) -> MappingPlan:
    """Check the options, align ``genes``, give every cell its condition and operate on the
    network (after seeding torch with the options' seed: the new rows' initialisation draws
    from it). Arguments as for :func:`map_onto`, with the cells' gene names, batches and
    labels."""
    site_id, epochs, seed = options.site_id, options.epochs, options.seed
    torch.manual_seed(seed)
    levels = release.label_levels
    if len(labels) > len(levels):
        raise ConfigError(
            f"{len(labels)} label keys given but the release has {len(levels)} label "
            f"level(s) ({', '.join(levels) or 'none'})"
        )
    method = options.transfer or release.content["transfer"]["method"]
    thresholds = release.unknown_thresholds(method)
    if options.unknown_threshold is not None:
        thresholds = dict.fromkeys(thresholds, float(options.unknown_threshold))
    alignment = align_genes(
        genes, release.genes, min_overlap=options.min_gene_overlap, source=source
    )
    if alignment.n_missing:
        log.warning(
            "%s: %d of %d release genes are missing and were zero-filled",
            source, alignment.n_missing, alignment.n_release_genes,
        )  # fmt: skip
    assignments, conditions = _assign_conditions(release, batches, site_id)
    if options.privacy is not None and initial_rows is not None:
        # rows trained without DP on the same cells would carry them into the private adaptor
        log.warning("differential privacy: the kept condition rows are not used; fresh rows")
        initial_rows = None
    model = operate(release, sum(not a.known for a in assignments), initial_rows)
    catalogue = [release.prototypes(lv) for lv in levels]
    site_labels = list(labels.values())
    # Labels the release knows point at its prototypes, labels new to it at prototypes learnt
    # from the site's cells.
    vocabularies = [
        [
            *catalogue[i].labels,
            *sorted({str(v) for v in values} - {UNLABELED} - set(catalogue[i].labels)),
        ]
        for i, values in enumerate(site_labels)
    ]
    train = (
        release.mapping_defaults if epochs is None else release.mapping_defaults.scaled_to(epochs)
    )
    if train_overrides:
        train = TrainConfig.from_dict({**train.to_dict(), **train_overrides})
    new = [a for a in assignments if not a.known]
    privacy = None
    if options.privacy is not None and new:
        train = private_recipe(train)
        privacy = PrivateRelease(
            options.privacy, [a.n_cells for a in new], label_levels=len(site_labels),
            statistics=model.dsbn is not None,
            training_epochs=train.epochs if model.trainable_parameters() else 0,
            batch_size=train.batch_size,
        )  # fmt: skip
    return MappingPlan(
        release=release,
        site_id=site_id,
        alignment=alignment,
        assignments=assignments,
        conditions=conditions,
        model=model,
        catalogue=catalogue,
        site_labels=site_labels,
        vocabularies=vocabularies,
        train=train,
        method=method,
        thresholds=thresholds,
        seed=seed,
        min_prototype_cells=options.min_prototype_cells,
        privacy=privacy,
    )


def train_adaptor(
    plan: MappingPlan,
    data: TrainingData | None,
    *,
    progress: bool,
    sample_cells: int | None = None,
) -> FitResult | None:
    """Train the plan's new condition rows on ``data`` (cells of new batches only; None only
    when there is nothing to train), then prove that every release tensor is unchanged. None
    when nothing was trained. ``sample_cells``: the most cells ``data`` may hold when it is a
    sample (a streamed file's), which DP-SGD sizes its minibatches by."""
    fit_result = None
    new, train, model = plan.new, plan.train, plan.model
    if new and train.epochs > 0:
        if data is None:
            raise ValueError("new conditions to train but no training cells")
        prototypes = PrototypeTargets(
            [torch.from_numpy(c.means) for c in plan.catalogue[: len(plan.site_labels)]],
            [len(vocabulary) for vocabulary in plan.vocabularies],
            model.config.latent_dim,
        )
        reporter = Progress(
            f"training adaptor ({len(new)} new condition{'s' if len(new) > 1 else ''})",
            train.epochs, "epoch", enabled=progress,
        )  # fmt: skip
        private = plan.privacy.dp_sgd(train, sample_cells) if plan.privacy is not None else None
        fit_result = fit(
            model, data, train, plan.release.recipe, mode="mapping",
            prototypes=prototypes, seed=plan.seed, progress=reporter, private=private,
        )  # fmt: skip
        reporter.finish("stopped early" if fit_result.stopped_early else "")
    assert_frozen(plan.release, model)
    return fit_result


def finish_mapping(
    plan: MappingPlan,
    latent: NDArray[np.float32],
    fit_result: FitResult | None,
    seconds: dict[str, float],
    *,
    sampled_cells: int | None = None,
) -> MappingResult:
    """The site's prototypes and adaptor (when it has new batches) and every cell's labels,
    from the latent means of all cells. ``sampled_cells``: how many cells of new batches the
    adaptor was trained on, when that was a sample of them."""
    release, new = plan.release, plan.new
    adaptor = None
    site_sets: list[PrototypeSet] = []
    dropped: dict[str, dict[str, int]] = {}
    if new:
        fresh_rows = plan.conditions >= plan.n_known
        site_sets, dropped = _site_prototypes(
            release.label_levels, plan.site_labels, latent, fresh_rows, plan.site_id,
            plan.min_prototype_cells,
        )  # fmt: skip
        released, counts = site_sets, [a.n_cells for a in new]
        summary = _training_summary(fit_result, plan.train, int(fresh_rows.sum()), sampled_cells)
        if plan.privacy is not None:
            released, withheld = plan.privacy.prototypes(
                latent[fresh_rows], [labels[fresh_rows] for labels in plan.site_labels],
                plan.catalogue, plan.site_id, plan.min_prototype_cells,
            )  # fmt: skip
            released += [PrototypeSet.empty(latent.shape[1])] * (len(site_sets) - len(released))
            dropped = {release.label_levels[i]: w for i, w in withheld.items()}
            counts = plan.privacy.counts
            summary = _private_summary(fit_result, plan.train, plan.privacy.noisy_cells)
        adaptor = extract_adaptor(
            release,
            plan.model,
            site_id=plan.site_id,
            conditions=[(a.condition, n) for a, n in zip(new, counts, strict=True)],
            prototypes=released,
            training=summary,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            privacy=None if plan.privacy is None else plan.privacy.record(),
        )

    t3 = time.perf_counter()
    transfers = _transfer(release, latent, plan.catalogue, site_sets, plan.method, plan.thresholds)
    seconds["transfer"] = time.perf_counter() - t3
    return MappingResult(
        release=release,
        latent=latent,
        transfers=transfers,
        assignments=plan.assignments,
        alignment=plan.alignment,
        adaptor=adaptor,
        fit=fit_result,
        trained_parameters=fit_result.trained_parameters if fit_result else 0,
        total_parameters=plan.model.total_parameter_count(),
        model=plan.model,
        transfer_method=plan.method,
        unknown_thresholds=plan.thresholds,
        seconds=seconds,
        dropped_prototypes=dropped,
    )


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
    thresholds: Mapping[str, float],
) -> dict[str, Transfer]:
    """Labels per level, from the release's catalogue merged with the site's own prototypes
    (what the composite will hold), or by kNN on the release's reference latents."""
    rules: dict[str, Callable[[NDArray[np.float32]], Transfer]] = {}
    for i, level in enumerate(release.label_levels):
        if method == "knn":
            ref = release.reference_latents()
            ref_labels = release.reference_labels(level)
            if ref is None or ref_labels is None:
                raise ConfigError("kNN transfer needs reference latents, which this release lacks")
            rules[level] = partial(
                knn_transfer, reference_latent=ref[0], reference_labels=ref_labels,
                threshold=thresholds[level],
            )  # fmt: skip
            continue
        merged = merge_prototype_sets([catalogue[i], *site_sets[i : i + 1]])
        if len(merged):
            rules[level] = partial(
                prototype_transfer, prototypes=merged, threshold=thresholds[level]
            )
    clusters = release.unlabeled_prototypes()
    if not release.label_levels and clusters is not None:
        rules[CLUSTER_LEVEL] = partial(
            prototype_transfer, prototypes=clusters, threshold=thresholds[CLUSTER_LEVEL]
        )
    return {level: _in_chunks(rule, latent, thresholds[level]) for level, rule in rules.items()}


def _in_chunks(
    rule: Callable[[NDArray[np.float32]], Transfer], latent: NDArray[np.float32], threshold: float
) -> Transfer:
    """``rule`` applied to ``TRANSFER_CHUNK_CELLS`` cells at a time (every rule treats each
    cell on its own), so its cells x prototypes or neighbours temporaries stay small."""
    n_cells = latent.shape[0]
    if n_cells <= TRANSFER_CHUNK_CELLS:
        return rule(latent)
    labels = np.empty(n_cells, dtype=object)
    uncertainty = np.empty(n_cells, dtype=np.float32)
    for start in range(0, n_cells, TRANSFER_CHUNK_CELLS):
        rows = slice(start, start + TRANSFER_CHUNK_CELLS)
        part = rule(latent[rows])
        labels[rows], uncertainty[rows] = part.labels, part.uncertainty
    return Transfer(labels=labels, uncertainty=uncertainty, threshold=threshold)


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


def _private_summary(
    fit_result: FitResult | None, train: TrainConfig, noisy_cells: int
) -> dict[str, Any]:
    """What a DP adaptor says about its training: only what the recipe fixed and the released
    cell count (losses and stopping points read the data)."""
    trained = fit_result.trained_parameters if fit_result is not None else 0
    epochs = fit_result.epochs if fit_result is not None else 0
    return {
        "n_cells": noisy_cells, "epochs": epochs, "trained_parameters": trained,
        "recipe": train.to_dict(), "private": True,
    }  # fmt: skip


def _training_summary(
    fit_result: FitResult | None, train: TrainConfig, n_cells: int, sampled_cells: int | None
) -> dict[str, Any]:
    if fit_result is None or not fit_result.history:
        return {"epochs": 0, "n_cells": n_cells, "trained_parameters": 0}
    last = fit_result.history[-1]
    sample = {} if sampled_cells is None else {"sampled_cells": sampled_cells}
    return {
        "n_cells": n_cells,
        **sample,
        "epochs": fit_result.epochs,
        "iterations": fit_result.iterations,
        "stopped_early": fit_result.stopped_early,
        "trained_parameters": fit_result.trained_parameters,
        "final_loss": round(float(last.get("loss", 0.0)), 6),
        "recipe": train.to_dict(),
    }
