"""Federated reference building on real Flower processes (TLS, SuperNode authentication):
``fedatlas coordinator federated-build`` with one SuperNode per CellBench reference dataset,
compared with the centrally trained reference on scenario S1; and a build in which one site's
ClientApp is hostile."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import fedatlas_json

from fedatlas.benchmarks.cellbench import REFERENCE_STEMS, load_scenario
from fedatlas.benchmarks.scoring import ReferenceCells, map_and_evaluate
from fedatlas.cli import main
from fedatlas.coordinator.flower_runs import run_campaign
from fedatlas.coordinator.registry import Registry
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.deploy.launcher import LocalLauncher
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.federated import FederatedPlan, train_federated
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import LATENT_TENSOR, Release

pytestmark = [pytest.mark.cellbench, pytest.mark.slow]

ROUNDS, LOCAL_EPOCHS = 10, 5  # 50 epochs in all, the scpoli recipe's length
# Measured on this 2-core machine (seed 0): central scpoli reference accuracy 1.000, overall
# 0.948; the federated build (10 x 5, FedAvg) accuracy 1.000, overall 0.943 (in-process runs of
# the same algorithm: FedProx mu 0.1 0.942; scarches 0.895 vs central 0.874). Margins below.
ACCURACY_MARGIN = 0.01
OVERALL_MARGIN = 0.03


@pytest.fixture
def federation(tmp_path: Path, cellbench_dir: Path) -> Iterator[dict[str, Any]]:
    """An initialised store with no release, one enrolled site per reference dataset, a
    SuperLink and three SuperNodes (each holding only its own dataset)."""
    data = load_scenario(cellbench_dir, "S1")
    store = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    sites = {}
    for stem in REFERENCE_STEMS:
        part = data.reference[data.reference.obs["batch"] == stem].copy()
        part.write_h5ad(tmp_path / f"{stem}.h5ad")
        sites[stem] = extract_cells(part, source=stem, batch_key="batch", label_keys=["cell_line"])
        assert main(["-q", "site", "keygen", "--out", str(tmp_path / stem)]) == 0
        assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", stem,
                     "--public-key", str(tmp_path / stem / "site.pub")]) == 0  # fmt: skip
    with LocalLauncher(tmp_path / "logs") as launcher:
        address = launcher.superlink(store)
        for stem in REFERENCE_STEMS:
            launcher.site_node(
                stem, superlink=address, ca=store / "ca.pem", key=tmp_path / stem / "site.key",
                data=tmp_path / f"{stem}.h5ad", batch_key="batch", label_key="cell_line",
                coordinator_key=store / "coordinator.pub",
            )  # fmt: skip
        yield {"store": store, "address": address, "sites": sites, "queries": data.queries,
               "reference": data.reference}  # fmt: skip


def test_federated_build_matches_the_central_reference(federation: dict[str, Any]) -> None:
    store = federation["store"]
    report = fedatlas_json(
        "coordinator", "federated-build", "--store", str(store),
        "--superlink", federation["address"], "--model", "scpoli",
        "--rounds", str(ROUNDS), "--local-epochs", str(LOCAL_EPOCHS),
        "--label-level", "cell_line", "--min-sites", "3", "--timeout", "300",
        timeout=1500,  # 13 Flower steps, each a fresh ClientApp process per site: ~7 min at load 9
    )  # fmt: skip
    assert report["completed"]
    assert report["status"] == "finished:completed"
    assert report["dropped"] == {}
    assert len(report["rounds"]) == ROUNDS
    assert {s["site_id"]: s["state"] for s in report["sites"]} == dict.fromkeys(
        REFERENCE_STEMS, "accepted"
    )
    with SQLiteStore.open(store / "registry.sqlite") as db:
        assert db.verify_audit() == []
    with Registry(store) as registry:
        release = registry.current_release()
        _, composite, _ = registry.current_composite()
    # the release is the averaged trunk only: no condition, no prototype, no cell of anyone
    assert release.condition_names == []
    assert LATENT_TENSOR not in release.tensors
    assert sorted(release.content["federated"]["sites"]) == sorted(REFERENCE_STEMS)
    assert len(release.prototypes("cell_line")) == 0
    assert sorted(composite.condition_names) == sorted(f"{s}/{s}" for s in REFERENCE_STEMS)
    assert sorted(composite.prototypes("cell_line").labels) == sorted(
        set(federation["reference"].obs["cell_line"].astype(str))
    )

    federated = _evaluate(composite, federation)
    cells = extract_cells(
        federation["reference"], source="reference", batch_key="batch", label_keys=["cell_line"]
    )
    central_release = train_reference(cells, preset="scpoli", seed=0, progress=False).release
    central = map_and_evaluate(central_release, federation["queries"], label_key="cell_line")
    print(f"\nfederated {federated}\ncentral {central}")
    assert federated["accuracy"] >= central["accuracy"] - ACCURACY_MARGIN
    overall = federated["integration"]["overall"]
    assert overall >= central["integration"]["overall"] - OVERALL_MARGIN


def _evaluate(composite: Release, federation: dict[str, Any]) -> dict[str, Any]:
    """The S1 query plates mapped onto a federated composite and scored, the sites' own cells
    embedded with it as the reference."""
    projected = ReferenceCells.embedded(composite, federation["sites"], "cell_line")
    return map_and_evaluate(
        composite, federation["queries"], label_key="cell_line", reference=projected
    )


HOSTILE_APP = Path(__file__).parent / "flower_apps" / "hostile"
# Measured (2 cores, 3.5 min): the app's plan (3 rounds x 2 epochs) reaches accuracy 0.937
# in-process with every site honest; on Flower, with sc_dropseq's zero trunk left out of every
# round, 0.952 (as in-process under the same attack). Plain FedAvg, which trusted the claim of
# 10^9 cells, fell to 0.349 in-process.
HOSTILE_MARGIN = 0.05


def test_a_hostile_sites_zero_trunk_is_left_out_and_the_build_completes(
    federation: dict[str, Any],
) -> None:
    settings = tomllib.loads((HOSTILE_APP / "pyproject.toml").read_text())
    config = settings["tool"]["flwr"]["app"]["config"]
    plan, attacker = FederatedPlan.from_json(config["plan"]), config["attacker"]
    honest = sorted(set(REFERENCE_STEMS) - {attacker})
    store = federation["store"]
    report = run_campaign(store, federation["address"], min_sites=2, timeout=300, app=HOSTILE_APP)
    assert report["completed"], report.get("error")
    assert report["dropped"] == {}
    assert len(report["rounds"]) == plan.rounds
    for record in report["rounds"]:
        assert list(record["left_out"]) == [attacker]
        assert "x the round's median" in record["left_out"][attacker]
        assert record["n_cells"][attacker] == 10**9
        assert sorted(record["weights"]) == honest
    # the attacker still gets its adaptor (its rows were trained honestly), but none of its
    # updates went into the trunk
    assert {s["site_id"]: s["state"] for s in report["sites"]} == dict.fromkeys(
        REFERENCE_STEMS, "accepted"
    )
    with Registry(store) as registry:
        release = registry.current_release()
        _, composite, _ = registry.current_composite()
    assert sorted(release.content["federated"]["sites"]) == honest
    attacked = _evaluate(composite, federation)
    result = train_federated(federation["sites"], plan)
    adaptors = [m.adaptor for m in result.mappings.values() if m.adaptor is not None]
    reference = _evaluate(compose(result.release, adaptors), federation)
    print(f"\nattacked on Flower {attacked}\nhonest in-process {reference}")
    assert abs(attacked["accuracy"] - reference["accuracy"]) <= HOSTILE_MARGIN
