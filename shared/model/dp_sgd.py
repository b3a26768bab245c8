"""DP-SGD for a site's new condition rows: per-cell gradients, clipped, summed, noised.

Mapping keeps the network in eval mode and trains only the fresh rows of its condition tables,
and every table is read one row per cell
(:class:`~fedatlas.shared.model.nn.conditions.ConditionTable`).
A cell's gradient on the rows is therefore the gradient on its own copy of the rows it looked up:
:func:`per_cell_rows` hands each table such copies for one minibatch, one backward pass of the
summed per-cell losses fills them, and :meth:`DPSGD.step` clips each cell's gradient (over all
tables together) to ``clip``, adds them into the rows they came from, adds Gaussian noise of
standard deviation ``noise_multiplier * clip`` to every fresh row and divides by the nominal
batch size (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1).

Each epoch puts every cell in one minibatch drawn independently of the other cells, so adding
or removing a cell changes one noisy sum per epoch by at most ``clip``: ``epochs`` Gaussian
mechanisms of that sensitivity (accounted in :mod:`fedatlas.shared.model.privacy`). The loss of a
cell depends on no other cell: no MMD across cells, no prototype learnt from the batch (cells
are pulled only towards the release's fixed prototypes), no validation split or early stopping,
and the final state is kept.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedatlas.shared.config import TrainConfig
from fedatlas.shared.model.nn.conditions import ConditionTable
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.privacy import GRADIENT_CLIP

MAX_EPOCHS = 50  # DP mapping trains at most this many epochs (each one costs privacy)


def private_recipe(train: TrainConfig) -> TrainConfig:
    """``train`` as DP-SGD runs it: at most :data:`MAX_EPOCHS` epochs, and nothing that lets
    one cell's loss depend on another's or picks a state by looking at the data."""
    scaled = train.scaled_to(min(train.epochs, MAX_EPOCHS))
    return replace(
        scaled, mmd_weight=0.0, validation_fraction=0.0, early_stopping_patience=None,
        balance_conditions=False, grad_clip=None, drop_last=False,
    )  # fmt: skip


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings of one mapping.

    Attributes:
        noise_multiplier: noise standard deviation in units of ``clip``.
        n_batches: minibatches per epoch (from the site's released noisy cell count).
        batch_size: nominal minibatch size the noisy sums are divided by.
        clip: per-cell gradient norm bound.
    """

    noise_multiplier: float
    n_batches: int
    batch_size: int
    clip: float = GRADIENT_CLIP

    @classmethod
    def for_budget(cls, rho: float, epochs: int, noisy_cells: int, batch_size: int) -> DPSGD:
        """Settings that spend ``rho`` over ``epochs`` epochs (rho = epochs / (2 z^2))."""
        return cls(
            noise_multiplier=math.sqrt(epochs / (2.0 * rho)),
            n_batches=max(1, round(noisy_cells / batch_size)),
            batch_size=batch_size,
        )

    def record(self, rho: float, epochs: int) -> dict[str, Any]:
        """The mechanism's entry in the bundle's privacy record."""
        return {
            "rho": rho, "sigma": self.noise_multiplier * self.clip,
            "noise_multiplier": self.noise_multiplier, "clip": self.clip, "epochs": epochs,
        }  # fmt: skip

    def minibatches(
        self, rows: NDArray[np.int64], rng: np.random.Generator
    ) -> list[NDArray[np.int64]]:
        """One epoch: every cell to one of :attr:`n_batches` minibatches, independently."""
        which = rng.integers(0, self.n_batches, size=rows.size)
        return [rows[which == b] for b in range(self.n_batches) if (which == b).any()]

    def step(
        self,
        losses: Tensor,
        leaves: list[tuple[ConditionTable, Tensor]],
        condition: Tensor,
        generator: torch.Generator,
    ) -> None:
        """Set every fresh row's gradient to the noisy mean of the clipped per-cell gradients
        of ``losses`` (one per cell) on ``leaves`` (from :func:`per_cell_rows`)."""
        grads = torch.autograd.grad(losses.sum(), [rows for _, rows in leaves])
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)
        scale = (self.clip / flat.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
        for (table, _), grad in zip(leaves, grads, strict=True):
            index = condition - table.n_frozen
            clipped = grad * scale.view(-1, *([1] * (grad.dim() - 1)))
            total = torch.zeros_like(table.fresh).index_add_(0, index, clipped)
            noise = torch.randn(table.fresh.shape, generator=generator)
            table.fresh.grad = (total + noise * self.noise_multiplier * self.clip) / self.batch_size


def secure_generators() -> tuple[np.random.Generator, torch.Generator]:
    """Noise sources seeded from the operating system's CSPRNG: DP noise must not be
    reproducible from a mapping's public seed."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return np.random.default_rng(secrets.randbits(128)), generator


@contextmanager
def per_cell_rows(
    model: CondVAE, condition: Tensor
) -> Iterator[list[tuple[ConditionTable, Tensor]]]:
    """While open, every learnable table with fresh rows answers a minibatch of cells with
    ``condition`` by per-cell copies of their rows (leaves whose gradients are per cell)."""
    leaves: list[tuple[ConditionTable, Tensor]] = []
    try:
        for table in model.condition_tables().values():
            if not (table.learnable and table.fresh.shape[0]):
                continue
            index = condition - table.n_frozen
            if bool((index < 0).any()):
                raise ValueError("DP-SGD trains only cells of new conditions")
            rows = table.fresh.detach()[index].clone().requires_grad_(True)
            table.per_cell = rows
            leaves.append((table, rows))
        yield leaves
    finally:
        for table, _ in leaves:
            table.per_cell = None
