"""The robustness suite: every CellBench split of ``fedatlas.benchmarks.splits`` and its
synthetic worlds (strong protocol effects, a condition response) through the command line on
``.h5ad`` files, scored by the peer harness, beside the published peers (CellBench only: their
harness reads CellBench).

For each preset, seed and split: write the site files, ``admin reference build``, ``site map``
each query, score the joint latent with ``../shared/peers/evaluate.py`` (scib-metrics when
``--eval-python`` names the harness's scoring environment, else its scikit-learn
implementation). The peers' scores on the same splits are read from
``bench/peers/cellbench_suite.json`` (written by ``bench/peers.py``); each preset is printed
beside its own peer (scpoli - scArches scPoli, scarches - trVAE, scalex - SCALEX) and the best
peer. Then the mean and the worst split per preset.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/robustness.py [--presets scpoli]
        [--seeds 0 1 2] [--splits NAME,...] [--eval-python /tmp/evalenv/bin/python]

Writes ``bench/results/robustness.json`` and ``bench/results/robustness.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.benchmarks import robustness
from fedatlas.benchmarks.cellbench import find_cellbench_dir
from fedatlas.benchmarks.splits import Split, SyntheticSplit, suite_splits, synthetic_splits
from fedatlas.cli import main

RESULTS = Path(__file__).resolve().parent / "results"
PEER_RESULTS = Path(__file__).resolve().parent / "peers" / "cellbench_suite.json"
PEER_OF = {"scpoli": "scpoli", "scarches": "trvae", "scalex": "scalex"}
COLUMNS = ("overall", "accuracy", "macro_f1", "auroc", "known_unknown", "novel_unknown")


def columns(evaluation: dict[str, Any], shares: dict[str, float | None]) -> dict[str, Any]:
    """The suite's columns from an ``evaluate.py`` result and the unknown shares."""
    transfer = evaluation.get("label_transfer", {})
    return {
        "overall": evaluation["overall"],
        "accuracy": transfer.get("accuracy"),
        "macro_f1": transfer.get("f1_macro_true_labels"),
        "auroc": evaluation.get("unknown_detection", {}).get("auroc"),
        "known_unknown": shares["known_called_unknown"],
        "novel_unknown": shares["novel_called_unknown"],
    }


def all_splits() -> tuple[Split | SyntheticSplit, ...]:
    """CellBench splits, then the synthetic worlds."""
    return (*suite_splits(), *synthetic_splits())


def run_one(data_dir: Path, split: Split | SyntheticSplit, preset: str, seed: int,
            eval_python: Path | None, work: Path, epochs: int | None = None,
            ) -> dict[str, Any]:  # fmt: skip
    """Our columns, timings and the scorer used for one (split, preset, seed); ``epochs``
    shortens the reference recipe."""
    folder = work / f"{preset}_{seed}_{split.name}"
    if isinstance(split, SyntheticSplit):
        reference, queries = robustness.write_synthetic_files(split, folder, seed)
    else:
        reference, queries = robustness.write_site_files(data_dir, split, folder)
    done = robustness.run_split(
        main, reference, queries, folder, preset=preset, seed=seed, epochs=epochs
    )
    joint = robustness.joint_latent(done, reference)
    joint_path = folder / "joint.h5ad"
    joint.write_h5ad(joint_path)
    evaluation = robustness.score(joint_path, eval_python)
    return {
        "split": split.name,
        "family": split.family,
        "kind": split.kind,
        "preset": preset,
        "seed": seed,
        **columns(evaluation, robustness.unknown_shares(joint, split.novel_lines)),
        "build_s": round(done.build_seconds, 2),
        "map_s": round(sum(done.map_seconds.values()), 3),
        "metrics_impl": evaluation.get("metrics_impl"),
        "reference_epochs": epochs,
    }


def peer_rows() -> list[dict[str, Any]]:
    """The peers' rows in the suite's columns (empty when none were measured)."""
    if not PEER_RESULTS.is_file():
        return []
    runs = json.loads(PEER_RESULTS.read_text()).get("runs", {})
    rows = []
    for key, entry in runs.items():
        method, seed, split = key.split("/", 2)
        rows.append({
            "split": split, "peer": method, "seed": int(seed),
            "overall": entry.get("overall"), "accuracy": entry.get("accuracy"),
            "macro_f1": entry.get("f1_macro_true_labels"), "auroc": entry.get("auroc"),
            "known_unknown": entry.get("known_called_unknown"), "novel_unknown": None,
            "map_s": entry.get("query_map_s"),
        })  # fmt: skip
    return rows


