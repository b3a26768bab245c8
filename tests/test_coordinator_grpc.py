"""The coordinator and site client over gRPC: real server processes on loopback with TLS, real
store files, real keys. Synthetic data (the CellBench scenarios are in test_federation.py)."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from processes import Coordinator, fedatlas, fedatlas_json

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.coordinator.registry import Registry
from fedatlas.coordinator.store import BundleRecord, SQLiteStore, utc_now
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.hashing import digest
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.bundle import make_bundle, parse_bundle
from fedatlas.shared.wire.composite import CompositeStatement
from fedatlas.shared.wire.signing import load_signing_key
from fedatlas.site_client.cli import EXIT_REJECTED
from fedatlas.site_client.client import CoordinatorClient, CoordinatorError
from fedatlas.v1 import coordinator_pb2 as pb


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, world: SyntheticWorld) -> dict[str, Path]:
    """A release and three sites' data files (site h1 has two plates)."""
    root = tmp_path_factory.mktemp("federation")
    reference = world.sample(300, batches=("r1", "r2"), cell_types=("A", "B", "C"), seed=31)
    cells = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    release = train_reference(cells, preset="scpoli", epochs=8, n_top_genes=150, progress=False)
    paths = {"release": release.release.save(root / "release")}
    for name, batch, seed in (("h1", "p1", 32), ("h1b", "p2", 33), ("h2", "p1", 34)):
        paths[name] = root / f"{name}.h5ad"
        world.sample(120, batches=(batch,), seed=seed).write_h5ad(paths[name])
    return paths


