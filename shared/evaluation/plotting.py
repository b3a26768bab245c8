"""Pictures of a mapping (PNG): joint reference + query embeddings coloured by label or
uncertainty with the prototypes drawn on them, the uncertainty distribution, and a PCA of the
learnt condition embeddings."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.patheffects as pe
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from numpy.typing import NDArray
from sklearn.neighbors import NearestNeighbors

from fedatlas.shared.model.label_transfer import UNKNOWN

Colour = tuple[float, float, float, float]
REFERENCE_GREY = "0.82"
STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 13,
    "legend.fontsize": 10,
    "figure.dpi": 110,
}


def umap_2d(latent: NDArray[np.float32], seed: int = 0) -> NDArray[np.float32]:
    """Two-dimensional UMAP of latent positions (15 exact neighbours, min_dist 0.3, 200 epochs);
    the same ``seed`` gives the same picture."""
    import umap  # imported when needed: it compiles numba code for seconds on import

    n = latent.shape[0]
    if n < 2:
        return np.zeros((n, 2), dtype=np.float32)
    k = max(2, min(15, n - 1))
    # Exact neighbours from scikit-learn: much faster than UMAP's own search on small data.
    distances, indices = NearestNeighbors(n_neighbors=k).fit(latent).kneighbors(latent)
    reducer = umap.UMAP(
        n_neighbors=k,
        min_dist=0.3,
        n_epochs=200,
        random_state=seed,
        n_jobs=1,
        init="spectral" if n > 4 else "random",  # the spectral start needs a few points
        precomputed_knn=(indices, distances, None),
    )
    with warnings.catch_warnings():  # "no search index: transform() unavailable" (unused)
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        return np.asarray(reducer.fit_transform(latent), dtype=np.float32)


def _columns(xy: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    return xy[:, 0], xy[:, 1]


def _label_palette(names: Sequence[str]) -> dict[str, Colour]:
    """A distinct colour per name (tab10 up to 10 names, then tab20, tab20b and tab20c)."""
    if len(names) <= 10:
        tab10 = mpl.colormaps["tab10"]
        return {name: tab10(i) for i, name in enumerate(names)}
    maps = [mpl.colormaps[m] for m in ("tab20", "tab20b", "tab20c")]
    return {name: maps[(i // 20) % 3](i % 20) for i, name in enumerate(names)}


def _marker_size(n_points: int) -> float:
    """Scatter marker area that keeps a few hundred or many thousand cells readable."""
    return max(2.0, min(18.0, 6000.0 / max(n_points, 1)))


def _scatter_labels(
    ax: Axes,
    xy: NDArray[np.float32],
    labels: NDArray[np.object_],
    colours: dict[str, Colour],
    size: float,
) -> None:
    """Cells coloured by label, cells called unknown as black crosses; legend entries carry
    the number of cells."""
    labels = np.asarray(labels, dtype=str)
    for name in sorted(set(labels) - {UNKNOWN}):
        rows = labels == name
        ax.scatter(
            *_columns(xy[rows]),
            s=size,
            color=colours[name],
            label=f"{name} ({int(rows.sum())})",
            linewidths=0,
        )
    unknown = labels == UNKNOWN
    if unknown.any():
        ax.scatter(
            *_columns(xy[unknown]),
            s=size * 2,
            c="black",
            marker="x",
            linewidths=0.8,
            label=f"{UNKNOWN} ({int(unknown.sum())})",
        )


def _draw_prototypes(
    ax: Axes, xy: NDArray[np.float32], labels: Sequence[str], colours: dict[str, Colour] | None
) -> None:
    """Prototypes as large outlined stars with their label written beside them (white stars
    when ``colours`` is None)."""
    for (x, y), name in zip(xy, labels, strict=True):
        ax.scatter(
            x,
            y,
            s=260,
            marker="*",
            color=colours[name] if colours else "white",
            edgecolors="black",
            linewidths=1.0,
            zorder=5,
        )
        ax.annotate(
            name,
            (x, y),
            xytext=(7, 7),
            textcoords="offset points",
            fontsize=10,
            fontweight="bold",
            zorder=6,
            path_effects=[pe.withStroke(linewidth=3, foreground="white")],
        )
    if len(labels):
        ax.scatter([], [], s=120, marker="*", color="white", edgecolors="black", label="prototype")


@contextmanager
def _figure(path: str | Path, figsize: tuple[float, float]) -> Iterator[tuple[Figure, Axes]]:
    """A one-panel figure in fedatlas' style, saved to ``path`` as PNG on leaving."""
    mpl.use("Agg")

    with mpl.style.context(STYLE):
        fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
        try:
            yield fig, ax
            out = Path(path)
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out)
        finally:
            plt.close(fig)


