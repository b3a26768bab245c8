"""Maximum mean discrepancy between conditions (trVAE), on the latent or first decoder layer."""

from __future__ import annotations

import torch
from torch import Tensor

# Bandwidths of trVAE's multi-scale RBF kernel: k(x, y) = sum_a exp(-|x - y|^2 / (2 a)).
KERNEL_BANDWIDTHS = (
    1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
    1e3, 1e4, 1e5, 1e6,
)  # fmt: skip


def rbf_mmd(a: Tensor, b: Tensor) -> Tensor:
    """Biased MMD^2 estimate between samples ``a`` and ``b`` with the multi-scale RBF kernel."""
    joint = torch.cat([a, b], dim=0)
    sq = torch.cdist(joint, joint).pow(2)
    kernel = torch.zeros_like(sq)
    for bw in KERNEL_BANDWIDTHS:  # one n x n term at a time: memory stays O(n^2), not O(19 n^2)
        kernel += torch.exp(sq * (-1.0 / (2.0 * bw)))
    n = a.shape[0]
    k_aa, k_bb, k_ab = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return k_aa.mean() + k_bb.mean() - 2 * k_ab.mean()


def mmd_across_conditions(h: Tensor, condition: Tensor, min_cells: int = 2) -> Tensor:
    """Sum of MMD^2 over all pairs of conditions present in a minibatch with at least
    ``min_cells`` cells each (0 when fewer than two conditions qualify)."""
    groups = [h[condition == c] for c in torch.unique(condition).tolist()]
    groups = [g for g in groups if g.shape[0] >= min_cells]
    total = h.new_zeros(())
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            total = total + rbf_mmd(groups[i], groups[j])
    return total
