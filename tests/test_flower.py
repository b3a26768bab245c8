"""Flower adaptor campaigns on real Flower processes on loopback (TLS, SuperNode
authentication): ``fedatlas coordinator superlink``, ``fedatlas site node`` per site and
``fedatlas coordinator campaign``, on CellBench S1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import pytest
from processes import (
    fedatlas,
    fedatlas_json,
    free_port,
    start_fedatlas,
    start_superlink,
    wait_for_text,
    wait_refused,
)

from fedatlas.benchmarks.cellbench import load_scenario
from fedatlas.benchmarks.scoring import MappedQuery, evaluate
from fedatlas.cli import main
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.shared.runtime.flower import stop

pytestmark = [pytest.mark.cellbench, pytest.mark.slow]

SITES = {"h1": "sc_celseq2_5cl_p2", "h2": "sc_celseq2_5cl_p3", "h3": "sc_celseq2_5cl_p1"}


@pytest.fixture
def federation(tmp_path: Path, cellbench_dir: Path) -> Iterator[dict[str, object]]:
    """A published S1 reference, three enrolled sites, a SuperLink and three SuperNodes."""
    data = load_scenario(cellbench_dir, "S1")
    cells = extract_cells(
        data.reference, source="reference", batch_key="batch", label_keys=["cell_line"]
    )
    release = train_reference(cells, preset="scpoli", seed=0, progress=False).release
    release.save(tmp_path / "release")
    store = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(store),
                 "--release", str(tmp_path / "release")]) == 0  # fmt: skip
    plates = {**data.queries, "sc_celseq2_5cl_p1": _plate(cellbench_dir)}
    for site, stem in SITES.items():
        plates[stem].write_h5ad(tmp_path / f"{site}.h5ad")
        assert main(["-q", "site", "keygen", "--out", str(tmp_path / site)]) == 0
        assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", site,
                     "--public-key", str(tmp_path / site / "site.pub")]) == 0  # fmt: skip
    address = f"127.0.0.1:{free_port()}"
    processes = []
    superlink = start_superlink(store, address, tmp_path / "superlink.log")
    processes.append(superlink)
    try:
        wait_for_text(tmp_path / "superlink.log", "superlink on", superlink, 90)
        for site in SITES:
            node = start_fedatlas(
                ["site", "node", "--superlink", address, "--ca", str(store / "ca.pem"),
                 "--site-id", site, "--key", str(tmp_path / site / "site.key"),
                 "--data", str(tmp_path / f"{site}.h5ad"), "--batch-key", "batch",
                 "--label-key", "cell_line", "--port", str(free_port()), "--epsilon", "inf",
                 "--known-coordinators", str(tmp_path / site / "known.json")],
                tmp_path / f"{site}-node.log",
            )  # fmt: skip
            processes.append(node)
        for site in SITES:
            wait_for_text(tmp_path / f"{site}-node.log", "SuperNode ID", processes[-1], 90)
        yield {"store": store, "address": address, "release": release, "root": tmp_path,
               "queries": data.queries}  # fmt: skip
    finally:
        for process in reversed(processes):
            stop(process)


def _plate(cellbench_dir: Path) -> ad.AnnData:
    from fedatlas.benchmarks.cellbench import load_stem

    return load_stem(cellbench_dir, "sc_celseq2_5cl_p1")


def test_a_campaign_registers_every_sites_adaptor(federation: dict[str, object]) -> None:
    store, root = Path(str(federation["store"])), Path(str(federation["root"]))
    # no --superlink: the SuperLink's Control API is found through the store
    report = fedatlas_json(
        "coordinator", "campaign", "--store", str(store), "--min-sites", "3", "--timeout", "180",
    )  # fmt: skip
    assert report["status"] == "finished:completed"
    outcomes = {s["site_id"]: s["state"] for s in report["sites"]}
    assert outcomes == {"h1": "accepted", "h2": "accepted", "h3": "accepted"}
    assert report["timed_out"] == []
    with SQLiteStore.open(store / "registry.sqlite") as db:
        accepted = db.list_bundles(state="accepted")
        assert sorted(b.site_id for b in accepted) == ["h1", "h2", "h3"]
        assert db.verify_audit() == []
        latest = db.latest_composite()
        assert latest is not None
        assert len(latest.bundle_ids) == 3
    # a third party pulls nothing new: it maps S1's query plates with the campaign composite
    third = root / "third"
    with_grpc = _pull_composite(store, third)
    release = federation["release"]
    assert isinstance(release, Release)
    federated, offline = [], []
    queries = federation["queries"]
    assert isinstance(queries, dict)
    for site in ("h1", "h2"):
        stem = SITES[site]
        query = queries[stem]
        truth = query.obs["cell_line"].astype(str).to_numpy(object)
        table = extract_cells(query, source=stem, batch_key="batch")
        mapped = map_onto(with_grpc, table, MappingOptions(site_id=site), progress=False)
        federated.append(MappedQuery(stem, truth, mapped, 0.0))
        mapped = map_onto(release, table, MappingOptions(site_id=stem), progress=False)
        offline.append(MappedQuery(stem, truth, mapped, 0.0))
    ours, theirs = evaluate(with_grpc, federated), evaluate(release, offline)
    print(f"\ncampaign composite: {ours}\noffline: {theirs}")
    # measured campaign / offline: accuracy 1.000 / 1.000, macro F1 1.000 / 1.000, kNN purity
    # 1.000 / 1.000, overall 0.948 / 0.948
    for key in ("accuracy", "macro_f1", "knn_purity"):
        assert ours[key] >= theirs[key] - 0.01, key
    assert ours["integration"]["overall"] >= theirs["integration"]["overall"] - 0.02


def _pull_composite(store: Path, out: Path) -> Release:
    """The store's current composite, through the coordinator's gRPC server."""
    from processes import Coordinator

    with Coordinator(store) as coordinator:
        fedatlas("site", "pull", "--coordinator", coordinator.address, "--ca",
                 str(store / "ca.pem"), "--known-coordinators", str(out / "known.json"),
                 "--out", str(out / "composite"))  # fmt: skip
    return Release.load(out / "composite")


def test_a_supernode_whose_key_is_not_enrolled_is_refused(
    federation: dict[str, object], tmp_path: Path
) -> None:
    assert main(["-q", "site", "keygen", "--out", str(tmp_path / "stranger")]) == 0
    log = tmp_path / "stranger-node.log"
    node = start_fedatlas(
        ["site", "node", "--superlink", str(federation["address"]), "--ca",
         str(Path(str(federation["store"])) / "ca.pem"), "--site-id", "stranger",
         "--key", str(tmp_path / "stranger" / "site.key"), "--data",
         str(tmp_path / "h1.h5ad"), "--batch-key", "batch", "--port", str(free_port())],
        log,
    )  # fmt: skip
    wait_refused(node, log)


def test_hostile_replies_are_refused_and_the_honest_one_registered(
    federation: dict[str, object],
) -> None:
    """Two of three sites answer with hostile bundles (one byte flipped after signing; NaN in
    the adaptor JSON, re-signed with the site's own enrolled key): each is refused with its
    reason code, the campaign completes and the honest site's bundle is registered."""
    from fedatlas.coordinator.flower_runs import run_campaign

    store = Path(str(federation["store"]))
    report = run_campaign(
        store, str(federation["address"]), min_sites=3, timeout=180,
        app=Path(__file__).parent / "flower_apps" / "hostile_campaign",
    )  # fmt: skip
    assert report["status"] == "finished:completed"
    outcomes = {s["site_id"]: (s["state"], s["reason_code"]) for s in report["sites"]}
    assert outcomes == {
        "h1": ("rejected", "bad_signature"),
        "h2": ("rejected", "malformed"),
        "h3": ("accepted", ""),
    }
    with SQLiteStore.open(store / "registry.sqlite") as db:
        assert [b.site_id for b in db.list_bundles(state="accepted")] == ["h3"]
        assert db.list_bundles(state="rejected") == []  # refusals are logged, not stored
        assert sorted((r.site_id, r.reason_code) for r in db.rejections()) == [
            ("h1", "bad_signature"), ("h2", "malformed"),
        ]  # fmt: skip


def test_revoking_a_site_removes_its_node_from_campaigns(federation: dict[str, object]) -> None:
    import json

    store = Path(str(federation["store"]))
    assert main(["-q", "admin", "site", "revoke", "--store", str(store), "--site-id", "h3"]) == 0
    nodes_file = store / "flower" / "nodes.json"
    deadline = time.monotonic() + 60
    while "h3" in json.loads(nodes_file.read_text())["registered"]:
        assert time.monotonic() < deadline, "the SuperLink kept h3's node"
        time.sleep(0.5)
    report = fedatlas_json(
        "coordinator", "campaign", "--store", str(store), "--superlink",
        str(federation["address"]), "--min-sites", "2", "--timeout", "120",
    )  # fmt: skip
    assert {s["site_id"]: s["state"] for s in report["sites"]} == {
        "h1": "accepted",
        "h2": "accepted",
    }
