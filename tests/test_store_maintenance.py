"""Store backup and restore (taken while the coordinator serves), signing-key rotation and TLS
certificate renewal, on a real store with a release and accepted bundles."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from processes import Coordinator, start_fedatlas

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.coordinator.registry import Registry
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.wire.signing import write_keypair

SITES = ("h1", "h2")
MAX_BACKUPS = 8  # taken while the second bundle is being sent


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, world: SyntheticWorld) -> dict[str, Path]:
    """A small release, the sites' keys and one signed bundle per site, prepared offline."""
    root = tmp_path_factory.mktemp("maintenance")
    reference = world.sample(240, batches=("r1", "r2"), cell_types=("A", "B", "C"), seed=51)
    cells = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    built = train_reference(cells, preset="scpoli", epochs=4, n_top_genes=100, progress=False)
    paths = {"release": built.release.save(root / "release")}
    for number, site in enumerate(SITES):
        data = root / f"{site}.h5ad"
        world.sample(100, batches=("p1",), seed=52 + number).write_h5ad(data)
        assert main(["-q", "site", "keygen", "--out", str(root / site)]) == 0
        paths[site] = root / f"{site}.bundle"
        assert main(["-q", "site", "prepare", "--reference", str(paths["release"]),
                     "--site-id", site, "--key", str(root / site / "site.key"),
                     "--data", str(data), "--batch-key", "batch", "--label-key", "cell_type",
                     "--out", str(root / f"{site}.out.h5ad"), "--bundle-out", str(paths[site]),
                     "--epochs", "2", "--epsilon", "inf"]) == 0  # fmt: skip
    return paths


@pytest.fixture
def store(tmp_path: Path, made: dict[str, Path]) -> Path:
    """A store with the release published and both sites enrolled."""
    root = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(root)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(root),
                 "--release", str(made["release"])]) == 0  # fmt: skip
    for site in SITES:
        public = made[site].parent / site / "site.pub"
        assert main(["-q", "admin", "site", "enroll", "--store", str(root), "--site-id", site,
                     "--public-key", str(public)]) == 0  # fmt: skip
    return root


