"""Federated reference training in one process (the algorithm the Flower apps transport):
gene election, FedAvg/FedProx, what stays at a site, how the release and adaptors come out, and
how the coordinator treats a site that fails a step (with a stand-in for Flower's Grid)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.coordinator.federated_build import BuildAbortedError, _Steps
from fedatlas.coordinator.verification import Rejection, _check_norms
from fedatlas.shared.config import PreprocessingRecipe
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.data.preprocessing import select_highly_variable_genes
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.federated import (
    FederatedPlan,
    SiteTrainer,
    average_trunks,
    elect_genes,
    gene_universe,
    initial_trunk,
    train_federated,
    trunk_problem,
)
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.release import LATENT_TENSOR
from fedatlas.shared.model.surgery import TABLE_SUFFIX, is_condition_table
from fedatlas.shared.wire.codec import encode_tensors

TYPES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(scope="module")
def sites() -> dict[str, CellTable]:
    """Three sites of one synthetic world, each with its own batches (some labelled)."""
    world = SyntheticWorld(seed=3, n_genes=300, cell_types=TYPES)
    layout = {"s1": ("s1-a", "s1-b"), "s2": ("s2-a",), "s3": ("s3-a", "s3-b")}
    out = {}
    for i, (site, batches) in enumerate(layout.items()):
        adata = world.sample(160 * len(batches), batches=batches, seed=10 + i)
        out[site] = extract_cells(adata, source=site, batch_key="batch", label_keys=["cell_type"])
    return out


def _plan(**overrides: object) -> FederatedPlan:
    values: dict[str, object] = {"preset": "scpoli", "rounds": 3, "local_epochs": 2,
                                 "n_top_genes": 120, "label_level": "cell_type",
                                 "finish_epochs": 2}  # fmt: skip
    values.update(overrides)
    return FederatedPlan.from_dict(values)


def test_the_sites_votes_elect_the_genes_a_central_build_selects(
    sites: dict[str, CellTable],
) -> None:
    plan = _plan()
    trainers = [SiteTrainer(cells, site, plan) for site, cells in sites.items()]
    universe = gene_universe([t.gene_names() for t in trainers])
    elected = elect_genes(universe, [t.votes(universe) for t in trainers], plan)
    # every site has the same genes here, so the pooled matrix needs no alignment
    counts = sp.vstack([c.counts for c in sites.values()], format="csr")
    batches = np.concatenate([c.batches for c in sites.values()])
    central = select_highly_variable_genes(counts, batches, PreprocessingRecipe(n_top_genes=120))
    assert elected == [universe[i] for i in central]
    assert len(elected) == 120


def test_fedavg_weights_each_site_by_its_cells() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4, dtype=torch.int64)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9, dtype=torch.int64)}
    mean = average_trunks([(a, 1), (b, 3)])
    assert torch.allclose(mean["w"], torch.tensor([2.5, 5.0]))
    assert mean["n"].dtype == torch.int64
    assert int(mean["n"]) == 8  # 7.75 rounded
    with pytest.raises(ValueError, match="no site"):
        average_trunks([])


def test_fedprox_keeps_a_sites_trunk_nearer_the_sent_one(sites: dict[str, CellTable]) -> None:
    cells = sites["s1"]
    trainers = {}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        plan = _plan(strategy=strategy, proximal_mu=mu, local_epochs=10)
        trainers[strategy] = SiteTrainer(cells, "s1", plan)
    genes = gene_universe([cells.genes])[:200]
    sent = initial_trunk(_plan(), len(genes))
    drift = {}
    for strategy, trainer in trainers.items():
        update = trainer.train_round(genes, sent, 0)
        drift[strategy] = sum(
            float(((update.trunk[k] - v) ** 2).sum())
            for k, v in sent.items()
            if v.is_floating_point()
        )
    # measured: squared drift 2.07 with FedAvg, 0.32 with FedProx (mu 50) after 10 epochs
    assert drift["fedprox"] < 0.5 * drift["fedavg"]


def test_a_federated_build_keeps_every_sites_rows_and_cells_at_the_site(
    sites: dict[str, CellTable],
) -> None:
    plan = _plan(rounds=6, local_epochs=5)
    result = train_federated(sites, plan)
    release = result.release
    # the release: averaged trunk only, no condition, no prototype, no latent of any cell
    assert release.condition_names == []
    assert LATENT_TENSOR not in release.tensors
    assert not any(is_condition_table(k) and v.shape[0] for k, v in release.tensors.items())
    assert len(release.prototypes("cell_type")) == 0
    assert release.content["federated"]["sites"] == ["s1", "s2", "s3"]
    assert len(release.content["federated"]["rounds"]) == plan.rounds
    # each site's adaptor: its own conditions and the prototypes of its labels
    for site, mapping in result.mappings.items():
        adaptor = mapping.adaptor
        assert adaptor is not None
        assert adaptor.site_id == site
        assert adaptor.condition_names == [f"{site}/{b}" for b in sorted(set(sites[site].batches))]
        assert sorted(adaptor.prototypes(0).labels) == sorted(set(sites[site].labels["cell_type"]))
    # the composite holds every site's conditions and prototypes, and embeds each site's cells
    # exactly as the site's own model did (nothing left to train)
    composite = compose(release, [m.adaptor for m in result.mappings.values() if m.adaptor])
    assert composite.condition_names == sorted(
        f"{s}/{b}" for s, cells in sites.items() for b in set(cells.batches)
    )
    catalogue = composite.prototypes("cell_type")
    assert sorted(set(catalogue.labels)) == sorted(TYPES)
    for site, cells in sites.items():
        again = map_onto(composite, cells, MappingOptions(site_id=site), progress=False)
        assert again.adaptor is None
        assert again.trained_parameters == 0
        np.testing.assert_allclose(again.latent, result.mappings[site].latent, atol=1e-5)


def test_the_final_adaptor_starts_from_the_rows_the_site_kept(sites: dict[str, CellTable]) -> None:
    plan = _plan(rounds=1, finish_epochs=0)
    result = train_federated({"s1": sites["s1"]}, plan)
    trainer = SiteTrainer(sites["s1"], "s1", plan)
    trainer.train_round(result.genes, initial_trunk(plan, len(result.genes)), 0)
    adaptor = result.mappings["s1"].adaptor
    assert adaptor is not None
    rows = adaptor.table_rows()
    assert rows.keys() == {k + TABLE_SUFFIX for k in trainer.rows}
    for name, kept in trainer.rows.items():
        assert torch.equal(rows[name + TABLE_SUFFIX], kept)


def test_rows_without_reference_rows_to_compare_are_bounded_per_entry() -> None:
    _check_norms("t", torch.full((1, 400), 9.0), 0.0, 10.0)  # RMS 9 <= 10: accepted
    with pytest.raises(Rejection) as caught:
        _check_norms("t", torch.full((1, 400), 11.0), 0.0, 10.0)
    assert caught.value.code == "norm_outlier"
    assert "no rows to compare" in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy"),
        ({"proximal_mu": 0.1}, "only used with fedprox"),
        ({"rounds": 0}, "must be >= 1"),
        ({"preset": "nope"}, "nope"),
        ({"colour": "red"}, "unknown federated plan field"),
    ],
)
def test_a_bad_plan_is_refused_with_a_reason(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(**overrides)
    with pytest.raises(ConfigError, match="not JSON"):
        FederatedPlan.from_json("{")


def _reply(node: int, kind: str) -> Any:
    """A stand-in for a Flower reply: ``ok`` or ``error``."""
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node),
        has_error=lambda: kind == "error",
        error=SimpleNamespace(reason="ClientApp raised ValueError"),
        content={},
    )


def test_a_site_that_fails_or_stays_silent_is_reported_and_left_out() -> None:
    report: dict[str, Any] = {"dropped": {}}
    steps = _Steps(None, _plan(), timeout=5.0, min_sites=1, report=report)
    steps.site_of = {1: "h1", 2: "h2", 3: "h3"}
    # node 3 never answers
    replies = steps.collect([1, 2, 3], "train.round", [_reply(1, "ok"), _reply(2, "error")])
    assert sorted(replies) == [1]
    assert report["dropped"]["2"] == {
        "site_id": "h2", "step": "train.round", "reason": "failed: ClientApp raised ValueError"
    }  # fmt: skip
    assert report["dropped"]["3"]["reason"] == "no answer within 5 s"
    strict = _Steps(None, _plan(), timeout=5.0, min_sites=2, report={"dropped": {}})
    with pytest.raises(BuildAbortedError, match="1 site\\(s\\) answered, 2 required"):
        strict.collect([1, 2, 3], "query.genes", [_reply(1, "ok"), _reply(2, "error")])


def test_a_trunk_that_does_not_fit_is_left_out_of_the_average() -> None:
    sent = {"w": torch.zeros(2, 3), "n": torch.tensor(1, dtype=torch.int64)}
    good = {"w": torch.ones(2, 3), "n": torch.tensor(2, dtype=torch.int64)}
    assert trunk_problem(sent, good) == ""
    assert "missing ['n']" in trunk_problem(sent, {"w": good["w"]})
    assert "expected torch.float32 (2, 3)" in trunk_problem(sent, {**good, "w": torch.ones(3, 2)})
    nan = {**good, "w": torch.full((2, 3), float("nan"))}
    assert "NaN" in trunk_problem(sent, nan)

    def answer(trunk: dict[str, torch.Tensor]) -> Any:
        return SimpleNamespace(
            content={
                "trunk": {"tensors": encode_tensors(trunk)},
                "federated": {"n-cells": 100, "loss": 1.0},
            }
        )

    report: dict[str, Any] = {"dropped": {}}
    steps = _Steps(None, _plan(), timeout=5.0, min_sites=1, report=report)
    steps.site_of = {1: "h1", 2: "h2"}
    updates = steps.usable_updates(sent, {1: answer(good), 2: answer(nan)}, "train.round 1")
    assert list(updates) == ["h1"]
    assert report["dropped"]["2"]["reason"].startswith("unusable trunk: w: holds NaN")
    strict = _Steps(None, _plan(), timeout=5.0, min_sites=2, report={"dropped": {}})
    strict.site_of = steps.site_of
    with pytest.raises(BuildAbortedError, match="1 usable trunk"):
        strict.usable_updates(sent, {1: answer(good), 2: answer(nan)}, "train.round 1")
