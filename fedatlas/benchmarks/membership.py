"""Membership inference against what a site sends: can someone holding the composite tell
whether a given cell was among the cells a site trained its adaptor on?

The attacker holds the composite (the release, the site's adaptor rows and its prototypes), a
candidate cell with its label, and cells of the same population that the site did not use. It
trains *shadow sites* on those cells by the same mapping path (:func:`map_onto`, the site's
recipe) and scores every candidate against the target site and against each shadow:

* ``adaptor``, a likelihood ratio on the adaptor rows (:func:`condition_scores`): the cell's
  ELBO (NB / Bernoulli reconstruction likelihood of its counts minus the KL term, at the
  posterior mean) under the site's condition, minus its best ELBO under a reference condition;
* ``prototype``, distance to prototype: minus the log standardised squared distance of the
  cell's latent position (encoded with the site's condition) to the site's prototype of the
  cell's label (in that prototype's per-dimension spread);
* ``combined``: the sum of the two per-candidate statistics.

Calibration follows offline LiRA (Carlini et al., "Membership Inference Attacks From First
Principles", IEEE S&P 2022): the shadows never saw any candidate, so their scores are samples of
a candidate's score as a non-member (OUT). ``global`` fits one Gaussian to all OUT scores (its
ranking is the raw score's); ``lira`` fits one per candidate (mean over the shadows, standard
deviation shrunk towards the pooled one, :data:`SHRINKAGE`) and ranks by the standardised score.

Members are the target site's cells (at most ``max_candidates`` of them are scored), non-members
as many held-out cells of the same population; shadows train on further cells of it, disjoint
from both. Synthetic sites come from a :class:`SyntheticWorld` site; CellBench sites from the
singlets of the two 5-line CEL-seq2 plates (the S1 query stems), the reference being S1's.

Used by ``bench/membership.py`` (table, JSON, PNG) and ``tests/test_membership.py``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from scipy.stats import rankdata

from fedatlas.benchmarks.cellbench import QUERY_STEMS, load_scenario
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.config import PreprocessingRecipe
from fedatlas.shared.data.dataset import CellTable, extract_cells
from fedatlas.shared.data.genes import align_genes
from fedatlas.shared.model.adaptor import Adaptor, compose
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.nn.vae import CondVAE
from fedatlas.shared.model.prototypes import PrototypeSet, standardized_sq_distances
from fedatlas.shared.model.release import Release
from fedatlas.shared.model.training import TrainingData, make_batch

ATTACKS = ("adaptor", "prototype", "combined")
CALIBRATIONS = ("global", "lira")
TARGET = "target"
SHADOW = "shadow"
SITE = "clinic"  # the synthetic site whose population the target and the shadows sample
SITE_BATCHES = ("b1",)
REFERENCE_BATCHES = ("r1", "r2", "r3")
CELLBENCH_LABEL = "cell_line"
SYNTHETIC_LABEL = "cell_type"
FPR = 0.01  # TPR is reported at this false-positive rate
SHRINKAGE = 4.0  # pseudo-shadows of pooled variance in each candidate's OUT variance
SCORE_CHUNK_CELLS = 512


# --------------------------------------------------------------------------------- the cells


@dataclass
class SiteSample:
    """One experiment's cells: the target site's (members), held-out cells of the same
    population (non-members) and each shadow site's, all disjoint."""

    members: CellTable  # every cell the target site trains on
    non_members: CellTable
    shadows: list[CellTable]
    scored_members: NDArray[np.int64]  # rows of ``members`` that are scored

    def candidates(self) -> tuple[CellTable, NDArray[np.bool_]]:
        """The scored members then the non-members, and which are members; equally many."""
        scored = subset(self.members, self.scored_members)
        if scored.n_cells != self.non_members.n_cells:
            raise ValueError("members and non-members are not equally many")
        is_member = np.arange(2 * scored.n_cells) < scored.n_cells
        return concatenate([scored, self.non_members]), is_member


def subset(cells: CellTable, rows: NDArray[np.int64]) -> CellTable:
    """The cells ``rows`` of ``cells``."""
    return CellTable(
        cells.counts[rows],
        list(cells.genes),
        cells.batches[rows],
        {k: v[rows] for k, v in cells.labels.items()},
    )


def concatenate(tables: Sequence[CellTable]) -> CellTable:
    """Cells of several tables with the same genes and label keys, in order."""
    first = tables[0]
    if any(t.genes != first.genes or t.labels.keys() != first.labels.keys() for t in tables):
        raise ValueError("tables differ in genes or label keys")
    return CellTable(
        sp.vstack([t.counts for t in tables], format="csr"),
        list(first.genes),
        np.concatenate([t.batches for t in tables]),
        {k: np.concatenate([t.labels[k] for t in tables]) for k in first.labels},
    )


