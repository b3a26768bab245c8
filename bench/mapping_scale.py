"""Streaming ``site map`` from 10^4 to 10^6 cells at one site: wall time and peak memory.

A reference per preset is built on 10,000 synthetic cells (2,000 genes, three batches, few
epochs: mapping is what is measured). For each size N, one site's ``.h5ad`` with three new
batches (site structure: the site's own effect plus each batch's) is generated block by block
into a work folder, then mapped by the real command line in a child process:

    fedatlas site map ... --chunk-size 10000 --train-cells 50000 --epochs 10

which reads the file twice in chunks (training sample, then projection), trains the adaptor on
at most 50,000 cells, labels every cell and writes a copy of the input with the results added.
Reported per (preset, N, path): wall time, the child's peak resident memory (VmHWM), the input
size, the output size (what the results add per cell: latent, uncertainty, unknown flag, label
code), peak minus output, and over N the least-squares slope of the peak in bytes per cell. For
comparison the in-memory path (``--chunk-size 0``) runs up to ``--in-memory-max`` cells. Slopes
are given over all sizes and over the sizes at or above the training cap, where the training
sample no longer grows and what remains is per-cell state.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/mapping_scale.py [--cells 10000 100000 1000000]

Prints a table and writes ``bench/results/mapping_scale.json`` and ``mapping_scale.png``.
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
from mapping_speed import CELL_TYPES, CHILD, REFERENCE_EPOCHS

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.model.reference import train_reference

RESULTS = Path(__file__).resolve().parent / "results"
SITE_BATCHES = ("b1", "b2", "b3")
MB = 1024**2


def map_in_child(
    release: Path, data: Path, out: Path, chunk: int, epochs: int, train_cells: int
) -> dict[str, Any]:
    """Run ``fedatlas site map`` in a child process, passing its progress lines through; its
    JSON result plus wall time and peak memory."""
    args = [
        "site", "map", "--reference", str(release), "--data", str(data), "--batch-key",
        "batch", "--out", str(out), "--site-id", "bench", "--epochs", str(epochs),
        "--chunk-size", str(chunk), "--train-cells", str(train_cells), "--json",
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    stdout, stderr = child.stdout, child.stderr
    assert stdout is not None
    assert stderr is not None
    lines = []
    for line in stderr:
        lines.append(line)
        if line.startswith("[fedatlas]"):
            print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
    output = stdout.read()
    if child.wait() != 0:
        raise RuntimeError(f"site map failed:\n{''.join(lines[-30:])}")
    measured = json.loads(lines[-1])
    return {**json.loads(output), "wall_s": time.perf_counter() - started, **measured}


def slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 with fewer than two points)."""
    return float(np.polyfit(xs, ys, 1)[0]) if len(set(xs)) > 1 else 0.0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate the sites, build the references and measure every (preset, size, path)."""
    world = SyntheticWorld(seed=args.seed, n_genes=2000, cell_types=CELL_TYPES)
    files = {}
    for n in args.cells:
        path = work / f"site_{n}.h5ad"
        if not path.exists():
            print(f"[bench] generating {n:,} cells -> {path}", file=sys.stderr, flush=True)
            world.write_h5ad(path, n, SITE_BATCHES, seed=args.seed + 1, site="bench", progress=True)
        files[n] = path
    reference = world.sample(10_000, batches=("ref1", "ref2", "ref3"), seed=args.seed + 2)
    ref_cells = extract_cells(reference, source="ref", batch_key="batch", label_keys=["cell_type"])
    rows = []
    for preset in args.presets:
        print(f"[bench] building {preset} reference (10,000 cells)", file=sys.stderr, flush=True)
        built = train_reference(
            ref_cells, preset=preset, epochs=REFERENCE_EPOCHS[preset], seed=args.seed,
            progress=False,
        )  # fmt: skip
        release = built.release.save(work / f"release_{preset}", overwrite=True)
        per_cell_output = 4 * built.release.model_config.latent_dim + (4 + 1 + 1) * max(
            1, len(built.release.label_levels)
        )
        for n, path in files.items():
            paths = [("streaming", args.chunk_size)]
            if n <= args.in_memory_max:
                paths.append(("in-memory", 0))
            for name, chunk in paths:
                print(f"[bench] {preset}: mapping {n:,} cells ({name})", file=sys.stderr)
                out = work / f"mapped_{preset}_{n}_{name}.h5ad"
                result = map_in_child(release, path, out, chunk, args.epochs, args.train_cells)
                output_mb = per_cell_output * n / MB
                rows.append(
                    {
                        "preset": preset,
                        "path": name,
                        "cells": n,
                        "wall_s": round(result["wall_s"], 2),
                        "seconds": result["seconds"],
                        "peak_rss_mb": round(result["peak_rss_mb"], 1),
                        "output_mb": round(output_mb, 1),
                        "peak_minus_output_mb": round(result["peak_rss_mb"] - output_mb, 1),
                        "input_file_mb": round(path.stat().st_size / MB, 1),
                        "cells_per_s": round(n / result["wall_s"]),
                        "trained_parameters": result["trained_parameters"],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                out.unlink()
    slopes = _slopes(rows) + _slopes([r for r in rows if r["cells"] >= args.train_cells])
    return {"rows": rows, "slopes": slopes, "settings": vars(args) | {"work": str(work)}}


def _slopes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (preset, path) with two sizes or more: bytes per cell of the peak and of peak minus
    output, seconds per 10^5 cells."""
    out = []
    for key in sorted({(r["preset"], r["path"]) for r in rows}):
        part = [r for r in rows if (r["preset"], r["path"]) == key]
        cells = [r["cells"] for r in part]
        if len(cells) < 2:
            continue
        out.append(
            {
                "preset": key[0],
                "path": key[1],
                "sizes": cells,
                "peak_bytes_per_cell": round(slope(cells, [r["peak_rss_mb"] * MB for r in part])),
                "peak_minus_output_bytes_per_cell": round(
                    slope(cells, [r["peak_minus_output_mb"] * MB for r in part])
                ),
                "seconds_per_100k_cells": round(1e5 * slope(cells, [r["wall_s"] for r in part]), 2),
            }
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory and wall time against cells, per preset and path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    output_drawn = False
    for key in sorted({(r["preset"], r["path"]) for r in rows}):
        part = [r for r in rows if (r["preset"], r["path"]) == key]
        part.sort(key=lambda r: r["cells"])
        cells = [r["cells"] for r in part]
        style = "-o" if key[1] == "streaming" else "--s"
        mem.plot(cells, [r["peak_rss_mb"] for r in part], style, label=f"{key[0]} {key[1]}")
        wall.plot(cells, [r["wall_s"] for r in part], style, label=f"{key[0]} {key[1]}")
        if key[1] == "streaming" and not output_drawn:  # the same for every preset
            mem.plot(cells, [r["output_mb"] for r in part], ":", color="grey", label="output")
            output_drawn = True
    mem.set(xscale="log", xlabel="cells", ylabel="peak RSS (MB)", title="peak memory of site map")
    wall.set(xscale="log", yscale="log", xlabel="cells", ylabel="wall time (s)")
    wall.set_title("site map wall time")
    for ax in (mem, wall):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--presets", nargs="+", default=["scpoli"])
    parser.add_argument("--epochs", type=int, default=10, help="adaptor training epochs")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="cells per chunk")
    parser.add_argument(
        "--train-cells", type=int, default=50_000, help="cap on the adaptor's training cells"
    )
    parser.add_argument(
        "--in-memory-max", type=int, default=100_000, help="largest size also mapped in memory"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep (and reuse) the generated files here (default: temp)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="fedatlas-scale-") as tmp:
            report = run(args, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mapping_scale.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report["rows"], RESULTS / "mapping_scale.png")
    print(
        f"{'preset':8} {'path':10} {'cells':>10} {'wall s':>8} {'cells/s':>8} {'peak MB':>8} "
        f"{'output MB':>9} {'peak-out':>8} {'input MB':>9}"
    )
    for r in report["rows"]:
        print(
            f"{r['preset']:8} {r['path']:10} {r['cells']:>10,} {r['wall_s']:>8.1f} "
            f"{r['cells_per_s']:>8,} {r['peak_rss_mb']:>8.0f} {r['output_mb']:>9.1f} "
            f"{r['peak_minus_output_mb']:>8.0f} {r['input_file_mb']:>9.0f}"
        )
    for s in report["slopes"]:
        print(
            f"slope {s['preset']} {s['path']} over {s['sizes']}: peak "
            f"{s['peak_bytes_per_cell']:,} B/cell, peak minus output "
            f"{s['peak_minus_output_bytes_per_cell']:,} B/cell, "
            f"{s['seconds_per_100k_cells']} s per 10^5 cells"
        )
    print(f"written: {RESULTS / 'mapping_scale.json'}, {RESULTS / 'mapping_scale.png'}")


if __name__ == "__main__":
    main()
