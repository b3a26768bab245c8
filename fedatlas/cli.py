"""The ``fedatlas`` command: one entry point over the command groups of every part.

The groups live with the code they drive: ``admin`` and ``coordinator`` in the coordinator,
``site`` in the site client, ``demo`` in deploy. Each module's ``register`` adds its subcommands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedatlas.coordinator import admin_cli
from fedatlas.coordinator import cli as coordinator_cli
from fedatlas.deploy import demo
from fedatlas.shared import __version__
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.runtime.commands import Handler
from fedatlas.site_client import cli as site_cli

GROUPS = ("admin", "coordinator", "site", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedatlas",
        description="Federated updating of single-cell reference atlases.",
    )
    parser.add_argument("--version", action="version", version=f"fedatlas {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debugging details")
    groups = parser.add_subparsers(dest="group", metavar="{" + ",".join(GROUPS) + "}")
    groups.required = True
    admin_cli.register(groups, "admin", "operator commands (store, releases, sites, ...)")
    coordinator_cli.register(groups, "coordinator", "run the coordinator's services")
    site_cli.register(groups, "site", "commands a site runs on its own data")
    demo.register(
        groups, "demo", "run the whole federation end to end on this machine", run_command=main
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="[fedatlas] %(message)s", stream=sys.stderr)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedatlasError as exc:
        print(f"fedatlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedatlas: interrupted", file=sys.stderr)
        return 130
