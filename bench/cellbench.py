"""CellBench S1/S2 quality and wall time per step, with the presets' full recipes.

For each preset and scenario: build the reference on the three reference datasets, map both
query plates unlabelled, and score with ``fedatlas.shared.evaluation`` (integration on the joint
latent, label accuracy / macro F1 on lines the reference knows, AUROC of the uncertainty for the
unseen lines of S2). The published peers' numbers (measured on these splits, see the issue) are
printed beside ours.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cellbench.py [--presets scpoli] [--scenarios S1]

Writes ``bench/results/cellbench.json`` and a joint-embedding PNG per preset and scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedatlas.shared.cellbench import find_cellbench_dir, load_scenario
from fedatlas.shared.dataset import extract_cells
from fedatlas.shared.evaluation import MappedQuery, evaluate
from fedatlas.shared.mapping import map_cells
from fedatlas.shared.plotting import plot_joint_embedding
from fedatlas.shared.reference import build_reference

RESULTS = Path(__file__).resolve().parent / "results"

# (overall, label accuracy, macro F1, unknown AUROC, query-map seconds, trained, total)
PEERS: dict[tuple[str, str], tuple[float, float, float, float | None, float, int, int]] = {
    ("scpoli", "S1"): (0.948, 0.998, 0.996, None, 13.6, 8_020, 191_885),
    ("scpoli", "S2"): (0.850, 0.981, 0.981, 0.812, 35.9, 8_020, 191_885),
    ("scarches", "S1"): (0.808, 0.911, 0.908, None, 88.2, 9_024, 559_908),
    ("scarches", "S2"): (0.713, 1.000, 1.000, 0.976, 70.5, 9_024, 559_908),
    ("scalex", "S1"): (0.876, 0.995, 0.995, None, 0.4, 0, 2_105_572),
    ("scalex", "S2"): (0.767, 1.000, 1.000, 0.784, 0.3, 0, 2_105_572),
}
PEER_NAMES = {
    "scpoli": "scArches scPoli",
    "scarches": "scArches trVAE + weighted kNN",
    "scalex": "SCALEX projection + kNN",
}


def run_one(data_dir: Path, scenario: str, preset: str, seed: int) -> dict[str, Any]:
    """Build, map, score one (scenario, preset); also draws the joint embedding."""
    data = load_scenario(data_dir, scenario)
    cells = extract_cells(
        data.reference, source="reference", batch_key="batch", label_keys=["cell_line"]
    )
    started = time.perf_counter()
    built = build_reference(cells, preset=preset, seed=seed, progress=True)
    build_s = time.perf_counter() - started
    release = built.release
    mapped = []
    for stem, query in data.queries.items():
        t0 = time.perf_counter()
        result = map_cells(
            release,
            extract_cells(query, source=stem, batch_key="batch"),
            site_id=stem,
            seed=seed,
            progress=False,
        )
        truth = query.obs["cell_line"].astype(str).to_numpy(dtype=object)
        mapped.append(MappedQuery(stem, truth, result, time.perf_counter() - t0))
    scores = evaluate(release, mapped)
    ref_latent, ref_conditions = release.reference_latents()  # type: ignore[misc]
    plot_joint_embedding(
        RESULTS / f"cellbench_{scenario}_{preset}.png",
        reference_latent=ref_latent,
        query_latent=np.vstack([m.result.latent for m in mapped]),
        query_labels=np.concatenate([m.result.transfers["cell_line"].called for m in mapped]),
        query_groups=np.concatenate([np.full(len(m.truth), m.name, object) for m in mapped]),
        reference_groups=np.asarray(release.condition_names, object)[ref_conditions],
        title=f"CellBench {scenario}, {preset} (query lines A549/H838 unseen in S2)",
        seed=seed,
    )
    return {
        "scenario": scenario,
        "preset": preset,
        "build_seconds": round(build_s, 2),
        "epochs_trained": built.fit.epochs,
        "steps": {m.name: {k: round(v, 3) for k, v in m.result.seconds.items()} for m in mapped},
        **scores,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Ours against the peers, one line each."""
    lines = [
        f"{'preset':9} {'scen':4} {'':6} {'overall':>8} {'acc':>6} {'macroF1':>8} "
        f"{'AUROC':>6} {'map s':>7} {'trained/total':>20}  unknown calls (unseen / seen)"
    ]
    for r in rows:
        key = (r["preset"], r["scenario"])
        trained = max(r["trained_parameters"].values())
        total = max(r["total_parameters"].values())
        map_s = sum(r["map_seconds"].values())
        auroc = r.get("unknown_auroc")
        lines.append(
            f"{r['preset']:9} {r['scenario']:4} {'ours':6} {r['integration']['overall']:>8.3f} "
            f"{r['accuracy']:>6.3f} {r['macro_f1']:>8.3f} "
            f"{(f'{auroc:.3f}' if auroc is not None else '–'):>6} {map_s:>7.1f} "
            f"{trained:>9,}/{total:<10,}  "
            + (f"{r['unseen_called_unknown']:.1%} / " if "unseen_called_unknown" in r else "– / ")
            + f"{r['seen_called_unknown']:.1%}"
        )
        if key in PEERS:
            o, a, f, u, s, t, n = PEERS[key]
            lines.append(
                f"{'':9} {'':4} {'peer':6} {o:>8.3f} {a:>6.3f} {f:>8.3f} "
                f"{(f'{u:.3f}' if u is not None else '–'):>6} {s:>7.1f} {t:>9,}/{n:<10,}"
                f"  ({PEER_NAMES[r['preset']]})"
            )
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["scpoli", "scarches", "scalex"])
    parser.add_argument("--scenarios", nargs="+", default=["S1", "S2"])
    parser.add_argument("--data-dir", type=Path, default=find_cellbench_dir())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.data_dir is None:
        sys.exit("CellBench data not found; pass --data-dir or set FEDATLAS_CELLBENCH")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets:
        for scenario in args.scenarios:
            print(f"[bench] {preset} {scenario}", file=sys.stderr)
            rows.append(run_one(args.data_dir, scenario, preset, args.seed))
            (RESULTS / "cellbench.json").write_text(json.dumps(rows, indent=2, default=str))
    print(table(rows))
    print(f"written: {RESULTS / 'cellbench.json'} and cellbench_*.png")


if __name__ == "__main__":
    main()