def admin_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``fedatlas admin ARGS --json`` in this process, parsed; fails unless it exits 0."""
    capsys.readouterr()
    status = main(["admin", *args, "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    answer: dict[str, Any] = json.loads(captured.out)
    return answer


def listing(capsys: pytest.CaptureFixture[str], store: Path) -> dict[str, Any]:
    """What the operator sees: sites, adaptors and the composite."""
    return {
        "sites": admin_json(capsys, "site", "list", "--store", str(store)),
        "adaptors": admin_json(capsys, "adaptors", "list", "--store", str(store)),
        "composite": admin_json(capsys, "composite", "show", "--store", str(store)),
    }


def send(address: str, store: Path, bundle: Path) -> list[str]:
    return ["site", "send", "--coordinator", address, "--ca", str(store / "ca.pem"),
            "--bundle", str(bundle)]  # fmt: skip


def test_backup_while_serving_restores_to_an_intact_store(
    tmp_path: Path, store: Path, made: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with Coordinator(store) as coordinator:
        assert main(["-q", *send(coordinator.address, store, made["h1"])]) == 0
        # the other site's bundle arrives (a separate process writing the store) while
        # backups are taken, one after the other
        log = tmp_path / "send.log"
        writer = start_fedatlas(send(coordinator.address, store, made["h2"]), log)
        during: list[Path] = []
        while (writer.poll() is None and len(during) < MAX_BACKUPS) or not during:
            during.append(tmp_path / f"during-{len(during)}.tar.gz")
            admin_json(capsys, "store", "backup", "--store", str(store), "--out", str(during[-1]))
            time.sleep(0.2)
        assert writer.wait() == 0, log.read_text()
        final = tmp_path / "final.tar.gz"
        info = admin_json(capsys, "store", "backup", "--store", str(store), "--out", str(final))
        live = listing(capsys, store)
    assert info["audit_intact"] is True
    assert final.stat().st_mode & 0o077 == 0  # it holds the private keys
    with tarfile.open(final) as tar:
        assert "flower" not in " ".join(tar.getnames())

    restored = tmp_path / "restored"
    admin_json(capsys, "store", "restore", "--backup", str(final), "--store", str(restored))
    assert main(["-q", "admin", "audit", "verify", "--store", str(restored)]) == 0
    assert listing(capsys, restored) == live
    for name in ("coordinator.key", "ca.key", "server.key", "registry.sqlite"):
        assert (restored / name).stat().st_mode & 0o077 == 0
        if name != "registry.sqlite":
            assert (restored / name).read_bytes() == (store / name).read_bytes()
    # every backup taken while h2's bundle was being registered is consistent: h1's bundle,
    # and h2's either completely (with its composite) or not at all
    accepted = {a["site_id"] for a in live["adaptors"]["adaptors"]}
    assert accepted == set(SITES)
    for number, backup in enumerate(during):
        target = tmp_path / f"restored-{number}"
        result = admin_json(capsys, "store", "restore", "--backup", str(backup),
                            "--store", str(target))  # fmt: skip
        assert result["audit_intact"] is True
        seen = listing(capsys, target)
        sites = {a["site_id"] for a in seen["adaptors"]["adaptors"]}
        assert sites in ({"h1"}, set(SITES))
        assert seen["composite"]["generation"] == len(sites) + 1

    # a restored store serves: the same coordinator key signs what sites pull
    with Coordinator(restored) as coordinator:
        assert main(["-q", "site", "pull", "--coordinator", coordinator.address,
                     "--ca", str(store / "ca.pem"),
                     "--coordinator-key", str(store / "coordinator.pub"),
                     "--known-coordinators", str(tmp_path / "known.json"),
                     "--out", str(tmp_path / "pulled")]) == 0  # fmt: skip


def test_backups_and_restores_refuse_what_they_cannot_do_safely(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = tmp_path / "b.tar.gz"
    admin_json(capsys, "store", "backup", "--store", str(store), "--out", str(backup))
    checks = [
        (["store", "backup", "--store", str(store), "--out", str(backup)], "already exists"),
        (["store", "backup", "--store", str(tmp_path), "--out", str(tmp_path / "x")],
         "not a coordinator store"),
        (["store", "restore", "--backup", str(backup), "--store", str(store)], "not empty"),
        (["store", "restore", "--backup", str(tmp_path / "none"), "--store",
          str(tmp_path / "r0")], "no such backup file"),
    ]  # fmt: skip
    with tarfile.open(backup) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    tampered = dict(members, **{"server.pem": members["server.pem"] + b"\n"})
    escaping = dict(members, **{"../escape": b"x"})
    for number, (files, message) in enumerate(
        ((tampered, "server.pem does not match its SHA-256"), (escaping, "'../escape'"))
    ):
        bad = tmp_path / f"bad-{number}.tar.gz"
        with tarfile.open(bad, "w:gz") as tar:
            for name, data in files.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        checks.append(
            (["store", "restore", "--backup", str(bad), "--store", str(tmp_path / "r")], message)
        )
    for args, message in checks:
        capsys.readouterr()
        assert main(["-q", "admin", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "escape").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left


def test_rotating_the_signing_key_and_the_server_certificate(
    tmp_path: Path, store: Path, made: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with Registry(store) as registry:
        assert registry.submit(made["h1"].read_bytes(), actor="test").state == "accepted"
    old_public = (store / "coordinator.pub").read_bytes()
    before = listing(capsys, store)
    rotated = admin_json(capsys, "store", "rotate-key", "--store", str(store))
    assert rotated["new_key_generated"] is True
    assert rotated["coordinator_key"] != rotated["previous_key"]
    assert (store / "coordinator.pub").read_bytes() != old_public
    [retired_public] = (store / "retired").glob("*-coordinator.pub")
    assert retired_public.read_bytes() == old_public
    after = listing(capsys, store)
    composite, previous = after["composite"], before["composite"]
    assert composite["generation"] == previous["generation"] + 1
    assert composite["content_hash"] == previous["content_hash"]
    assert after["sites"] == before["sites"]
    assert main(["-q", "admin", "audit", "verify", "--store", str(store)]) == 0

    # a rotation interrupted after the new key was written (coordinator.pub still the old one,
    # the composite not yet signed): running it again only finishes the job
    write_keypair(tmp_path / "crash", "coordinator")
    (store / "coordinator.key").write_bytes((tmp_path / "crash" / "coordinator.key").read_bytes())
    (store / "coordinator.pub").write_bytes(old_public)
    finished = admin_json(capsys, "store", "rotate-key", "--store", str(store))
    assert finished["new_key_generated"] is False
    assert finished["previous_key"] == rotated["coordinator_key"]
    assert (store / "coordinator.pub").read_bytes() == (
        tmp_path / "crash" / "coordinator.pub"
    ).read_bytes()
    composite = listing(capsys, store)["composite"]
    assert composite["generation"] == previous["generation"] + 2
    assert main(["-q", "admin", "audit", "verify", "--store", str(store)]) == 0

    renewed = admin_json(capsys, "tls", "server-cert", "--store", str(store),
                         "--host", "coordinator.example.org")  # fmt: skip
    assert renewed["hosts"] == ["coordinator.example.org", "localhost", "127.0.0.1", "::1"]
    names = (
        x509.load_pem_x509_certificate((store / "server.pem").read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert "coordinator.example.org" in names
    assert len(list((store / "retired").glob("*-server.key"))) == 1

    pull = ["site", "pull", "--ca", str(store / "ca.pem"),
            "--known-coordinators", str(tmp_path / "known.json")]  # fmt: skip
    with Coordinator(store) as coordinator:
        capsys.readouterr()
        assert main([*pull, "--coordinator", coordinator.address, "--coordinator-key",
                     str(store / "coordinator.pub"), "--out", str(tmp_path / "new"),
                     "--json"]) == 0  # fmt: skip
        new = json.loads(capsys.readouterr().out)
        refused = main([*pull, "--coordinator", coordinator.address, "--coordinator-key",
                        str(retired_public), "--out", str(tmp_path / "old")])  # fmt: skip
    assert new["generation"] == composite["generation"]
    assert refused == 2
    assert "refusing its composite" in capsys.readouterr().err
