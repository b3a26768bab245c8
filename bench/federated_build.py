"""FedAvg / FedProx rounds needed to reach the central reference's score, on CellBench S1.

The three S1 reference datasets are three sites that never pool cells; the federated build
(:mod:`fedatlas.shared.model.federated`, the algorithm the Flower apps run) is scored after every
round: each site's kept rows become its adaptor on that round's trunk, and both S1 query plates
are mapped onto the composite and scored exactly like the central reference (integration on
the joint latent, label accuracy). Also reports the bytes a site exchanges per round. Every
strategy runs with every aggregation asked for (``--aggregations``; all sites are honest here,
so this measures what a robust aggregation costs).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/federated_build.py [--preset scpoli]
        [--rounds 15] [--local-epochs 5] [--strategies fedavg fedprox]
        [--aggregations fedavg median trimmed-mean]

Writes ``bench/results/federated_build.json`` and ``federated_build.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedatlas.benchmarks.cellbench import REFERENCE_STEMS, find_cellbench_dir, load_scenario
from fedatlas.benchmarks.scoring import ReferenceCells, map_and_evaluate
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.model.adaptor import compose
from fedatlas.shared.model.federated import (
    AGGREGATIONS,
    FederatedPlan,
    SiteTrainer,
    Trunk,
    federated_release,
    train_federated,
)
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.surgery import split

RESULTS = Path(__file__).resolve().parent / "results"
MARGIN = 0.01  # "reached": within this of the central reference's overall score


def score_round(genes: list[str], trunk: Trunk, trainers: Mapping[str, SiteTrainer],
                plan: FederatedPlan, queries: Mapping[str, Any]) -> dict[str, float]:  # fmt: skip
    """Release this round's trunk, let each site finish its adaptor, score the composite."""
    n_cells = sum(t.cells.n_cells for t in trainers.values())
    release = federated_release(plan, genes, trunk, n_cells=n_cells, sites=sorted(trainers),
                                history=[])  # fmt: skip
    finished = {s: t.finish(release) for s, t in trainers.items()}
    composite = compose(release, [m.adaptor for m in finished.values() if m.adaptor])
    sites = {s: t.cells for s, t in trainers.items()}
    cells = ReferenceCells.embedded(composite, sites, "cell_line")
    scores = map_and_evaluate(composite, queries, label_key="cell_line", reference=cells)
    return {"overall": scores["integration"]["overall"], "accuracy": scores["accuracy"]}


def run(preset: str, rounds: int, local_epochs: int, strategies: list[str],
        aggregations: list[str]) -> dict[str, Any]:  # fmt: skip
    """Central reference, then one federated build per strategy and aggregation, scored every
    round."""
    data_dir = find_cellbench_dir()
    if data_dir is None:
        sys.exit("CellBench data not found (../shared/data/cellbench or FEDATLAS_CELLBENCH)")
    data = load_scenario(data_dir, "S1")
    sites: dict[str, CellTable] = {}
    for stem in REFERENCE_STEMS:
        part = data.reference[data.reference.obs["batch"] == stem].copy()
        sites[stem] = extract_cells(part, source=stem, batch_key="batch", label_keys=["cell_line"])
    cells = extract_cells(
        data.reference, source="reference", batch_key="batch", label_keys=["cell_line"]
    )
    started = time.perf_counter()
    central_release = train_reference(cells, preset=preset, seed=0, progress=False).release
    central_seconds = time.perf_counter() - started
    central = map_and_evaluate(central_release, data.queries, label_key="cell_line")
    out: dict[str, Any] = {
        "preset": preset, "local_epochs": local_epochs, "margin": MARGIN,
        "central": {"overall": central["integration"]["overall"],
                    "accuracy": central["accuracy"], "seconds": round(central_seconds, 1)},
        "strategies": {},
    }  # fmt: skip
    print(f"central {preset}: overall {out['central']['overall']:.3f}, accuracy "
          f"{out['central']['accuracy']:.3f} ({central_seconds:.1f} s)")  # fmt: skip
    for strategy in strategies:
        for aggregation in aggregations:
            out["strategies"][f"{strategy}/{aggregation}"] = run_strategy(
                strategy, aggregation, sites, data.queries, preset, rounds, local_epochs,
                out["central"]["overall"],
            )  # fmt: skip
    return out


def run_strategy(
    strategy: str, aggregation: str, sites: Mapping[str, CellTable], queries: Mapping[str, Any],
    preset: str, rounds: int, local_epochs: int, central: float,
) -> dict[str, Any]:  # fmt: skip
    """One federated build, scored after every round."""
    mu = 0.01 if strategy == "fedprox" else 0.0
    plan = FederatedPlan(preset=preset, rounds=rounds, local_epochs=local_epochs,
                         strategy=strategy, proximal_mu=mu, label_level="cell_line",
                         aggregation=aggregation)  # fmt: skip
    label = f"{strategy}/{aggregation}"
    curve: list[dict[str, float]] = []

    def on_round(r: int, genes: list[str], trunk: Trunk,
                 trainers: Mapping[str, SiteTrainer]) -> None:  # fmt: skip
        point = {"round": r + 1, **score_round(genes, trunk, trainers, plan, queries)}
        curve.append(point)
        print(f"{label} round {r + 1}: overall {point['overall']:.3f}, "
              f"accuracy {point['accuracy']:.3f}", flush=True)  # fmt: skip

    started = time.perf_counter()
    result = train_federated(sites, plan, on_round=on_round)
    trunk_bytes = sum(t.numel() * t.element_size() for t in _trunk(result.release).values())
    reached = next((p["round"] for p in curve if p["overall"] >= central - MARGIN), None)
    print(f"{label}: within {MARGIN} of central after {reached} round(s); "
          f"{2 * trunk_bytes:,} B per site per round")  # fmt: skip
    return {
        "mu": mu, "aggregation": aggregation, "curve": curve, "rounds_to_central": reached,
        "left_out": sum(len(r["left_out"]) for r in result.history),
        "clipped": sum(len(r["clipped"]) for r in result.history),
        "seconds_with_scoring": round(time.perf_counter() - started, 1),
        "trunk_bytes": trunk_bytes,
        "bytes_per_site_per_round": 2 * trunk_bytes,  # trunk down + trunk up
    }  # fmt: skip


def _trunk(release: Release) -> dict[str, Any]:
    return split(release.model_tensors())[0]


def plot(result: dict[str, Any], path: Path) -> None:
    """Overall score per round for each strategy and aggregation, with the central reference's
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy, info in result["strategies"].items():
        rounds = [p["round"] for p in info["curve"]]
        ax.plot(rounds, [p["overall"] for p in info["curve"]], marker="o", label=strategy)
    central = result["central"]["overall"]
    ax.axhline(central, color="black", linestyle="--", label=f"central ({central:.3f})")
    ax.axhspan(central - result["margin"], central, color="grey", alpha=0.15,
               label=f"within {result['margin']}")  # fmt: skip
    ax.set_xlabel(f"round ({result['local_epochs']} local epochs each)")
    ax.set_ylabel("overall integration score (S1)")
    ax.set_title(f"Federated {result['preset']} reference on CellBench S1 (3 sites)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Parse arguments, run, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", default="scpoli")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox"])
    parser.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS, default=["fedavg"])
    args = parser.parse_args()
    result = run(args.preset, args.rounds, args.local_epochs, args.strategies, args.aggregations)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated_build.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "federated_build.png")
    print(f"wrote {RESULTS / 'federated_build.json'} and federated_build.png")


if __name__ == "__main__":
    main()
