"""The training plan: minibatches, the loss, the epoch loop, and passes over all cells.

One loop serves both jobs. ``mode="reference"`` trains the whole network (train mode: dropout
and batch statistics on). ``mode="mapping"`` keeps the network in eval mode, so dropout is off and
no running statistic moves, and only the fresh condition rows reach the optimiser; what the frozen
network computes for every cell alone (its encoding, the likelihood's fixed terms) is cached
once and reused across epochs (:class:`FrozenCache`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from fedatlas.shared.config import PreprocessingRecipe, TrainConfig
from fedatlas.shared.data.preprocessing import (
    input_values,
    library_sizes,
    maxabs_scales,
    model_input,
)
from fedatlas.shared.model.dp_sgd import DPSGD, per_cell_rows, secure_generators
from fedatlas.shared.model.nn.layers import SparseRows
from fedatlas.shared.model.nn.likelihoods import NonZero
from fedatlas.shared.model.nn.mmd import mmd_across_conditions
from fedatlas.shared.model.nn.vae import CondVAE, DecoderOutput
from fedatlas.shared.model.privacy import clip_rows, noisy_mean, noisy_variance
from fedatlas.shared.progress import Progress

Mode = Literal["reference", "mapping"]
Penalty = Callable[[], Tensor]  # an extra loss term, recomputed at every optimiser step
CHUNK_CELLS = 4096
# Validation chunks are smaller: the MMD term builds cells x cells kernels (64 MB per term at
# 4,096 cells, 4 MB at 1,024).
VALIDATION_CHUNK_CELLS = 1024
# Fixed likelihood terms are computed on every non-zero count, about 40 bytes each (int64
# coordinates, Gamma-function temporaries): 1,024 cells with 1,000 non-zeros each take 40 MB.
FIXED_TERMS_CHUNK_CELLS = 1024
# Intra-op threads while training. Minibatches of 64-128 cells are too small to share across
# cores: on two cores one thread trained 1.2-1.5x faster than two (CellBench references of all
# three presets, 10^4-cell mappings); whole-data passes (projection) keep every thread.
TRAINING_THREADS = 1


@dataclass
class TrainingData:
    """Cells in model gene order with their condition indices and prototype targets."""

    counts: sp.csr_matrix
    conditions: NDArray[np.int64]
    targets: list[NDArray[np.int64]] = field(default_factory=list)  # per level; -1 = none
    scales: NDArray[np.float32] | None = None  # MaxAbs scale rows (Bernoulli recipe)
    scale_index: NDArray[np.int64] | None = None  # row of ``scales`` for each cell
    library: NDArray[np.float32] = field(init=False)

    def __post_init__(self) -> None:
        self.library = library_sizes(self.counts)

    @classmethod
    def for_recipe(
        cls,
        counts: sp.csr_matrix,
        conditions: NDArray[np.int64],
        targets: list[NDArray[np.int64]],
        recipe: PreprocessingRecipe,
    ) -> TrainingData:
        """Training data with whatever the recipe needs besides counts (per-batch MaxAbs
        scales, computed from these cells, for the Bernoulli recipe)."""
        if recipe.input_transform != "log_normalized_maxabs":
            return cls(counts, conditions, targets)
        n_rows = int(conditions.max()) + 1 if conditions.size else 0
        scales = maxabs_scales(counts, conditions, n_rows, recipe.target_sum)
        return cls(counts, conditions, targets, scales, conditions)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.counts.shape[0])


@dataclass
class FrozenCache:
    """What a frozen network yields for every cell, computed once and reused across epochs.

    When the encoder never sees the condition (DSBN) the whole encoding is cached (``mean``,
    ``log_var``); otherwise the first layer's projection without its condition term. With a
    frozen NB dispersion, each cell's likelihood terms that the mean does not enter
    (``fixed_likelihood_terms``, see :meth:`CondVAE.fixed_likelihood_terms`) as well.
    """

    projected: NDArray[np.float32] | None = None
    mean: NDArray[np.float32] | None = None
    log_var: NDArray[np.float32] | None = None
    fixed_likelihood_terms: NDArray[np.float32] | None = None


@dataclass
class Batch:
    """A minibatch as tensors; the encoder input is computed only if something asks for it."""

    counts: Tensor
    nonzero: NonZero
    library: Tensor
    condition: Tensor
    targets: list[Tensor]
    input_of: Callable[[], Tensor]  # computes the encoder input of these cells
    projected: Tensor | None = None
    encoded: tuple[Tensor, Tensor] | None = None
    fixed_likelihood_terms: Tensor | None = None

    @cached_property
    def model_input(self) -> Tensor:
        """The transformed counts the encoder reads (and Gaussian/Bernoulli likelihoods score)."""
        return self.input_of()


def rows_input(
    data: TrainingData,
    rows: NDArray[np.int64] | slice,
    recipe: PreprocessingRecipe,
    block: sp.csr_matrix | None = None,
) -> Tensor:
    """The encoder input of the cells ``rows`` of ``data`` (``block``: their counts, if sliced
    already)."""
    return model_input(
        data.counts[rows] if block is None else block,
        data.library[rows],
        recipe,
        data.scales,
        None if data.scale_index is None else data.scale_index[rows],
    )


def make_batch(
    data: TrainingData,
    rows: NDArray[np.int64],
    recipe: PreprocessingRecipe,
    cache: FrozenCache | None = None,
) -> Batch:
    """Densify the rows ``rows`` of ``data`` into a :class:`Batch`."""
    block = data.counts[rows]
    batch = Batch(
        counts=torch.from_numpy(block.toarray()),
        nonzero=_nonzero(block),
        library=torch.from_numpy(data.library[rows]),
        condition=torch.from_numpy(data.conditions[rows]),
        targets=[torch.from_numpy(t[rows]) for t in data.targets],
        input_of=lambda: rows_input(data, rows, recipe, block),
    )
    if cache is None:
        return batch
    if cache.mean is not None and cache.log_var is not None:
        batch.encoded = (torch.from_numpy(cache.mean[rows]), torch.from_numpy(cache.log_var[rows]))
    elif cache.projected is not None:
        batch.projected = torch.from_numpy(cache.projected[rows])
    if cache.fixed_likelihood_terms is not None:
        batch.fixed_likelihood_terms = torch.from_numpy(cache.fixed_likelihood_terms[rows])
    return batch


def _nonzero(block: sp.csr_matrix) -> NonZero:
    """The non-zero entries of ``block`` as tensors."""
    coo = block.tocoo()
    return NonZero(
        torch.from_numpy(coo.row.astype(np.int64)),
        torch.from_numpy(coo.col.astype(np.int64)),
        torch.from_numpy(coo.data),
    )


def iter_inputs(
    data: TrainingData, recipe: PreprocessingRecipe, chunk_cells: int = CHUNK_CELLS
) -> Iterator[tuple[slice, SparseRows, Tensor]]:
    """All cells in order, ``chunk_cells`` at a time: (rows, encoder input, conditions), the
    input as sparse rows (never densified: see :meth:`CondVAE.sparse_projector`)."""
    counts = data.counts
    for start in range(0, data.n_cells, chunk_cells):
        rows = slice(start, min(start + chunk_cells, data.n_cells))
        first, last = counts.indptr[rows.start], counts.indptr[rows.stop]
        offsets = counts.indptr[rows.start : rows.stop + 1] - first
        block = sp.csr_matrix(  # from the arrays: 4x faster than scipy's counts[rows]
            (counts.data[first:last], counts.indices[first:last], offsets),
            shape=(offsets.size - 1, counts.shape[1]),
        )
        values = input_values(
            block,
            data.library[rows],
            recipe,
            data.scales,
            None if data.scale_index is None else data.scale_index[rows],
        )
        x = SparseRows(
            torch.from_numpy(block.indices),
            torch.from_numpy(block.indptr),
            torch.from_numpy(values),
        )
        yield rows, x, torch.from_numpy(data.conditions[rows])


@torch.no_grad()
def cache_frozen(model: CondVAE, data: TrainingData, recipe: PreprocessingRecipe) -> FrozenCache:
    """The :class:`FrozenCache` of every cell; valid while the network's trunk is frozen."""
    model.eval()
    project = model.sparse_projector()
    cache = FrozenCache()
    if model.encoder_condition is None and model.embedding is None:
        cache.mean = np.empty((data.n_cells, model.config.latent_dim), dtype=np.float32)
        cache.log_var = np.empty_like(cache.mean)
        for rows, x, condition in iter_inputs(data, recipe):
            mean, log_var = model.encode_projected(project(x), condition)
            cache.mean[rows], cache.log_var[rows] = mean.numpy(), log_var.numpy()
    else:
        cache.projected = np.empty(
            (data.n_cells, model.encoder_input.out_features), dtype=np.float32
        )
        for rows, x, _ in iter_inputs(data, recipe):
            cache.projected[rows] = project(x).numpy()
    if model.has_fixed_likelihood_terms:
        cache.fixed_likelihood_terms = np.empty(data.n_cells, dtype=np.float32)
        for start in range(0, data.n_cells, FIXED_TERMS_CHUNK_CELLS):
            rows = slice(start, min(start + FIXED_TERMS_CHUNK_CELLS, data.n_cells))
            terms = model.fixed_likelihood_terms(_nonzero(data.counts[rows]), rows.stop - start)
            cache.fixed_likelihood_terms[rows] = terms.numpy()
    return cache


