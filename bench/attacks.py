"""Hostile members against real processes on loopback: what one enrolled site, or anyone
holding ``ca.pem``, can do to the coordinator and the other sites.

1. Bundles (``fedatlas.benchmarks.attacks``): every altered, re-signed bundle goes to
   ``coordinator serve`` over gRPC (TLS, SQLite store); the outcome (accepted, or the reason
   code) and an honest third party's accuracy and novel-type unknown share after ``site pull``
   and ``site map``, against the honest federation's.
2. Flower's Control API: ``flwr ls``, ``flwr supernode register`` and ``flwr run`` with only
   ``ca.pem`` and the public address of ``coordinator superlink``.
3. Federated builds (``fedatlas.benchmarks.trunk_attacks``): one site of four sends hostile
   round updates; the reference's accuracy under each aggregation, against the honest build.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/attacks.py [--out bench/results/attacks]
        [--genes 2000] [--epochs 100] [--seed 0] [--attacks NAME ...] [--no-federated]

Prints the tables and writes attacks.json and attacks.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedatlas.benchmarks import attacks, trunk_attacks
from fedatlas.cli import main
from fedatlas.deploy.launcher import LocalLauncher
from fedatlas.shared.model.federated import AGGREGATIONS, train_federated
from fedatlas.shared.runtime.commands import table
from fedatlas.shared.wire.bundle import make_bundle
from fedatlas.shared.wire.signing import load_signing_key


def run(out: Path, seed: int, genes: int, epochs: int, names: list[str],
        federated: bool) -> None:  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedatlas-attacks-") as tmp:
        root = Path(tmp)
        fed = attacks.prepare_federation(root, main, seed=seed, n_genes=genes, epochs=epochs)
        adaptors = {s: attacks.site_adaptor(fed, main, s)
                    for s in (*attacks.HONEST_SITES, attacks.ATTACKER)}  # fmt: skip
        with LocalLauncher(root / "logs") as launcher:
            address = launcher.coordinator(fed.store)
            honest = [make_bundle(adaptors[s], load_signing_key(fed.key(s))).raw
                      for s in attacks.HONEST_SITES]  # fmt: skip
            refused = [a for a in attacks.submit(address, fed, honest) if a.state != "accepted"]
            if refused:
                sys.exit(f"an honest bundle was refused: {refused}")
            baseline = attacks.third_party_scores(address, fed, main)
            outcomes = [
                attacks.run_attack(name, adaptors[attacks.ATTACKER], fed, address, main, baseline)
                for name in names
            ]
            control = attacks.control_api_probes(launcher.superlink(fed.store), fed)
    rows = [["honest federation", "-", f"{baseline.accuracy:.3f}", f"{baseline.novel_unknown:.3f}"]]
    rows += [
        [o.description[:70], ", ".join(f"{k} x{v}" for k, v in o.codes.items()),
         f"{o.accuracy:.3f}", f"{o.novel_unknown:.3f}"]
        for o in outcomes
    ]  # fmt: skip
    for line in table(["ATTACK", "OUTCOME", "3RD-PARTY ACCURACY", "NOVEL CALLED UNKNOWN"], rows):
        print(line)
    print()
    for line in table(["WITH ONLY ca.pem", "OUTCOME"], [list(item) for item in control.items()]):
        print(line)
    result = {**attacks.outcome_json(outcomes, baseline), "control_api": control}
    if federated:
        result["federated_build"] = federated_build_attacks()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"({result['seconds']:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    plot(outcomes, baseline, out / "attacks.png")


def federated_build_attacks() -> dict[str, dict[str, float]]:
    """Reference accuracy of each trunk attack under each aggregation (honest build first)."""
    sites, query = trunk_attacks.federation(), trunk_attacks.query()
    scores: dict[str, dict[str, float]] = {}
    for aggregation in AGGREGATIONS:
        plan = trunk_attacks.plan(aggregation=aggregation)
        runs = {"none (honest)": None, **{a: trunk_attacks.hostile(a)
                                          for a in trunk_attacks.TRUNK_ATTACKS}}  # fmt: skip
        for attack, hook in runs.items():
            result = train_federated(sites, plan, on_update=hook)
            scores.setdefault(attack, {})[aggregation] = trunk_attacks.accuracy(result, query)
            print(f"federated build, {attack}, {aggregation}: "
                  f"{scores[attack][aggregation]:.3f}", flush=True)  # fmt: skip
    rows = [[attack, *(f"{by[a]:.3f}" for a in AGGREGATIONS)] for attack, by in scores.items()]
    for line in table(["ONE SITE OF FOUR SENDS", *(a.upper() for a in AGGREGATIONS)], rows):
        print(line)
    return scores


def plot(outcomes: list[attacks.Outcome], honest: attacks.Scores, path: Path) -> None:
    """Per attack, the third party's accuracy and novel-unknown share relative to the honest
    federation's, with the bars issue 15 sets (0.95 and 0.8); refused attacks sit at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = [attacks.relative(o, honest) for o in outcomes]
    names = [f"{o.attack} ({', '.join(o.codes)})" for o in outcomes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(outcomes) + 1.5), sharey=True)
    for ax, column, bar, title in ((axes[0], 0, 0.95, "accuracy on known types"),
                                   (axes[1], 1, 0.8, "novel type called unknown")):  # fmt: skip
        ax.barh(names, [r[column] for r in relative], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvline(bar, color="tab:red", linestyle="--", label=f"bar ({bar} x honest)")
        ax.set_xlabel(f"{title}, x honest")
        ax.legend(loc="lower right")
    axes[0].invert_yaxis()
    fig.suptitle(f"One hostile member; honest third party: accuracy {honest.accuracy:.3f}, "
                 f"novel unknown {honest.novel_unknown:.3f}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/attacks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes", type=int, default=2000, help="genes of the synthetic world")
    parser.add_argument("--epochs", type=int, default=100, help="reference training epochs")
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=sorted(attacks.ATTACKS),
        default=list(attacks.ATTACKS),
        help="which attacks (default: all)",
    )
    parser.add_argument("--no-federated", action="store_true",
                        help="skip the federated-build attacks")  # fmt: skip
    args = parser.parse_args()
    run(args.out, args.seed, args.genes, args.epochs, args.attacks, not args.no_federated)


if __name__ == "__main__":
    cli()
