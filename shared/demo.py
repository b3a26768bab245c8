"""``fedatlas demo``: build a reference, map two sites, compose their adaptors, report.

Offline, on one machine: on generated data by default (two sites, one with a cell type the
reference lacks), or on the CellBench files with ``--data-dir`` (scenario S2). Writes the data,
the release, each site's annotated ``.h5ad`` and adaptor, the composite, ``summary.json`` and a
PNG of the joint embedding into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from fedatlas.shared.cli import add_subcommand, print_result
from fedatlas.shared.config import DEFAULT_PRESET, PRESETS


def register(groups: Any, name: str, help_text: str) -> None:
    """Add the ``demo`` command."""
    parser = add_subcommand(groups, name, _run, help_text, __doc__ or help_text)
    parser.add_argument(
        "--out", type=Path, default=Path("fedatlas-demo"), help="report folder (./fedatlas-demo)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="CellBench folder: run scenario S2 on it instead"
    )
    parser.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    parser.add_argument("--epochs", type=int, help="override the preset's reference epochs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")


def _load_data(data_dir: Path | None, seed: int) -> tuple[ad.AnnData, dict[str, ad.AnnData], str]:
    """Reference, {site id: query}, label column."""
    if data_dir is None:
        from fedatlas.shared.synthetic import make_demo_scenario

        reference, queries = make_demo_scenario(seed=seed)
        return reference, queries, "cell_type"
    from fedatlas.shared.cellbench import load_scenario

    scenario = load_scenario(data_dir, "S2")
    return scenario.reference, dict(scenario.queries), "cell_line"


def run_demo(
    out: Path, *, data_dir: Path | None, model: str, epochs: int | None, seed: int, progress: bool
) -> dict[str, Any]:
    """Run the demo and return the summary written to ``out/summary.json``."""
    from fedatlas.shared.adaptor import compose
    from fedatlas.shared.annotations import annotate
    from fedatlas.shared.dataset import extract_cells
    from fedatlas.shared.evaluation import MappedQuery, evaluate
    from fedatlas.shared.h5ad import write_h5ad
    from fedatlas.shared.mapping import map_cells
    from fedatlas.shared.plotting import plot_joint_embedding
    from fedatlas.shared.reference import build_reference

    started = time.perf_counter()
    reference, queries, label_key = _load_data(data_dir, seed)
    for path, adata in [("reference", reference), *queries.items()]:
        write_h5ad(adata, out / "data" / f"{path}.h5ad")

    ref_cells = extract_cells(
        reference, source="reference", batch_key="batch", label_keys=[label_key]
    )
    built = build_reference(ref_cells, preset=model, seed=seed, epochs=epochs, progress=progress)
    release = built.release
    release.save(out / "release", overwrite=True)

    mapped: list[MappedQuery] = []
    for site, query in queries.items():
        cells = extract_cells(query, source=site, batch_key="batch")  # labels stay hidden
        t0 = time.perf_counter()
        result = map_cells(release, cells, site_id=site, seed=seed, progress=progress)
        seconds = time.perf_counter() - t0
        annotated = query.copy()
        annotate(annotated, result)
        write_h5ad(annotated, out / "sites" / f"{site}.h5ad")
        assert result.adaptor is not None  # every demo batch is new to the release
        result.adaptor.save(out / "adaptors" / f"{site}.adaptor")
        truth = query.obs[label_key].astype(str).to_numpy(dtype=object)
        mapped.append(MappedQuery(site, truth, result, seconds))

    adaptors = [m.result.adaptor for m in mapped if m.result.adaptor is not None]
    composite = compose(release, adaptors)
    reversed_hash = compose(release, adaptors[::-1]).content_hash
    composite.save(out / "composite", overwrite=True)
    scores = evaluate(release, mapped)

    ref_latent, ref_conditions = release.reference_latents() or (np.zeros((0, 1)), np.zeros(0))
    plot = plot_joint_embedding(
        out / "joint_embedding.png",
        reference_latent=ref_latent,
        query_latent=np.vstack([m.result.latent for m in mapped]),
        query_labels=np.concatenate(
            [m.result.transfers[release.label_levels[0]].called for m in mapped]
        ),
        query_groups=np.concatenate([np.full(len(m.truth), m.name, object) for m in mapped]),
        reference_groups=np.asarray(release.condition_names, object)[ref_conditions],
        title=f"fedatlas demo: {model} reference + {len(mapped)} mapped sites",
        seed=seed,
    )
    summary = {
        "data": str(data_dir) if data_dir else "synthetic (fedatlas.shared.synthetic)",
        "model": model,
        "sites": [m.name for m in mapped],
        "release_id": release.content_hash,
        "composite_hash": composite.content_hash,
        "composite_order_independent": reversed_hash == composite.content_hash,
        "accepted_adaptors": len(adaptors),
        "adaptor_bytes": {a.site_id: len(a.to_bytes()) for a in adaptors},
        "trainable_params": scores["trained_parameters"],
        "total_params": max(scores["total_parameters"].values()),
        "label_accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "unknown_auroc": scores.get("unknown_auroc"),
        "overall_score": scores["integration"]["overall"],
        "scores": scores,
        "plot": str(plot),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _run(args: argparse.Namespace) -> int:
    summary = run_demo(
        args.out,
        data_dir=args.data_dir,
        model=args.model,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.quiet,
    )
    integ = summary["scores"]["integration"]
    auroc = summary["unknown_auroc"]
    lines = [
        f"fedatlas demo ({summary['model']}, {summary['data']}) finished in {summary['seconds']}s",
        f"  sites                 {', '.join(summary['sites'])}",
        f"  adaptors composed     {summary['accepted_adaptors']} -> composite "
        f"{summary['composite_hash']} (same for either order: "
        f"{summary['composite_order_independent']})",
        "  adaptor size          "
        + ", ".join(f"{k}: {v:,} bytes" for k, v in summary["adaptor_bytes"].items()),
        "  trained / total       "
        + ", ".join(f"{k}: {v:,}" for k, v in summary["trainable_params"].items())
        + f" of {summary['total_params']:,} parameters",
        f"  label accuracy        {summary['label_accuracy']:.3f} (macro F1 "
        f"{summary['macro_f1']:.3f}) on cell types the reference knows",
        "  unknown detection     "
        + (f"AUROC {auroc:.3f} for cell types the reference lacks" if auroc else "n/a"),
        f"  integration           overall {integ['overall']:.3f} (bio {integ['bio']:.3f}, "
        f"batch {integ['batch']:.3f})",
        f"  report                {args.out / 'summary.json'}, {summary['plot']}",
    ]
    print_result(summary, args.json, lines)
    return 0
