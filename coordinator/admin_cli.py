"""``fedatlas admin ...``: the operator's commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedatlas.shared.cli import (
    add_data_arguments,
    add_subcommand,
    print_result,
    read_cells,
    settings,
)
from fedatlas.shared.config import PRESETS


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``admin`` command group."""
    admin = groups.add_parser(name, help=help_text, description=help_text)
    sections = admin.add_subparsers(dest="admin_section", metavar="{reference}")
    sections.required = True
    reference = sections.add_parser("reference", help="reference releases")
    commands = reference.add_subparsers(dest="reference_command", metavar="{build}")
    commands.required = True
    build = add_subcommand(
        commands,
        "build",
        _build,
        "train a reference network on raw counts and write a release directory",
        "Select highly variable genes on the reference, train the chosen model family on all "
        "of its cells and write a release (manifest + pickle-free weights) to --out.",
    )
    add_data_arguments(
        build,
        label_help="obs column with cell-type labels; repeat for several label levels "
        "(primary first)",
    )
    build.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    build.add_argument("--out", required=True, type=Path, help="release directory to create")
    build.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument(
        "--n-top-genes", type=int, default=2000, help="highly variable genes to keep (2000)"
    )
    build.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set likelihood=zinb --set latent_dim=16",
    )
    build.add_argument(
        "--train-set",
        action="append",
        metavar="KEY=VALUE",
        help="override a training setting, e.g. --train-set prototype_weight=20",
    )
    build.add_argument(
        "--unknown-threshold",
        type=float,
        default=0.5,
        help="uncertainty above which sites call a cell unknown (default 0.5)",
    )
    build.add_argument(
        "--no-reference-latents",
        action="store_true",
        help="do not keep the reference cells' latent positions (disables kNN transfer)",
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    build.add_argument("--json", action="store_true", help="print the result as JSON")


def _build(args: argparse.Namespace) -> int:
    from fedatlas.shared.config import ModelConfig, TrainConfig
    from fedatlas.shared.errors import ReleaseError
    from fedatlas.shared.reference import build_reference

    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ReleaseError(f"{out}: already exists; choose a new --out or pass --overwrite")
    model_overrides = settings(args.set, ModelConfig)
    train_overrides = settings(args.train_set, TrainConfig)
    _, cells = read_cells(args)
    result = build_reference(
        cells,
        preset=args.model,
        seed=args.seed,
        epochs=args.epochs,
        n_top_genes=args.n_top_genes,
        model_overrides=model_overrides,
        train_overrides=train_overrides,
        keep_latents=not args.no_reference_latents,
        unknown_threshold=args.unknown_threshold,
        progress=not args.quiet,
    )
    release = result.release
    release.save(out, overwrite=args.overwrite)
    model = release.build_model()
    payload = {
        "release_dir": str(out),
        "release_id": release.content_hash,
        "preset": args.model,
        "n_cells": cells.n_cells,
        "n_genes": len(release.genes),
        "conditions": release.condition_names,
        "label_levels": release.label_levels,
        "total_parameters": model.total_parameter_count(),
        "epochs_trained": result.fit.epochs,
        "stopped_early": result.fit.stopped_early,
        "training_seconds": round(result.fit.seconds, 2),
    }
    labels = ", ".join(f"{lv} ({len(release.prototypes(lv))} types)" for lv in release.label_levels)
    print_result(
        payload,
        args.json,
        [
            f"release {release.content_hash}",
            f"  written to      {out}",
            f"  model           {args.model}, {payload['total_parameters']:,} parameters",
            f"  cells / genes   {cells.n_cells:,} / {len(release.genes):,}",
            f"  conditions      {len(release.condition_names)}: "
            + ", ".join(release.condition_names),
            f"  label levels    {labels or 'none (unlabelled reference)'}",
            f"  training        {result.fit.epochs} epochs in {result.fit.seconds:.1f}s"
            + (" (stopped early)" if result.fit.stopped_early else ""),
        ],
    )
    return 0