def _scored(n_cells: int, max_candidates: int, rng: np.random.Generator) -> NDArray[np.int64]:
    n = min(n_cells, max_candidates)
    return np.sort(rng.choice(n_cells, size=n, replace=False)).astype(np.int64)


def synthetic_world(n_genes: int = 2000, seed: int = 0) -> SyntheticWorld:
    """The world of the synthetic experiments (six cell types)."""
    return SyntheticWorld(seed=seed, n_genes=n_genes)


def synthetic_reference(world: SyntheticWorld, n_cells: int = 3000, seed: int = 0) -> CellTable:
    """Reference cells of ``world``: three batches, every type."""
    adata = world.sample(n_cells, batches=REFERENCE_BATCHES, seed=seed)
    return _cells(adata, "synthetic reference", SYNTHETIC_LABEL)


def synthetic_sample(
    world: SyntheticWorld, n_cells: int, *, n_shadows: int, seed: int, max_candidates: int
) -> SiteSample:
    """A site of ``n_cells`` cells of the world's site :data:`SITE`, as many non-members (at
    most ``max_candidates``) and ``n_shadows`` shadow sites of ``n_cells`` cells each, every
    set an independent draw of that site's population."""

    def draw(n: int, k: int) -> CellTable:
        adata = world.sample(n, batches=SITE_BATCHES, site=SITE, seed=1000 * seed + 100 + k)
        return _cells(adata, f"synthetic site draw {k}", SYNTHETIC_LABEL)

    rng = np.random.default_rng([seed, n_cells])
    scored = _scored(n_cells, max_candidates, rng)
    return SiteSample(
        members=draw(n_cells, 0),
        non_members=draw(scored.size, 1),
        shadows=[draw(n_cells, 2 + k) for k in range(n_shadows)],
        scored_members=scored,
    )


def cellbench_cells(data_dir: Path) -> tuple[CellTable, CellTable]:
    """CellBench S1's reference cells and the pool of site cells: the singlets of the two
    5-line CEL-seq2 plates (same lines, same protocol; each plate its own batch)."""
    scenario = load_scenario(data_dir, "S1")
    plates = anndata.concat([scenario.queries[s] for s in QUERY_STEMS], join="outer", fill_value=0)
    return (
        _cells(scenario.reference, "CellBench S1 reference", CELLBENCH_LABEL),
        _cells(plates, "CellBench plates 2 and 3", CELLBENCH_LABEL),
    )


def cellbench_sample(
    pool: CellTable, n_cells: int, *, n_shadows: int, seed: int, max_candidates: int
) -> SiteSample:
    """A site of ``n_cells`` random cells of ``pool``, as many other cells as non-members, and
    ``n_shadows`` shadow sites of ``n_cells`` cells each, drawn from the rest of the pool (so
    shadows overlap one another but never a candidate). Needs 3 x ``n_cells`` cells."""
    if 3 * n_cells > pool.n_cells:
        raise ValueError(f"a site of {n_cells} cells needs {3 * n_cells} pool cells")
    rng = np.random.default_rng([seed, n_cells, 7])
    order = rng.permutation(pool.n_cells)
    scored = _scored(n_cells, max_candidates, rng)
    members, non_members = order[:n_cells], order[n_cells : n_cells + scored.size]
    rest = order[n_cells + scored.size :]
    shadows = [np.sort(rng.choice(rest, size=n_cells, replace=False)) for _ in range(n_shadows)]
    return SiteSample(
        members=subset(pool, np.sort(members)),
        non_members=subset(pool, np.sort(non_members)),
        shadows=[subset(pool, rows) for rows in shadows],
        scored_members=scored,
    )


def _cells(adata: anndata.AnnData, source: str, label_key: str) -> CellTable:
    return extract_cells(adata, source=source, batch_key="batch", label_keys=[label_key])


# ------------------------------------------------------------------------------- the attacks


@dataclass
class Scores:
    """Per attack, the target's raw score of every candidate and each shadow's (shadows x
    candidates; NaN where a shadow has no prototype of the candidate's label)."""

    target: dict[str, NDArray[np.float64]]
    shadows: dict[str, NDArray[np.float64]]
    is_member: NDArray[np.bool_]
    target_adaptor: Adaptor
    shadow_adaptors: list[Adaptor]
    seconds: dict[str, float] = field(default_factory=dict)


