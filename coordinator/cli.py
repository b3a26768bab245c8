"""``fedatlas coordinator ...``: the coordinator's long-running services."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedatlas.coordinator.flower_runs import (
    run_campaign,
    run_federated_build,
    start_superlink,
    sync_nodes,
)
from fedatlas.coordinator.server import serve_forever, start_server
from fedatlas.coordinator.simulation import simulate
from fedatlas.shared.config import PRESETS as PRESET_NAMES
from fedatlas.shared.model.federated import FederatedPlan
from fedatlas.shared.runtime.commands import add_subcommand, print_result, table
from fedatlas.shared.runtime.flower import supervise

NODE_SYNC_SECONDS = 5.0  # how often the SuperLink's node registrations follow the store


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``coordinator`` command group."""
    group = groups.add_parser(name, help=help_text, description=help_text)
    commands = group.add_subparsers(
        dest="coordinator_command",
        metavar="{serve,superlink,campaign,federated-build,simulate}",
    )
    commands.required = True
    serve = add_subcommand(
        commands, "serve", _serve, "serve the coordinator's gRPC API with TLS",
        "Sites pull the signed composite and submit bundles here. Stops cleanly on SIGTERM or "
        "Ctrl-C. Prints 'serving on HOST:PORT' once it accepts connections.",
    )  # fmt: skip
    serve.add_argument("--store", required=True, type=Path, help="coordinator store directory")
    serve.add_argument(
        "--address", required=True, metavar="HOST:PORT", help="where to listen (port 0: any)"
    )
    serve.add_argument(
        "--require-client-cert",
        action="store_true",
        help="mutual TLS: only clients with a certificate from the store's CA may connect",
    )
    serve.add_argument("--workers", type=int, default=8, help="concurrent requests (8)")

    superlink = add_subcommand(
        commands, "superlink", _superlink, "run a Flower SuperLink beside the coordinator",
        "flower-superlink with the store's TLS material, SuperNode authentication on and "
        "runtime dependency installation off. It accepts exactly the Flower node keys of "
        "enrolled, non-revoked sites (followed within seconds of admin site enroll/revoke). "
        "Prints 'superlink on "
        "HOST:PORT' once healthy; stops with its children on SIGTERM or Ctrl-C.",
    )  # fmt: skip
    superlink.add_argument("--store", required=True, type=Path, help="coordinator store")
    superlink.add_argument("--address", required=True, metavar="HOST:PORT")

    campaign = add_subcommand(
        commands, "campaign", _campaign, "run a federated adaptor campaign on the SuperLink",
        "Every connected site's SuperNode trains its adaptor on its own data and answers with "
        "a signed bundle, registered exactly like a gRPC submission. Prints each site's "
        "outcome; exit status 0 only when the run completed.",
    )  # fmt: skip
    _add_run_arguments(campaign, min_sites="wait for this many nodes", timeout="seconds per phase")

    build = add_subcommand(
        commands, "federated-build", _federated_build,
        "train a reference across sites that may not pool cells (FedAvg/FedProx on Flower)",
        "The connected sites' SuperNodes send their gene names and per-batch gene dispersions "
        "(aggregates; no cell's values), the coordinator elects the highly variable genes, "
        "then each round every site trains the shared trunk and its own condition rows on "
        "its cells and returns the trunk, which is averaged weighted by cells. The final trunk "
        "is published as the store's current release (signed, no conditions of its own); each "
        "site's kept rows become its adaptor, verified and registered like a campaign bundle. "
        "Exit status 0 only when every step completed with at least --min-sites sites.",
    )  # fmt: skip
    _add_run_arguments(build, min_sites="sites required at every step", timeout="seconds per step")
    build.add_argument(
        "--model", default="scpoli", choices=sorted(PRESET_NAMES), help="preset (scpoli)"
    )
    build.add_argument("--rounds", type=int, required=True, help="FedAvg rounds")
    build.add_argument("--local-epochs", type=int, default=5, help="epochs per round (5)")
    build.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    build.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx mu (0.01)")
    build.add_argument("--n-top-genes", type=int, default=2000, help="genes to elect (2000)")
    build.add_argument(
        "--label-level", default="cell_type",
        help="name of the release's label level; each site maps its --label-key onto it "
        "(empty: no labels)",
    )  # fmt: skip
    build.add_argument("--finish-epochs", type=int, help="epochs of each site's final fine-tune")
    build.add_argument("--seed", type=int, default=0)

    simulate = add_subcommand(
        commands, "simulate", _simulate,
        "run an adaptor campaign with virtual sites on Flower's Simulation Engine",
        "Starts its own simulation SuperLink on a free loopback port and runs the campaign app "
        "with one virtual SuperNode per entry of --sites-file (Ray backend; needs the "
        "`simulation` extra: pip install 'fedatlas[simulation]'). The sites file is a JSON "
        "list of objects with site-id, data (.h5ad), batch-key, key (the site's site.key) and "
        "optionally label-key, coordinator-key (default: the store's), out, seed, epochs; "
        "relative paths are relative to the file. Bundles are registered exactly like a gRPC "
        "submission, so sites that are not enrolled are rejected. Prints each site's outcome; "
        "exit status 0 only when the run completed. Every process it starts (Ray's included) "
        "is stopped at the end, also on failure, Ctrl-C or SIGTERM.",
    )  # fmt: skip
    simulate.add_argument("--store", required=True, type=Path, help="coordinator store")
    simulate.add_argument(
        "--sites-file", required=True, type=Path, help="JSON list of the virtual sites"
    )
    simulate.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    simulate.add_argument(
        "--parallel", type=int, default=2, help="virtual sites training at a time (2)"
    )
    simulate.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_run_arguments(parser: argparse.ArgumentParser, *, min_sites: str, timeout: str) -> None:
    """The options of every Flower run the coordinator starts on its SuperLink."""
    parser.add_argument("--store", required=True, type=Path, help="coordinator store")
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT")
    parser.add_argument("--min-sites", type=int, default=1, help=min_sites)
    parser.add_argument("--timeout", type=float, default=600.0, help=timeout)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _serve(args: argparse.Namespace) -> int:

    server, port, registry = start_server(
        args.store,
        args.address,
        require_client_cert=args.require_client_cert,
        max_workers=args.workers,
    )
    host = args.address.rsplit(":", 1)[0]
    print(
        f"serving on {host}:{port} (store {args.store}, key {registry.key_fingerprint})",
        flush=True,
    )
    serve_forever(server, registry)
    return 0