@torch.no_grad()
def latent_means(
    model: CondVAE,
    data: TrainingData,
    recipe: PreprocessingRecipe,
    progress: Progress | None = None,
) -> NDArray[np.float32]:
    """Latent mean of every cell (the embedding sites report), in eval mode."""
    was_training = model.training
    model.eval()
    out = np.empty((data.n_cells, model.config.latent_dim), dtype=np.float32)
    project = model.sparse_projector()
    for rows, x, condition in iter_inputs(data, recipe):
        mean, _ = model.encode_projected(project(x), condition)
        out[rows] = mean.numpy()
        if progress is not None:
            progress.advance(rows.stop - rows.start)
    model.train(was_training)
    return out


@torch.no_grad()
def estimate_dsbn_statistics(
    model: CondVAE,
    data: TrainingData,
    recipe: PreprocessingRecipe,
    means: NDArray[np.float32],
    private: tuple[float, np.random.Generator] | None = None,
) -> None:
    """Set the DSBN statistics of every fresh condition to the mean and variance of its cells'
    pre-normalisation decoder output (latent means as input): exact, or with ``private``
    (noise sigma, generator) Gaussian releases of squared sensitivity
    :data:`~fedatlas.shared.model.privacy.STATISTICS_SENSITIVITY_SQ` (two passes over the cells)
    whose clipping bounds come from the release's own statistics. Frozen rows are untouched."""
    if model.dsbn is None:
        return
    stats_mean, stats_var = model.dsbn.running_mean, model.dsbn.running_var
    n_frozen, n_fresh = stats_mean.n_frozen, stats_mean.fresh.shape[0]
    if n_fresh == 0:
        return
    width = stats_mean.row_shape[0]

    def accumulate(term: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Per fresh condition: the cell count and the sum of ``term(logits, index)``."""
        sums = torch.zeros(n_fresh, width, dtype=torch.float64)
        counts = torch.zeros(n_fresh, dtype=torch.float64)
        for start in range(0, data.n_cells, CHUNK_CELLS):
            rows = np.arange(start, min(start + CHUNK_CELLS, data.n_cells))
            condition = torch.from_numpy(data.conditions[rows])
            fresh = condition >= n_frozen
            if not fresh.any():
                continue
            z = torch.from_numpy(means[rows])[fresh]
            _, _, logits = model.decode_before_dsbn(z, condition[fresh])
            index = condition[fresh] - n_frozen
            sums.index_add_(0, index, term(logits.double(), index))
            counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        return counts, sums

    if private is None:
        counts, sums = accumulate(lambda x, _: x)
        _, squares = accumulate(lambda x, _: x**2)
        seen = counts > 0
        mean = torch.where(seen[:, None], sums / counts.clamp(min=1)[:, None], 0.0)
        var = torch.where(seen[:, None], squares / counts.clamp(min=1)[:, None] - mean**2, 1.0)
    else:
        sigma, rng = private
        centre, radius, deviation = _statistics_bounds(stats_mean.frozen, stats_var.frozen)
        centre_t = torch.from_numpy(centre)
        counts, clipped = accumulate(
            lambda x, _: torch.from_numpy(clip_rows((x - centre_t).numpy(), radius))
        )
        released = [
            noisy_mean(int(n), s.numpy(), centre, radius, sigma, rng)
            for n, s in zip(counts.tolist(), clipped, strict=True)
        ]
        mean = torch.from_numpy(np.stack([m for _, m in released]))
        _, squares = accumulate(
            lambda x, index: torch.from_numpy(clip_rows((x - mean[index]).numpy(), deviation)) ** 2
        )
        var = torch.from_numpy(
            np.stack(
                [
                    noisy_variance(sq.numpy(), count, deviation, sigma, rng)
                    for sq, (count, _) in zip(squares, released, strict=True)
                ]
            )
        )
    stats_mean.set_fresh(mean.float())
    stats_var.set_fresh(var.clamp(min=0).float())


def _statistics_bounds(
    frozen_mean: Tensor, frozen_var: Tensor
) -> tuple[NDArray[np.float64], float, float]:
    """Clipping centre, radius and deviation for DSBN inputs, from the release's statistics:
    its conditions' means with three standard deviations to spare."""
    means, spread = frozen_mean.double().numpy(), frozen_var.double().sum(dim=1).sqrt().numpy()
    centre = means.mean(axis=0)
    offsets = np.linalg.norm(means - centre, axis=1)
    return centre, float((offsets + 3.0 * spread).max()), float(3.0 * spread.max())


class PrototypeTargets:
    """Per label level, the prototypes the prototype loss pulls cells towards (scPoli).

    Rows ``[0, n_fixed)`` of a level come from a release and never move. The other rows belong
    to labels being learnt: each is the mean latent of the training cells with that label,
    recomputed (without gradient) when the prototype phase starts and after every epoch of it.
    """

    def __init__(self, fixed: list[Tensor], n_labels: list[int], latent_dim: int) -> None:
        self.n_fixed = [int(f.shape[0]) for f in fixed]
        self.tables = [
            torch.cat([f.detach().float(), torch.zeros(n - f.shape[0], latent_dim)])
            for f, n in zip(fixed, n_labels, strict=True)
        ]

    def level(self, i: int) -> Tensor:
        """All prototypes of level ``i`` (fixed first)."""
        return self.tables[i]

    def update(self, means: NDArray[np.float32], targets: list[NDArray[np.int64]]) -> None:
        """Move every learnt prototype to the mean latent of the cells that carry its label."""
        for i, target in enumerate(targets):
            for j in range(self.n_fixed[i], self.tables[i].shape[0]):
                rows = target == j
                if rows.any():
                    self.tables[i][j] = torch.from_numpy(means[rows].mean(axis=0))

    def state(self) -> list[Tensor]:
        """A copy of the current prototypes."""
        return [t.clone() for t in self.tables]

    def load_state(self, state: list[Tensor]) -> None:
        """Restore prototypes saved by :meth:`state`."""
        self.tables = [t.clone() for t in state]


def prototype_loss(z: Tensor, targets: list[Tensor], prototypes: PrototypeTargets) -> Tensor:
    """scPoli's prototype loss: for every label level and every label present, the mean squared
    Euclidean distance of its cells to its prototype, summed over labels and levels."""
    loss = z.new_zeros(())
    for i, target in enumerate(targets):
        labelled = target >= 0
        if not labelled.any():
            continue
        labels = target[labelled]
        sq = ((z[labelled] - prototypes.level(i)[labels]) ** 2).sum(dim=-1)
        present, inverse = torch.unique(labels, return_inverse=True)
        per_label = torch.zeros(len(present)).index_add(0, inverse, sq)
        counts = torch.zeros(len(present)).index_add(0, inverse, torch.ones_like(sq))
        loss = loss + (per_label / counts).sum()
    return loss


@dataclass
class LossParts:
    """The loss of one minibatch and its parts (per cell)."""

    total: Tensor
    monitored: float  # with final (not annealed) weights, for early stopping
    parts: dict[str, float]


@dataclass
class CellTerms:
    """One minibatch's forward pass: the latent sample, the decoder output and, per cell, the
    reconstruction NLL and the KL divergence."""

    z: Tensor
    out: DecoderOutput
    recon: Tensor
    kl: Tensor


def cell_terms(model: CondVAE, batch: Batch, *, sample: bool) -> CellTerms:
    """Encode, sample (when ``sample``) and decode ``batch``; the ELBO's terms per cell."""
    if batch.encoded is not None:
        mean, log_var = batch.encoded
    elif batch.projected is not None:
        mean, log_var = model.encode_projected(batch.projected, batch.condition)
    else:
        mean, log_var = model.encode(batch.model_input, batch.condition)
    z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var) if sample else mean
    out = model.decode(z, batch.condition)
    transformed = batch.model_input if model.scores_transformed_input else None
    recon = model.reconstruction_nll(
        out, batch.counts, batch.nonzero, batch.library, batch.condition, transformed,
        batch.fixed_likelihood_terms,
    )  # fmt: skip
    kl = -0.5 * (1 + log_var - mean**2 - log_var.exp()).sum(dim=-1)
    return CellTerms(z, out, recon, kl)


