"""What secure aggregation (SecAgg+) costs a federated build, on real Flower processes.

The three CellBench S1 reference datasets are three sites, each behind its own SuperNode (TLS,
SuperNode authentication; ``fedatlas.deploy.launcher``). The same plan is built plain and with
``secure_aggregation``, through ``tests/flower_apps/secure`` (fedatlas' own apps, whose
ServerApp counts the messages and bytes it sends and receives). Reported per setting: the
build's wall time and its rounds' seconds, messages and bytes both ways (Flower's protobuf
encoding of each message's content), and the label accuracy of the S1 query plates mapped onto
the composite.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/secure_aggregation.py [--rounds 3]
        [--local-epochs 2]

Writes ``bench/results/secure_aggregation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedatlas.benchmarks.cellbench import REFERENCE_STEMS, find_cellbench_dir, load_scenario
from fedatlas.benchmarks.scoring import ReferenceCells, map_and_evaluate
from fedatlas.cli import main as fedatlas
from fedatlas.coordinator.flower_runs import flower_dir, run_federated_build
from fedatlas.coordinator.registry import Registry
from fedatlas.deploy.launcher import LocalLauncher
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.federated import FederatedPlan

RESULTS = Path(__file__).resolve().parent / "results"
APP = Path(__file__).resolve().parents[1] / "tests" / "flower_apps" / "secure"


def run(rounds: int, local_epochs: int) -> dict[str, Any]:
    """Both builds, each on a fresh federation of the S1 sites; their numbers and the
    overheads (secure / plain)."""
    data_dir = find_cellbench_dir()
    if data_dir is None:
        sys.exit("CellBench data not found (../shared/data/cellbench or FEDATLAS_CELLBENCH)")
    data = load_scenario(data_dir, "S1")
    out: dict[str, Any] = {"rounds": rounds, "local_epochs": local_epochs, "builds": {}}
    for secure in (False, True):
        plan = FederatedPlan(
            preset="scpoli", rounds=rounds, local_epochs=local_epochs, label_level="cell_line",
            secure_aggregation=secure,
        )  # fmt: skip
        name = "secure" if secure else "plain"
        with tempfile.TemporaryDirectory() as tmp:
            out["builds"][name] = build(Path(tmp), plan, data, name)
    plain, secure_build = out["builds"]["plain"], out["builds"]["secure"]
    out["overhead"] = {
        key: round(secure_build[key] / plain[key], 3)
        for key in ("seconds", "round_seconds", "messages_sent", "bytes_sent", "bytes_received")
    }
    out["accuracy_difference"] = round(secure_build["accuracy"] - plain["accuracy"], 4)
    return out


def build(root: Path, plan: FederatedPlan, data: Any, name: str) -> dict[str, Any]:
    """One build on a fresh store, SuperLink and three SuperNodes under ``root``: its wall
    time, traffic and composite's accuracy."""
    store, sites = root / "store", {}
    assert fedatlas(["-q", "admin", "init", "--store", str(store)]) == 0
    for stem in REFERENCE_STEMS:
        part = data.reference[data.reference.obs["batch"] == stem].copy()
        part.write_h5ad(root / f"{stem}.h5ad")
        sites[stem] = extract_cells(part, source=stem, batch_key="batch", label_keys=["cell_line"])
        assert fedatlas(["-q", "site", "keygen", "--out", str(root / stem)]) == 0
        assert fedatlas(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", stem,
                         "--public-key", str(root / stem / "site.pub")]) == 0  # fmt: skip
    with LocalLauncher(root / "logs") as launcher:
        address = launcher.superlink(store)
        for stem in REFERENCE_STEMS:
            launcher.site_node(
                stem, superlink=address, ca=store / "ca.pem", key=root / stem / "site.key",
                data=root / f"{stem}.h5ad", batch_key="batch", label_key="cell_line",
                coordinator_key=store / "coordinator.pub", epsilon=math.inf,
            )  # fmt: skip
        started = time.perf_counter()
        report = run_federated_build(
            store, address, plan, min_sites=3, timeout=600, app=APP,
            gene_list=list(data.reference.var_names),
        )  # fmt: skip
        seconds = time.perf_counter() - started
    if not report["completed"]:
        sys.exit(f"the {name} build stopped: {report.get('error')}")
    newest = max((flower_dir(store) / "campaigns").glob("*.traffic.json"), key=_mtime)
    traffic = json.loads(newest.read_text())
    with Registry(store) as registry:
        _, composite, _ = registry.current_composite()
    cells = ReferenceCells.embedded(composite, sites, "cell_line")
    scores = map_and_evaluate(composite, data.queries, label_key="cell_line", reference=cells)
    result = {
        "seconds": round(seconds, 1),
        "round_seconds": round(sum(r["seconds"] for r in report["rounds"]), 1),
        **traffic,
        "accuracy": scores["accuracy"],
        "overall": scores["integration"]["overall"],
    }
    print(f"{name}: {result}", flush=True)
    return result


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def main() -> None:
    """Parse arguments, run, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    result = run(args.rounds, args.local_epochs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "secure_aggregation.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"overhead (secure / plain): {result['overhead']}\nwrote {path}")


if __name__ == "__main__":
    main()
