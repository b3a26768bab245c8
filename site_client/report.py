"""A mapping's report for the people who read it: figures and numbers in one folder.

Reads what ``fedatlas site map`` wrote (the site's ``.h5ad`` with ``obsm['X_fedatlas']``, the
predicted labels, uncertainties, unknown calls and ``uns['fedatlas']``) and writes:

* ``umap_labels.png``: one UMAP of reference cells (grey), query cells by predicted label and
  the label prototypes (stars), fitted on all of them together so they share coordinates;
* ``umap_uncertainty.png``: the same coordinates, query cells by uncertainty, unknowns circled;
* ``uncertainty_histogram.png``: the uncertainty distribution with the unknown threshold;
* ``condition_pca.png``: PCA of the learnt condition (sample) embeddings, reference and site
  (``embedding`` condition mechanism, e.g. the ``scpoli`` preset, and a release only);
* ``index.html`` (every figure embedded, so the page stands alone) and ``report.json`` with the
  same numbers: cells, label counts, unknown share, uncertainty, threshold, release, gene overlap
  and, when true labels are given, accuracy and a confusion table.

Reference cells, prototypes and the reference's condition embeddings come from the release; without
one only the query is drawn. The UMAP draws at most ``max_reference_cells`` reference cells and
``max_query_cells`` query cells (a seeded random subset; every number is over all cells).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData
from numpy.typing import NDArray

from fedatlas.shared.errors import InputDataError, ReleaseError
from fedatlas.shared.evaluation import plotting
from fedatlas.shared.evaluation.metrics import unknown_auroc
from fedatlas.shared.model.annotations import (
    LABEL_KEY,
    LATENT_KEY,
    PROVENANCE_KEY,
    UNCERTAINTY_KEY,
    UNKNOWN_KEY,
)
from fedatlas.shared.model.label_transfer import DEFAULT_UNKNOWN_THRESHOLD, UNKNOWN
from fedatlas.shared.model.prototypes import PrototypeSet
from fedatlas.shared.model.release import CLUSTER_LEVEL, Release

log = logging.getLogger(__name__)

MAX_REFERENCE_CELLS = 5_000
MAX_QUERY_CELLS = 20_000
REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
NOT_MAPPED = "not a fedatlas map output, run `fedatlas site map` first"
PCA_COLOURS = {"the reference": "0.55", "other sites": "tab:blue", "this site": "tab:red"}


@dataclass
class ReportSummary:
    """The numbers of a report (``report.json``) and where its files are."""

    source: str
    n_cells: int
    label_level: str
    label_counts: dict[str, int]  # predicted label (``unknown`` included) -> cells
    n_unknown: int
    unknown_share: float
    mean_uncertainty: float
    median_uncertainty: float
    unknown_threshold: float
    release_id: str  # the release or composite the cells were mapped onto
    adaptor_id: str
    preset: str
    transfer_method: str
    gene_overlap: dict[str, Any]
    reference: dict[str, Any] | None  # the release drawn (cells, prototypes), if one was given
    truth: dict[str, Any] | None  # accuracy and confusion table, if true labels were given
    umap_cells: dict[str, int]  # points of each kind in the UMAP
    figures: dict[str, str] = field(default_factory=dict)  # figure -> file name in out_dir
    notes: list[str] = field(default_factory=list)
    out_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (what ``report.json`` holds)."""
        return asdict(self)


def check_mapped(adata: AnnData, source: str) -> None:
    """Raise InputDataError unless ``adata`` holds a ``fedatlas site map`` result."""
    missing = [f"obsm[{LATENT_KEY!r}]"] if LATENT_KEY not in adata.obsm else []
    missing += [
        f"obs[{k!r}]" for k in (LABEL_KEY, UNCERTAINTY_KEY, UNKNOWN_KEY) if k not in adata.obs
    ]
    missing += [f"uns[{PROVENANCE_KEY!r}]"] if PROVENANCE_KEY not in adata.uns else []
    if missing:
        raise InputDataError(f"{source}: {NOT_MAPPED} (no {', '.join(missing)})")
    if adata.n_obs == 0:
        raise InputDataError(f"{source}: has no cells")


