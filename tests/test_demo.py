"""``fedatlas demo``: the whole federation on loopback with real processes, on generated data;
and every process it started is gone afterwards, also when it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import FEDATLAS

from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.data.h5ad import read_h5ad

pytestmark = pytest.mark.slow

EPOCHS = "20"  # reference epochs: the scpoli recipe has 50; 20 keep the test short
SUMMARY_KEYS = {
    "sites", "accepted_adaptors", "bundle_bytes", "trainable_params", "total_params",
    "label_accuracy", "unknown_auroc", "overall_score", "composite_hash",
}  # fmt: skip


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (e.g. the demo's folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and text.encode() in raw:
            found.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _gone(pids: dict[str, int]) -> dict[str, int]:
    """The pids still alive (zombies count as gone)."""
    alive = {}
    for name, pid in pids.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive[name] = pid
    return alive


def test_the_demo_runs_the_federation_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = subprocess.run(
        [*FEDATLAS, "demo", "--out", str(out), "--epochs", EPOCHS, "--json"],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["sites"] == ["site_a", "site_b", "site_c"]
    assert summary["accepted_adaptors"] == 3
    # a site sends a few kB (its 10-d embedding row and prototypes), never its cells
    assert all(1_000 < b < 10_000 for b in summary["bundle_bytes"].values())
    assert summary["trainable_params"] == 10
    assert summary["total_params"] > 100_000
    # measured with these settings (seed 0): accuracy 0.952, unknown AUROC 0.934, overall 0.834
    assert summary["label_accuracy"] >= 0.90
    assert summary["unknown_auroc"] >= 0.85
    assert summary["overall_score"] >= 0.75
    with SQLiteStore.open(out / "coordinator" / "store" / "registry.sqlite") as db:
        latest = db.latest_composite()
        assert latest is not None
        assert latest.content_hash == summary["composite_hash"]
        assert len(latest.bundle_ids) == 3
        assert db.verify_audit() == []
    # each site's process wrote its own annotated cells; no site ever got another's file
    for site in summary["sites"]:
        mapped = read_h5ad(out / "sites" / site / "mapped.h5ad")
        assert "X_fedatlas" in mapped.obsm
        log = (out / "logs" / f"node-{site}.log").read_text(errors="replace")
        others = {s for s in summary["sites"] if s != site}
        assert not any(f"sites/{o}/cells.h5ad" in log for o in others)
    report = (out / "report" / "index.html").read_text()
    for png in ("umap_labels.png", "umap_uncertainty.png", "uncertainty_histogram.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    assert "<img" in report
    assert (out / "joint_embedding.png").stat().st_size > 10_000
    started = json.loads((out / "logs" / "processes.json").read_text())
    assert set(started) == {"coordinator", "superlink", "node-site_a", "node-site_b", "node-site_c"}
    assert _gone(started) == {}
    assert _processes_mentioning(str(out)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_stops_every_process_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("wb") as handle:
        demo = subprocess.Popen(
            [*FEDATLAS, "demo", "--out", str(out), "--epochs", "2"],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "campaign:" not in log.read_text(errors="replace"):
            assert demo.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never reached its campaign"
            time.sleep(0.5)
        demo.send_signal(sig)
        assert demo.wait(timeout=120) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "interrupted" in log.read_text(errors="replace")
    started = json.loads((out / "logs" / "processes.json").read_text())
    assert len(started) == 5
    time.sleep(3)  # Flower's SuperExec children exit a moment after their parent
    assert _gone(started) == {}
    assert _processes_mentioning(str(out)) == []
