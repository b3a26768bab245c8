"""Adaptor campaigns on Flower's Simulation Engine: ``fedatlas coordinator simulate`` with 20
enrolled virtual sites (synthetic data, keys from ``site keygen``) and one that is not
enrolled, against a real store. Every process the command starts, Ray's included, is gone
when it returns: after a completed run, a failed run and Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import FEDATLAS, fedatlas, fedatlas_json

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.coordinator.registry import Registry
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.runtime.process_tree import adopting_orphans, descendants

pytestmark = pytest.mark.slow

STRANGER = "stranger"  # keys made with site keygen, never enrolled


def _federation(root: Path, n_sites: int) -> tuple[Path, Path]:
    """A store with a small released scpoli reference, ``n_sites`` enrolled virtual sites and a
    sites file listing them and one unenrolled site (120 cells each, a batch of its own)."""
    world = SyntheticWorld(seed=5, n_genes=300, cell_types=("A", "B", "C"))
    reference = world.sample(360, batches=("r1", "r2", "r3"), seed=1)
    cells = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    build = train_reference(cells, preset="scpoli", epochs=6, n_top_genes=150, progress=False)
    build.release.save(root / "release")
    store = root / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    assert main(["-q", "admin", "release", "publish", "--store", str(store),
                 "--release", str(root / "release")]) == 0  # fmt: skip
    sites = []
    for i, site in enumerate([*_enrolled(n_sites), STRANGER]):
        world.sample(120, batches=(f"{site}-plate",), seed=10 + i).write_h5ad(root / f"{site}.h5ad")
        assert main(["-q", "site", "keygen", "--out", str(root / "keys" / site)]) == 0
        if site != STRANGER:
            assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", site,
                         "--public-key", str(root / "keys" / site / "site.pub")]) == 0  # fmt: skip
        sites.append({"site-id": site, "data": f"{site}.h5ad", "batch-key": "batch",
                      "label-key": "cell_type", "key": f"keys/{site}/site.key",
                      "epochs": 5})  # fmt: skip
    (root / "sites.json").write_text(json.dumps(sites))
    return store, root / "sites.json"


def _enrolled(n_sites: int) -> list[str]:
    return [f"v{i:02d}" for i in range(n_sites)]


@contextlib.contextmanager
def _leaves_no_process() -> Iterator[None]:
    """Fail if the block leaves a process behind: meanwhile this test process adopts the
    orphans of what it starts, so a leftover (a Ray agent, say) stays its descendant."""
    before = set(descendants())
    with adopting_orphans():
        yield
        left = set(descendants()) - before
    assert not left, f"processes left running: {[_command(pid) for pid in left]}"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return f"{pid} (gone)"


def test_twenty_virtual_sites_register_their_adaptors(tmp_path: Path) -> None:
    store, sites_file = _federation(tmp_path, 20)
    started = time.monotonic()
    with _leaves_no_process():
        report = fedatlas_json(
            "coordinator", "simulate", "--store", str(store), "--sites-file", str(sites_file),
            "--timeout", "300",
        )  # fmt: skip
    # measured on 2 shared cores: 22-35 s for the command, most of it the Flower run
    print(f"\nsimulate: {time.monotonic() - started:.1f} s; {report['simulation']}")
    assert report["status"] == "finished:completed"
    assert report["timed_out"] == []
    outcomes = {s["site_id"]: (s["state"], s.get("reason_code", "")) for s in report["sites"]}
    assert outcomes == {
        **dict.fromkeys(_enrolled(20), ("accepted", "")),
        STRANGER: ("rejected", "unknown_site"),
    }
    listed = fedatlas_json("admin", "adaptors", "list", "--store", str(store))["adaptors"]
    assert sorted(a["site_id"] for a in listed if a["state"] == "accepted") == _enrolled(20)
    with Registry(store) as registry:
        record, composite, _ = registry.current_composite()
        assert len(record.bundle_ids) == 20
        assert record.generation == report["composite_generation"]
        assert {f"{s}/{s}-plate" for s in _enrolled(20)} <= set(composite.condition_names)
        assert not any(c.startswith(f"{STRANGER}/") for c in composite.condition_names)
        assert registry.store.verify_audit() == []


def test_ctrl_c_stops_every_process_of_the_simulation(tmp_path: Path) -> None:
    store, sites_file = _federation(tmp_path, 3)
    log = tmp_path / "simulate.log"
    with _leaves_no_process():
        process = subprocess.Popen(
            [*FEDATLAS, "coordinator", "simulate", "--store", str(store), "--sites-file",
             str(sites_file)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not _ray_actors(process.pid) and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            assert _ray_actors(process.pid), f"no ClientApp started:\n{log.read_text()[-3000:]}"
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "interrupted" in log.read_text()


def _ray_actors(pid: int) -> list[int]:
    """The ClientApp actors Ray runs under ``pid`` (they rename themselves)."""
    return [p for p in descendants(pid) if _command(p).startswith("ray::ClientAppActor")]


def test_a_failed_run_is_an_error_and_leaves_no_process(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0  # no release published
    for name in ("cells.h5ad", "site.key"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sites.json").write_text(json.dumps([
        {"site-id": "v00", "data": "cells.h5ad", "batch-key": "batch", "key": "site.key"}
    ]))  # fmt: skip
    with _leaves_no_process():
        run = fedatlas("coordinator", "simulate", "--store", str(store), "--sites-file",
                       str(tmp_path / "sites.json"), check=False)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "finished:failed" in run.stderr
    assert "superlink.log" in run.stderr


def test_a_sites_file_with_a_missing_key_is_refused_before_anything_starts(tmp_path: Path) -> None:
    assert main(["-q", "admin", "init", "--store", str(tmp_path / "store")]) == 0
    (tmp_path / "cells.h5ad").write_bytes(b"")
    (tmp_path / "sites.json").write_text(json.dumps([
        {"site-id": "v00", "data": "cells.h5ad", "batch-key": "batch", "key": "nowhere/site.key"}
    ]))  # fmt: skip
    run = fedatlas("coordinator", "simulate", "--store", str(tmp_path / "store"),
                   "--sites-file", str(tmp_path / "sites.json"), check=False)  # fmt: skip
    assert run.returncode == 2
    assert "key file" in run.stderr
    assert "nowhere/site.key" in run.stderr