def train_adaptors(
    release: Release, sample: SiteSample, options: MappingOptions
) -> tuple[Adaptor, list[Adaptor]]:
    """The target site's adaptor (site id :data:`TARGET`) and each shadow's (``shadowK``, seed
    ``options.seed + 1 + K``), all trained by :func:`map_onto` with ``options``."""

    def adaptor(cells: CellTable, site_id: str, seed: int) -> Adaptor:
        opts = dataclasses.replace(options, site_id=site_id, seed=seed)
        result = map_onto(release, cells, opts, source=site_id, progress=False)
        if result.adaptor is None:
            raise ValueError(f"{site_id}: nothing was trained")
        return result.adaptor

    target = adaptor(sample.members, TARGET, options.seed)
    shadows = [
        adaptor(cells, f"{SHADOW}{k}", options.seed + 1 + k)
        for k, cells in enumerate(sample.shadows)
    ]
    return target, shadows


@torch.no_grad()
def condition_scores(
    model: CondVAE, data: TrainingData, recipe: PreprocessingRecipe, conditions: Sequence[int]
) -> tuple[NDArray[np.float64], NDArray[np.float32]]:
    """Every cell of ``data`` under each of ``conditions`` (rows of the model's condition
    tables): its ELBO (log-likelihood of its data at the posterior mean minus the KL term;
    cells x conditions) and its latent mean (conditions x cells x latent)."""
    model.eval()
    elbo = np.empty((data.n_cells, len(conditions)), dtype=np.float64)
    latent = np.empty((len(conditions), data.n_cells, model.config.latent_dim), dtype=np.float32)
    for start in range(0, data.n_cells, SCORE_CHUNK_CELLS):
        rows = np.arange(start, min(start + SCORE_CHUNK_CELLS, data.n_cells))
        batch = make_batch(data, rows, recipe)
        x = batch.model_input
        for j, c in enumerate(conditions):
            condition = torch.full((rows.size,), int(c), dtype=torch.int64)
            mean, log_var = model.encode(x, condition)
            out = model.decode(mean, condition)
            recon = model.reconstruction_nll(
                out, batch.counts, batch.nonzero, batch.library, condition,
                x if model.scores_transformed_input else None,
            )  # fmt: skip
            kl = -0.5 * (1 + log_var - mean**2 - log_var.exp()).sum(dim=-1)
            elbo[rows, j] = -(recon + kl).double().numpy()
            latent[j, rows] = mean.numpy()
    return elbo, latent


def prototype_score(
    latent: NDArray[np.float32], labels: NDArray[np.object_], prototypes: PrototypeSet
) -> NDArray[np.float64]:
    """Minus the log standardised squared distance of each cell (``latent``: one row per
    cell under each of the site's conditions, conditions x cells x latent; the nearest counts)
    to the site's prototype of its label; NaN where the site has no prototype of it."""
    out = np.full(latent.shape[1], np.nan)
    for i, label in enumerate(prototypes.labels):
        rows = np.flatnonzero(labels == label)
        if rows.size:
            mean, var = prototypes.means[i : i + 1], prototypes.variances[i : i + 1]
            d2 = np.min([standardized_sq_distances(z[rows], mean, var)[:, 0] for z in latent], 0)
            out[rows] = -np.log(d2 + 1e-9)
    return out


def score_candidates(
    release: Release, target: Adaptor, shadows: Sequence[Adaptor], candidates: CellTable
) -> tuple[dict[str, NDArray[np.float64]], dict[str, NDArray[np.float64]]]:
    """Each attack's raw score of every candidate against the target and against each shadow
    (``adaptor`` and ``prototype``; see the module docstring), from the composite of the
    release and all those adaptors."""
    composite = compose(release, [target, *shadows])
    model, names = composite.build_model(), composite.condition_names
    n_reference = len(release.condition_names)
    sites = [target, *shadows]
    rows_of = [[names.index(c) for c in a.condition_names] for a in sites]
    alignment = align_genes(candidates.genes, composite.genes, source="candidates")
    counts = alignment.apply(candidates.counts)
    zeros = np.zeros(candidates.n_cells, dtype=np.int64)
    data = TrainingData.for_recipe(counts, zeros, [], composite.recipe)
    columns = [*range(n_reference), *(r for rows in rows_of for r in rows)]
    elbo, latent = condition_scores(model, data, composite.recipe, columns)
    column = {c: j for j, c in enumerate(columns)}
    best_reference = elbo[:, :n_reference].max(axis=1)
    labels = next(iter(candidates.labels.values()))
    adaptor, proto = [], []
    for site, rows in zip(sites, rows_of, strict=True):
        js = [column[r] for r in rows]
        adaptor.append(elbo[:, js].max(axis=1) - best_reference)
        proto.append(prototype_score(latent[js], labels, site.prototypes(0)))
    scores = {"adaptor": np.asarray(adaptor), "prototype": np.asarray(proto)}
    return {k: v[0] for k, v in scores.items()}, {k: v[1:] for k, v in scores.items()}


