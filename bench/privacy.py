"""What differential privacy costs: labels at the site and propagated to another site, per epsilon.

For every split (CellBench S1, S2 and the robustness suite's splits), preset and seed: build the
reference from the split's reference file, then at each epsilon (delta 1e-5; infinity = no DP)
map site A unlabelled (its own accuracy, macro F1, unknown AUROC) and labelled (its DP bundle's
prototypes label site B through the composite), as :mod:`fedatlas.benchmarks.dp_cost` describes.
Prints a table per epsilon (seed means, worst split), writes ``bench/results/privacy.json`` and
``bench/results/privacy.png``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/privacy.py [--splits S1,S2,...]
        [--seeds 0 1 2] [--presets scpoli] [--epsilons 0.5,1,2,4,8,inf]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.benchmarks import dp_cost
from fedatlas.benchmarks.cellbench import find_cellbench_dir
from fedatlas.benchmarks.splits import Split, suite_splits

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    ("own", "accuracy"), ("own", "macro_f1"), ("own", "auroc"), ("own", "known_called_unknown"),
    ("propagation", "accuracy"), ("propagation", "novel_propagated"),
)  # fmt: skip


def named_splits(names: str | None) -> dict[str, Split]:
    """S1, S2 and the suite's splits by name (all by default)."""
    every = {**dp_cost.STANDARD_SPLITS, **{s.name: s for s in suite_splits()}}
    if not names:
        return every
    wanted = names.split(",")
    unknown = sorted(set(wanted) - set(every))
    if unknown:
        raise SystemExit(f"unknown splits {unknown}; choose from {sorted(every)}")
    return {n: every[n] for n in wanted}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per preset and epsilon: each column's mean over splits (of seed means) and worst split."""
    by: dict[tuple[str, float, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        for part, key in COLUMNS:
            value = row[part][key]
            if value is not None:
                by[(row["preset"], row["epsilon"], row["split"])][f"{part}.{key}"].append(value)
    out: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    for preset, epsilon in sorted({(p, e) for p, e, _ in by}):
        per_split = [v for (p, e, _), v in by.items() if (p, e) == (preset, epsilon)]
        columns: dict[str, float | None] = {}
        for part, key in COLUMNS:
            name = f"{part}.{key}"
            means = [float(np.mean(s[name])) for s in per_split if s.get(name)]
            worst = max if key == "known_called_unknown" else min
            columns[name] = float(np.mean(means)) if means else None
            columns[f"{name}.worst"] = worst(means) if means else None
        rejected = [
            r["propagation"]["coordinator_check"] != "passed"
            for r in rows
            if (r["preset"], r["epsilon"]) == (preset, epsilon)
        ]
        columns["bundles_refused"] = float(np.mean(rejected))
        out[preset][str(epsilon)] = columns
    return out


def print_table(summary: dict[str, dict[str, dict[str, float | None]]]) -> None:
    """One line per preset and epsilon: means (worst split in brackets)."""
    head = ["preset", "epsilon", *(f"{p[:4]}.{k}" for p, k in COLUMNS), "refused"]
    print(" | ".join(head))
    for preset, by_epsilon in summary.items():
        for epsilon, cols in by_epsilon.items():
            cells = []
            for part, key in COLUMNS:
                mean, worst = cols[f"{part}.{key}"], cols[f"{part}.{key}.worst"]
                cells.append("-" if mean is None else f"{mean:.3f} ({worst:.3f})")
            print(" | ".join([preset, epsilon, *cells, f"{cols['bundles_refused']:.2f}"]))


def plot(summary: dict[str, dict[str, dict[str, float | None]]], path: Path) -> None:
    """Each column's mean against epsilon (infinity drawn at the right end), per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.6), sharex=True)
    for preset, by_epsilon in summary.items():
        epsilons = [float(e) for e in by_epsilon]
        finite = [e for e in epsilons if math.isfinite(e)]
        x_inf = max(finite) * 2 if finite else 1.0
        xs = [e if math.isfinite(e) else x_inf for e in epsilons]
        for ax, (part, key) in zip(axes, COLUMNS, strict=True):
            ys = [by_epsilon[e][f"{part}.{key}"] for e in by_epsilon]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=preset)
            ax.set_title(f"{part}: {key}", fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel("epsilon (rightmost: no DP)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli() -> None:
    """Parse arguments, run every split x preset x seed, print, write JSON and PNG."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--splits", help="comma-separated split names (default: all; 'none': synthetic only)"
    )
    parser.add_argument("--presets", nargs="+", default=["scpoli"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epsilons", default=",".join(str(e) for e in dp_cost.EPSILONS))
    parser.add_argument(
        "--synthetic-sizes", default="",
        help="also synthetic sites of these cell counts, e.g. 200,2000 (default: none)",
    )  # fmt: skip
    parser.add_argument("--reference-epochs", type=int, help="rescale the reference recipe")
    parser.add_argument("--work", type=Path, help="folder for the site files (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args()
    data_dir = find_cellbench_dir()
    if data_dir is None:
        sys.exit("CellBench data not found (see ../shared/data/README.md)")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    splits = named_splits(args.splits) if args.splits != "none" else {}
    sizes = [int(n) for n in args.synthetic_sizes.split(",") if n]
    work = args.work or Path(tempfile.mkdtemp(prefix="fedatlas-privacy-"))
    rows: list[dict[str, Any]] = []
    total = (len(splits) + len(sizes)) * len(args.presets) * len(args.seeds)
    done = 0
    for preset in args.presets:
        for seed in args.seeds:
            jobs = [*splits, *(f"synthetic-{n}" for n in sizes)]
            for name in jobs:
                started = time.perf_counter()
                if name in splits:
                    sites = dp_cost.split_sites(data_dir, splits[name], work / name, seed)
                else:
                    sites = dp_cost.synthetic_sites(int(name.removeprefix("synthetic-")), seed)
                rows += dp_cost.run(
                    sites, name, preset=preset, seed=seed, epsilons=epsilons,
                    reference_epochs=args.reference_epochs,
                )  # fmt: skip
                done += 1
                print(f"[{done}/{total}] {preset} seed {seed} {name}: "
                      f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    summary = summarise(rows)
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    cli()