def _mean(rows: list[dict[str, Any]], column: str) -> float | None:
    values = [r[column] for r in rows if r.get(column) is not None]
    return float(np.mean(values)) if values else None


def _worst(rows: list[dict[str, Any]], column: str) -> float | None:
    values = [r[column] for r in rows if r.get(column) is not None]
    if not values:
        return None
    return float(max(values) if column == "known_unknown" else min(values))


def _cell(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def report(ours: list[dict[str, Any]], peers: list[dict[str, Any]]) -> dict[str, Any]:
    """Print ours beside the peers per split (seed means), then mean and worst per method;
    returns the summary."""
    header = f"{'split':<92} {'method':<16}" + "".join(f"{c:>14}" for c in COLUMNS) + "   map s"
    print(header)
    methods: dict[str, list[dict[str, Any]]] = {}
    for split in all_splits():
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in ours:
            if row["split"] == split.name:
                groups.setdefault(row["preset"], []).append(row)
        for row in peers:
            if row["split"] == split.name:
                groups.setdefault("peer " + row["peer"], []).append(row)
        for method, rows in sorted(groups.items()):
            mean = {c: _mean(rows, c) for c in (*COLUMNS, "map_s")}
            methods.setdefault(method, []).append(mean)
            cells = "".join(f"{_cell(mean[c]):>14}" for c in COLUMNS)
            print(f"{split.name:<92} {method:<16}{cells}   {_cell(mean['map_s'])}")
    summary = {}
    print()
    for method, rows in sorted(methods.items()):
        summary[method] = {
            "splits": len(rows),
            "mean": {c: _mean(rows, c) for c in COLUMNS},
            "worst": {c: _worst(rows, c) for c in COLUMNS},
        }
        for what in ("mean", "worst"):
            cells = "".join(f"{_cell(summary[method][what][c]):>14}" for c in COLUMNS)
            print(f"{what + ' over ' + str(len(rows)) + ' splits':<92} {method:<16}{cells}")
    return summary


def plot(ours: list[dict[str, Any]], peers: list[dict[str, Any]], path: Path) -> None:
    """Accuracy and overall per split: each preset's seed mean beside each peer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in all_splits()]
    methods = sorted({r["preset"] for r in ours} | {"peer " + r["peer"] for r in peers})
    fig, axes = plt.subplots(2, 1, figsize=(14, 8), sharex=True)
    width = 0.8 / max(len(methods), 1)
    for ax, column in zip(axes, ("accuracy", "overall"), strict=True):
        for m, method in enumerate(methods):
            values = []
            for name in names:
                rows = [
                    r for r in (ours if not method.startswith("peer ") else peers)
                    if r["split"] == name and (r.get("preset") or "peer " + r["peer"]) == method
                ]  # fmt: skip
                value = _mean(rows, column)
                values.append(np.nan if value is None else value)
            ax.bar(np.arange(len(names)) + m * width, values, width, label=method)
        ax.set_ylabel(column)
        ax.set_ylim(0.4, 1.02)
    axes[0].legend(ncol=len(methods), fontsize=8)
    axes[1].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    axes[1].set_xticklabels([f"{i}" for i in range(len(names))])
    axes[1].set_xlabel("split (index in bench/results/robustness.json 'splits')")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_bench(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["scpoli"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--splits", default="", help="comma-separated split names (default all)")
    parser.add_argument("--eval-python", type=Path, default=None)
    parser.add_argument(
        "--epochs", type=int, default=None, help="shorten every reference recipe to N epochs"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the files here")
    parser.add_argument("--out", type=Path, default=RESULTS / "robustness.json")
    args = parser.parse_args(argv)
    data_dir = find_cellbench_dir()
    if data_dir is None:
        print("CellBench data not found beside the project", file=sys.stderr)
        return 2
    wanted = set(filter(None, args.splits.split(",")))
    splits = [s for s in all_splits() if not wanted or s.name in wanted]
    ours: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedatlas-robustness-") as scratch:
        work = args.work or Path(scratch)
        for preset in args.presets:
            for seed in args.seeds:
                for i, split in enumerate(splits, 1):
                    row = run_one(
                        data_dir, split, preset, seed, args.eval_python, work, args.epochs
                    )
                    ours.append(row)
                    print(
                        f"[{preset} seed {seed} {i}/{len(splits)}] {split.name}: "
                        + " ".join(f"{c} {_cell(row[c])}" for c in COLUMNS)
                        + f" map {row['map_s']:.1f}s",
                        flush=True,
                    )
    peers = peer_rows()
    summary = report(ours, peers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"splits": [s.name for s in all_splits()], "ours": ours, "peers": peers,
              "summary": summary}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1))
    plot(ours, peers, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_bench())
