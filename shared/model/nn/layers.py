"""Building blocks of the conditional VAE: hidden layers and domain-specific batch norm."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedatlas.shared.model.nn.conditions import ConditionTable

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
# Output columns a sparse product computes per pass over the stored entries: their weights
# (genes x 128 float32, 1 MB at 2,000 genes) stay in a core's L2 cache.
SPARSE_BLOCK_COLUMNS = 128


def make_norm(kind: str, width: int) -> nn.Module:
    """Normalisation after a hidden layer: batch norm (affine), layer norm (no affine) or none."""
    if kind == "batch":
        return nn.BatchNorm1d(width, eps=BN_EPS, momentum=BN_MOMENTUM)
    if kind == "layer":
        return nn.LayerNorm(width, elementwise_affine=False)
    return nn.Identity()


class HiddenActivation(nn.Module):
    """Norm -> ReLU -> dropout, applied after a hidden layer's affine map."""

    def __init__(self, width: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm = make_norm(norm, width)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        """Apply the activation stack."""
        return self.dropout(self.act(self.norm(h)))


class HiddenStack(nn.Module):
    """Hidden layers after the first one (the first layer carries the condition term)."""

    def __init__(self, widths: tuple[int, ...], norm: str, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for w_in, w_out in itertools.pairwise(widths):
            layers += [nn.Linear(w_in, w_out), HiddenActivation(w_out, norm, dropout)]
        self.layers = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        """Run the stack."""
        out: Tensor = self.layers(h)
        return out


class DomainSpecificBatchNorm(nn.Module):
    """Batch norm with a separate scale, shift and statistics per condition (SCALEX's DSBN).

    In training mode each condition in the minibatch is normalised with its own minibatch
    statistics and the running statistics of *fresh* (new) conditions are updated; frozen
    conditions' statistics are never written. In eval mode the stored statistics are used.
    """

    def __init__(self, width: int, n_conditions: int) -> None:
        super().__init__()
        self.weight = ConditionTable((width,), n_conditions, init="ones")
        self.bias = ConditionTable((width,), n_conditions, init="zeros")
        self.running_mean = ConditionTable((width,), n_conditions, init="zeros", learnable=False)
        self.running_var = ConditionTable((width,), n_conditions, init="ones", learnable=False)

    def forward(self, h: Tensor, condition: Tensor) -> Tensor:
        """Normalise ``h`` (cells x width) per condition."""
        if not self.training:
            mean = self.running_mean(condition)
            var = self.running_var(condition)
            normed = (h - mean) / torch.sqrt(var + BN_EPS)
        else:
            normed = torch.empty_like(h)
            for c in torch.unique(condition).tolist():
                rows = condition == c
                part = h[rows]
                mean_c = part.mean(dim=0)
                var_c = part.var(dim=0, unbiased=False)
                normed[rows] = (part - mean_c) / torch.sqrt(var_c + BN_EPS)
                self._update_running(int(c), mean_c.detach(), var_c.detach())
        return normed * self.weight(condition) + self.bias(condition)

    def _update_running(self, condition: int, mean: Tensor, var: Tensor) -> None:
        fresh_row = condition - self.running_mean.n_frozen
        if fresh_row < 0:
            return
        with torch.no_grad():
            m = self.running_mean.fresh[fresh_row]
            v = self.running_var.fresh[fresh_row]
            m.mul_(1 - BN_MOMENTUM).add_(mean, alpha=BN_MOMENTUM)
            v.mul_(1 - BN_MOMENTUM).add_(var, alpha=BN_MOMENTUM)


class SparseRows(NamedTuple):
    """Rows of a CSR matrix as tensors: row ``i`` holds ``values[offsets[i]:offsets[i + 1]]`` in
    the columns ``indices[offsets[i]:offsets[i + 1]]``."""

    indices: Tensor
    offsets: Tensor  # rows + 1 entries, same dtype as ``indices``
    values: Tensor


class SparseLinear:
    """A linear layer applied to :class:`SparseRows` without densifying them.

    Each row's output is the sum of the weight columns of its stored entries, scaled by their
    values (``embedding_bag``): work in proportion to the stored entries rather than to all
    columns. Output columns are computed ``SPARSE_BLOCK_COLUMNS`` at a time, so the weights read
    stay in cache. Holds a copy of the layer's weights: build a new one after they change.
    """

    def __init__(self, linear: nn.Linear) -> None:
        columns = linear.weight.detach().t()  # inputs x outputs
        self.blocks = [
            columns[:, start : start + SPARSE_BLOCK_COLUMNS].contiguous()
            for start in range(0, columns.shape[1], SPARSE_BLOCK_COLUMNS)
        ]
        self.bias = linear.bias.detach()

    def __call__(self, x: SparseRows) -> Tensor:
        """``x @ weight.T + bias``."""
        parts = [
            F.embedding_bag(
                x.indices,
                block,
                x.offsets,
                mode="sum",
                per_sample_weights=x.values,
                include_last_offset=True,
            )
            for block in self.blocks
        ]
        return torch.cat(parts, dim=1).add_(self.bias)
