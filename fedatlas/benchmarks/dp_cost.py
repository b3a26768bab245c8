"""What differential privacy costs on real data: labels at the site and labels propagated.

Per split (CellBench S1/S2 and the robustness suite's splits) the query cells form two sites:
A (the first query stem, or a random half of a single one) and B (the rest). For each epsilon:

* **own**: A maps its cells unlabelled with DP (noisy DP-SGD rows change its latent); its
  accuracy on lines the reference holds (``unknown`` a miss), macro F1 over its true lines, and
  the AUROC of its uncertainty for lines the reference lacks;
* **propagation**: A maps its cells *labelled* with DP and sends the adaptor; the composite
  (release + A's noisy prototypes) labels B's cells, which B maps without DP. Reported: B's
  accuracy on every line the reference or A knows (a line whose prototype A could not send is
  a miss), ``novel_propagated``: the same on the lines only A knows, and whether A's bundle
  passes the coordinator's prototype checks at the default policy (a refused bundle does not
  enter the composite, as at the coordinator).

Epsilon infinity is the same path without DP. Synthetic worlds (:func:`synthetic_sites`) show
the same at site sizes CellBench does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
from sklearn.metrics import f1_score

from fedatlas.benchmarks.cellbench import QUERY_STEMS, REFERENCE_STEMS
from fedatlas.benchmarks.robustness import TRUTH, write_site_files
from fedatlas.benchmarks.splits import Split
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.prototype_checks import (
    PrototypeProblem,
    check_prototypes,
    claimed_cells,
)
from fedatlas.shared.api import build_reference
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.evaluation.metrics import unknown_auroc
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.label_transfer import UNKNOWN
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.privacy import DEFAULT_DELTA, PrivacySpec
from fedatlas.shared.model.release import Release

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
SYNTHETIC_TYPES = ("T1", "T2", "T3", "N1", "N2")
STANDARD_SPLITS = {
    "S1": Split("standard", REFERENCE_STEMS, QUERY_STEMS),
    "S2": Split("standard", REFERENCE_STEMS, QUERY_STEMS, ("A549", "H838")),
}


@dataclass(frozen=True)
class Sites:
    """A split's reference and its two query sites (raw counts, truth in ``obs[TRUTH]``)."""

    reference: anndata.AnnData
    a: anndata.AnnData
    b: anndata.AnnData
    reference_lines: frozenset[str]


def split_sites(data_dir: Path, split: Split, folder: Path, seed: int) -> Sites:
    """Write the split's files as sites hold them (once) and cut its query into sites A and B."""
    if not (folder / "reference.h5ad").is_file():
        write_site_files(data_dir, split, folder)
    reference = anndata.read_h5ad(folder / "reference.h5ad")
    queries = [anndata.read_h5ad(folder / f"{stem}.h5ad") for stem in split.query]
    if len(queries) > 1:
        a, b = queries[0], anndata.concat(queries[1:], merge="same")
    else:
        order = np.random.default_rng(seed).permutation(queries[0].n_obs)
        half = order.size // 2
        a, b = queries[0][np.sort(order[:half])].copy(), queries[0][np.sort(order[half:])].copy()
    lines = frozenset(str(v) for v in reference.obs[TRUTH])
    return Sites(reference, a, b, lines)


def synthetic_sites(site_cells: int, seed: int) -> Sites:
    """A synthetic world of five types: a 3,000-cell reference of three batches lacking two of
    them, and sites A and B of ``site_cells`` cells each (one batch, every type)."""
    world = SyntheticWorld(seed=seed, cell_types=SYNTHETIC_TYPES)
    held = SYNTHETIC_TYPES[:3]
    reference = world.sample(3000, batches=("r1", "r2", "r3"), cell_types=held, seed=seed + 1)
    a = world.sample(site_cells, batches=("a",), seed=seed + 2, site="A")
    b = world.sample(site_cells, batches=("b",), seed=seed + 3, site="B")
    return Sites(reference, a, b, frozenset(held))