def _superlink(args: argparse.Namespace) -> int:

    process = start_superlink(args.store, args.address)
    print(f"superlink on {args.address} (store {args.store})", flush=True)
    # node registrations follow sites enrolled or revoked meanwhile
    return supervise(process, every=NODE_SYNC_SECONDS, tick=lambda: sync_nodes(args.store))


def _campaign(args: argparse.Namespace) -> int:

    report = run_campaign(
        args.store, args.superlink, min_sites=args.min_sites, timeout=args.timeout
    )
    _print_campaign(report, args.json)
    return 0


def _federated_build(args: argparse.Namespace) -> int:
    plan = FederatedPlan(
        preset=args.model, rounds=args.rounds, local_epochs=args.local_epochs,
        strategy=args.strategy, proximal_mu=args.proximal_mu if args.strategy == "fedprox" else 0.0,
        n_top_genes=args.n_top_genes, label_level=args.label_level, seed=args.seed,
        finish_epochs=args.finish_epochs,
    )  # fmt: skip
    report = run_federated_build(
        args.store, args.superlink, plan, min_sites=args.min_sites, timeout=args.timeout
    )
    rows = _site_rows(report) + [
        [d["site_id"] or "-", n, f"left at {d['step']}", "", d["reason"]]
        for n, d in report["dropped"].items()
    ]
    last = report["rounds"][-1]["loss"] if report["rounds"] else {}
    status = "completed" if report["completed"] else f"stopped: {report.get('error', '')}"
    print_result(
        report,
        args.json,
        [
            f"federated build run {report['run_id']}: {status}",
            f"{len(report['rounds'])} of {plan.rounds} rounds ({plan.strategy}, "
            f"{plan.local_epochs} local epochs); last losses {last}",
            f"release {report.get('release_id', '-')}, {report.get('genes', 0)} genes; "
            f"composite generation {report.get('composite_generation', 0)}",
            *table(["SITE", "NODE", "OUTCOME", "CODE", "REASON"], rows),
        ],
    )
    return 0 if report["completed"] else 1


def _simulate(args: argparse.Namespace) -> int:

    report = simulate(args.store, args.sites_file, timeout=args.timeout, parallel=args.parallel)
    _print_campaign(report, args.json)
    return 0


def _site_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One table row per site that answered: outcome and reason."""
    return [
        [s["site_id"] or "-", s["node_id"], s["state"], s.get("reason_code", ""), s["reason"]]
        for s in report["sites"]
    ]


def _print_campaign(report: dict[str, Any], as_json: bool) -> None:

    rows = _site_rows(report) + [["-", n, "timed out", "", ""] for n in report["timed_out"]]
    print_result(
        report,
        as_json,
        [
            f"campaign run {report['run_id']}: {report['status']}; composite generation "
            f"{report['composite_generation']}",
            *table(["SITE", "NODE", "OUTCOME", "CODE", "REASON"], rows),
        ],
    )
