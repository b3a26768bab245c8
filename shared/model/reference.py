"""Building a reference release from raw counts (the coordinator's, or a consortium's, data)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

import fedatlas.shared as fs
from fedatlas.shared.config import (
    ModelConfig,
    PreprocessingRecipe,
    Preset,
    TrainConfig,
    get_preset,
)
from fedatlas.shared.data.dataset import UNLABELED, CellTable, condition_name, label_targets
from fedatlas.shared.data.preprocessing import select_highly_variable_genes
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.label_transfer import DEFAULT_UNKNOWN_THRESHOLD, calibrate_knn_threshold
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.prototypes import PrototypeSet, cluster_prototypes
from fedatlas.shared.model.release import (
    CONDITION_TENSOR,
    LATENT_TENSOR,
    MODEL_PREFIX,
    UNLABELED_PREFIX,
    Release,
    prototype_prefix,
    reference_label_tensor,
    transfer_levels,
)
from fedatlas.shared.model.surgery import export_tensors
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

REFERENCE_SITE = "reference"
# Below this many optimiser steps the presets' networks were seen to leave cell types unresolved
# (e.g. 240 cells: 2 steps per epoch); the build warns.
MIN_ADVISED_STEPS = 300


@dataclass
class BuildResult:
    """A built release and what training did."""

    release: Release
    fit: FitResult
    latent: NDArray[np.float32]  # reference cells' latent means, in input order
    conditions: NDArray[np.int64]  # condition index of each reference cell


def train_reference(
    cells: CellTable,
    *,
    preset: Preset | str = "scpoli",
    seed: int = 0,
    epochs: int | None = None,
    n_top_genes: int = 2000,
    model_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    site_id: str = REFERENCE_SITE,
    keep_latents: bool = True,
    unknown_threshold: float | None = None,
    progress: bool = True,
) -> BuildResult:
    """Select genes, train the full network on ``cells`` and package a release.

    ``cells.labels`` gives the label levels in order (primary first); ``epochs`` rescales the
    preset's recipe (its phases keep their proportions). Reference latents (one row per cell,
    latent space only) are kept in the release when ``keep_latents`` so kNN transfer and plots
    of the reference work at sites.

    The release records an unknown threshold per label-transfer method and label level: 0.5 for
    prototypes (their uncertainty is calibrated per type already) and, when latents and labels
    are kept, for kNN one calibrated on the reference at each level (a finer level's votes are
    more ambiguous; :func:`calibrate_knn_threshold`). ``unknown_threshold`` replaces the
    release's default method's thresholds at every level.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise ConfigError(f"unknown threshold must be in [0, 1], got {unknown_threshold}")
    torch.manual_seed(seed)
    overrides = dict(model_overrides or {})
    model_cfg = preset.model_config(n_top_genes, **overrides)  # validate before any work
    recipe = PreprocessingRecipe(n_top_genes=n_top_genes, input_transform=model_cfg.input_transform)
    train = preset.reference if epochs is None else preset.reference.scaled_to(epochs)
    if train_overrides:
        train = TrainConfig.from_dict({**train.to_dict(), **train_overrides})
    if train.mmd_weight > 0 and train.mmd_on == "decoder" and not model_cfg.decoder_hidden:
        raise ConfigError("MMD on the decoder needs a hidden decoder layer (decoder_hidden)")

    gene_index = select_highly_variable_genes(cells.counts, cells.batches, recipe)
    genes = [cells.genes[i] for i in gene_index]
    model_cfg = preset.model_config(len(genes), **overrides)
    batch_names = sorted(set(cells.batches.tolist()))
    conditions = np.searchsorted(np.asarray(batch_names), cells.batches).astype(np.int64)
    levels = list(cells.labels)
    vocab = {lv: sorted({str(v) for v in cells.labels[lv]} - {UNLABELED}) for lv in levels}
    targets = [label_targets(cells.labels[lv], vocab[lv]) for lv in levels]
    data = TrainingData.for_recipe(cells.counts[:, gene_index].tocsr(), conditions, targets, recipe)
    log.info(
        "reference: %d cells, %d batches, %d genes selected, label levels %s",
        data.n_cells, len(batch_names), len(genes), levels or "none",
    )  # fmt: skip

    model = CondVAE(model_cfg, len(batch_names))
    result = _train(model, data, train, recipe, [len(vocab[lv]) for lv in levels], seed, progress)
    means = latent_means(model, data, recipe)
    estimate_dsbn_statistics(model, data, recipe, means)
    model.freeze_all()

    tensors, described, unlabeled_meta = _release_tensors(
        model, means, cells, data, site_id, seed, keep_latents
    )
    cell_counts = np.bincount(conditions, minlength=len(batch_names))
    content = reference_content(
        preset=preset,
        model_cfg=model_cfg,
        recipe=recipe,
        train=train,
        seed=seed,
        genes=genes,
        conditions=[
            {"name": condition_name(site_id, b), "origin": site_id, "n_cells": int(n)}
            for b, n in zip(batch_names, cell_counts, strict=True)
        ],
        prototypes=described,
        unlabeled_prototypes=unlabeled_meta,
        reference={"n_cells": data.n_cells, "keeps_latents": keep_latents, "label_vocab": vocab},
        transfer=_transfer_defaults(
            preset, means, cells, conditions, keep_latents, unknown_threshold, seed
        ),
    )
    provenance = release_provenance(result)
    release = Release.assemble(content, tensors, provenance)
    return BuildResult(release=release, fit=result, latent=means, conditions=conditions)


