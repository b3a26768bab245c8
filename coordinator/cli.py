"""``fedatlas coordinator ...``: the coordinator's long-running services."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedatlas.shared.cli import add_subcommand


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``coordinator`` command group."""
    group = groups.add_parser(name, help=help_text, description=help_text)
    commands = group.add_subparsers(dest="coordinator_command", metavar="{serve}")
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