def run_attacks(release: Release, sample: SiteSample, options: MappingOptions) -> Scores:
    """Train the target and shadow sites on ``sample`` and score its candidates."""
    t0 = time.perf_counter()
    target, shadows = train_adaptors(release, sample, options)
    t1 = time.perf_counter()
    candidates, is_member = sample.candidates()
    on_target, on_shadows = score_candidates(release, target, shadows, candidates)
    t2 = time.perf_counter()
    seconds = {"train": t1 - t0, "score": t2 - t1}
    return Scores(on_target, on_shadows, is_member, target, shadows, seconds)


# ---------------------------------------------------------------------------- calibration


def lira_statistic(
    target: NDArray[np.float64], shadows: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Offline LiRA: each candidate's target score standardised by a Gaussian fit of its OUT
    scores (``shadows``, shadows x candidates, NaN = missing): per-candidate mean; variance
    shrunk towards the pooled per-candidate variance with :data:`SHRINKAGE` pseudo-shadows.
    0 where the target score is missing; a candidate with fewer than two OUT scores is
    standardised by the global fit."""
    k = np.sum(np.isfinite(shadows), axis=0)
    enough = k >= 2
    out = np.zeros(target.shape, dtype=np.float64)
    if not enough.any():
        return out
    cols = shadows[:, enough]
    mean = np.full(target.shape, np.nan)
    var = np.full(target.shape, np.nan)
    mean[enough] = np.nanmean(cols, axis=0)
    var[enough] = np.nanvar(cols, axis=0, ddof=1)
    pooled = float(np.mean(var[enough]))
    sd = np.sqrt(((k - 1) * np.nan_to_num(var) + SHRINKAGE * pooled) / (k - 1 + SHRINKAGE))
    everything = shadows[np.isfinite(shadows)]
    g_mean, g_sd = float(everything.mean()), float(everything.std()) or 1.0
    stat = np.where(enough, (target - mean) / np.maximum(sd, 1e-12), (target - g_mean) / g_sd)
    finite = np.isfinite(target)
    out[finite] = stat[finite]
    return out


def global_statistic(
    target: NDArray[np.float64], shadows: NDArray[np.float64]
) -> NDArray[np.float64]:
    """The target score standardised by one Gaussian over all OUT scores (0 where missing)."""
    everything = shadows[np.isfinite(shadows)]
    if everything.size < 2:
        return np.zeros(target.shape, dtype=np.float64)
    stat = (target - everything.mean()) / (everything.std() or 1.0)
    return np.where(np.isfinite(stat), stat, 0.0)


def statistics(scores: Scores) -> dict[str, dict[str, NDArray[np.float64]]]:
    """Per attack (:data:`ATTACKS`) and calibration (:data:`CALIBRATIONS`), every candidate's
    membership statistic (higher: more likely a member); ``combined`` adds the other two."""
    out: dict[str, dict[str, NDArray[np.float64]]] = {}
    for attack in ("adaptor", "prototype"):
        t, s = scores.target[attack], scores.shadows[attack]
        out[attack] = {"global": global_statistic(t, s), "lira": lira_statistic(t, s)}
    out["combined"] = {c: out["adaptor"][c] + out["prototype"][c] for c in CALIBRATIONS}
    return out


# ------------------------------------------------------------------------------ evaluation


def auc(statistic: NDArray[np.float64], is_member: NDArray[np.bool_]) -> float:
    """Area under the ROC curve of ``statistic`` for telling members (ties count half)."""
    ranks = rankdata(statistic)
    n1, n0 = int(is_member.sum()), int((~is_member).sum())
    return float((ranks[is_member].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(
    statistic: NDArray[np.float64], is_member: NDArray[np.bool_], fpr: float = FPR
) -> float:
    """Share of members above the strictest threshold that lets through at most ``fpr`` of
    the non-members (with fewer than 1/``fpr`` non-members: none of them)."""
    negatives = np.sort(statistic[~is_member])[::-1]
    allowed = math.floor(fpr * negatives.size)
    threshold = negatives[allowed] if allowed < negatives.size else -np.inf
    return float(np.mean(statistic[is_member] > threshold))


def null_auc_sd(n_members: int, n_non_members: int) -> float:
    """Standard deviation of the AUC of a statistic that knows nothing (Mann-Whitney)."""
    return math.sqrt((n_members + n_non_members + 1) / (12.0 * n_members * n_non_members))


def evaluate(scores: Scores) -> dict[str, dict[str, dict[str, float]]]:
    """AUC and TPR at :data:`FPR` of every attack and calibration."""
    return {
        attack: {
            calibration: {
                "auc": auc(stat, scores.is_member),
                "tpr_at_1pct_fpr": tpr_at_fpr(stat, scores.is_member),
            }
            for calibration, stat in by_calibration.items()
        }
        for attack, by_calibration in statistics(scores).items()
    }
