"""The public Python API: AnnData in, AnnData out, keys as arguments (scanpy's conventions).

::

    import fedatlas

    release = fedatlas.build_reference(reference, batch_key="batch", label_key="cell_type")
    release.save("release")
    mapped = fedatlas.map_cells(query, fedatlas.Release.load("release"), batch_key="batch")
    mapped.obs["fedatlas_label"], mapped.obsm["X_fedatlas"]

``import fedatlas`` gives these names. The command line calls the same code: ``admin reference
build`` calls :func:`build_reference`; ``site map`` maps with the same
:func:`~fedatlas.shared.model.mapping.map_onto` and writes the same entries as
:func:`map_cells` (``obsm['X_fedatlas']``, ``obs['fedatlas_label']``,
``obs['fedatlas_uncertainty']``, ``obs['fedatlas_unknown']``, ``uns['fedatlas']``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from anndata import AnnData

from fedatlas.shared.config import DEFAULT_PRESET, TransferMethod
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.data.genes import DEFAULT_MIN_GENE_OVERLAP
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.adaptor import Adaptor, compose
from fedatlas.shared.model.annotations import annotate
from fedatlas.shared.model.mapping import (
    DEFAULT_MIN_PROTOTYPE_CELLS,
    DEFAULT_SITE,
    MappingOptions,
    map_onto,
)
from fedatlas.shared.model.privacy import PrivacySpec
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release

__all__ = ["Adaptor", "Release", "build_reference", "compose", "extract_adaptor", "map_cells"]

LabelKeys = str | Sequence[str] | None


def build_reference(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: LabelKeys = None,
    model: str = DEFAULT_PRESET,
    epochs: int | None = None,
    seed: int = 0,
    n_top_genes: int = 2000,
    layer: str | None = None,
    gene_key: str | None = None,
    model_settings: Mapping[str, Any] | None = None,
    train_settings: Mapping[str, Any] | None = None,
    unknown_threshold: float | None = None,
    keep_reference_latents: bool = True,
    progress: bool = False,
    source: str = "adata",
) -> Release:
    """Train a reference network on the raw counts of ``adata`` and return its release.

    Args:
        adata: cells x genes with raw counts in ``X`` (or ``layers[layer]``).
        batch_key: obs column with each cell's batch; batches become the release's conditions.
        label_key: obs column(s) with cell-type labels, primary level first (None: unlabelled;
            Leiden clusters then serve as prototypes).
        model: preset (``scpoli``, ``scarches`` or ``scalex``).
        epochs: rescale the preset's recipe to this many epochs.
        seed: random seed.
        n_top_genes: highly variable genes selected on ``adata``.
        layer, gene_key: where the raw counts and the gene identifiers are.
        model_settings, train_settings: fields of the model / training configuration to
            replace (see :mod:`fedatlas.shared.config`).
        unknown_threshold: replace the default transfer method's unknown thresholds.
        keep_reference_latents: keep the reference cells' latent positions (kNN transfer).
        progress: show epochs as they pass.
        source: the data's name in error messages (e.g. its file).

    Returns:
        The release (``.save(directory)`` writes it; ``Release.load`` reads it back).
    """
    cells = _cells(adata, source, batch_key, label_key, layer, gene_key)
    return train_reference(
        cells,
        preset=model,
        seed=seed,
        epochs=epochs,
        n_top_genes=n_top_genes,
        model_overrides=model_settings,
        train_overrides=train_settings,
        keep_latents=keep_reference_latents,
        unknown_threshold=unknown_threshold,
        progress=progress,
    ).release


def map_cells(
    adata: AnnData,
    release: Release,
    *,
    batch_key: str,
    label_key: LabelKeys = None,
    site_id: str = DEFAULT_SITE,
    layer: str | None = None,
    gene_key: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    transfer: TransferMethod | None = None,
    unknown_threshold: float | None = None,
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    min_prototype_cells: int = DEFAULT_MIN_PROTOTYPE_CELLS,
    privacy: PrivacySpec | None = None,
    copy: bool = True,
    progress: bool = False,
    source: str = "adata",
) -> AnnData:
    """Map the cells of ``adata`` onto ``release`` by architecture surgery, as ``site map`` does.

    Batches the release already knows (as ``SITE_ID/BATCH``) are only embedded; for the others
    the release's network gets new condition parameters and only those are trained. Labels
    given with ``label_key`` (matched in order to the release's label levels) steer that
    training and give the site's prototypes. The other options are those of ``site map``
    (:class:`~fedatlas.shared.model.mapping.MappingOptions`; ``privacy`` makes the adaptor
    differentially private); ``source`` names the data in error messages.

    Returns:
        ``adata`` (a copy unless ``copy=False``) with ``obsm['X_fedatlas']`` (latent),
        ``obs['fedatlas_label']``, ``obs['fedatlas_uncertainty']`` (0-1),
        ``obs['fedatlas_unknown']`` (further label levels suffixed ``_<level>``) and
        ``uns['fedatlas']`` (release and adaptor ids, gene overlap, trained parameters, ...).
    """
    options = MappingOptions(
        site_id=site_id, epochs=epochs, seed=seed, min_gene_overlap=min_gene_overlap,
        transfer=transfer, unknown_threshold=unknown_threshold,
        min_prototype_cells=min_prototype_cells, privacy=privacy,
    )  # fmt: skip
    cells = _cells(adata, source, batch_key, label_key, layer, gene_key)
    result = map_onto(release, cells, options, source=source, progress=progress)
    out = adata.copy() if copy else adata
    annotate(out, result)
    return out


def extract_adaptor(
    adata: AnnData,
    release: Release,
    *,
    batch_key: str,
    site_id: str,
    label_key: LabelKeys = None,
    layer: str | None = None,
    gene_key: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    min_gene_overlap: float = DEFAULT_MIN_GENE_OVERLAP,
    min_prototype_cells: int = DEFAULT_MIN_PROTOTYPE_CELLS,
    privacy: PrivacySpec | None = None,
    progress: bool = False,
) -> Adaptor:
    """Train the adaptor of ``site_id``'s cells in ``adata`` on ``release`` (their new condition
    rows and the prototypes of their labelled types): what a site sends in its bundle.
    Arguments as for :func:`map_cells`; ``privacy`` (a
    :class:`~fedatlas.shared.model.privacy.PrivacySpec`) makes it differentially private;
    :func:`compose` puts adaptors onto a release, in any
    order to the same composite. ``.save(path)`` / ``Adaptor.load(path)`` write and read it."""
    options = MappingOptions(
        site_id=site_id, epochs=epochs, seed=seed, min_gene_overlap=min_gene_overlap,
        min_prototype_cells=min_prototype_cells, privacy=privacy,
    )  # fmt: skip
    cells = _cells(adata, "adata", batch_key, label_key, layer, gene_key)
    result = map_onto(release, cells, options, source="adata", progress=progress)
    if result.adaptor is None:
        raise ConfigError(
            f"every batch of the data is already a condition of the release (as {site_id}/BATCH)"
            ": there is no adaptor to train; pass another site_id"
        )
    return result.adaptor


def _cells(
    adata: AnnData,
    source: str,
    batch_key: str,
    label_key: LabelKeys,
    layer: str | None,
    gene_key: str | None,
) -> CellTable:
    labels = (label_key,) if isinstance(label_key, str) else tuple(label_key or ())
    return extract_cells(
        adata, source=source, batch_key=batch_key, label_keys=labels, layer=layer,
        gene_key=gene_key,
    )  # fmt: skip