def write_report(
    adata: AnnData,
    out_dir: str | Path,
    release: Release | None = None,
    *,
    label_key: str | None = None,
    source: str = "data",
    seed: int = 0,
    max_reference_cells: int = MAX_REFERENCE_CELLS,
    max_query_cells: int = MAX_QUERY_CELLS,
) -> ReportSummary:
    """Write the report of the mapped cells ``adata`` into ``out_dir`` (see the module docstring).

    ``release`` (the release or a composite of the one the cells were mapped onto) adds the
    reference cells, prototypes and condition embeddings; ``label_key`` names an obs column of
    true labels. Raises InputDataError / ReleaseError on unusable input.
    """
    check_mapped(adata, source)
    info = _plain(dict(adata.uns[PROVENANCE_KEY]))
    latent = np.asarray(adata.obsm[LATENT_KEY], dtype=np.float32)
    called = adata.obs[LABEL_KEY].astype(str).to_numpy(dtype=object)
    uncertainty = adata.obs[UNCERTAINTY_KEY].to_numpy(dtype=np.float32)
    unknown = adata.obs[UNKNOWN_KEY].to_numpy(dtype=bool)
    level = (info.get("label_levels") or ["label"])[0]
    earlier = info.get("unknown_threshold", DEFAULT_UNKNOWN_THRESHOLD)  # maps before per level
    threshold = float(info.get("unknown_thresholds", {}).get(level, earlier))
    notes: list[str] = []
    ref_latent, prototypes, reference_info = _reference_view(
        release, info, level, latent.shape[1], source, seed, max_reference_cells, notes
    )
    truth = None
    if label_key is not None:
        truth = _truth_scores(adata, label_key, called, uncertainty, prototypes, source)
    query_rows = _subsample(len(latent), max_query_cells, seed + 1)
    if len(query_rows) < len(latent):
        notes.append(
            f"The UMAPs draw a random {len(query_rows):,} of the {len(latent):,} query cells; "
            "every number is over all cells."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proto_means = (
        np.zeros((0, latent.shape[1]), np.float32)
        if prototypes is None
        else prototypes.means.astype(np.float32)
    )
    proto_labels = [] if prototypes is None else list(prototypes.labels)

    parts = [ref_latent, latent[query_rows], proto_means]
    log.info(
        "report: UMAP of %d reference cells, %d query cells and %d prototypes ...",
        len(ref_latent), len(query_rows), len(proto_means),
    )  # fmt: skip
    started = time.perf_counter()
    coords = plotting.umap_2d(np.vstack(parts), seed=seed)
    log.info("report: UMAP done in %.1fs", time.perf_counter() - started)
    ref_xy, query_xy, proto_xy = np.split(coords, np.cumsum([len(p) for p in parts])[:-1])

    n_cells = int(adata.n_obs)
    figures = {
        "umap_labels": plotting.plot_label_umap(
            out / "umap_labels.png",
            reference_xy=ref_xy,
            query_xy=query_xy,
            query_labels=called[query_rows],
            prototype_xy=proto_xy,
            prototype_labels=proto_labels,
            title=f"{len(query_rows):,} mapped cells by predicted {level}",
        ),
        "umap_uncertainty": plotting.plot_uncertainty_umap(
            out / "umap_uncertainty.png",
            reference_xy=ref_xy,
            query_xy=query_xy,
            uncertainty=uncertainty[query_rows],
            threshold=threshold,
            prototype_xy=proto_xy,
            prototype_labels=proto_labels,
            title=f"uncertainty of the predicted {level}",
        ),
        "uncertainty_histogram": plotting.plot_uncertainty_histogram(
            out / "uncertainty_histogram.png",
            uncertainty,
            threshold,
            title=f"uncertainty of the predicted {level}, {n_cells:,} cells",
        ),
    }
    pca = _condition_pca(release, info, out / "condition_pca.png", notes)
    if pca is not None:
        figures["condition_pca"] = pca

    counts = dict(sorted(_counts(called).items(), key=lambda kv: (-kv[1], kv[0])))
    summary = ReportSummary(
        source=source,
        n_cells=n_cells,
        label_level=level,
        label_counts=counts,
        n_unknown=int(unknown.sum()),
        unknown_share=float(unknown.mean()),
        mean_uncertainty=float(uncertainty.mean()),
        median_uncertainty=float(np.median(uncertainty)),
        unknown_threshold=threshold,
        release_id=str(info.get("release_id", "")),
        adaptor_id=str(info.get("adaptor_id", "")),
        preset=str(info.get("preset", "")),
        transfer_method=str(info.get("transfer_method", "")),
        gene_overlap=dict(info.get("gene_overlap", {})),
        reference=reference_info,
        truth=truth,
        umap_cells={
            "reference": len(ref_latent),
            "query": len(query_rows),
            "prototypes": len(proto_means),
        },
        figures={name: path.name for name, path in figures.items()},
        notes=notes,
        out_dir=str(out),
    )
    (out / REPORT_JSON).write_text(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
    (out / INDEX_HTML).write_text(_html(summary, out))
    return summary


# ------------------------------------------------------------------------------- inputs
def _plain(value: Any) -> Any:
    """``uns`` content as plain Python (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _reference_view(
    release: Release | None,
    info: dict[str, Any],
    level: str,
    dim: int,
    source: str,
    seed: int,
    max_cells: int,
    notes: list[str],
) -> tuple[NDArray[np.float32], PrototypeSet | None, dict[str, Any] | None]:
    """What the report draws of the release: reference latents (at most ``max_cells``, a seeded
    random subset), the prototypes of ``level`` and a description; notes say what is missing."""
    if release is None:
        notes.append(
            "No reference release given: only the query cells are drawn, without reference "
            "cells, prototypes or condition embeddings."
        )
        return np.zeros((0, dim), dtype=np.float32), None, None
    _check_release(release, info, dim, source)
    prototypes = _level_prototypes(release, level)
    kept = release.reference_latents()
    n_ref = 0 if kept is None else len(kept[0])
    if kept is None:
        notes.append("The release keeps no reference cells: the UMAP shows no grey cells.")
        ref_latent = np.zeros((0, dim), dtype=np.float32)
    else:
        ref_latent = kept[0][_subsample(n_ref, max_cells, seed)]
        if n_ref > max_cells:
            notes.append(
                f"The UMAP draws a random {max_cells:,} of the release's {n_ref:,} reference cells."
            )
    described = {
        "release_id": release.content_hash,
        "kind": release.content.get("kind", "release"),
        "n_reference_cells": n_ref,
        "n_prototypes": 0 if prototypes is None else len(prototypes),
    }
    return ref_latent, prototypes, described


def _check_release(release: Release, info: dict[str, Any], dim: int, source: str) -> None:
    """Refuse a release whose network is not the one the cells were mapped with."""
    latent_dim = release.model_config.latent_dim
    mapped_trunk = info.get("trunk_id")
    if latent_dim != dim or (mapped_trunk is not None and mapped_trunk != release.trunk_id):
        raise ReleaseError(
            f"--reference {release.short_id} is not the network {source} was mapped with "
            f"(release {info.get('release_id', '?')}); give that release or one of its composites"
        )


def _level_prototypes(release: Release, level: str) -> PrototypeSet | None:
    """The release's prototypes of the label level the mapping reported first."""
    if level in release.label_levels:
        return release.prototypes(level)
    return release.unlabeled_prototypes() if level == CLUSTER_LEVEL else None


def _subsample(n: int, limit: int, seed: int) -> NDArray[np.int64]:
    """Sorted indices of a seeded random subset of at most ``limit`` of ``n`` items."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _counts(values: NDArray[np.object_]) -> dict[str, int]:
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return {str(k): int(v) for k, v in zip(names, counts, strict=True)}


# ------------------------------------------------------------------------------- figures
def _condition_pca(
    release: Release | None, info: dict[str, Any], path: Path, notes: list[str]
) -> Path | None:
    """PCA of the release's condition embeddings and the site's own rows (from the map output);
    None with a note when there is nothing to draw."""
    if release is None:
        return None  # the note on the missing reference says it
    embedded = release.condition_embeddings()
    if embedded is None:
        notes.append(
            f"No PCA of condition embeddings: the {info.get('preset') or '?'} preset learns "
            "none (only the embedding condition mechanism, e.g. the scpoli preset, does)."
        )
        return None
    # The builder's conditions come first in the table; composites append the sites' after them.
    table = release.content["conditions"]
    builder = {c["name"] for c in table if c.get("origin") == table[0].get("origin")}
    rows = dict(zip(embedded[0], embedded[1], strict=True))
    site = info.get("condition_embeddings")
    site_names: list[str] = []
    if site is None:
        notes.append(
            "The map output holds no condition embeddings of its own (written by an older "
            "fedatlas): the PCA shows the release's conditions only."
        )
    else:
        site_names = [str(n) for n in site["names"]]
        rows.update(zip(site_names, np.asarray(site["values"], np.float32), strict=True))
    names = list(rows)
    if len(names) < 2:
        notes.append("No PCA of condition embeddings: fewer than two conditions.")
        return None
    groups = [
        "this site" if n in site_names else ("the reference" if n in builder else "other sites")
        for n in names
    ]
    return plotting.plot_condition_pca(
        path,
        names,
        np.stack([rows[n] for n in names]),
        groups,
        PCA_COLOURS,
        title="learnt condition (sample) embeddings, PCA",
    )


# ------------------------------------------------------------------------------- truth
def _truth_scores(
    adata: AnnData,
    label_key: str,
    called: NDArray[np.object_],
    uncertainty: NDArray[np.float32],
    prototypes: PrototypeSet | None,
    source: str,
) -> dict[str, Any]:
    """Accuracy against the true labels in ``obs[label_key]`` and the confusion table.

    A cell's type counts as known when the release's prototype catalogue has it (or, without a
    release, when some cell was predicted as it). Known types must be called by their label
    (unknown counts as an error); for the others the right call is unknown.
    """
    if label_key not in adata.obs:
        raise InputDataError(
            f"{source}: --label-key {label_key!r} is not an obs column (columns: "
            f"{', '.join(map(str, adata.obs.columns))})"
        )
    column = adata.obs[label_key]
    labelled = column.notna().to_numpy() & (column.astype(str).to_numpy() != "")
    if not labelled.any():
        raise InputDataError(f"{source}: obs[{label_key!r}] has no labelled cell")
    truth = column.astype(str).to_numpy(dtype=object)[labelled]
    predicted = called[labelled]
    known_types = set(predicted.tolist()) - {UNKNOWN}
    if prototypes is not None:
        known_types |= set(prototypes.labels)
    seen = np.isin(truth, sorted(known_types))
    correct = np.where(seen, predicted == truth, predicted == UNKNOWN)
    confusion: dict[str, dict[str, int]] = {}
    for t, p in zip(truth.tolist(), predicted.tolist(), strict=True):
        confusion.setdefault(t, {}).setdefault(p, 0)
        confusion[t][p] += 1
    scores: dict[str, Any] = {
        "label_key": label_key,
        "n_labelled": int(labelled.sum()),
        "n_known_type_cells": int(seen.sum()),
        "n_unseen_type_cells": int((~seen).sum()),
        "unseen_types": sorted(set(truth[~seen].tolist())),
        "accuracy": float(np.mean(predicted[seen] == truth[seen])) if seen.any() else None,
        "known_types_called_unknown": float(np.mean(predicted[seen] == UNKNOWN))
        if seen.any()
        else None,
        "unseen_called_unknown": float(np.mean(predicted[~seen] == UNKNOWN))
        if (~seen).any()
        else None,
        "correct_calls": float(correct.mean()),
        "unknown_auroc": unknown_auroc(uncertainty[labelled], ~seen)
        if seen.any() and (~seen).any()
        else None,
        "confusion": {t: dict(sorted(row.items())) for t, row in sorted(confusion.items())},
    }
    return scores


# ------------------------------------------------------------------------------- page
FIGURE_TEXT = {
    "umap_labels": (
        "Map of the predicted labels",
        "One UMAP of the reference cells (grey), this site's cells coloured by predicted label "
        "and the label prototypes (stars), computed together so that they share coordinates. "
        "Black crosses are cells called unknown: no reference type explains them well.",
    ),
    "umap_uncertainty": (
        "Map of the uncertainty",
        "The same map, cells coloured by the uncertainty of their label (0 = confident, "
        "1 = no support); red circles mark cells above the unknown threshold.",
    ),
    "uncertainty_histogram": (
        "Uncertainty distribution",
        "How many cells have each uncertainty; red bars are above the unknown threshold "
        "(dashed line) and are called unknown.",
    ),
    "condition_pca": (
        "Condition (sample) embeddings",
        "PCA of the learnt condition embeddings: one point per batch or sample, from the "
        "reference and this site. Samples close together were treated as alike by the model.",
    ),
}


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs
    )


def _overview(s: ReportSummary) -> list[tuple[str, str]]:
    overlap = s.gene_overlap
    pairs = [
        ("cells", f"{s.n_cells:,}"),
        ("label level", s.label_level),
        ("called unknown", f"{s.n_unknown:,} ({s.unknown_share:.1%})"),
        ("mean uncertainty", f"{s.mean_uncertainty:.3f} (median {s.median_uncertainty:.3f})"),
        ("unknown threshold", f"uncertainty > {s.unknown_threshold:g}"),
        ("mapped onto release", s.release_id),
        ("adaptor", s.adaptor_id or "none (every batch was known to the release)"),
        ("model preset / transfer", f"{s.preset} / {s.transfer_method}"),
    ]
    if overlap:
        pairs.append(
            (
                "gene overlap",
                f"{overlap.get('n_found', 0):,} of {overlap.get('n_release_genes', 0):,} release "
                f"genes ({overlap.get('overlap', 0.0):.1%}); {overlap.get('n_missing', 0):,} "
                "zero-filled",
            )
        )
    if s.reference is not None:
        pairs.append(
            (
                "reference drawn",
                f"{s.reference['kind']} {s.reference['release_id']}: "
                f"{s.reference['n_reference_cells']:,} cells, "
                f"{s.reference['n_prototypes']} prototypes",
            )
        )
    return pairs


def _truth_html(truth: dict[str, Any]) -> str:
    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    pairs = [
        ("true labels", f"obs['{truth['label_key']}'], {truth['n_labelled']:,} labelled cells"),
        ("accuracy (types the reference knows)", share(truth["accuracy"])),
        ("known types called unknown", share(truth["known_types_called_unknown"])),
        ("types the reference lacks", ", ".join(truth["unseen_types"]) or "none"),
        ("their cells called unknown", share(truth["unseen_called_unknown"])),
        ("correct calls (all labelled cells)", share(truth["correct_calls"])),
        (
            "unknown AUROC",
            "n/a" if truth["unknown_auroc"] is None else f"{truth['unknown_auroc']:.3f}",
        ),
    ]
    confusion: dict[str, dict[str, int]] = truth["confusion"]
    columns = sorted({p for row in confusion.values() for p in row})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(
        f"<tr><th>{html.escape(t)}</th>"
        + "".join(
            ("<td class='hit'>" if p == t else "<td>") + f"{row.get(p, 0) or ''}</td>"
            for p in columns
        )
        + "</tr>"
        for t, row in confusion.items()
    )
    return (
        f"<h2>Against the true labels</h2>\n<table>{_rows(pairs)}</table>\n"
        "<h3>Confusion table (rows: true label, columns: predicted)</h3>\n"
        f"<table class='confusion'><tr><th></th>{head}</tr>\n{body}</table>"
    )


def _html(s: ReportSummary, out: Path) -> str:
    """The report page, every figure embedded as a data URI."""
    counts = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:,}</td><td>{v / s.n_cells:.1%}</td></tr>"
        for k, v in s.label_counts.items()
    )
    figures = []
    for name, file in s.figures.items():
        heading, text = FIGURE_TEXT[name]
        data = base64.b64encode((out / file).read_bytes()).decode("ascii")
        figures.append(
            f"<h2>{heading}</h2>\n<p>{html.escape(text)}</p>\n"
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(heading)}">'
            f"<figcaption>{html.escape(file)}</figcaption></figure>"
        )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in s.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fedatlas mapping report: {html.escape(Path(s.source).name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td {{ font-variant-numeric: tabular-nums; }}
table.confusion td {{ text-align: right; }}
td.hit {{ background: #d8f0d8; font-weight: bold; }}
img {{ max-width: 100%; }}
figcaption {{ color: #666; font-size: 0.85em; }}
</style></head><body>
<h1>fedatlas mapping report</h1>
<p>{html.escape(s.source)}</p>
<table>{_rows(_overview(s))}</table>
<h2>Predicted labels ({html.escape(s.label_level)})</h2>
<table><tr><th>label</th><th>cells</th><th>share</th></tr>
{counts}</table>
{_truth_html(s.truth) if s.truth else ""}
{"".join(figures)}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p><small>Numbers also in report.json.</small></p>
</body></html>
"""
