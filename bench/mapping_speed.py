"""Mapping speed and memory on synthetic data, per preset.

For each preset a reference is built on 10,000 synthetic cells (2,000 genes, three batches; a few
epochs, since the reference's quality is not what is measured here). Then, for each query size N,
a site's ``.h5ad`` with two new batches is mapped by the real command line in a child process:

    fedatlas site map ... --epochs 10 --adaptor-out FILE

which reads the file, trains the adaptor for 10 epochs, projects every cell, transfers labels and
writes the annotated ``.h5ad``. Reported per (preset, N): wall time of that command and its peak
memory, seconds of adaptor training, projection throughput from raw counts (cells/s, measured
in-process on the same cells), trained/total parameters and adaptor bytes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/mapping_speed.py [--cells 10000 100000]

Prints a table and writes ``bench/results/mapping_speed.json`` and ``mapping_speed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.data.genes import align_genes
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.training import TrainingData, latent_means

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_EPOCHS = {"scpoli": 10, "scarches": 20, "scalex": 5}
CELL_TYPES = tuple(f"type{i}" for i in range(8))

# Runs the CLI in a child process and reports that process's own peak resident memory: VmHWM
# of its address space (getrusage's ru_maxrss would also count the parent's memory at fork).
CHILD = """
import json, re, sys, time
from pathlib import Path
from fedatlas.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"exit": code, "main_s": time.perf_counter() - started,
                  "peak_rss_mb": hwm_kb / 1024}), file=sys.stderr)
sys.exit(code)
"""


def map_with_cli(release_dir: Path, data: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Run ``fedatlas site map`` in a child process; its JSON result plus time and memory."""
    args = [
        "-q", "site", "map", "--reference", str(release_dir), "--data", str(data),
        "--batch-key", "batch", "--out", str(work / "mapped.h5ad"),
        "--adaptor-out", str(work / "site.adaptor"), "--site-id", "bench",
        "--epochs", str(epochs), "--json", "--epsilon", "inf",
    ]  # fmt: skip
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        check=False,
    )
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"site map failed:\n{run.stderr}")
    measured = json.loads(run.stderr.strip().splitlines()[-1])
    return {**json.loads(run.stdout), "wall_s": wall, **measured}


def projection_throughput(release: Release, adata: Any) -> float:
    """Cells per second from raw counts to latent means (in-process, after a warm-up)."""
    cells = extract_cells(adata, source="bench", batch_key="batch")
    model = release.build_model()
    counts = align_genes(cells.genes, release.genes).apply(cells.counts)
    conditions = np.zeros(cells.n_cells, dtype=np.int64)  # any known condition: same cost
    warm_up = TrainingData.for_recipe(counts[:2000], conditions[:2000], [], release.recipe)
    latent_means(model, warm_up, release.recipe)
    started = time.perf_counter()
    latent_means(
        model, TrainingData.for_recipe(counts, conditions, [], release.recipe), release.recipe
    )
    return cells.n_cells / (time.perf_counter() - started)


def run(presets: list[str], sizes: list[int], epochs: int, seed: int) -> list[dict[str, Any]]:
    """Measure every (preset, size) pair."""
    world = SyntheticWorld(seed=seed, n_genes=2000, cell_types=CELL_TYPES)
    reference = world.sample(10_000, batches=("ref1", "ref2", "ref3"), seed=seed + 1)
    queries = {n: world.sample(n, batches=("b1", "b2"), seed=seed + 2 + n) for n in sizes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedatlas-bench-") as tmp:
        work = Path(tmp)
        for n, adata in queries.items():
            adata.write_h5ad(work / f"query_{n}.h5ad")
        ref_cells = extract_cells(
            reference, source="ref", batch_key="batch", label_keys=["cell_type"]
        )
        for preset in presets:
            print(f"[bench] building {preset} reference (10,000 cells)", file=sys.stderr)
            built = train_reference(
                ref_cells, preset=preset, epochs=REFERENCE_EPOCHS[preset], seed=seed, progress=False
            )
            release_dir = built.release.save(work / f"release_{preset}", overwrite=True)
            for n, adata in queries.items():
                print(f"[bench] mapping {n:,} cells with {preset}", file=sys.stderr)
                result = map_with_cli(release_dir, work / f"query_{n}.h5ad", work, epochs)
                rows.append(
                    {
                        "preset": preset,
                        "cells": n,
                        "map_command_s": round(result["wall_s"], 2),
                        "peak_rss_mb": round(result["peak_rss_mb"], 1),
                        "adaptor_training_s": result["seconds"]["train"],
                        "projection_s": result["seconds"]["project"],
                        "label_transfer_s": result["seconds"]["transfer"],
                        "projection_cells_per_s": round(
                            projection_throughput(built.release, adata)
                        ),
                        "trained_parameters": result["trained_parameters"],
                        "total_parameters": result["total_parameters"],
                        "trained_share": result["trained_parameters"] / result["total_parameters"],
                        "adaptor_bytes": result["adaptor_bytes"],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar charts: map-command time, peak memory and projection throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['preset']}\n{r['cells']:,}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    panels = [
        ("map_command_s", "site map wall time (s)", 120.0, "target 120 s at 10^5 cells"),
        ("peak_rss_mb", "peak memory (MB)", 1536.0, "target 1.5 GB"),
        ("projection_cells_per_s", "projection (cells/s)", 60_000.0, "target 60,000 cells/s"),
    ]
    for ax, (key, title, target, note) in zip(axes, panels, strict=True):
        ax.bar(labels, [r[key] for r in rows], color="tab:blue")
        ax.axhline(target, color="tab:red", linestyle="--", label=note)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--presets", nargs="+", default=["scpoli", "scarches", "scalex"])
    parser.add_argument("--epochs", type=int, default=10, help="adaptor training epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = run(args.presets, args.cells, args.epochs, args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mapping_speed.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / "mapping_speed.png")
    print(
        f"{'preset':9} {'cells':>8} {'map s':>7} {'peak MB':>8} {'train s':>8} "
        f"{'proj c/s':>9} {'trained/total':>18} {'adaptor B':>10}"
    )
    for r in rows:
        print(
            f"{r['preset']:9} {r['cells']:>8,} {r['map_command_s']:>7.1f} {r['peak_rss_mb']:>8.0f} "
            f"{r['adaptor_training_s']:>8.2f} {r['projection_cells_per_s']:>9,} "
            f"{r['trained_parameters']:>7,}/{r['total_parameters']:<10,} {r['adaptor_bytes']:>10,}"
        )
    print(f"written: {RESULTS / 'mapping_speed.json'}, {RESULTS / 'mapping_speed.png'}")


if __name__ == "__main__":
    main()
