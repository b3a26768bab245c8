"""Writing mapping results into a site's AnnData under fedatlas' keys (DESIGN §7)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from fedatlas.shared.label_transfer import UNKNOWN
from fedatlas.shared.mapping import MappingResult

LATENT_KEY = "X_fedatlas"
LABEL_KEY = "fedatlas_label"
UNCERTAINTY_KEY = "fedatlas_uncertainty"
UNKNOWN_KEY = "fedatlas_unknown"
PROVENANCE_KEY = "fedatlas"


def annotate(adata: ad.AnnData, result: MappingResult) -> None:
    """Add the latent embedding, labels, uncertainty, unknown calls and provenance to ``adata``.

    The primary label level goes to ``obs['fedatlas_label']``, ``obs['fedatlas_uncertainty']``
    and ``obs['fedatlas_unknown']``; further levels get the same columns suffixed with
    ``_<level>``. Cells keep their order; nothing else in ``adata`` changes.
    """
    if adata.n_obs != result.latent.shape[0]:
        raise ValueError("result and AnnData have different numbers of cells")
    adata.obsm[LATENT_KEY] = result.latent.astype(np.float32)
    for i, (level, transfer) in enumerate(result.transfers.items()):
        suffix = "" if i == 0 else f"_{level}"
        called = transfer.called
        categories = [*sorted({str(v) for v in called} - {UNKNOWN}), UNKNOWN]
        adata.obs[LABEL_KEY + suffix] = pd.Categorical(called.astype(str), categories=categories)
        adata.obs[UNCERTAINTY_KEY + suffix] = transfer.uncertainty.astype(np.float32)
        adata.obs[UNKNOWN_KEY + suffix] = transfer.unknown.astype(bool)
    adata.uns[PROVENANCE_KEY] = result.provenance()