def _legend(ax: Axes, **kwargs: Any) -> None:
    """A legend whose point markers are at least a readable size, however small the points."""
    for handle in ax.legend(**kwargs).legend_handles:
        if isinstance(handle, PathCollection):
            handle.set_sizes([max(40.0, float(handle.get_sizes()[0]))])


def _umap_axes(ax: Axes, reference_xy: NDArray[np.float32], size: float) -> None:
    """Reference cells in grey under everything else, and UMAP axis labels without ticks."""
    if len(reference_xy):
        ax.scatter(
            *_columns(reference_xy),
            s=size,
            c=REFERENCE_GREY,
            linewidths=0,
            label=f"reference cells ({len(reference_xy)})",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")


def plot_label_umap(
    path: str | Path,
    *,
    reference_xy: NDArray[np.float32],
    query_xy: NDArray[np.float32],
    query_labels: NDArray[np.object_],
    prototype_xy: NDArray[np.float32],
    prototype_labels: Sequence[str],
    title: str,
) -> Path:
    """Joint UMAP: reference in grey, query cells by predicted label (unknown: black crosses),
    prototypes as stars in their label's colour."""
    names = sorted((set(np.asarray(query_labels, str)) | set(prototype_labels)) - {UNKNOWN})
    colours = _label_palette(names)
    size = _marker_size(len(reference_xy) + len(query_xy))
    with _figure(path, (10.5, 7.5)) as (_, ax):
        _umap_axes(ax, reference_xy, size)
        _scatter_labels(ax, query_xy, query_labels, colours, size * 2)
        _draw_prototypes(ax, prototype_xy, prototype_labels, colours)
        _legend(
            ax,
            title="cells (number)",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            ncols=1 + len(names) // 25,
        )
        ax.set_title(title)
    return Path(path)


def plot_uncertainty_umap(
    path: str | Path,
    *,
    reference_xy: NDArray[np.float32],
    query_xy: NDArray[np.float32],
    uncertainty: NDArray[np.float32],
    threshold: float,
    prototype_xy: NDArray[np.float32],
    prototype_labels: Sequence[str],
    title: str,
) -> Path:
    """Joint UMAP: query cells coloured by uncertainty (colour bar with the threshold marked),
    cells called unknown circled in red, prototypes as white stars."""
    size = _marker_size(len(reference_xy) + len(query_xy))
    order = np.argsort(uncertainty, kind="stable")  # the most uncertain cells on top
    unknown = uncertainty > threshold
    with _figure(path, (10.0, 7.5)) as (fig, ax):
        _umap_axes(ax, reference_xy, size)
        points = ax.scatter(
            *_columns(query_xy[order]),
            s=size * 2,
            c=uncertainty[order],
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            linewidths=0,
        )
        if unknown.any():
            ax.scatter(
                *_columns(query_xy[unknown]),
                s=size * 5,
                facecolors="none",
                edgecolors="red",
                linewidths=0.8,
                label=f"called unknown (uncertainty > {threshold:g}): {int(unknown.sum())} cells",
            )
        _draw_prototypes(ax, prototype_xy, prototype_labels, None)
        bar = fig.colorbar(points, ax=ax, shrink=0.8)
        bar.set_label("uncertainty (0 = confident, 1 = no support)")
        bar.ax.axhline(threshold, color="red", linewidth=2)
        bar.ax.text(
            -0.6,
            threshold,
            f"unknown\n> {threshold:g}",
            color="red",
            ha="right",
            va="center",
            transform=bar.ax.get_yaxis_transform(),
            fontsize=9,
        )
        _legend(ax, loc="upper left", bbox_to_anchor=(0.0, -0.02), frameon=False, ncols=3)
        ax.set_title(title)
    return Path(path)


def plot_uncertainty_histogram(
    path: str | Path, uncertainty: NDArray[np.float32], threshold: float, title: str
) -> Path:
    """Histogram of the uncertainty of every cell, bars above ``threshold`` (unknown) in red and
    the threshold drawn as a dashed line."""
    bins = np.linspace(0.0, 1.0, 41).tolist()
    unknown = uncertainty > threshold
    with _figure(path, (9.0, 5.5)) as (_, ax):
        ax.hist(
            [uncertainty[~unknown], uncertainty[unknown]],
            bins=bins,
            stacked=True,
            color=["tab:blue", "tab:red"],
            label=[
                f"given a label: {int((~unknown).sum())} cells",
                f"called unknown: {int(unknown.sum())} cells ({unknown.mean():.1%})",
            ],
        )
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.5,
            label=f"unknown threshold = {threshold:g}",
        )
        ax.axvline(
            float(uncertainty.mean()),
            color="0.4",
            linestyle=":",
            linewidth=1.5,
            label=f"mean uncertainty = {uncertainty.mean():.3f}",
        )
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("uncertainty of the predicted label (0 = confident, 1 = no support)")
        ax.set_ylabel("number of cells")
        ax.legend(loc="upper center", framealpha=0.95)
        ax.set_title(title)
    return Path(path)


