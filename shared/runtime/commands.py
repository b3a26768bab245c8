"""What every command group shares: subcommands, result printing, tables and data options.

The root command (:mod:`fedatlas.cli`) imports each group's ``register`` function; a group
(``admin``, ``coordinator``, ``site``, ``demo``) adds its subcommands with :func:`add_subcommand`
and prints with :func:`print_result`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedatlas.shared.config import parse_overrides
from fedatlas.shared.data.dataset import DataSource

Handler = Callable[[argparse.Namespace], int]


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


def data_source(args: argparse.Namespace) -> DataSource:
    """The dataset named by :func:`add_data_arguments`' options."""
    return DataSource(
        args.data, args.batch_key, tuple(args.label_key), layer=args.layer, gene_key=args.gene_key
    )


def settings(pairs: Sequence[str] | None, target: type) -> dict[str, Any]:
    """``--set KEY=VALUE`` options parsed for a config dataclass."""
    return parse_overrides(list(pairs or []), target)
