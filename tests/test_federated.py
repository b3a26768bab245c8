"""Federated reference training in one process (the algorithm the Flower apps transport):
gene election, FedAvg/FedProx, what stays at a site, how the release and adaptors come out, how
a round's updates are combined without trusting the sites (counts, norms, median, trimmed mean),
what a hostile site can do to the reference, and how the coordinator treats a site that fails a
step (with a stand-in for Flower's Grid)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from fedatlas.benchmarks import trunk_attacks
from fedatlas.coordinator.federated_build import BuildAbortedError, _Steps
from fedatlas.coordinator.verification import Rejection, _check_norms
from fedatlas.shared.config import PreprocessingRecipe
from fedatlas.shared.data.dataset import CellTable
from fedatlas.shared.data.preprocessing import select_highly_variable_genes
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.federated import (
    AGGREGATIONS,
    FederatedPlan,
    RoundUpdate,
    SiteTrainer,
    aggregate_round,
    average_trunks,
    capped_shares,
    elect_genes,
    gene_universe,
    initial_trunk,
    train_federated,
    trimmed_mean_trunks,
    trunk_problem,
)
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.release import LATENT_TENSOR
from fedatlas.shared.model.surgery import TABLE_SUFFIX, is_condition_table
from fedatlas.shared.wire.codec import encode_tensors


@pytest.fixture(scope="module")
def sites() -> dict[str, CellTable]:
    """Three sites of one synthetic world, each with its own batches (some labelled)."""
    return trunk_attacks.honest_sites()


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


def test_median_and_trimmed_mean_are_flowers_fedmedian_and_fedtrimmedavg() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 3, 4))
    trunks = [{"w": torch.from_numpy(v), "n": torch.tensor(i, dtype=torch.int64)}
              for i, v in enumerate(values)]  # fmt: skip
    median = trimmed_mean_trunks(trunks, cut=2)
    np.testing.assert_allclose(median["w"].numpy(), np.median(values, axis=0))
    assert median["n"].dtype == torch.int64
    assert int(median["n"]) == 2
    # Flower's trimmed mean is scipy's: cut floor(beta * n) at each end of every coordinate
    trimmed = trimmed_mean_trunks(trunks, cut=int(0.34 * 5))
    np.testing.assert_allclose(trimmed["w"].numpy(), stats.trim_mean(values, 0.34, axis=0))
    even = trimmed_mean_trunks(trunks[:4], cut=1)  # the median of four: mean of the middle two
    np.testing.assert_allclose(even["w"].numpy(), np.median(values[:4], axis=0))
    with pytest.raises(ValueError, match="cannot cut 2 of 4"):
        trimmed_mean_trunks(trunks[:4], cut=2)


def test_no_site_gets_more_than_its_capped_share_of_the_weight() -> None:
    shares = capped_shares({"big": 10**7, "a": 100, "b": 300}, 0.5)
    assert shares == pytest.approx({"big": 0.5, "a": 0.125, "b": 0.375})
    # the excess goes to the others by their cells, who may be capped in turn
    shares = capped_shares({"x": 900, "y": 800, "z": 100, "w": 100}, 0.3)
    assert shares == pytest.approx({"x": 0.3, "y": 0.3, "z": 0.2, "w": 0.2})
    assert capped_shares({"x": 1, "y": 3}, 1.0) == pytest.approx({"x": 0.25, "y": 0.75})
    # a cap that cannot hold for so few sites: equal shares
    assert capped_shares({"x": 1, "y": 3}, 0.4) == {"x": 0.5, "y": 0.5}


def _update(delta: list[float], n_cells: int) -> RoundUpdate:
    return RoundUpdate(
        {"w": torch.tensor(delta), "n": torch.tensor(7, dtype=torch.int64)}, n_cells, 1.0
    )


def test_a_round_trusts_no_count_and_no_update_length() -> None:
    sent = {"w": torch.zeros(4), "n": torch.tensor(5, dtype=torch.int64)}
    updates = {
        "h1": _update([1.0, 0, 0, 0], 100),
        "h2": _update([0, 1.0, 0, 0], 100),
        "h3": _update([0, 0, 3.0, 0], 100),  # 3 x the median norm: clipped to 2 x
        "h4": _update([30.0, 0, 0, 0], 100),  # 30 x: left out
        "h5": _update([1.0, 0, 0, 0], -599),  # not a count: left out
        "h6": _update([0, 0, 0, 1.0], 10**9),  # counts as 10^7 cells, weighs at most half
    }
    aggregate = aggregate_round(_plan(), sent, updates)
    assert aggregate.scale == 1.0
    assert sorted(aggregate.left_out) == ["h4", "h5"]
    assert "update norm 30 > 5 x the round's median 1" in aggregate.left_out["h4"]
    assert "claims -599 cells" in aggregate.left_out["h5"]
    assert aggregate.clipped == ["h3"]
    assert aggregate.cells == {"h1": 100, "h2": 100, "h3": 100, "h6": 10**7}
    assert aggregate.weights == pytest.approx({"h1": 1 / 6, "h2": 1 / 6, "h3": 1 / 6, "h6": 0.5})
    expected = torch.tensor([1 / 6, 1 / 6, 2 / 6, 0.5])
    assert torch.allclose(aggregate.trunk["w"], expected)
    assert int(aggregate.trunk["n"]) == 7
    # the median of the same four updates: every coordinate is 0 for three of them
    median = aggregate_round(_plan(aggregation="median"), sent, updates)
    assert median.weights == dict.fromkeys(["h1", "h2", "h3", "h6"], 0.25)
    assert torch.equal(median.trunk["w"], torch.zeros(4))
    # a round left with no update keeps the trunk sent
    empty = aggregate_round(_plan(), sent, {"h5": updates["h5"]})
    assert empty.weights == {}
    assert torch.equal(empty.trunk["w"], sent["w"])


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
    assert sorted(set(catalogue.labels)) == sorted(trunk_attacks.TYPES)
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
        ({"aggregation": "krum"}, "unknown aggregation"),
        ({"trim_fraction": 0.5}, "trim fraction"),
        ({"max_site_cells": 0}, "max site cells"),
        ({"max_site_share": 0.0}, "max site share"),
        ({"clip_factor": 0.5}, "clip factor"),
        ({"clip_factor": 6.0}, "clip factor <= outlier factor"),
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

    def answer(trunk: dict[str, torch.Tensor], n_cells: object = 100) -> Any:
        return SimpleNamespace(
            content={
                "trunk": {"tensors": encode_tensors(trunk)},
                "federated": {"n-cells": n_cells, "loss": 1.0},
            }
        )

    report: dict[str, Any] = {"dropped": {}}
    steps = _Steps(None, _plan(), timeout=5.0, min_sites=1, report=report)
    steps.site_of = {1: "h1", 2: "h2", 3: "h3", 4: "h4"}
    no_trunk = SimpleNamespace(content={"federated": {"n-cells": 100, "loss": 1.0}})
    answers = {1: answer(good), 2: answer(nan), 3: answer(good, 1e9), 4: no_trunk}
    updates = steps.usable_updates(sent, answers, "train.round 1")
    assert list(updates) == ["h1"]
    assert report["dropped"]["2"]["reason"].startswith("unusable trunk: w: holds NaN")
    assert report["dropped"]["3"]["reason"] == (
        "unusable reply: 'n-cells' is float, expected an integer"
    )
    assert report["dropped"]["4"]["reason"] == "unusable reply: no 'trunk' record"


def test_an_update_left_out_of_a_round_stops_the_build_only_below_min_sites() -> None:
    sent = {"w": torch.zeros(4)}
    updates = {"h1": _update([1.0, 0, 0, 0], 100), "h2": _update([0, 1.0, 0, 0], -599)}
    report: dict[str, Any] = {"dropped": {}}
    lenient = _Steps(None, _plan(), timeout=5.0, min_sites=1, report=report)
    assert list(lenient.aggregate(sent, updates, "train.round 1").weights) == ["h1"]
    assert report["dropped"] == {}  # left out of the round only, not of the build
    strict = _Steps(None, _plan(), timeout=5.0, min_sites=2, report=report)
    with pytest.raises(BuildAbortedError, match="1 usable update\\(s\\), 2 required"):
        strict.aggregate(sent, updates, "train.round 1")


# --------------------------------------------------------------------------- a hostile site
# fedatlas.benchmarks.trunk_attacks: three honest sites and a fourth (s4) that trains honestly,
# then replaces what it returns each round; accuracy of 400 new cells on the composite.
# Measured (seed 0, 2 cores, ~3 s a build): honest build 0.583. Before the aggregation trusted
# no claim (plain FedAvg weighted by claimed cells): zero trunk 0.380, noise trunk 0.497, -599
# cells 0.645, update x100 0.390. With the defaults the attacker is left out of every round and
# every attack gives 0.580; median and trimmed mean 0.595 (their honest builds: 0.580). The issue
# asks for at most 5 points of harm.
ACCURACY_MARGIN = 0.05
Query = tuple[CellTable, np.ndarray]


@pytest.fixture(scope="module")
def federation(sites: dict[str, CellTable]) -> dict[str, CellTable]:
    """The three sites and the one that will attack."""
    return trunk_attacks.federation(sites)


@pytest.fixture(scope="module")
def query() -> Query:
    """New cells of the same world (two batches no site has) and their true types."""
    return trunk_attacks.query()


@pytest.fixture(scope="module")
def honest_accuracy(federation: dict[str, CellTable], query: Query) -> float:
    """The accuracy of the honest build (every site honest, default aggregation)."""
    return trunk_attacks.accuracy(train_federated(federation, trunk_attacks.plan()), query)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("attack", trunk_attacks.TRUNK_ATTACKS)
def test_a_hostile_site_neither_moves_the_reference_nor_stops_the_build(
    federation: dict[str, CellTable],
    query: Query,
    honest_accuracy: float,
    attack: str,
    aggregation: str,
) -> None:
    plan = trunk_attacks.plan(aggregation=aggregation)
    result = train_federated(federation, plan, on_update=trunk_attacks.hostile(attack))
    assert len(result.history) == plan.rounds
    # left out of every round, with the reason in the round's record
    for record in result.history:
        assert list(record["left_out"]) == [trunk_attacks.ATTACKER]
        assert sorted(record["weights"]) == ["s1", "s2", "s3"]
    accuracy = trunk_attacks.accuracy(result, query)
    print(f"\n{attack}, {aggregation}: accuracy {accuracy:.3f}, honest {honest_accuracy:.3f}")
    assert abs(accuracy - honest_accuracy) <= ACCURACY_MARGIN


def test_without_the_safeguards_a_zero_trunk_wrecks_the_reference(
    federation: dict[str, CellTable], query: Query, honest_accuracy: float
) -> None:
    # what the test above guards against: with no clipping, no outlier rule and no share cap,
    # the zero trunk's claim of 10^9 cells (counted as 10^7) outweighs every honest site
    trusting = trunk_attacks.plan(clip_factor=1e6, outlier_factor=1e6, max_site_share=1.0)
    result = train_federated(
        federation, trusting, on_update=trunk_attacks.hostile("zero trunk claiming 10^9 cells")
    )
    assert all(not record["left_out"] for record in result.history)
    # measured: 0.378 against 0.583
    assert trunk_attacks.accuracy(result, query) < honest_accuracy - 3 * ACCURACY_MARGIN


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_median_and_trimmed_mean_hold_without_the_outlier_rule(
    federation: dict[str, CellTable],
    query: Query,
    honest_accuracy: float,
    aggregation: str,
) -> None:
    # an attacker no norm rule catches: the coordinate-wise aggregate still ignores it
    # (measured: noise trunk 0.557, zero trunk 0.603, update x100 0.590 against 0.583)
    plan = trunk_attacks.plan(aggregation=aggregation, clip_factor=1e6, outlier_factor=1e6)
    result = train_federated(
        federation,
        plan,
        on_update=trunk_attacks.hostile("Gaussian noise trunk claiming 10^9 cells"),
    )
    assert all(trunk_attacks.ATTACKER in record["weights"] for record in result.history)
    assert abs(trunk_attacks.accuracy(result, query) - honest_accuracy) <= ACCURACY_MARGIN
