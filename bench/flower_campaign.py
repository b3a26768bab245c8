"""Flower adaptor campaigns on the Simulation Engine: wall time and bytes moved per site.

For 3, 10 and 20 virtual sites (synthetic data: a 2,000-gene scpoli reference of 2,000 cells
in three batches, each site 200 cells in a batch of its own, mapping with the release's own
recipe) ``fedatlas coordinator simulate`` runs one campaign against a fresh store:

- wall time of the whole command (simulation SuperLink start, the Flower run, cleanup of every
  process including Ray's) and of the Flower run alone;
- bytes per site: the composite sent down (manifest + weights + signed statement and
  signature, the payload of the campaign message) and the signed bundle sent up.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/flower_campaign.py [--sites 3 10 20]

Writes ``bench/results/flower_campaign.json`` and ``flower_campaign.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main as cli
from fedatlas.coordinator.registry import Registry
from fedatlas.coordinator.simulation import simulate
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.reference import train_reference

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_EPOCHS = 20


def prepare(root: Path, world: SyntheticWorld, n_sites: int, cells: int) -> list[dict[str, Any]]:
    """The release (``root/release``) and ``n_sites`` sites' data and keys; their sites-file
    entries."""
    reference = world.sample(2_000, batches=("r1", "r2", "r3"), seed=1)
    table = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    train_reference(table, preset="scpoli", epochs=REFERENCE_EPOCHS, progress=False).release.save(
        root / "release"
    )
    sites = []
    for i in range(n_sites):
        site = f"site{i:02d}"
        world.sample(cells, batches=(f"{site}-run",), seed=10 + i).write_h5ad(root / f"{site}.h5ad")
        assert cli(["-q", "site", "keygen", "--out", str(root / "keys" / site)]) == 0
        sites.append({"site-id": site, "data": str(root / f"{site}.h5ad"), "batch-key": "batch",
                      "label-key": "cell_type",
                      "key": str(root / "keys" / site / "site.key")})  # fmt: skip
    return sites


def campaign(root: Path, sites: list[dict[str, Any]]) -> dict[str, Any]:
    """One simulated campaign with ``sites`` against a fresh store; its measurements."""
    store = root / f"store-{len(sites)}"
    assert cli(["-q", "admin", "init", "--store", str(store)]) == 0
    assert cli(["-q", "admin", "release", "publish", "--store", str(store),
                     "--release", str(root / "release")]) == 0  # fmt: skip
    for site in sites:
        assert cli(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id",
                         site["site-id"], "--public-key",
                         str(Path(site["key"]).with_name("site.pub"))]) == 0  # fmt: skip
    with Registry(store) as registry:
        _, composite, statement = registry.current_composite()
        down = {
            "manifest": len(composite.manifest_json().encode()),
            "weights": len(composite.weights_bytes()),
            "statement": len(statement.statement_json.encode()) + len(statement.signature),
        }
    sites_file = root / f"sites-{len(sites)}.json"
    sites_file.write_text(json.dumps(sites))
    load_before = os.getloadavg()[0]
    report = simulate(store, sites_file, timeout=1200)
    accepted = [s for s in report["sites"] if s["state"] == "accepted"]
    if len(accepted) != len(sites):
        raise RuntimeError(f"only {len(accepted)} of {len(sites)} sites accepted: {report}")
    up = [s["bundle_bytes"] for s in accepted]
    timing = report["simulation"]
    return {
        "sites": len(sites),
        "wall_s": round(timing["total_seconds"], 2),
        "run_s": round(timing["run_seconds"], 2),
        "superlink_start_s": round(timing["superlink_seconds"], 2),
        "cleanup_s": round(timing["cleanup_seconds"], 2),
        "run_s_per_site": round(timing["run_seconds"] / len(sites), 2),
        "down_bytes_per_site": sum(down.values()),
        "down_parts": down,
        "up_bytes_per_site": int(np.mean(up)),
        "up_bytes_range": [min(up), max(up)],
        "composite_generation_after": report["composite_generation"],
        # the machine's 1-minute load average before and after (other work slows Ray down)
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Wall time against site count, and bytes per site in each direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    n = [r["sites"] for r in rows]
    left.plot(n, [r["wall_s"] for r in rows], marker="o", label="simulate (start to cleanup)")
    left.plot(n, [r["run_s"] for r in rows], marker="s", label="Flower run")
    left.set(xlabel="virtual sites", ylabel="seconds", title="campaign wall time (2 cores)")
    left.set_ylim(bottom=0)
    left.legend()
    x = np.arange(len(rows))
    right.bar(x - 0.2, [r["down_bytes_per_site"] for r in rows], 0.4, label="composite down")
    right.bar(x + 0.2, [r["up_bytes_per_site"] for r in rows], 0.4, label="bundle up")
    right.set(xticks=x, xticklabels=[str(v) for v in n], xlabel="virtual sites", yscale="log")
    right.set(ylabel="bytes per site", title="payload per site", ylim=(1e3, 1e7))
    right.legend(loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--cells", type=int, default=200, help="cells per site")
    args = parser.parse_args()
    world = SyntheticWorld(seed=0, n_genes=2000, cell_types=tuple(f"t{i}" for i in range(6)))
    with tempfile.TemporaryDirectory(prefix="fedatlas-bench-") as tmp:
        root = Path(tmp)
        sites = prepare(root, world, max(args.sites), args.cells)
        rows = []
        for n in args.sites:
            print(f"[bench] campaign with {n} virtual sites", file=sys.stderr)
            rows.append(campaign(root, sites[:n]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"cells_per_site": args.cells, "genes": world.n_genes, "campaigns": rows}
    (RESULTS / "flower_campaign.json").write_text(json.dumps(result, indent=2))
    plot(rows, RESULTS / "flower_campaign.png")
    for r in rows:
        print(
            f"{r['sites']:>3} sites: {r['wall_s']:6.1f} s wall ({r['run_s']:.1f} s Flower run, "
            f"{r['run_s_per_site']:.2f} s/site); per site {r['down_bytes_per_site']:,} B down, "
            f"{r['up_bytes_per_site']:,} B up; load average {r['load_average']}"
        )
    print(f"written: {RESULTS / 'flower_campaign.json'}, {RESULTS / 'flower_campaign.png'}")


if __name__ == "__main__":
    main()
