"""Pictures of a mapping: the joint reference + query embedding (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedatlas.shared.label_transfer import UNKNOWN


def umap_2d(latent: NDArray[np.float32], seed: int = 0) -> NDArray[np.float32]:
    """Two-dimensional UMAP of latent positions (15 neighbours, min_dist 0.3)."""
    import umap

    n_neighbors = max(2, min(15, latent.shape[0] - 1))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.3, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(latent), dtype=np.float32)


def _palette(names: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20" if len(names) > 10 else "tab10"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = umap_2d(np.vstack([reference_latent, query_latent]), seed=seed)
    ref_xy, query_xy = coords[: len(reference_latent)], coords[len(reference_latent) :]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), constrained_layout=True)
    size = max(2.0, min(18.0, 6000.0 / len(coords)))

    left.scatter(ref_xy[:, 0], ref_xy[:, 1], s=size, c="0.82", label="reference", linewidths=0)
    labels = np.asarray(query_labels, dtype=str)
    known_names = sorted(set(labels) - {UNKNOWN})
    colours = _palette(known_names)
    for name in known_names:
        rows = labels == name
        left.scatter(*query_xy[rows].T, s=size, color=colours[name], label=name, linewidths=0)
    unknown = labels == UNKNOWN
    if unknown.any():
        left.scatter(
            *query_xy[unknown].T,
            s=size * 2,
            c="black",
            marker="x",
            linewidths=0.8,
            label=f"{UNKNOWN} ({int(unknown.sum())})",
        )
    left.set_title("query cells by predicted label (reference in grey)")

    groups = np.concatenate([np.asarray(reference_groups, str), np.asarray(query_groups, str)])
    group_names = list(dict.fromkeys(groups.tolist()))
    group_colours = _palette(group_names)
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
