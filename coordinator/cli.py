"""``fedatlas coordinator ...``: the coordinator's long-running services."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedatlas.coordinator.flower_runs import (
    DEFAULT_CONTROL_PORT,
    run_campaign,
    run_federated_build,
    start_superlink,
)
from fedatlas.coordinator.server import serve_forever, start_server
from fedatlas.coordinator.simulation import simulate
from fedatlas.shared.config import PRESETS as PRESET_NAMES
from fedatlas.shared.model.federated import AGGREGATIONS, FederatedPlan
from fedatlas.shared.model.federated_genes import read_gene_list
from fedatlas.shared.runtime.commands import add_subcommand, print_result, table
from fedatlas.shared.runtime.flower import supervise

NODE_SYNC_SECONDS = 5.0  # how often the SuperLink's node registrations follow the store
# `federated-build` options for the plan's safeguards against hostile sites: field, type, help
SAFEGUARDS = (
    ("trim_fraction", float, "trimmed-mean cuts this share of the sites' values (rounded down) "
     "at each end of every coordinate"),
    ("max_site_cells", int, "the most cells a site's claim counts for"),
    ("max_site_share", float, "the largest share of the fedavg weight one site gets; 1: no cap"),
    ("clip_factor", float, "updates are clipped to this many times the round's median norm"),
    ("outlier_factor", float, "an update longer than this many times the median norm is left "
     "out of the round"),
)  # fmt: skip


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
        "runtime dependency installation off, listening on loopback only (127.0.0.1, "
        "--control-port): there its Control API serves the coordinator's campaigns and the "
        "operator's flwr (FLWR_HOME=STORE/flower/home). The sites' SuperNodes connect to "
        "--address, where a proxy with the same certificate forwards Flower's Fleet API and "
        "nothing else. It accepts exactly the Flower node keys of enrolled, non-revoked sites "
        "(followed within seconds of admin site enroll/revoke; any other key is unregistered). "
        "Records both addresses in STORE/flower/superlink.json. Prints 'superlink on "
        "HOST:PORT' once serving; stops with its children on SIGTERM or Ctrl-C.",
    )  # fmt: skip
    superlink.add_argument("--store", required=True, type=Path, help="coordinator store")
    superlink.add_argument(
        "--address", required=True, metavar="HOST:PORT", help="public address (Fleet API only)"
    )
    superlink.add_argument(
        "--control-port", type=int, default=DEFAULT_CONTROL_PORT,
        help=f"loopback port of the SuperLink itself (Control API; {DEFAULT_CONTROL_PORT})",
    )  # fmt: skip

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
        "The connected sites' SuperNodes say which genes they hold (only of --gene-list, or "
        "only those in their public gene universe) and send per-batch gene dispersions "
        "(aggregates; no cell's values), the coordinator elects the highly variable genes, "
        "then each round every site trains the shared trunk and its own condition rows on "
        "its cells and returns the trunk and its cell count. No claim is trusted: a count must "
        "be a positive integer and weighs at most --max-site-cells and --max-site-share; each "
        "update (trunk minus trunk sent) is clipped to --clip-factor times the round's median "
        "update norm, and one longer than --outlier-factor times it is left out of the round "
        "(reported per round, never fatal); the rest are combined by --aggregation. The final "
        "trunk is published as the store's current release (signed, no conditions of its own); "
        "each site's kept rows become its adaptor, verified and registered like a campaign "
        "bundle. Exit status 0 only when every step completed with at least --min-sites sites "
        "(answering, and with their update combined in every round).",
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
    build.add_argument(
        "--gene-list", type=Path, metavar="PATH",
        help="the build's genes: a file of names (one per line) or a release directory (its "
        "genes); each site then only says which of them it holds. Without it each site names "
        "its genes that are in its public gene universe (site node --gene-universe)",
    )  # fmt: skip
    build.add_argument("--finish-epochs", type=int, help="epochs of each site's final fine-tune")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--aggregation", choices=AGGREGATIONS, default=FederatedPlan.aggregation,
        help="fedavg: mean weighted by (capped) cells; median, trimmed-mean: coordinate-wise, "
        f"each site once ({FederatedPlan.aggregation})",
    )  # fmt: skip
    for field, kind, help_text in SAFEGUARDS:
        default = getattr(FederatedPlan, field)
        build.add_argument(
            "--" + field.replace("_", "-"), type=kind, default=default,
            help=f"{help_text} ({default:,})",
        )  # fmt: skip
    build.add_argument(
        "--secure-aggregation", action="store_true",
        help="SecAgg+ in every round: the coordinator learns only the cell-weighted sum of the "
        "sites' updates (needs --aggregation fedavg; each site clips its own update, no "
        "outlier is left out and --max-site-share does not apply)",
    )  # fmt: skip
    build.add_argument(
        "--secure-clip-norm", type=float, default=FederatedPlan.secure_clip_norm,
        help="with --secure-aggregation: L2 bound of a site's update in the first round (every "
        f"round with DP), later --clip-factor times the mean update norm "
        f"({FederatedPlan.secure_clip_norm:g})",
    )  # fmt: skip
    build.add_argument(
        "--dp-noise-multiplier", type=float, default=FederatedPlan.dp_noise_multiplier,
        help="with --secure-aggregation: DP-FedAvg, Gaussian noise of this many times one "
        "site's largest influence on the mean update (0: off)",
    )  # fmt: skip

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
    parser.add_argument(
        "--superlink", metavar="HOST:PORT",
        help="the SuperLink's Control API (default: the loopback address `coordinator "
        "superlink` recorded in STORE/flower/superlink.json; its public address means the same)",
    )  # fmt: skip
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
    # httpx logs every request at INFO: the node sync's every 5 s and each one the proxy forwards
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with start_superlink(args.store, args.address, control_port=args.control_port) as superlink:
        print(
            f"superlink on {args.address} (Fleet API only; Control API on "
            f"{superlink.addresses.control}; store {args.store})",
            flush=True,
        )
        # node registrations follow sites enrolled or revoked meanwhile
        return supervise(
            superlink.process, every=NODE_SYNC_SECONDS, tick=superlink.tick,
            shutdown=superlink.stop,
        )  # fmt: skip


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
        finish_epochs=args.finish_epochs, aggregation=args.aggregation,
        secure_aggregation=args.secure_aggregation, secure_clip_norm=args.secure_clip_norm,
        dp_noise_multiplier=args.dp_noise_multiplier,
        **{field: getattr(args, field) for field, _, _ in SAFEGUARDS},
    )  # fmt: skip
    report = run_federated_build(
        args.store, args.superlink, plan, min_sites=args.min_sites, timeout=args.timeout,
        gene_list=read_gene_list(args.gene_list) if args.gene_list else None,
    )  # fmt: skip
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
            f"{plan.aggregation}, {plan.local_epochs} local epochs); last losses {last}",
            *[
                f"round {r['round']}: {site} left out: {reason}"
                for r in report["rounds"]
                for site, reason in r["left_out"].items()
            ],
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