def _cells(adata: anndata.AnnData, labelled: bool) -> CellTable:
    keys = [TRUTH] if labelled else []
    return extract_cells(adata, source="site", batch_key="batch", label_keys=keys)


def _spec(epsilon: float) -> PrivacySpec | None:
    return None if math.isinf(epsilon) else PrivacySpec(epsilon, DEFAULT_DELTA)


def _labels(result: MappingResult) -> tuple[np.ndarray, np.ndarray]:
    transfer = next(iter(result.transfers.values()))
    return np.asarray(transfer.called, dtype=str), np.asarray(transfer.uncertainty, np.float64)


def own_scores(
    release: Release, site: anndata.AnnData, lines: frozenset[str], epsilon: float, seed: int
) -> dict[str, float | None]:
    """Site A's own labels after an unlabelled DP mapping."""
    options = MappingOptions(site_id="a", seed=seed, privacy=_spec(epsilon))
    result = map_onto(release, _cells(site, labelled=False), options, progress=False)
    predicted, uncertainty = _labels(result)
    truth = site.obs[TRUTH].astype(str).to_numpy()
    known = np.isin(truth, sorted(lines))
    novel = ~known
    f1 = f1_score(truth[known], predicted[known], labels=sorted(set(truth[known])),
                  average="macro", zero_division=0)  # fmt: skip
    return {
        "accuracy": float(np.mean(predicted[known] == truth[known])),
        "macro_f1": float(f1),
        "auroc": unknown_auroc(uncertainty, novel) if novel.any() and known.any() else None,
        "known_called_unknown": float(np.mean(predicted[known] == UNKNOWN)),
    }


def propagation_scores(
    release: Release,
    sites: Sites,
    epsilon: float,
    seed: int,
) -> dict[str, Any]:
    """B's labels from the composite holding A's DP prototypes."""
    options = MappingOptions(site_id="a", seed=seed, privacy=_spec(epsilon))
    mapped_a = map_onto(release, _cells(sites.a, labelled=True), options, progress=False)
    adaptor = mapped_a.adaptor
    assert adaptor is not None
    check = "passed"
    level = release.label_levels[0]
    claimed = claimed_cells(adaptor, len(release.label_levels))
    try:
        check_prototypes(level, adaptor.prototypes(0), release.prototypes(level), claimed, Policy())
    except PrototypeProblem as problem:
        check = problem.code
    composite = compose(release, [adaptor] if check == "passed" else [])
    mapped_b = map_onto(
        composite, _cells(sites.b, labelled=False), MappingOptions(site_id="b", seed=seed),
        progress=False,
    )  # fmt: skip
    predicted, _ = _labels(mapped_b)
    truth = sites.b.obs[TRUTH].astype(str).to_numpy()
    taught = {str(v) for v in sites.a.obs[TRUTH]} | set(sites.reference_lines)
    covered = np.isin(truth, sorted(taught))
    only_a = np.isin(truth, sorted(taught - sites.reference_lines))
    return {
        "accuracy": float(np.mean(predicted[covered] == truth[covered])),
        "novel_propagated": float(np.mean(predicted[only_a] == truth[only_a]))
        if only_a.any()
        else None,
        "labels_sent": len(adaptor.prototypes(0)),
        "coordinator_check": check,
    }


def run(
    sites: Sites,
    split_name: str,
    *,
    preset: str,
    seed: int,
    epsilons: Sequence[float],
    reference_epochs: int | None = None,
) -> list[dict[str, Any]]:
    """Every epsilon on one split's sites and seed: one row each."""
    release = build_reference(
        sites.reference, batch_key="batch", label_key=TRUTH, model=preset, seed=seed,
        epochs=reference_epochs,
    )  # fmt: skip
    rows = []
    for epsilon in epsilons:
        rows.append(
            {
                "split": split_name, "preset": preset, "seed": seed, "epsilon": epsilon,
                "site_cells": int(sites.a.n_obs),
                "own": own_scores(release, sites.a, sites.reference_lines, epsilon, seed),
                "propagation": propagation_scores(release, sites, epsilon, seed),
            }
        )  # fmt: skip
    return rows
