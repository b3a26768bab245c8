"""``fedatlas coordinator ...``: the coordinator's long-running services."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedatlas.shared.cli import add_subcommand

NODE_SYNC_SECONDS = 5.0  # how often the SuperLink's node registrations follow the store


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``coordinator`` command group."""
    group = groups.add_parser(name, help=help_text, description=help_text)
    commands = group.add_subparsers(
        dest="coordinator_command", metavar="{serve,superlink,campaign}"
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
    campaign.add_argument("--store", required=True, type=Path, help="coordinator store")
    campaign.add_argument("--superlink", required=True, metavar="HOST:PORT")
    campaign.add_argument("--min-sites", type=int, default=1, help="wait for this many nodes")
    campaign.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    campaign.add_argument("--json", action="store_true", help="print the report as JSON")


def _serve(args: argparse.Namespace) -> int:
    from fedatlas.coordinator.server import serve_forever, start_server

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
    from fedatlas.coordinator.flower_runs import start_superlink, sync_nodes
    from fedatlas.shared.flower import supervise

    process = start_superlink(args.store, args.address)
    print(f"superlink on {args.address} (store {args.store})", flush=True)
    # node registrations follow sites enrolled or revoked meanwhile
    return supervise(process, every=NODE_SYNC_SECONDS, tick=lambda: sync_nodes(args.store))


def _campaign(args: argparse.Namespace) -> int:
    from fedatlas.coordinator.flower_runs import run_campaign
    from fedatlas.shared.cli import print_result, table

    report = run_campaign(
        args.store, args.superlink, min_sites=args.min_sites, timeout=args.timeout
    )
    rows = [
        [s["site_id"] or "-", s["node_id"], s["state"], s.get("reason_code", ""), s["reason"]]
        for s in report["sites"]
    ] + [["-", n, "timed out", "", ""] for n in report["timed_out"]]
    print_result(
        report,
        args.json,
        [
            f"campaign run {report['run_id']}: {report['status']}; composite generation "
            f"{report['composite_generation']}",
            *table(["SITE", "NODE", "OUTCOME", "CODE", "REASON"], rows),
        ],
    )
    return 0