def compute_loss(
    model: CondVAE,
    batch: Batch,
    train: TrainConfig,
    *,
    kl_weight: float,
    prototypes: PrototypeTargets | None,
    sample: bool,
) -> LossParts:
    """ELBO (+ MMD across conditions, + prototype loss when ``prototypes`` is given)."""
    terms = cell_terms(model, batch, sample=sample)
    z, recon, kl = terms.z, terms.recon.mean(), terms.kl.mean()
    total = recon + kl_weight * kl
    monitored = recon + train.kl_weight * kl
    parts = {"recon": recon.item(), "kl": kl.item()}
    compared = z if train.mmd_on == "latent" else terms.out.first_hidden
    if train.mmd_weight > 0 and compared is not None:
        mmd = mmd_across_conditions(compared, batch.condition)
        total = total + train.mmd_weight * mmd
        monitored = monitored + train.mmd_weight * mmd
        parts["mmd"] = mmd.item()
    if prototypes is not None:
        proto = prototype_loss(z, batch.targets, prototypes)
        total = total + train.prototype_weight * proto
        monitored = monitored + train.prototype_weight * proto
        parts["prototype"] = proto.item()
    return LossParts(total=total, monitored=monitored.item(), parts=parts)


def per_cell_loss(
    model: CondVAE,
    batch: Batch,
    train: TrainConfig,
    *,
    kl_weight: float,
    prototypes: PrototypeTargets | None,
) -> Tensor:
    """Each cell's own loss (DP-SGD): its ELBO terms and its squared distance to the fixed
    prototype of its label; no term couples two cells."""
    terms = cell_terms(model, batch, sample=True)
    loss = terms.recon + kl_weight * terms.kl
    if prototypes is not None:
        for i, target in enumerate(batch.targets):
            fixed = (target >= 0) & (target < prototypes.n_fixed[i])
            centre = prototypes.level(i)[target.clamp(min=0)]
            sq = ((terms.z - centre) ** 2).sum(dim=-1)
            loss = loss + train.prototype_weight * torch.where(fixed, sq, torch.zeros_like(sq))
    return loss


