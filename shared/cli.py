"""The ``fedatlas`` command: one entry point with subcommand groups.

Each group lives with the code it drives (``admin`` in the coordinator, ``site`` in the site
client) and registers its subcommands here through a ``register(subparsers)`` function; heavy
imports happen inside the command handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedatlas.shared import __version__
from fedatlas.shared.errors import FedatlasError

if TYPE_CHECKING:
    from anndata import AnnData

    from fedatlas.shared.dataset import CellTable

# (group name, module with a register(subparsers) function, help)
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("admin", "fedatlas.coordinator.admin_cli", "operator commands (store, releases, sites, ...)"),
    ("coordinator", "fedatlas.coordinator.cli", "run the coordinator's services"),
    ("site", "fedatlas.site_client.cli", "commands a site runs on its own data"),
    ("demo", "fedatlas.deploy.demo", "run the whole federation end to end on this machine"),
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedatlas",
        description="Federated updating of single-cell reference atlases.",
    )
    parser.add_argument("--version", action="version", version=f"fedatlas {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debugging details")
    groups = parser.add_subparsers(dest="group", metavar="{" + ",".join(g[0] for g in GROUPS) + "}")
    groups.required = True
    for name, module, help_text in GROUPS:
        importlib.import_module(module).register(groups, name, help_text)
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


def add_subcommand(
    subparsers: Any, name: str, handler: Handler, help_text: str, description: str = ""
) -> argparse.ArgumentParser:
    """Add a subcommand whose ``handler`` receives the parsed arguments."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=description or help_text
    )
    parser.set_defaults(handler=handler)
    return parser


def print_result(payload: dict[str, Any], as_json: bool, lines: Sequence[str]) -> None:
    """Print a command's result: ``payload`` as JSON for scripts, else the readable ``lines``."""
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        for line in lines:
            print(line)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def add_data_arguments(parser: argparse.ArgumentParser, *, label_help: str) -> None:
    """The options every command that reads a dataset shares."""
    parser.add_argument("--data", required=True, type=Path, help=".h5ad file with raw counts")
    parser.add_argument("--batch-key", required=True, help="obs column with each cell's batch")
    parser.add_argument("--label-key", action="append", default=[], help=label_help)
    parser.add_argument("--layer", help="layer holding raw counts (default: X)")
    parser.add_argument("--gene-key", help="var column with gene identifiers (default: var_names)")


def read_cells(args: argparse.Namespace) -> tuple[AnnData, CellTable]:
    """The dataset named by :func:`add_data_arguments`' options, validated."""
    from fedatlas.shared.dataset import extract_cells
    from fedatlas.shared.h5ad import read_h5ad

    adata = read_h5ad(args.data)
    cells = extract_cells(
        adata,
        source=str(args.data),
        batch_key=args.batch_key,
        label_keys=args.label_key,
        layer=args.layer,
        gene_key=args.gene_key,
    )
    return adata, cells


def settings(pairs: Sequence[str] | None, target: type) -> dict[str, Any]:
    """``--set KEY=VALUE`` options parsed for a config dataclass."""
    from fedatlas.shared.config import parse_overrides

    return parse_overrides(list(pairs or []), target)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
