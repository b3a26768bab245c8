"""``fedatlas site ...``: what a site runs on its own data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedatlas.shared.cli import add_data_arguments, add_subcommand, print_result, read_cells


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``site`` command group."""
    site = groups.add_parser(name, help=help_text, description=help_text)
    commands = site.add_subparsers(dest="site_command", metavar="{map}")
    commands.required = True
    mapping = add_subcommand(
        commands,
        "map",
        _map,
        "map a site's cells onto a release and write the results into a copy of its .h5ad",
        "Batches the release already knows (as SITE_ID/BATCH) are embedded without training; "
        "for every other batch the release's network gets new condition parameters, only those "
        "are trained, and they form the site's adaptor (--adaptor-out). The output is the input "
        "plus obsm['X_fedatlas'], obs['fedatlas_label'], obs['fedatlas_uncertainty'], "
        "obs['fedatlas_unknown'] and uns['fedatlas'].",
    )
    mapping.add_argument("--reference", required=True, type=Path, help="release directory")
    add_data_arguments(
        mapping,
        label_help="obs column with known labels, matched in order to the release's label "
        "levels; labelled cells guide adaptor training and give the site's prototypes",
    )
    mapping.add_argument("--out", required=True, type=Path, help="output .h5ad")
    mapping.add_argument("--adaptor-out", type=Path, help="write the site's adaptor to this file")
    mapping.add_argument("--epochs", type=int, help="override the release's mapping epochs")
    mapping.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    mapping.add_argument(
        "--site-id",
        default="query",
        help="this site's id; its batches become conditions SITE_ID/BATCH (default: query)",
    )
    mapping.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.5,
        help="refuse if fewer than this share of the release's genes are present (0.5)",
    )
    mapping.add_argument(
        "--transfer",
        choices=("prototype", "knn"),
        help="label transfer: nearest prototype (default) or weighted kNN on reference latents",
    )
    mapping.add_argument(
        "--unknown-threshold", type=float, help="uncertainty above which a cell is unknown"
    )
    mapping.add_argument(
        "--min-prototype-cells",
        type=int,
        default=10,
        help="labels with fewer cells get no prototype in the adaptor (default 10)",
    )
    mapping.add_argument("--json", action="store_true", help="print the result as JSON")


def _map(args: argparse.Namespace) -> int:
    from fedatlas.shared.annotations import annotate
    from fedatlas.shared.dataset import condition_name
    from fedatlas.shared.errors import ConfigError
    from fedatlas.shared.h5ad import write_h5ad
    from fedatlas.shared.mapping import map_cells
    from fedatlas.shared.release import Release

    release = Release.load(args.reference)
    adata, cells = read_cells(args)
    if args.adaptor_out is not None:
        known = set(release.condition_names)
        if all(condition_name(args.site_id, b) in known for b in set(cells.batches.tolist())):
            raise ConfigError(
                f"--adaptor-out: every batch of {args.data} is already a condition of the release "
                f"(as {args.site_id}/BATCH), so there is no adaptor to train; drop --adaptor-out "
                "or map them as new conditions under another --site-id"
            )
    result = map_cells(
        release,
        cells,
        site_id=args.site_id,
        epochs=args.epochs,
        seed=args.seed,
        min_gene_overlap=args.min_gene_overlap,
        transfer=args.transfer,
        unknown_threshold=args.unknown_threshold,
        min_prototype_cells=args.min_prototype_cells,
        source=str(args.data),
        progress=not args.quiet,
    )
    annotate(adata, result)
    write_h5ad(adata, args.out)
    adaptor_bytes = 0
    if args.adaptor_out is not None and result.adaptor is not None:
        adaptor_bytes = len(result.adaptor.to_bytes())
        result.adaptor.save(args.adaptor_out)
    payload: dict[str, Any] = {
        "out": str(args.out),
        "n_cells": cells.n_cells,
        **result.provenance(),
        "adaptor_file": str(args.adaptor_out) if args.adaptor_out else "",
        "adaptor_bytes": adaptor_bytes,
    }
    lines = [
        f"mapped {cells.n_cells:,} cells onto release {release.content_hash}",
        f"  written to      {args.out}",
        f"  genes           {result.alignment.n_found:,} of {result.alignment.n_release_genes:,} "
        f"release genes present ({result.alignment.n_missing:,} zero-filled)",
    ]
    for a in result.assignments:
        status = "known, embedded only" if a.known else "new, adaptor trained"
        lines.append(f"  batch {a.batch!r:<14} -> {a.condition} ({status}, {a.n_cells:,} cells)")
    lines.append(
        f"  parameters      {result.trained_parameters:,} trained of "
        f"{result.total_parameters:,} (release tensors verified bit-identical)"
    )
    for level, transfer in result.transfers.items():
        n_unknown = int(transfer.unknown.sum())
        lines.append(
            f"  labels ({level}) {n_unknown:,} cells unknown (uncertainty > {transfer.threshold})"
        )
    if result.adaptor is not None and args.adaptor_out is not None:
        lines.append(
            f"  adaptor         {result.adaptor.content_hash} -> {args.adaptor_out} "
            f"({adaptor_bytes:,} bytes)"
        )
    print_result(payload, args.json, lines)
    return 0
