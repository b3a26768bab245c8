"""Federated reference training (FedAvg, optionally FedProx) for sites that may not pool cells.

The network splits along the same line as architecture surgery: the *trunk* (every tensor that
is not a condition table) is shared and averaged; each site's condition rows (embedding rows,
one-hot columns, DSBN branches, per-condition dispersions) never leave it. One build goes:

1. gene universe: every site says which genes it holds — only of the build's gene list, or only
   those in its public gene universe (:mod:`fedatlas.shared.model.federated_genes`); the
   coordinator takes the sorted union (:func:`train_federated`, in one process, sends nothing
   and takes every site's genes);
2. gene votes: every site sends per-batch normalised dispersions and detection counts over the
   universe (gene-level aggregates, :class:`~fedatlas.shared.data.preprocessing.GeneVotes`); the
   coordinator elects the highly variable genes exactly as a central build does;
3. rounds: the coordinator sends the trunk; each site trains the trunk and its own rows for a
   few local epochs (FedProx adds ``mu/2 * |trunk - sent trunk|^2``) and returns its trunk and
   cell count; the coordinator combines them without trusting either (:func:`aggregate_round`:
   counts validated and capped, updates clipped, outliers left out, then FedAvg weighted by
   cells, or a coordinate-wise median or trimmed mean). With secure aggregation the coordinator
   only learns the cell-weighted mean of the sites' clipped updates
   (:mod:`fedatlas.shared.model.secure_aggregation`);
4. release: the final trunk becomes a release with no conditions of its own; each site turns
   its kept rows into its adaptor (a short surgery fine-tune on the frozen final trunk, plus its
   prototypes), which the registry verifies and composes like any other adaptor.

This module is the algorithm without transport. The Flower apps
(:mod:`fedatlas.coordinator.federated_build`, :mod:`fedatlas.site_client.federated_build`) and
:func:`train_federated` (all sites in one process, for tests and benchmarks) drive it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedatlas.shared.config import (
    ModelConfig,
    PreprocessingRecipe,
    Preset,
    TrainConfig,
    get_preset,
)
from fedatlas.shared.data.dataset import UNLABELED, CellTable, label_targets
from fedatlas.shared.data.genes import align_genes
from fedatlas.shared.data.preprocessing import GeneVotes, combine_gene_votes, gene_votes
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.label_transfer import DEFAULT_UNKNOWN_THRESHOLD
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.prototypes import PrototypeSet
from fedatlas.shared.model.reference import reference_content, release_provenance
from fedatlas.shared.model.release import MODEL_PREFIX, Release, prototype_prefix, transfer_levels
from fedatlas.shared.model.surgery import export_tensors, load_trunk, trunk_of
from fedatlas.shared.model.training import PrototypeTargets, TrainingData, fit

log = logging.getLogger(__name__)

Trunk = dict[str, Tensor]
STRATEGIES = ("fedavg", "fedprox")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
# the plan's secure-aggregation settings (left out of a plan without it: FederatedPlan.to_dict)
SECURE_FIELDS = ("secure_aggregation", "secure_clip_norm", "dp_noise_multiplier")


@dataclass(frozen=True)
class FederatedPlan:
    """What every participant of one federated build agrees on (announced by the coordinator).

    Attributes:
        preset: model preset (network shape and reference recipe).
        rounds: FedAvg rounds.
        local_epochs: epochs each site trains per round.
        strategy: ``fedavg`` or ``fedprox``.
        proximal_mu: FedProx's mu (weight of the proximal term); 0 with ``fedavg``.
        n_top_genes: highly variable genes to elect.
        label_level: name of the release's label level ("" for none); each site maps its own
            label column onto it.
        seed: seed of the initial trunk (sites offset it by round).
        finish_epochs: epochs of the final surgery fine-tune of each site's rows (None: the
            preset's mapping recipe).
        aggregation: how a round's updates are combined (:func:`aggregate_round`): ``fedavg``
            (mean weighted by cells), ``median`` or ``trimmed-mean`` (coordinate-wise, every
            site counting once, as Flower's FedMedian and FedTrimmedAvg).
        trim_fraction: ``trimmed-mean`` cuts ``floor(trim_fraction * n)`` of the ``n`` values at
            each end of every coordinate; the default cuts one site of 3 to 5, two of 6 to 8.
        max_site_cells: the most cells one site's claim counts for in the weights; a larger
            claim is capped (ten million: more than one hospital or lab holds for a reference
            today, while a claim of 10^9 counts no more).
        max_site_share: the largest share of the FedAvg weight one site can get (the excess
            goes to the others in proportion to their cells); 0.5: no site outweighs all the
            others together. 1 turns it off.
        clip_factor: each site's update (its trunk minus the trunk sent) is scaled down to at
            most this multiple of the round's median update norm (honest sites of similar size
            measured within 1.7 times it).
        outlier_factor: an update longer than this multiple of the median norm is left out of
            the round (a trunk of zeros measured at 10 times it or more with 5 local epochs).
        secure_aggregation: run every round with Flower's SecAgg+ so that the coordinator
            learns only the (cell-weighted) sum of the sites' updates; needs ``fedavg``; the
            median-norm clip moves to the sites, outliers cannot be left out and
            ``max_site_share`` does not apply (:mod:`fedatlas.shared.model.secure_aggregation`).
        secure_clip_norm: with secure aggregation, the L2 bound of a site's update in the first
            round (with DP: in every round); later rounds use ``clip_factor`` times the previous
            round's mean update norm (scpoli's measured 0.7 to 1.3 on CellBench S1).
        dp_noise_multiplier: with secure aggregation, DP-FedAvg: Gaussian noise of this many
            times one site's largest influence on the mean update is added to it (0: off).
    """

    preset: str = "scpoli"
    rounds: int = 10
    local_epochs: int = 5
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    n_top_genes: int = 2000
    label_level: str = "cell_type"
    seed: int = 0
    finish_epochs: int | None = None
    aggregation: str = "fedavg"
    trim_fraction: float = 0.34
    max_site_cells: int = 10_000_000
    max_site_share: float = 0.5
    clip_factor: float = 2.0
    outlier_factor: float = 5.0
    secure_aggregation: bool = False
    secure_clip_norm: float = 10.0
    dp_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if self.rounds < 1 or self.local_epochs < 1:
            raise ConfigError(
                f"rounds and local epochs must be >= 1, got {self.rounds} and {self.local_epochs}"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}"
            )
        if self.proximal_mu < 0 or (self.strategy == "fedavg" and self.proximal_mu):
            raise ConfigError("proximal mu must be >= 0, and is only used with fedprox")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"unknown aggregation {self.aggregation!r}; expected one of "
                f"{', '.join(AGGREGATIONS)}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.max_site_cells < 1 or not 0 < self.max_site_share <= 1:
            raise ConfigError(
                f"max site cells must be >= 1 and max site share in (0, 1], got "
                f"{self.max_site_cells} and {self.max_site_share}"
            )
        if not 1 <= self.clip_factor <= self.outlier_factor < math.inf:
            raise ConfigError(
                f"need 1 <= clip factor <= outlier factor (finite), got {self.clip_factor} "
                f"and {self.outlier_factor}"
            )
        if self.secure_aggregation and self.aggregation != "fedavg":
            raise ConfigError(
                f"secure aggregation hides each site's update, which the coordinate-wise "
                f"{self.aggregation} needs; use the fedavg aggregation with it"
            )
        if not 0 < self.secure_clip_norm < math.inf or self.dp_noise_multiplier < 0:
            raise ConfigError(
                f"need a finite secure clip norm > 0 and a DP noise multiplier >= 0, got "
                f"{self.secure_clip_norm} and {self.dp_noise_multiplier}"
            )
        if self.dp_noise_multiplier > 0 and not self.secure_aggregation:
            raise ConfigError("DP noise on the aggregate needs secure aggregation")

    @property
    def preset_spec(self) -> Preset:
        """The preset this plan trains."""
        return get_preset(self.preset)

    @property
    def recipe(self) -> PreprocessingRecipe:
        """The preprocessing every site applies."""
        transform = self.preset_spec.model_config(self.n_top_genes).input_transform
        return PreprocessingRecipe(n_top_genes=self.n_top_genes, input_transform=transform)

    @property
    def training(self) -> TrainConfig:
        """The preset's reference recipe spread over all rounds (phases keep their shares)."""
        return self.preset_spec.reference.scaled_to(self.rounds * self.local_epochs)

    def model_config(self, n_genes: int) -> ModelConfig:
        """The network for ``n_genes`` elected genes."""
        return self.preset_spec.model_config(n_genes)

    def round_recipe(self, round_index: int) -> TrainConfig:
        """Local training of round ``round_index`` (0-based): the global recipe's KL warm-up
        and prototype phase at this point of the schedule; no early stopping, no hold-out."""
        total = self.training
        start, epochs = round_index * self.local_epochs, self.local_epochs
        kl = total.kl_weight
        if total.kl_anneal_epochs > 0:
            kl *= min(1.0, (start + epochs) / total.kl_anneal_epochs)
        pretrain = min(max(total.effective_pretrain_epochs - start, 0), epochs)
        return dataclasses.replace(
            total,
            epochs=epochs,
            pretrain_epochs=pretrain,
            kl_weight=kl,
            kl_anneal_epochs=0,
            max_iterations=None,
            early_stopping_patience=None,
            validation_fraction=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values; a plan without secure aggregation leaves its settings out, so that
        it (and the release recording it) reads exactly as before they existed."""
        values = dataclasses.asdict(self)
        if not self.secure_aggregation:
            for name in SECURE_FIELDS:
                del values[name]
        return values

    def to_json(self) -> str:
        """The plan as it travels to the sites."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederatedPlan:
        """Inverse of :meth:`to_json`, with a clear error for anything else."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"federated plan is not JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError("federated plan must be a JSON object")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FederatedPlan:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown federated plan field(s): {', '.join(unknown)}")
        return cls(**values)


def initial_trunk(plan: FederatedPlan, n_genes: int) -> Trunk:
    """The trunk every site starts from (deterministic in ``plan.seed``)."""
    torch.manual_seed(plan.seed)
    return trunk_of(CondVAE(plan.model_config(n_genes), 0))


def trunk_problem(sent: Mapping[str, Tensor], returned: Mapping[str, Tensor]) -> str:
    """Why a site's returned trunk cannot be averaged with the others ("" when it can): other
    tensor names, shapes or dtypes than the trunk sent, or values that are not finite."""
    missing, unexpected = sorted(set(sent) - set(returned)), sorted(set(returned) - set(sent))
    if missing or unexpected:
        return f"tensor names differ (missing {missing[:3]}, unexpected {unexpected[:3]})"
    for name, tensor in sent.items():
        got = returned[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            return (
                f"{name}: {got.dtype} {tuple(got.shape)}, expected {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{name}: holds NaN or infinite values"
    return ""


def gene_universe(gene_lists: Sequence[Sequence[str]]) -> list[str]:
    """The genes of the build's vote: the sorted union of the sites' genes."""
    return sorted(set().union(*(set(g) for g in gene_lists)))


def elect_genes(
    universe: Sequence[str], votes: Sequence[GeneVotes], plan: FederatedPlan
) -> list[str]:
    """The highly variable genes elected by the sites' votes, in universe order."""
    return [universe[i] for i in combine_gene_votes(list(votes), plan.recipe)]


@dataclass
class RoundUpdate:
    """What a site returns after a round: its trunk, its cell count and its mean loss."""

    trunk: Trunk
    n_cells: int
    loss: float


@dataclass
class SiteTrainer:
    """One site's side of a federated build: its cells, its condition rows, its local rounds.

    ``rows`` holds the site's condition rows between rounds (per condition table); a Flower
    ClientApp keeps them in its node state, :func:`train_federated` in this object.
    """

    cells: CellTable
    site_id: str
    plan: FederatedPlan
    rows: dict[str, Tensor] = field(default_factory=dict)
    # the cells in the elected genes' order, prepared once for every round (in one process)
    _prepared: tuple[tuple[str, ...], TrainingData, list[int]] | None = field(
        default=None, repr=False
    )

    def gene_names(self) -> list[str]:
        """The site's gene names (sent for the universe)."""
        return list(self.cells.genes)

    def votes(self, universe: Sequence[str]) -> GeneVotes:
        """Per-batch gene dispersions over ``universe`` (missing genes count as undetected)."""
        aligned = align_genes(
            self.cells.genes, list(universe), min_overlap=0.0, source=self.site_id
        )
        return gene_votes(aligned.apply(self.cells.counts), self.cells.batches, self.plan.recipe)

    @property
    def batch_names(self) -> list[str]:
        """The site's batches in condition order (sorted), as surgery orders them too."""
        return sorted(set(self.cells.batches.tolist()))

    def train_round(
        self, genes: Sequence[str], trunk: Mapping[str, Tensor], round_index: int
    ) -> RoundUpdate:
        """Train the sent trunk and this site's rows for one round; keep the rows."""
        data, n_labels = self._training_data(genes)
        model = CondVAE(self.plan.model_config(len(genes)), len(self.batch_names))
        load_trunk(model, trunk)
        if self.rows:
            for name, table in model.condition_tables().items():
                table.set_fresh(self.rows[name])
        penalty = None
        if self.plan.strategy == "fedprox" and self.plan.proximal_mu > 0:
            penalty = _proximal_term(model, trunk, self.plan.proximal_mu)
        prototypes = PrototypeTargets(
            [torch.zeros(0, model.config.latent_dim) for _ in n_labels],
            n_labels,
            model.config.latent_dim,
        )
        result = fit(
            model, data, self.plan.round_recipe(round_index), self.plan.recipe, mode="reference",
            prototypes=prototypes, seed=self.plan.seed + 1000 * (round_index + 1), penalty=penalty,
        )  # fmt: skip
        self.rows = {
            name: table.table().detach().clone() for name, table in model.condition_tables().items()
        }
        loss = float(result.history[-1]["loss"]) if result.history else float("nan")
        return RoundUpdate(trunk_of(model), data.n_cells, loss)

    def finish(self, release: Release, *, progress: bool = False) -> MappingResult:
        """Turn the kept rows into this site's adaptor on the federated ``release``: surgery
        starting from those rows, a short fine-tune of them alone, the site's prototypes."""
        labels = self._labels()
        cells = CellTable(
            counts=self.cells.counts,
            genes=self.cells.genes,
            batches=self.cells.batches,
            labels={release.label_levels[0]: labels}
            if labels is not None and release.label_levels
            else {},
        )
        options = MappingOptions(
            site_id=self.site_id, epochs=self.plan.finish_epochs, seed=self.plan.seed
        )
        return map_onto(
            release, cells, options, initial_rows=self.rows or None, source=self.site_id,
            progress=progress,
        )  # fmt: skip

    def _labels(self) -> Any:
        return next(iter(self.cells.labels.values())) if self.cells.labels else None

    def _training_data(self, genes: Sequence[str]) -> tuple[TrainingData, list[int]]:
        if self._prepared is not None and self._prepared[0] == tuple(genes):
            return self._prepared[1], self._prepared[2]
        aligned = align_genes(self.cells.genes, list(genes), source=self.site_id)
        index = np.searchsorted(np.asarray(self.batch_names), self.cells.batches).astype(np.int64)
        labels = self._labels()
        targets, n_labels = [], []
        if labels is not None and self.plan.label_level:
            vocab = sorted({str(v) for v in labels} - {UNLABELED})
            targets.append(label_targets(labels, vocab))
            n_labels.append(len(vocab))
        data = TrainingData.for_recipe(
            aligned.apply(self.cells.counts), index, targets, self.plan.recipe
        )
        self._prepared = (tuple(genes), data, n_labels)
        return data, n_labels


def _proximal_term(model: CondVAE, sent: Mapping[str, Tensor], mu: float) -> Callable[[], Tensor]:
    """FedProx: ``mu/2 * sum |w - w_sent|^2`` over the trunk's trainable parameters."""
    named = dict(model.named_parameters())
    pairs = [(named[k], v.detach().clone()) for k, v in sent.items() if k in named]

    def term() -> Tensor:
        total = torch.zeros(())
        for p, w in pairs:
            total = total + ((p - w) ** 2).sum()
        return (mu / 2.0) * total

    return term


def average_trunks(updates: Sequence[tuple[Mapping[str, Tensor], float]]) -> Trunk:
    """FedAvg: the mean of the sites' trunks weighted by their cells (or any weights)."""
    if not updates:
        raise ValueError("no site returned a trunk")
    total = float(sum(w for _, w in updates))
    weights = torch.tensor([w / total for _, w in updates], dtype=torch.float64)
    return _combine([t for t, _ in updates], lambda stack: torch.tensordot(weights, stack, dims=1))


def trimmed_mean_trunks(trunks: Sequence[Mapping[str, Tensor]], cut: int) -> Trunk:
    """The coordinate-wise mean of the sites' trunks without the ``cut`` lowest and ``cut``
    highest values of each coordinate (Flower's FedTrimmedAvg); ``cut = (n - 1) // 2`` of ``n``
    trunks leaves the coordinate-wise median (FedMedian)."""
    n = len(trunks)
    if not 0 <= 2 * cut < n:
        raise ValueError(f"cannot cut {cut} of {n} trunks at each end")
    return _combine(trunks, lambda stack: stack.sort(dim=0).values[cut : n - cut].mean(dim=0))


def _combine(trunks: Sequence[Mapping[str, Tensor]], reduce: Callable[[Tensor], Tensor]) -> Trunk:
    """Each tensor of the trunks reduced over the sites (``reduce`` gets them stacked in
    float64, sites first); integer tensors (counters) are rounded back."""
    out: Trunk = {}
    for name, first in trunks[0].items():
        value = reduce(torch.stack([t[name].to(torch.float64) for t in trunks]))
        out[name] = (
            value.to(first.dtype) if first.is_floating_point() else value.round().to(first.dtype)
        )
    return out


def update_norm(sent: Mapping[str, Tensor], trunk: Mapping[str, Tensor]) -> float:
    """The length of a site's update: the L2 norm of ``trunk - sent`` over every
    floating-point tensor (weights and batch-norm statistics; integer counters are not
    updates)."""
    squares = sum(
        float(((trunk[k].to(torch.float64) - v.to(torch.float64)) ** 2).sum())
        for k, v in sent.items()
        if v.is_floating_point()
    )
    return math.sqrt(squares)


def capped_shares(cells: Mapping[str, int], max_share: float) -> dict[str, float]:
    """Each site's share of the FedAvg weight: in proportion to its cells, but at most
    ``max_share``; what a capped site loses goes to the others in proportion to their cells.
    Equal shares when ``max_share`` cannot hold (fewer than ``1 / max_share`` sites)."""
    if max_share * len(cells) < 1:
        return dict.fromkeys(cells, 1.0 / len(cells))
    shares: dict[str, float] = {}
    free = dict(cells)
    while True:  # at least one site stays free: max_share * len(cells) >= 1
        left, total = 1.0 - sum(shares.values()), sum(free.values())
        over = [s for s, n in free.items() if left * n / total > max_share]
        if not over:
            return {**shares, **{s: left * n / total for s, n in free.items()}}
        for site in over:
            shares[site] = max_share
            del free[site]


@dataclass
class RoundAggregate:
    """One round's updates combined by :func:`aggregate_round`, and how each site fared.

    Attributes:
        trunk: the new trunk.
        weights: the sites whose update went in, with their weight (equal for ``median`` and
            ``trimmed-mean``).
        cells: their counts as weighed (capped at the plan's ``max_site_cells``).
        norms: the update norm of every update with a valid count.
        scale: the round's median update norm.
        clipped: the sites whose update was scaled down to ``clip_factor * scale``.
        left_out: the sites whose update was left out, with the reason.
    """

    trunk: Trunk
    weights: dict[str, float]
    cells: dict[str, int]
    norms: dict[str, float]
    scale: float
    clipped: list[str]
    left_out: dict[str, str]


def aggregate_round(
    plan: FederatedPlan, sent: Mapping[str, Tensor], updates: Mapping[str, RoundUpdate]
) -> RoundAggregate:
    """Combine a round's updates (trunks that pass :func:`trunk_problem`) trusting no claim:

    1. an update whose cell count is not a positive integer is left out; a count above
       ``plan.max_site_cells`` counts as that many;
    2. each update's norm (:func:`update_norm`) is compared with the round's median norm over
       the valid updates: above ``outlier_factor`` times it the update is left out, above
       ``clip_factor`` times it the update is scaled down to that length;
    3. the rest are combined by ``plan.aggregation``: FedAvg with :func:`capped_shares` of the
       capped counts, or the coordinate-wise median or trimmed mean (every site once).

    With a majority of honest sites the median norm is an honest one, so no update counts for
    more than ``clip_factor`` times an honest update's length. A round left with no update keeps
    the trunk sent; nothing a site claims makes this fail.
    """
    left_out: dict[str, str] = {}
    valid: dict[str, RoundUpdate] = {}
    for site, update in sorted(updates.items()):
        if update.n_cells < 1:
            left_out[site] = f"claims {update.n_cells} cells; a count must be a positive integer"
        else:
            valid[site] = update
    norms = {s: update_norm(sent, u.trunk) for s, u in valid.items()}
    scale = statistics.median(norms.values()) if norms else 0.0
    used: dict[str, Mapping[str, Tensor]] = {}
    clipped = []
    for site, update in valid.items():
        if norms[site] > plan.outlier_factor * scale:
            left_out[site] = (
                f"update norm {norms[site]:.4g} > {plan.outlier_factor:g} x the round's median "
                f"{scale:.4g}"
            )
        elif norms[site] > plan.clip_factor * scale:
            used[site] = _shortened(sent, update.trunk, plan.clip_factor * scale / norms[site])
            clipped.append(site)
        else:
            used[site] = update.trunk
    for site, reason in left_out.items():
        log.warning("site %s: update left out of the round: %s", site, reason)
    cells = {s: min(valid[s].n_cells, plan.max_site_cells) for s in used}
    weights = _weights(plan, cells)
    if not used:
        trunk = dict(sent)
    elif plan.aggregation == "fedavg":
        trunk = average_trunks([(used[s], weights[s]) for s in used])
    else:
        n = len(used)
        cut = (n - 1) // 2 if plan.aggregation == "median" else int(plan.trim_fraction * n)
        trunk = trimmed_mean_trunks(list(used.values()), cut)
    return RoundAggregate(trunk, weights, cells, norms, scale, clipped, left_out)


def _weights(plan: FederatedPlan, cells: Mapping[str, int]) -> dict[str, float]:
    """The weight of each used site: capped shares for FedAvg, else equal."""
    if not cells:
        return {}
    if plan.aggregation == "fedavg":
        return capped_shares(cells, plan.max_site_share)
    return dict.fromkeys(cells, 1.0 / len(cells))


def _shortened(sent: Mapping[str, Tensor], trunk: Mapping[str, Tensor], factor: float) -> Trunk:
    """``sent + factor * (trunk - sent)`` for the floating-point tensors; counters as sent back."""
    return {
        k: (v + factor * (trunk[k] - v)) if v.is_floating_point() else trunk[k]
        for k, v in sent.items()
    }


def federated_release(
    plan: FederatedPlan,
    genes: Sequence[str],
    trunk: Mapping[str, Tensor],
    *,
    n_cells: int,
    sites: Sequence[str],
    history: Sequence[Mapping[str, Any]],
    unknown_threshold: float = DEFAULT_UNKNOWN_THRESHOLD,
) -> Release:
    """The release of a federated build: the final trunk, no conditions of its own, an empty
    prototype catalogue (sites' adaptors bring conditions and prototypes)."""
    model = CondVAE(plan.model_config(len(genes)), 0)
    load_trunk(model, trunk)
    model.freeze_all()
    latent_dim = model.config.latent_dim
    tensors = {MODEL_PREFIX + k: v for k, v in export_tensors(model).items()}
    levels = [plan.label_level] if plan.label_level else []
    empty = PrototypeSet.empty(latent_dim)
    for i in range(len(levels)):
        tensors.update(empty.to_tensors(prototype_prefix(i)))
    content = reference_content(
        preset=plan.preset_spec,
        model_cfg=model.config,
        recipe=plan.recipe,
        train=plan.training,
        seed=plan.seed,
        genes=list(genes),
        conditions=[],
        prototypes={lv: empty.describe() for lv in levels},
        unlabeled_prototypes=None,
        reference={"n_cells": int(n_cells), "keeps_latents": False,
                   "label_vocab": {lv: [] for lv in levels}},
        transfer={
            "method": "prototype",
            "unknown_thresholds": {
                "prototype": dict.fromkeys(transfer_levels(levels), unknown_threshold)
            },
        },
        federated={"plan": plan.to_dict(), "sites": list(sites), "rounds": list(history)},
    )  # fmt: skip
    return Release.assemble(content, tensors, release_provenance(None))


@dataclass
class FederatedResult:
    """A federated build run in one process: the release and each site's mapping onto it."""

    release: Release
    genes: list[str]
    mappings: dict[str, MappingResult]
    history: list[dict[str, Any]]


def train_federated(
    sites: Mapping[str, CellTable],
    plan: FederatedPlan,
    *,
    on_round: Callable[[int, list[str], Trunk, Mapping[str, SiteTrainer]], None] | None = None,
    on_update: Callable[[int, str, Trunk, RoundUpdate], RoundUpdate] | None = None,
) -> FederatedResult:
    """Run a whole federated build with every site in this process (what the Flower apps do,
    without transport). ``on_round(r, genes, trunk, trainers)`` sees the elected genes, the
    aggregated trunk and the sites (with the rows they keep) after every round.
    ``on_update(r, site, sent, update)`` returns what the coordinator receives from ``site``
    in round ``r`` in place of its honest ``update`` (a hostile site, for the tests)."""
    trainers = {s: SiteTrainer(cells, s, plan) for s, cells in sites.items()}
    universe = gene_universe([t.gene_names() for t in trainers.values()])
    genes = elect_genes(universe, [t.votes(universe) for t in trainers.values()], plan)
    trunk = initial_trunk(plan, len(genes))
    history: list[dict[str, Any]] = []
    for r in range(plan.rounds):
        started = time.perf_counter()
        updates = {}
        for site, trainer in trainers.items():
            update = trainer.train_round(genes, trunk, r)
            updates[site] = update if on_update is None else on_update(r, site, trunk, update)
        aggregate = aggregate_round(plan, trunk, updates)
        trunk = aggregate.trunk
        history.append(round_record(r, updates, aggregate, time.perf_counter() - started))
        log.info("federated round %d/%d: %s", r + 1, plan.rounds, history[-1]["loss"])
        if on_round is not None:
            on_round(r, genes, trunk, trainers)
    n_cells = sum(t.cells.counts.shape[0] for t in trainers.values())
    release = federated_release(
        plan, genes, trunk, n_cells=n_cells, sites=sorted(sites), history=history
    )
    mappings = {s: t.finish(release) for s, t in trainers.items()}
    return FederatedResult(release, genes, mappings, history)


def round_record(
    round_index: int,
    updates: Mapping[str, RoundUpdate],
    aggregate: RoundAggregate,
    seconds: float,
) -> dict[str, Any]:
    """A round's line in the release's history: per site the loss and the cells it claims;
    how the updates were combined (weights, update norms, their median, the sites clipped)
    and which were left out, with the reason."""
    return {
        "round": round_index + 1,
        "seconds": round(seconds, 3),
        "loss": {s: round(u.loss, 4) for s, u in sorted(updates.items())},
        "n_cells": {s: u.n_cells for s, u in sorted(updates.items())},
        "weights": {s: round(w, 4) for s, w in sorted(aggregate.weights.items())},
        "update_norms": {s: round(n, 4) for s, n in sorted(aggregate.norms.items())},
        "median_norm": round(aggregate.scale, 4),
        "clipped": sorted(aggregate.clipped),
        "left_out": dict(sorted(aggregate.left_out.items())),
    }
