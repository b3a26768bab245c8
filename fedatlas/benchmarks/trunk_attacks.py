"""A hostile member of a federated build: what it can make its round updates say, and what that
does to the reference everyone gets.

A synthetic world of four cell types; three honest sites and a fourth (``s4``, its own 160
cells) that trains honestly, then replaces what it returns each round (:data:`TRUNK_ATTACKS`).
The build runs in one process (:func:`fedatlas.shared.model.federated.train_federated`, the
algorithm the Flower apps transport; ``tests/flower_apps/hostile`` does the same through real
SuperNodes). Accuracy: the label accuracy of 400 new cells (two batches no site has) mapped
onto the composite of the release and every site's adaptor.

Used by ``bench/attacks.py`` (every attack under every aggregation) and
``tests/test_federated.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.federated import (
    FederatedPlan,
    FederatedResult,
    RoundUpdate,
    Trunk,
)
from fedatlas.shared.model.mapping import MappingOptions, map_onto

TYPES = ("alpha", "beta", "gamma", "delta")
WORLD = SyntheticWorld(seed=3, n_genes=300, cell_types=TYPES)
ATTACKER = "s4"
ROUNDS, LOCAL_EPOCHS = 10, 5
UpdateHook = Callable[[int, str, Trunk, RoundUpdate], RoundUpdate]


def site_cells(site: str, batches: tuple[str, ...], seed: int) -> CellTable:
    """160 labelled cells of the world per batch, for ``site``."""
    adata = WORLD.sample(160 * len(batches), batches=batches, seed=seed)
    return extract_cells(adata, source=site, batch_key="batch", label_keys=["cell_type"])


def honest_sites() -> dict[str, CellTable]:
    """Three sites of the world, each with its own batches."""
    layout = {"s1": ("s1-a", "s1-b"), "s2": ("s2-a",), "s3": ("s3-a", "s3-b")}
    return {site: site_cells(site, batches, 10 + i)
            for i, (site, batches) in enumerate(layout.items())}  # fmt: skip


def federation(sites: dict[str, CellTable] | None = None) -> dict[str, CellTable]:
    """The honest sites and the one that will attack."""
    return {**(sites or honest_sites()), ATTACKER: site_cells(ATTACKER, ("s4-a",), 13)}


def query() -> tuple[CellTable, NDArray[np.str_]]:
    """New cells of the world (two batches no site has) and their true types."""
    adata = WORLD.sample(400, batches=("q1", "q2"), seed=40)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    return extract_cells(adata, source="query", batch_key="batch"), truth


def plan(**overrides: object) -> FederatedPlan:
    """The build the attacks run against (``overrides``: aggregation, safeguards, ...)."""
    values: dict[str, object] = {"preset": "scpoli", "rounds": ROUNDS,
                                 "local_epochs": LOCAL_EPOCHS, "n_top_genes": 300,
                                 "label_level": "cell_type"}  # fmt: skip
    values.update(overrides)
    return FederatedPlan.from_dict(values)


def accuracy(result: FederatedResult, cells: tuple[CellTable, NDArray[np.str_]]) -> float:
    """Label accuracy of ``cells`` mapped onto the build's composite."""
    adaptors = [m.adaptor for m in result.mappings.values() if m.adaptor is not None]
    composite = compose(result.release, adaptors)
    table, truth = cells
    mapped = map_onto(composite, table, MappingOptions(site_id="query"), progress=False)
    return float(np.mean(mapped.transfers["cell_type"].labels.astype(str) == truth))


def _zero_trunk(sent: Trunk, update: RoundUpdate) -> RoundUpdate:
    zeros = {k: torch.zeros_like(v) for k, v in update.trunk.items()}
    return RoundUpdate(zeros, 10**9, update.loss)


def _noise_trunk(sent: Trunk, update: RoundUpdate) -> RoundUpdate:
    noise = torch.Generator().manual_seed(99)
    trunk = {k: torch.randn(v.shape, generator=noise).to(v.dtype) if v.is_floating_point() else v
             for k, v in update.trunk.items()}  # fmt: skip
    return RoundUpdate(trunk, 10**9, update.loss)


def _negative_count(sent: Trunk, update: RoundUpdate) -> RoundUpdate:
    return RoundUpdate(update.trunk, -599, update.loss)


def _boosted_update(sent: Trunk, update: RoundUpdate) -> RoundUpdate:
    trunk = {k: sent[k] + 100 * (v - sent[k]) if v.is_floating_point() else v
             for k, v in update.trunk.items()}  # fmt: skip
    return RoundUpdate(trunk, update.n_cells, update.loss)


TRUNK_ATTACKS: dict[str, Callable[[Trunk, RoundUpdate], RoundUpdate]] = {
    "zero trunk claiming 10^9 cells": _zero_trunk,
    "Gaussian noise trunk claiming 10^9 cells": _noise_trunk,
    "-599 cells": _negative_count,
    "honest update x100": _boosted_update,
}


def hostile(attack: str) -> UpdateHook:
    """An ``on_update`` hook of :func:`train_federated`: the attacker's update replaced by
    ``attack``."""
    replace = TRUNK_ATTACKS[attack]

    def on_update(r: int, site: str, sent: Trunk, update: RoundUpdate) -> RoundUpdate:
        return replace(sent, update) if site == ATTACKER else update

    return on_update
