"""Maximum mean discrepancy across conditions (trVAE's penalty on the first decoder layer)."""

from __future__ import annotations

import torch
from torch import Tensor

# Bandwidth multipliers of the multi-scale RBF kernel; each is divided by the feature width so
# the kernel scales stay meaningful for any layer size.
KERNEL_SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)


def rbf_mmd(a: Tensor, b: Tensor) -> Tensor:
    """Biased MMD^2 estimate between samples ``a`` and ``b`` with a multi-scale RBF kernel."""
    width = a.shape[1]
    joint = torch.cat([a, b], dim=0)
    sq = torch.cdist(joint, joint).pow(2)
    kernel = sum(torch.exp(-sq * (s / width)) for s in KERNEL_SCALES)
    assert isinstance(kernel, Tensor)
    n = a.shape[0]
    k_aa, k_bb, k_ab = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return k_aa.mean() + k_bb.mean() - 2 * k_ab.mean()


def mmd_across_conditions(h: Tensor, condition: Tensor, min_cells: int = 2) -> Tensor:
    """Mean pairwise MMD^2 between the conditions present in a minibatch (0 if fewer than two
    conditions have at least ``min_cells`` cells)."""
    groups = [h[condition == c] for c in torch.unique(condition).tolist()]
    groups = [g for g in groups if g.shape[0] >= min_cells]
    if len(groups) < 2:
        return h.new_zeros(())
    total = h.new_zeros(())
    n_pairs = 0
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            total = total + rbf_mmd(groups[i], groups[j])
            n_pairs += 1
    return total / n_pairs