@pytest.fixture
def store(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A coordinator store with the release published and sites h1, h2 enrolled."""
    root = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(root)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(root),
                 "--release", str(files["release"])]) == 0  # fmt: skip
    for site in ("h1", "h2"):
        assert main(["-q", "site", "keygen", "--out", str(tmp_path / site)]) == 0
        assert main(["-q", "admin", "site", "enroll", "--store", str(root), "--site-id", site,
                     "--public-key", str(tmp_path / site / "site.pub")]) == 0  # fmt: skip
    return root


def site_args(store: Path, address: str, home: Path) -> list[str]:
    return ["--coordinator", address, "--ca", str(store / "ca.pem"),
            "--known-coordinators", str(home / "known.json")]  # fmt: skip


def prepare(tmp_path: Path, files: dict[str, Path], site: str, data: str, labels: bool) -> Path:
    """A bundle file prepared offline against the published release."""
    out = tmp_path / f"{data}.bundle"
    args = ["-q", "site", "prepare", "--reference", str(files["release"]), "--site-id", site,
            "--key", str(tmp_path / site / "site.key"), "--data", str(files[data]),
            "--batch-key", "batch", "--out", str(tmp_path / f"{data}.out.h5ad"),
            "--bundle-out", str(out), "--epochs", "3", "--epsilon", "inf"]  # fmt: skip
    if labels:
        args += ["--label-key", "cell_type"]
    assert main(args) == 0
    return out


def test_submit_pull_and_map_with_the_composite(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    with Coordinator(store) as coordinator:
        submitted = fedatlas_json(
            "site", "submit", *site_args(store, coordinator.address, tmp_path),
            "--site-id", "h1", "--key", str(tmp_path / "h1" / "site.key"),
            "--data", str(files["h1"]), "--batch-key", "batch", "--label-key", "cell_type",
            "--out", str(tmp_path / "h1.out.h5ad"), "--epochs", "3", "--epsilon", "inf",
        )  # fmt: skip
        assert submitted["state"] == "accepted"
        assert submitted["composite_generation"] == 2
        assert (tmp_path / "h1.out.h5ad.bundle").stat().st_size == submitted["bundle_bytes"]

        with CoordinatorClient(coordinator.address, store / "ca.pem") as client:
            status = client.status(submitted["bundle_id"])
            assert (status.state, status.composite_generation) == (1, 2)  # accepted, in gen. 2
            # without client certificates nobody may list who takes part
            with pytest.raises(CoordinatorError, match=r"PERMISSION_DENIED.*mutual TLS"):
                client.list_sites()
            with pytest.raises(CoordinatorError, match="PERMISSION_DENIED"):
                client.list_adaptors("h1")
            with pytest.raises(CoordinatorError, match="NOT_FOUND"):
                client.status("sha256:" + "0" * 64)
        third = tmp_path / "third-party"
        pulled = fedatlas_json(
            "site", "pull", *site_args(store, coordinator.address, third), "--out",
            str(third / "composite"),
        )  # fmt: skip
    assert pulled["generation"] == 2
    assert "h1/p1" in pulled["conditions"]
    composite = Release.load(third / "composite")
    with Registry(store) as registry:
        CompositeStatement.load(third / "composite").verify(
            composite, registry.public_key, source="test"
        )
    # a third party maps h1's plate with the composite: the condition is known, so it is only
    # embedded, with h1's trained rows, and lands exactly where h1's own mapping put it
    mapped = tmp_path / "third.h5ad"
    assert main(["-q", "site", "map", "--reference", str(third / "composite"), "--data",
                 str(files["h1"]), "--batch-key", "batch", "--site-id", "h1", "--out",
                 str(mapped)]) == 0  # fmt: skip
    theirs, ours = ad.read_h5ad(mapped), ad.read_h5ad(tmp_path / "h1.out.h5ad")
    assert theirs.uns["fedatlas"]["trained_parameters"] == 0
    np.testing.assert_allclose(theirs.obsm["X_fedatlas"], ours.obsm["X_fedatlas"], atol=1e-5)


def test_a_pinned_coordinator_key_refuses_another_coordinator(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    impostor = tmp_path / "impostor"
    assert main(["-q", "admin", "init", "--store", str(impostor)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(impostor),
                 "--release", str(files["release"])]) == 0  # fmt: skip
    with Coordinator(store) as genuine:
        port = genuine.port
        fedatlas("site", "pull", *site_args(store, genuine.address, tmp_path), "--out",
                 str(tmp_path / "c1"))  # fmt: skip
    # the impostor answers at the same address, with a certificate from the same CA
    (impostor / "ca.pem").write_bytes((store / "ca.pem").read_bytes())
    for name in ("server.pem", "server.key"):
        (impostor / name).write_bytes((store / name).read_bytes())
    with Coordinator(impostor, port=port) as other:
        refused = fedatlas(
            "site", "pull", *site_args(store, other.address, tmp_path), "--out",
            str(tmp_path / "c2"), check=False,
        )  # fmt: skip
        explicit = fedatlas(
            "site", "pull", *site_args(store, other.address, tmp_path / "fresh"), "--out",
            str(tmp_path / "c3"), "--coordinator-key", str(store / "coordinator.pub"),
            check=False,
        )  # fmt: skip
    for run in (refused, explicit):
        assert run.returncode == 2
        assert "refusing its composite" in run.stderr
    assert not (tmp_path / "c2").exists()


def test_bundle_size_does_not_grow_with_cells(
    tmp_path: Path, store: Path, files: dict[str, Path], world: SyntheticWorld
) -> None:
    sizes = {}
    for n in (100, 10_000):
        data = tmp_path / f"cells{n}.h5ad"
        world.sample(n, batches=("p1",), seed=40).write_h5ad(data)
        files_n = {**files, f"n{n}": data}
        bundle = prepare(tmp_path, files_n, "h1", f"n{n}", labels=True)
        sizes[n] = bundle.stat().st_size
        adaptor = Adaptor.verified(*_adaptor_parts(bundle))
        tensor_bytes = sum(t.numel() * t.element_size() for t in adaptor.tensors.values())
        sizes[f"tensors{n}"] = tensor_bytes
    # identical tensors (condition rows and one prototype per type); the only difference is
    # the number of digits of numbers in the training summary (100 vs 10000 cells, loss values)
    assert sizes["tensors100"] == sizes["tensors10000"]
    assert abs(sizes[100] - sizes[10_000]) <= 24, sizes
    assert sizes[10_000] < 4_000


def _adaptor_parts(bundle: Path) -> tuple[dict[str, object], dict[str, object], str]:
    from fedatlas.shared.hashing import content_hash
    from fedatlas.shared.wire.bundle import parse_bundle

    adaptor = parse_bundle(bundle.read_bytes()).adaptor()
    return adaptor.content, adaptor.tensors, content_hash(adaptor.content)  # type: ignore[return-value]


def test_rejections_reach_the_site_and_oversize_messages_are_refused(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    bundle = prepare(tmp_path, files, "h1", "h1", labels=False)
    forged = tmp_path / "forged.bundle"
    adaptor = _adaptor_parts(bundle)
    forged.write_bytes(
        make_bundle(
            Adaptor(adaptor[0], adaptor[1]),  # type: ignore[arg-type]
            load_signing_key(tmp_path / "h2" / "site.key"),
        ).raw
    )
    with SQLiteStore.open(store / "registry.sqlite") as db:
        before = db.snapshot()
    with Coordinator(store) as coordinator:
        run = fedatlas("site", "send", *site_args(store, coordinator.address, tmp_path),
                       "--bundle", str(forged), check=False)  # fmt: skip
        assert run.returncode == EXIT_REJECTED
        assert "key_mismatch" in run.stdout
        with CoordinatorClient(coordinator.address, store / "ca.pem", retries=0) as client:
            with pytest.raises(CoordinatorError, match="RESOURCE_EXHAUSTED"):
                client.submit(b"\x00" * (33 << 20))
            assert client.health().status == "serving"
    with SQLiteStore.open(store / "registry.sqlite") as db:
        assert db.snapshot() == before


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, store: Path) -> None:
    assert main(["-q", "admin", "tls", "client-cert", "--store", str(store), "--name", "h1",
                 "--out", str(tmp_path / "tls")]) == 0  # fmt: skip
    with Coordinator(store, extra=["--require-client-cert"]) as coordinator:
        with (
            CoordinatorClient(coordinator.address, store / "ca.pem", retries=0) as anonymous,
            pytest.raises(CoordinatorError, match="UNAVAILABLE"),
        ):
            anonymous.health()
        with CoordinatorClient(
            coordinator.address,
            store / "ca.pem",
            client_certificate=tmp_path / "tls" / "h1.pem",
            client_key=tmp_path / "tls" / "h1.key",
        ) as client:
            assert client.health().composite_generation == 1
            sites = {s.site_id: (s.status, s.n_adaptors) for s in client.list_sites()}
            assert sites == {"h1": ("enrolled", 0), "h2": ("enrolled", 0)}
            assert client.list_adaptors("h1") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_send_retries_until_the_coordinator_is_up(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    bundle = prepare(tmp_path, files, "h1", "h1", labels=True)
    port = _free_port()
    started: list[Coordinator] = []
    timer = threading.Timer(2.0, lambda: started.append(Coordinator(store, port=port)))
    timer.start()
    try:
        result = fedatlas_json(
            "site", "send", *site_args(store, f"127.0.0.1:{port}", tmp_path),
            "--bundle", str(bundle), "--retries", "8",
        )  # fmt: skip
    finally:
        timer.join()
        for c in started:
            c.stop()
    assert result["state"] == "accepted"
    with SQLiteStore.open(store / "registry.sqlite") as db:
        assert [b.bundle_id for b in db.list_bundles()] == [result["bundle_id"]]


def test_composites_commute_across_coordinators(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    bundles = [
        prepare(tmp_path, files, "h1", "h1", labels=True),
        prepare(tmp_path, files, "h2", "h2", labels=True),
    ]
    second = tmp_path / "second-store"
    assert main(["-q", "admin", "init", "--store", str(second)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(second),
                 "--release", str(files["release"])]) == 0  # fmt: skip
    for site in ("h1", "h2"):
        assert main(["-q", "admin", "site", "enroll", "--store", str(second), "--site-id", site,
                     "--public-key", str(tmp_path / site / "site.pub")]) == 0  # fmt: skip
    hashes = []
    for root, order in ((store, bundles), (second, bundles[::-1])):
        with Coordinator(root) as coordinator:
            for bundle in order:
                fedatlas("site", "send", *site_args(root, coordinator.address, tmp_path / "k"),
                         "--bundle", str(bundle))  # fmt: skip
        shown = fedatlas_json("admin", "composite", "show", "--store", str(root))
        assert shown["generation"] == 3
        hashes.append(shown["content_hash"])
    assert hashes[0] == hashes[1]


def test_kill_9_during_submissions_loses_no_acknowledged_bundle(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    content, tensors, _ = _adaptor_parts(prepare(tmp_path, files, "h1", "h1", labels=True))
    key = load_signing_key(tmp_path / "h1" / "site.key")
    bundles = []
    for i in range(60):  # the same trained rows offered as 60 different batches of h1
        body = dict(content)
        body["conditions"] = [{**content["conditions"][0], "name": f"h1/batch{i}"}]  # type: ignore[index]
        bundles.append(make_bundle(Adaptor(body, tensors), key).raw)  # type: ignore[arg-type]
    acknowledged: list[str] = []
    coordinator = Coordinator(store)
    with CoordinatorClient(coordinator.address, store / "ca.pem", retries=0) as client:

        def stream() -> None:
            for raw in bundles:
                try:
                    status = client.submit(raw)
                except CoordinatorError:
                    return
                assert status.state == 1  # accepted
                acknowledged.append(status.bundle_id)

        sender = threading.Thread(target=stream)
        sender.start()
        while len(acknowledged) < 8:
            time.sleep(0.01)
        coordinator.kill()
        sender.join()
    assert 8 <= len(acknowledged) < len(bundles)
    with (
        Coordinator(store) as restarted,
        CoordinatorClient(restarted.address, store / "ca.pem") as client,
    ):
        health = client.health()
    with SQLiteStore.open(store / "registry.sqlite") as db:
        stored = {b.bundle_id for b in db.list_bundles(state="accepted")}
        assert set(acknowledged) <= stored
        assert db.verify_audit() == []
        latest = db.latest_composite()
        assert latest is not None
        assert set(latest.bundle_ids) == stored  # the composite caught up on restart
        assert health.composite_generation == latest.generation
    assert fedatlas_json("admin", "audit", "verify", "--store", str(store))["intact"]


def test_admin_audit_verify_detects_tampering(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    with Registry(store) as registry:
        outcome = registry.submit(
            prepare(tmp_path, files, "h1", "h1", labels=True).read_bytes(), actor="test"
        )
    assert outcome.state == "accepted"
    assert fedatlas("admin", "audit", "verify", "--store", str(store)).returncode == 0
    database = store / "registry.sqlite"
    original = database.read_bytes()
    edits = {
        "bundle blob byte flipped": _flip_last_blob_byte,
        "audit payload edited": lambda c: c.execute(
            "UPDATE audit SET payload = replace(payload, 'h1', 'h9') WHERE seq = 3"
        ),
        "audit entry removed": lambda c: c.execute("DELETE FROM audit WHERE seq = 2"),
    }
    for what, edit in edits.items():
        database.write_bytes(original)
        with sqlite3.connect(database) as connection:
            edit(connection)
        run = fedatlas("admin", "audit", "verify", "--store", str(store), check=False)
        assert run.returncode == 1, (what, run.stderr[-800:])
        assert "NOT intact" in run.stdout, what


def _flip_last_blob_byte(connection: sqlite3.Connection) -> None:
    bundle_id, blob = connection.execute("SELECT bundle_id, blob FROM bundles").fetchone()
    edited = blob[:-1] + bytes([blob[-1] ^ 1])
    connection.execute("UPDATE bundles SET blob = ? WHERE bundle_id = ?", (edited, bundle_id))


def test_operator_and_protocol_refusals_are_readable(tmp_path: Path, store: Path) -> None:
    empty = tmp_path / "empty"
    assert main(["-q", "admin", "init", "--store", str(empty)]) == 0
    assert main(["-q", "admin", "init", "--store", str(empty)]) == 2  # not over an existing one
    again = fedatlas("admin", "site", "enroll", "--store", str(store), "--site-id", "h1",
                     "--public-key", str(tmp_path / "h2" / "site.pub"), check=False)  # fmt: skip
    assert again.returncode == 2
    assert "h1" in again.stderr
    missing = fedatlas("admin", "composite", "show", "--store", str(tmp_path / "nowhere"),
                       check=False)  # fmt: skip
    assert missing.returncode == 2
    assert "admin init" in missing.stderr
    with (
        Coordinator(empty) as coordinator,
        CoordinatorClient(coordinator.address, empty / "ca.pem", retries=0) as client,
    ):
        with pytest.raises(CoordinatorError, match=r"FAILED_PRECONDITION.*no reference release"):
            client.pull()
        with pytest.raises(CoordinatorError, match=r"FAILED_PRECONDITION.*no reference release"):
            client.submit(b"anything")
        assert client.health().composite_generation == 0


def test_a_stored_bundle_that_does_not_compose_leaves_the_last_good_composite_served(
    tmp_path: Path, store: Path, files: dict[str, Path]
) -> None:
    """A bundle an earlier version accepted, now damaged (its tensors no longer match its
    content): the coordinator still starts, serves the last good composite and says why; the
    operator withdraws the bundle and a new generation without it is served."""
    good = prepare(tmp_path, files, "h1", "h1", labels=True)
    with Registry(store) as registry:
        assert registry.submit(good.read_bytes(), actor="test").state == "accepted"
    damaged = parse_bundle(prepare(tmp_path, files, "h2", "h2", labels=True).read_bytes())
    body = pb.BundleBody.FromString(damaged.message.body)
    body.tensors[0].data = bytes([body.tensors[0].data[0] ^ 1]) + body.tensors[0].data[1:]
    damaged.message.body = body.SerializeToString()
    blob = damaged.message.SerializeToString()
    bad_id = digest(blob)
    with SQLiteStore.open(store / "registry.sqlite") as db:  # as an earlier version stored it
        db.add_bundle(
            BundleRecord(bad_id, "h2", body.release_id, bytes(body.nonce), ("h2/p1",),
                         "accepted", blob, utc_now(), utc_now(), "earlier version", ""),
            actor="earlier version",
        )  # fmt: skip
    third = tmp_path / "third"
    with Coordinator(store) as coordinator:
        pulled = fedatlas_json(
            "site", "pull", *site_args(store, coordinator.address, third), "--out",
            str(third / "c1"),
        )  # fmt: skip
        assert pulled["generation"] == 2  # the last good composite: h1's bundle, not h2's
        assert "h2/p1" not in pulled["conditions"]
        assert "do not compose" in coordinator.log.read_text()
        assert main(["-q", "admin", "adaptors", "withdraw", "--store", str(store), bad_id[:20],
                     "--reason", "damaged"]) == 0  # fmt: skip
        # the good composite already lacked it; withdrawing h1's bundle makes a new one
        assert main(["-q", "admin", "adaptors", "withdraw", "--store", str(store),
                     digest(good.read_bytes()), "--reason", "on request"]) == 0  # fmt: skip
        again = fedatlas_json(
            "site", "pull", *site_args(store, coordinator.address, third), "--out",
            str(third / "c2"),
        )  # fmt: skip
    assert again["generation"] == 3
    assert "h1/p1" not in again["conditions"]
    with SQLiteStore.open(store / "registry.sqlite") as db:
        assert db.get_bundle(bad_id).state == "rejected"  # type: ignore[union-attr]
        events = [e.event for e in db.audit_entries()]
        assert events[-3:] == ["bundle.withdraw", "bundle.withdraw", "composite.publish"]
        assert db.verify_audit() == []