def reference_content(
    *,
    preset: Preset,
    model_cfg: ModelConfig,
    recipe: PreprocessingRecipe,
    train: TrainConfig,
    seed: int,
    genes: list[str],
    conditions: list[dict[str, Any]],
    prototypes: dict[str, Any],
    unlabeled_prototypes: dict[str, Any] | None,
    reference: dict[str, Any],
    transfer: dict[str, Any],
    federated: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest content of a reference release (a central or a federated build)."""
    content = {
        "kind": "reference",
        "preset": preset.name,
        "model": model_cfg.to_dict(),
        "preprocessing": recipe.to_dict(),
        "reference_training": train.to_dict(),
        "mapping": preset.mapping.to_dict(),
        "seed": seed,
        "genes": genes,
        "conditions": conditions,
        "label_levels": list(prototypes),
        "prototypes": prototypes,
        "unlabeled_prototypes": unlabeled_prototypes,
        "reference": reference,
        "transfer": transfer,
        "lineage": {"base": None, "adaptors": []},
    }
    if federated is not None:
        content["federated"] = federated
    return content


def release_provenance(result: FitResult | None, **extra: Any) -> dict[str, Any]:
    """When and with what a release was built."""
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fedatlas_version": fs.__version__,
        "torch_version": str(torch.__version__),
        **({} if result is None else {
            "epochs_trained": result.epochs,
            "stopped_early": result.stopped_early,
            "training_seconds": round(result.seconds, 3),
        }),
        **extra,
    }  # fmt: skip


def _train(
    model: CondVAE,
    data: TrainingData,
    train: TrainConfig,
    recipe: PreprocessingRecipe,
    n_labels: list[int],
    seed: int,
    progress: bool,
) -> FitResult:
    """Train the whole network, with progress and a warning when training was too short."""
    prototypes = PrototypeTargets(
        [torch.zeros(0, model.config.latent_dim) for _ in n_labels],
        n_labels,
        model.config.latent_dim,
    )
    reporter = Progress("training reference", train.epochs, "epoch", enabled=progress)
    result = fit(
        model, data, train, recipe, mode="reference", prototypes=prototypes, seed=seed,
        progress=reporter,
    )  # fmt: skip
    reporter.finish("stopped early" if result.stopped_early else "")
    if result.iterations < MIN_ADVISED_STEPS:
        log.warning(
            "training took only %d optimiser steps (%d cells, %d epochs of %d-cell minibatches); "
            "a network trained this briefly may not separate cell types: consider more --epochs",
            result.iterations, data.n_cells, result.epochs, train.batch_size,
        )  # fmt: skip
    return result


def _transfer_defaults(
    preset: Preset,
    means: NDArray[np.float32],
    cells: CellTable,
    conditions: NDArray[np.int64],
    keep_latents: bool,
    unknown_threshold: float | None,
    seed: int,
) -> dict[str, Any]:
    """The release's default label-transfer method and each method's unknown threshold per
    label level (see :func:`transfer_levels`)."""
    levels = transfer_levels(list(cells.labels))
    thresholds = {"prototype": dict.fromkeys(levels, DEFAULT_UNKNOWN_THRESHOLD)}
    defaults: dict[str, Any] = {}
    primary = next(iter(cells.labels.values()), None)
    if keep_latents and primary is not None and (primary != UNLABELED).sum() >= 2:
        log.info("calibrating the kNN unknown thresholds on the reference cells")
        knn, records = dict.fromkeys(levels, DEFAULT_UNKNOWN_THRESHOLD), {}
        for level, labels in cells.labels.items():
            if (labels != UNLABELED).sum() >= 2:
                knn[level], records[level] = calibrate_knn_threshold(
                    means, labels, conditions, seed=seed
                )
        thresholds["knn"], defaults["knn_calibration"] = knn, records
    method = preset.transfer if preset.transfer in thresholds else "prototype"
    if unknown_threshold is not None:
        thresholds[method] = dict.fromkeys(levels, unknown_threshold)
    return {"method": method, "unknown_thresholds": thresholds, **defaults}


def _release_tensors(
    model: CondVAE,
    means: NDArray[np.float32],
    cells: CellTable,
    data: TrainingData,
    site_id: str,
    seed: int,
    keep_latents: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Weights, prototype catalogue (labelled and Leiden clusters) and optional latents."""
    tensors = {MODEL_PREFIX + k: v for k, v in export_tensors(model).items()}
    described: dict[str, Any] = {}
    levels = list(cells.labels)
    for i, level in enumerate(levels):
        pset, _ = PrototypeSet.from_latents(means, cells.labels[level], site_id)
        tensors.update(pset.to_tensors(prototype_prefix(i)))
        described[level] = pset.describe()
    unlabeled_meta = None
    unlabeled = np.ones(data.n_cells, bool) if not levels else cells.labels[levels[0]] == UNLABELED
    if unlabeled.sum() >= 3:
        clusters = cluster_prototypes(means[unlabeled], source=site_id, seed=seed)
        tensors.update(clusters.to_tensors(UNLABELED_PREFIX))
        unlabeled_meta = clusters.describe()
    if keep_latents:
        tensors[LATENT_TENSOR] = torch.from_numpy(means.copy())
        tensors[CONDITION_TENSOR] = torch.from_numpy(data.conditions.astype(np.int32))
        for i, target in enumerate(data.targets):
            tensors[reference_label_tensor(i)] = torch.from_numpy(target.astype(np.int32))
    return tensors, described, unlabeled_meta