def plot_condition_pca(
    path: str | Path,
    names: Sequence[str],
    embeddings: NDArray[np.float32],
    groups: Sequence[str],
    colours: Mapping[str, str],
    title: str,
) -> Path:
    """First two principal components of condition (sample) embeddings, one named point per
    condition coloured by its group (e.g. reference / other sites / this site) in ``colours``."""
    centred = np.asarray(embeddings, dtype=np.float64) - embeddings.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    pcs = np.zeros((len(names), 2))
    n_pc = min(2, s.size)
    pcs[:, :n_pc] = u[:, :n_pc] * s[:n_pc]
    explained = s**2 / max(float((s**2).sum()), 1e-30)
    with _figure(path, (9.0, 7.0)) as (_, ax):
        for group in dict.fromkeys(groups):
            rows = np.asarray(groups) == group
            ax.scatter(
                *_columns(pcs[rows]),
                s=90,
                color=colours[group],
                edgecolors="black",
                linewidths=0.6,
                label=f"{group} ({int(rows.sum())})",
            )
        for i, ((x, y), name) in enumerate(zip(pcs, names, strict=True)):
            ax.annotate(
                name,
                (x, y),
                xytext=(6, 5 if i % 2 else -12),  # alternate above/below: fewer collisions
                textcoords="offset points",
                fontsize=9,
                path_effects=[pe.withStroke(linewidth=3, foreground="white")],
            )
        shares = [*explained[:2].tolist(), 0.0, 0.0]
        ax.set_xlabel(f"PC 1 ({shares[0]:.0%} of variance)")
        ax.set_ylabel(f"PC 2 ({shares[1]:.0%} of variance)")
        _legend(ax, title="conditions of", loc="best", framealpha=0.95)
        ax.set_title(title)
    return Path(path)


def plot_joint_embedding(
    path: str | Path,
    *,
    reference_latent: NDArray[np.float32],
    query_latent: NDArray[np.float32],
    query_labels: NDArray[np.object_],
    query_groups: NDArray[np.object_],
    reference_groups: NDArray[np.object_],
    title: str,
    seed: int = 0,
) -> Path:
    """Write a two-panel PNG of the joint UMAP.

    Left: reference cells in grey, query cells coloured by predicted label, cells called unknown
    as black crosses. Right: every cell coloured by where it comes from (reference batch or query
    site), showing how well sources mix.
    """
    mpl.use("Agg")

    coords = umap_2d(np.vstack([reference_latent, query_latent]), seed=seed)
    ref_xy, query_xy = coords[: len(reference_latent)], coords[len(reference_latent) :]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    size = _marker_size(len(coords))

    left.scatter(*_columns(ref_xy), s=size, c=REFERENCE_GREY, label="reference", linewidths=0)
    colours = _label_palette(sorted(set(np.asarray(query_labels, str)) - {UNKNOWN}))
    _scatter_labels(left, query_xy, query_labels, colours, size)
    left.set_title("query cells by predicted label (reference in grey)")

    groups = np.concatenate([np.asarray(reference_groups, str), np.asarray(query_groups, str)])
    group_names = list(dict.fromkeys(groups.tolist()))
    group_colours = _label_palette(group_names)
    order = np.random.default_rng(seed).permutation(len(coords))  # no source paints over another
    right.scatter(
        coords[order, 0],
        coords[order, 1],
        s=size,
        c=[group_colours[g] for g in groups[order]],
        linewidths=0,
    )
    for name in group_names:
        right.scatter([], [], s=20, color=group_colours[name], label=name)
    right.set_title("all cells by source (reference batches and query sites)")
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.legend(loc="best", fontsize=8, markerscale=2, frameon=False)
    fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