@dataclass
class FitResult:
    """What a training run did."""

    epochs: int
    iterations: int
    seconds: float
    stopped_early: bool
    best_epoch: int
    trained_parameters: int
    history: list[dict[str, float]]


def fit(
    model: CondVAE,
    data: TrainingData,
    train: TrainConfig,
    recipe: PreprocessingRecipe,
    *,
    mode: Mode,
    prototypes: PrototypeTargets | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    penalty: Penalty | None = None,
    private: DPSGD | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with recipe ``train``.

    The best state (lowest monitored loss: validation when a validation share is set, else
    training) is restored at the end, as scArches does. Early stopping waits until the KL warm-up
    is over. ``penalty`` (e.g. FedProx's proximal term) is added to every minibatch's loss.
    ``private`` trains by DP-SGD (mapping only; ``train`` as :func:`private_recipe` makes it):
    minibatches drawn per cell, per-cell losses, clipped and noised gradients, the final state
    kept. Returns a :class:`FitResult`.
    """
    if private is not None and (mode != "mapping" or penalty is not None):
        raise ValueError("DP-SGD trains a mapping's condition rows only")
    with torch_threads(TRAINING_THREADS):
        return _fit(model, data, train, recipe, mode, prototypes, seed, progress, penalty, private)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` intra-op torch threads (at most the current number)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(
    model: CondVAE,
    data: TrainingData,
    train: TrainConfig,
    recipe: PreprocessingRecipe,
    mode: Mode,
    prototypes: PrototypeTargets | None,
    seed: int,
    progress: Progress | None,
    penalty: Penalty | None,
    private: DPSGD | None,
) -> FitResult:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = model.trainable_parameters()
    optimiser = _optimiser(model, params, train)
    if optimiser is None or train.epochs == 0:
        return FitResult(0, 0, time.perf_counter() - started, False, -1, 0, [])
    dp_noise = None
    if private is not None:
        rng, generator = secure_generators()  # minibatch draws are part of the mechanism
        dp_noise = (private, generator)
    train_rows, val_rows = _split(data.n_cells, train.validation_fraction, rng)
    cache = cache_frozen(model, data, recipe) if mode == "mapping" else None
    proto_start = train.effective_pretrain_epochs
    use_prototypes = (
        prototypes is not None
        and train.prototype_weight > 0
        and any((t >= 0).any() for t in data.targets)
        and proto_start < train.epochs
    )
    history: list[dict[str, float]] = []
    best = (math.inf, -1)
    snapshot = _snapshot(model, prototypes)
    stale = iterations = 0
    stopped_early = False
    for epoch in range(train.epochs):
        active = prototypes if use_prototypes and epoch >= proto_start else None
        if active is not None and epoch == proto_start and private is None:
            active.update(latent_means(model, data, recipe), data.targets)
            best, stale = (math.inf, -1), 0  # the objective changes
        kl_weight = train.kl_weight
        if train.kl_anneal_epochs > 0:
            kl_weight *= min(1.0, (epoch + 1) / train.kl_anneal_epochs)
        model.train(mode == "reference")
        if private is None:
            order = _epoch_order(train_rows, data.conditions, train.balance_conditions, rng)
            batches = _minibatches(order, train, mode)
        else:
            batches = private.minibatches(train_rows, rng)
        record, steps = _run_epoch(
            model, data, batches, recipe, train, optimiser, params, cache, active, kl_weight,
            penalty, private=dp_noise,
            max_steps=(train.max_iterations - iterations) if train.max_iterations else None,
        )  # fmt: skip
        iterations += steps
        model.eval()
        if active is not None and private is None:
            active.update(latent_means(model, data, recipe), data.targets)
        if val_rows.size:
            record["val_loss"] = _evaluate(model, data, val_rows, recipe, train, cache, active)
        history.append(record)
        monitored = record.get("val_loss", record.get("loss", math.inf))
        if private is not None:  # the final state: choosing one by its loss reads the data
            best = (monitored, epoch)
        elif not math.isfinite(best[0]) or monitored < best[0] - 1e-6 * abs(best[0]):
            best, stale = (monitored, epoch), 0
            snapshot = _snapshot(model, prototypes)
        else:
            stale += 1
        if progress is not None:
            progress.advance(1, **record)
        if train.max_iterations and iterations >= train.max_iterations:
            break
        patience = train.early_stopping_patience
        warming_up = epoch + 1 < train.kl_anneal_epochs
        if patience is not None and stale >= patience and not warming_up:
            stopped_early = True
            break
    if private is None:
        _restore(model, prototypes, snapshot)
    model.eval()
    return FitResult(
        epochs=len(history),
        iterations=iterations,
        seconds=time.perf_counter() - started,
        stopped_early=stopped_early,
        best_epoch=best[1],
        trained_parameters=sum(p.numel() for p in params),
        history=history,
    )


def _minibatches(
    order: NDArray[np.int64], train: TrainConfig, mode: Mode
) -> list[NDArray[np.int64]]:
    """``order`` cut into minibatches (a short last one dropped when the recipe says so; in
    reference training a single cell cannot give batch statistics)."""
    out = []
    for start in range(0, len(order), train.batch_size):
        rows = order[start : start + train.batch_size]
        if train.drop_last and start > 0 and len(rows) < train.batch_size:
            break
        if len(rows) < 2 and mode == "reference":
            continue
        out.append(rows)
    return out


def _run_epoch(
    model: CondVAE,
    data: TrainingData,
    batches: list[NDArray[np.int64]],
    recipe: PreprocessingRecipe,
    train: TrainConfig,
    optimiser: torch.optim.Optimizer,
    params: list[nn.Parameter],
    cache: FrozenCache | None,
    prototypes: PrototypeTargets | None,
    kl_weight: float,
    penalty: Penalty | None,
    private: tuple[DPSGD, torch.Generator] | None,
    max_steps: int | None,
) -> tuple[dict[str, float], int]:
    """One pass over ``batches``; returns the mean loss parts and the step count."""
    sums: dict[str, float] = {}
    n_seen = steps = 0
    for rows in batches:
        if max_steps is not None and steps >= max_steps:
            break
        batch = make_batch(data, rows, recipe, cache)
        optimiser.zero_grad(set_to_none=True)
        if private is not None:
            dp, generator = private
            with per_cell_rows(model, batch.condition) as leaves:
                losses = per_cell_loss(
                    model, batch, train, kl_weight=kl_weight, prototypes=prototypes
                )
                dp.step(losses, leaves, batch.condition, generator)
            parts = {"loss": float(losses.detach().mean())}
        else:
            loss = compute_loss(
                model, batch, train, kl_weight=kl_weight, prototypes=prototypes, sample=True
            )
            total = loss.total if penalty is None else loss.total + penalty()
            total.backward()
            if train.grad_clip:
                nn.utils.clip_grad_norm_(params, train.grad_clip)
            parts = {"loss": loss.monitored, **loss.parts}
        optimiser.step()
        steps += 1
        n_seen += len(rows)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * len(rows)
    return {k: v / max(n_seen, 1) for k, v in sums.items()}, steps


def _split(
    n_cells: int, fraction: float, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    n_val = int(n_cells * fraction)
    if fraction <= 0 or n_val < 1 or n_cells - n_val < 2:
        return np.arange(n_cells), np.zeros(0, dtype=np.int64)
    order = rng.permutation(n_cells)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def _evaluate(
    model: CondVAE,
    data: TrainingData,
    rows: NDArray[np.int64],
    recipe: PreprocessingRecipe,
    train: TrainConfig,
    cache: FrozenCache | None,
    prototypes: PrototypeTargets | None,
) -> float:
    total = 0.0
    for start in range(0, len(rows), VALIDATION_CHUNK_CELLS):
        part = rows[start : start + VALIDATION_CHUNK_CELLS]
        batch = make_batch(data, part, recipe, cache)
        loss = compute_loss(
            model, batch, train, kl_weight=train.kl_weight, prototypes=prototypes, sample=False
        )
        total += loss.monitored * len(part)
    return total / len(rows)


def _optimiser(
    model: CondVAE, params: list[nn.Parameter], train: TrainConfig
) -> torch.optim.Optimizer | None:
    """Adam over ``params``; condition embeddings get no weight decay (as in scPoli)."""
    if not params:
        return None
    no_decay = {id(model.embedding.fresh)} if model.embedding is not None else set()
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if id(p) not in no_decay]},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.Adam(
        [g for g in groups if g["params"]],
        lr=train.lr,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        fused=True,
    )


def _epoch_order(
    rows: NDArray[np.int64],
    conditions: NDArray[np.int64],
    balance: bool,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Cells of one epoch: a permutation, or (``balance``) as many draws with replacement in
    which every condition is equally likely, so small batches weigh as much as large ones."""
    if not balance:
        return rng.permutation(rows)
    cond = conditions[rows]
    _, inverse, counts = np.unique(cond, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return rng.choice(rows, size=rows.size, replace=True, p=weights / weights.sum())


def _snapshot(model: CondVAE, prototypes: PrototypeTargets | None) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "prototypes": prototypes.state() if prototypes is not None else None,
    }


def _restore(model: CondVAE, prototypes: PrototypeTargets | None, state: dict[str, Any]) -> None:
    model.load_state_dict(state["model"])
    if prototypes is not None and state["prototypes"] is not None:
        prototypes.load_state(state["prototypes"])
