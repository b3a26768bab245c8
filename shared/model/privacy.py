"""Differential privacy of what leaves a site: the accountant, the budget and its mechanisms.

A site may release its adaptor under (epsilon, delta)-differential privacy with respect to
adding or removing one of its cells. Everything in the adaptor that its cells determine goes
through a Gaussian mechanism:

* ``training``: the new condition rows are trained by DP-SGD (:mod:`fedatlas.shared.model.dp_sgd`):
  each cell's gradient on the rows is clipped to ``clip`` and Gaussian noise of standard deviation
  ``noise_multiplier * clip`` is added to every minibatch's sum. Every cell falls in exactly one
  minibatch per epoch (drawn independently of the other cells), so one cell is in ``epochs``
  noisy sums.
* ``statistics``: a SCALEX preset's per-condition normalisation statistics (DSBN mean and
  per-dimension variance: :func:`noisy_mean`, then :func:`noisy_variance`, in two passes).
* ``prototypes``: per label, the count, mean and spread, and for a label new to the release
  its log d^2 moments (:func:`private_prototypes`).
* ``counts``: the cell count each new condition states.

**Accounting** is zero-concentrated DP (zCDP), after Bun & Steinke, "Concentrated Differential
Privacy: Simplifications, Extensions, and Lower Bounds" (TCC 2016): a Gaussian mechanism of L2
sensitivity ``S`` and noise ``sigma`` is ``rho = S^2 / (2 sigma^2)``-zCDP (their Prop. 1.6);
rho adds up under (adaptive) composition (Lemma 2.3); rho-zCDP implies
``(rho + 2 sqrt(rho ln(1/delta)), delta)``-DP for every delta > 0 (Prop. 1.3), whose inverse
gives the rho a site's (epsilon, delta) allows. Cells of different labels (or conditions) are
disjoint, so one label level's prototypes, or the per-condition counts, cost one mechanism's rho
(parallel composition); label levels, epochs and the four mechanisms add up. A site's budget per
release is the sum of the rho of every bundle it sent against that release.

What is public (no privacy cost): the release (all clipping bounds are derived from it), the site's
label vocabulary and batch names (a label is released only if its *noisy* count reaches the
coordinator's k), and the mapping recipe (epochs, batch size: fixed before any cell is read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.prototypes import PrototypeSet
from fedatlas.shared.validation import Int, MapOf, Num, Record, Str

ACCOUNTING = "zcdp"
DEFAULT_DELTA = 1e-5
# What a site's bundle spends unless it says otherwise (``--epsilon``). Without DP, membership
# inference on the adaptor and prototypes reached AUC 0.58-0.62 for sites of 50-100 cells
# (bench/membership.py); at epsilon 1 it stayed at or below 0.53 for 50-5,000 cells.
DEFAULT_EPSILON = 1.0
# How a bundle's rho is shared among the mechanisms it uses (renormalised over those present).
# Prototypes carry most of what a composite gains from a site; the condition rows trained by
# DP-SGD moved scPoli's latent by about 1e-3 on CellBench, so they get less.
SHARES: dict[str, float] = {"training": 0.3, "prototypes": 0.55, "statistics": 0.1, "counts": 0.05}
GRADIENT_CLIP = 1.0  # per-cell gradient norm on the condition rows (DP-SGD)
PROTOTYPE_SENSITIVITY_SQ = 6.0  # count, coarse and fine sums, spread, log d^2 centre and spread
LOG_D2_CLIP = 3.0  # log d^2 offsets clipped to +- this
# A DP prototype is sent only if its mean's noise (per dimension) is at most this share of the
# label's spread (standard deviation per dimension): noisier ones would move the composite's
# prototypes more than they inform them.
NOISE_TO_SPREAD = 0.5
STATISTICS_SENSITIVITY_SQ = 3.0  # count, sum, squared deviations
# the ``privacy`` record of an adaptor's content
PRIVACY_RECORD = Record(
    {
        "accounting": Str(16),
        "epsilon": Num(),
        "delta": Num(),
        "rho": Num(),
        "mechanisms": MapOf(
            Record(
                {"rho": Num(), "sigma": Num()},
                {
                    "noise_multiplier": Num(),
                    "clip": Num(),
                    "epochs": Int(0, 1_000_000),
                    "levels": Int(0, 32),
                },
            ),
            8,
        ),
    }
)


def rho_for(epsilon: float, delta: float) -> float:
    """The zCDP rho whose (epsilon, delta)-DP conversion is exactly ``epsilon`` at ``delta``."""
    if math.isinf(epsilon):
        return math.inf
    log_term = math.log(1.0 / delta)
    return (math.sqrt(epsilon + log_term) - math.sqrt(log_term)) ** 2


def epsilon_for(rho: float, delta: float) -> float:
    """The epsilon of rho-zCDP at ``delta`` (Bun & Steinke 2016, Prop. 1.3)."""
    if math.isinf(rho):
        return math.inf
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def gaussian_sigma(sensitivity_sq: float, rho: float) -> float:
    """Noise standard deviation that makes a Gaussian mechanism of squared L2 sensitivity
    ``sensitivity_sq`` rho-zCDP."""
    return math.sqrt(sensitivity_sq / (2.0 * rho))


def gaussian_rho(sensitivity_sq: float, sigma: float) -> float:
    """The rho of a Gaussian mechanism (Bun & Steinke 2016, Prop. 1.6)."""
    return sensitivity_sq / (2.0 * sigma**2)


@dataclass(frozen=True)
class PrivacySpec:
    """What one bundle may spend: (epsilon, delta)-DP for adding or removing one cell."""

    epsilon: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"epsilon must be a positive finite number, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def rho(self) -> float:
        """The bundle's zCDP budget."""
        return rho_for(self.epsilon, self.delta)

    def budget(self, mechanisms: Sequence[str]) -> dict[str, float]:
        """The rho each of ``mechanisms`` gets (:data:`SHARES`, renormalised)."""
        unknown = sorted(set(mechanisms) - set(SHARES))
        if unknown:
            raise ValueError(f"unknown mechanisms {unknown}")
        total = sum(SHARES[m] for m in mechanisms)
        return {m: self.rho * SHARES[m] / total for m in mechanisms}


def privacy_record(spec: PrivacySpec, mechanisms: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``privacy`` entry of an adaptor's content: the spec, the rho spent (the sum over
    ``mechanisms``, each with its ``rho`` and parameters) and its epsilon at the spec's delta."""
    rho = sum(float(m["rho"]) for m in mechanisms.values())
    return {
        "accounting": ACCOUNTING,
        "epsilon": epsilon_for(rho, spec.delta),
        "delta": spec.delta,
        "rho": rho,
        "mechanisms": {k: dict(v) for k, v in sorted(mechanisms.items())},
    }


def record_problem(record: Mapping[str, Any]) -> str | None:
    """Why a bundle's ``privacy`` record does not add up (None when it does): every mechanism's
    rho must follow from its noise and sensitivity, the total from the parts, epsilon from the
    total at its delta. The shape is checked before (:data:`PRIVACY_RECORD`)."""
    if record["accounting"] != ACCOUNTING:
        return f"accounting {str(record['accounting'])!r}, expected {ACCOUNTING!r}"
    delta = float(record["delta"])
    if not 0 < delta < 1:
        return f"delta {delta} is not in (0, 1)"
    parts = 0.0
    for name, mech in record["mechanisms"].items():
        sigma = float(mech["sigma"])
        if name not in SHARES or sigma <= 0:
            return f"mechanism {name[:32]!r}: unknown, or noise {sigma} not positive"
        expected = gaussian_rho(_sensitivity_sq(name, mech), sigma)
        if not math.isclose(float(mech["rho"]), expected, rel_tol=1e-6):
            return (
                f"mechanism {name!r}: rho {mech['rho']} does not follow from its noise "
                f"({expected:.6g})"
            )
        parts += expected
    if not math.isclose(float(record["rho"]), parts, rel_tol=1e-6):
        return f"rho {record['rho']} is not the sum of its mechanisms' ({parts:.6g})"
    if not math.isclose(float(record["epsilon"]), epsilon_for(parts, delta), rel_tol=1e-6):
        return f"epsilon {record['epsilon']} does not follow from rho {parts:.6g} at delta {delta}"
    return None


def count_slack(record: Mapping[str, Any], n_labels: int, n_conditions: int, claimed: int) -> int:
    """How far a DP bundle's prototype counts may honestly exceed its conditions' cells (both
    noisy): four standard deviations of the difference, at most ``claimed`` itself."""
    mechanisms = record["mechanisms"]
    var = n_conditions * float(mechanisms.get("counts", {}).get("sigma", 0.0)) ** 2
    var += n_labels * float(mechanisms.get("prototypes", {}).get("sigma", 0.0)) ** 2
    return min(math.ceil(4.0 * math.sqrt(var)), claimed)


def _sensitivity_sq(name: str, mech: Mapping[str, Any]) -> float:
    """Squared sensitivity (in units of the noise's scale) of a mechanism over its releases."""
    if name == "training":  # ``epochs`` noisy sums hold the cell, each with noise z * clip
        return float(mech.get("epochs", 0)) * float(mech.get("clip", 0.0)) ** 2
    if name == "prototypes":
        return PROTOTYPE_SENSITIVITY_SQ * float(mech.get("levels", 0))
    if name == "statistics":
        return STATISTICS_SENSITIVITY_SQ
    return 1.0  # counts


# ------------------------------------------------------------------------------ mechanisms


@dataclass(frozen=True)
class LatentBounds:
    """Where a label's cells are clipped, derived from the release's catalogue only (public).

    A label the catalogue has is clipped around its prototype's mean, to twice the root of its
    summed variances. A new label is located in two steps: a coarse mean of offsets from the
    catalogue's count-weighted centre clipped to ``radius`` (covering every prototype with three
    standard deviations to spare), then offsets from that coarse mean clipped to ``typical``
    (the median of the known labels' clipping radii).
    """

    catalogue: PrototypeSet
    center: NDArray[np.float64]
    radius: float
    typical: float

    @classmethod
    def of(cls, catalogue: PrototypeSet, latent_dim: int) -> LatentBounds:
        """The bounds of a catalogue (without prototypes: a unit-variance latent's)."""
        if not len(catalogue):
            unit = math.sqrt(latent_dim)
            return cls(catalogue, np.zeros(latent_dim), 4.0 * unit, 2.0 * unit)
        means = catalogue.means.astype(np.float64)
        weights = catalogue.counts.astype(np.float64)
        center = (means * weights[:, None]).sum(axis=0) / max(weights.sum(), 1.0)
        spread = np.sqrt(catalogue.variances.astype(np.float64).sum(axis=1))
        offsets = np.linalg.norm(means - center, axis=1)
        radius = float((offsets + 3.0 * spread).max())
        return cls(catalogue, center, radius, float(np.median(2.0 * spread)))

    def known(self, label: str) -> int | None:
        """The catalogue's index of ``label`` (None for a new label)."""
        return self.catalogue.labels.index(label) if label in self.catalogue.labels else None


def clip_rows(rows: NDArray[np.float64], bound: float) -> NDArray[np.float64]:
    """Each row scaled down, if needed, to L2 norm ``bound``."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def noisy_mean(
    n_rows: int,
    clipped_sum: NDArray[np.float64],
    center: NDArray[np.float64],
    radius: float,
    sigma: float,
    rng: np.random.Generator,
) -> tuple[float, NDArray[np.float64]]:
    """Noisy count and mean from the count and the sum of offsets from ``center`` clipped to
    ``radius`` (two releases of sensitivity 1 in units of ``sigma``)."""
    count = n_rows + rng.normal(0.0, sigma)
    total = clipped_sum + rng.normal(0.0, sigma * radius, clipped_sum.shape)
    return count, center + total / max(count, 1.0)


def noisy_variance(
    clipped_squares: NDArray[np.float64],
    count: float,
    deviation: float,
    sigma: float,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Noisy per-dimension variance from the sum of squared deviations (from a released mean)
    clipped to ``deviation`` (one release of sensitivity 1 in units of ``sigma``)."""
    noise = rng.normal(0.0, sigma * deviation**2, clipped_squares.shape)
    return np.maximum((clipped_squares + noise) / max(count, 1.0), 0.0)


def private_prototypes(
    latent: NDArray[np.float32],
    labels: NDArray[np.object_],
    vocabulary: Sequence[str],
    source: str,
    *,
    bounds: LatentBounds,
    sigma: float,
    min_cells: int,
    rng: np.random.Generator,
) -> tuple[PrototypeSet, dict[str, int]]:
    """Prototypes of every label of ``vocabulary`` whose noisy count reaches ``min_cells``.

    Per label, Gaussian releases of sensitivity 1 in units of ``sigma`` (squared sensitivity
    at most :data:`PROTOTYPE_SENSITIVITY_SQ`): the count, the sum of clipped offsets (twice for a
    new label: coarse, then fine; :class:`LatentBounds`), the sum of each cell's mean squared
    clipped deviation from the noisy mean (the spread) and, for a new label, its log d^2 centre
    and spread (:func:`_noisy_log_d2`). The per-dimension variances are the spread times the
    catalogue's variance profile of the label (isotropic for a new label); a known label keeps
    the catalogue's log d^2 moments, so its radius is the catalogue's. A label is withheld when
    its noisy count is below ``min_cells`` or too small for the noise: its mean's noise would
    exceed :data:`NOISE_TO_SPREAD` of the spread (the clip radius is twice the root of the summed
    variances, so that takes ``4 sqrt(dim) sigma`` cells). Returns the set and the labels
    withheld (label -> rounded noisy count)."""
    values = np.asarray(labels, dtype=object)
    dim = latent.shape[1]
    catalogue = bounds.catalogue
    min_cells = max(min_cells, math.ceil(2.0 * math.sqrt(dim) * sigma / NOISE_TO_SPREAD))
    kept: list[tuple[str, float, NDArray[np.float64], NDArray[np.float64], tuple[float, float]]]
    kept, withheld = [], {}
    for name in sorted(vocabulary):
        rows = latent[values == name].astype(np.float64)
        k = bounds.known(name)
        if k is not None:
            clip = 2.0 * math.sqrt(float(catalogue.variances[k].astype(np.float64).sum()))
            count, mean = _noisy_label_mean(rows, catalogue.means[k], clip, sigma, rng)
            profile = catalogue.variances[k].astype(np.float64)
        else:
            clip = bounds.typical
            count, coarse = _noisy_label_mean(rows, bounds.center, bounds.radius, sigma, rng)
            _, mean = _noisy_label_mean(rows, coarse, clip, sigma, rng, count=count)
            profile = np.ones(dim)
        n = max(count, 1.0)
        squares = (clip_rows(rows - mean, clip) ** 2).sum() / dim
        spread = (squares + rng.normal(0.0, sigma * clip**2 / dim)) / n
        spread = max(spread, 1e-3 * float(profile.mean()))
        variances = profile * spread / float(profile.mean())
        if k is not None:
            log_d2 = (float(catalogue.log_d2[k, 0]), float(catalogue.log_d2[k, 1]))
        else:
            log_d2 = _noisy_log_d2(rows, mean, variances, sigma, rng, n)
        if count < min_cells:
            withheld[name] = max(round(count), 0)
            continue
        kept.append((name, count, mean, variances, log_d2))
    if not kept:
        return PrototypeSet.empty(dim), withheld
    pset = PrototypeSet(
        tuple(k[0] for k in kept),
        np.asarray([k[2] for k in kept], np.float32),
        np.asarray([k[3] for k in kept], np.float32),
        np.asarray([round(k[1]) for k in kept], np.int64),
        np.asarray([k[4] for k in kept], np.float32),
        tuple((source,) for _ in kept),
    )
    return pset, withheld


def _noisy_log_d2(
    rows: NDArray[np.float64],
    mean: NDArray[np.float64],
    variances: NDArray[np.float64],
    sigma: float,
    rng: np.random.Generator,
    count: float,
) -> tuple[float, float]:
    """Mean and variance of a new label's log d^2 (cells against its noisy mean and variances):
    two releases of sensitivity :data:`LOG_D2_CLIP`, the offsets from log(dim) and their
    absolute deviations from the noisy offset; the variance is pi / 2 times the squared mean
    absolute deviation, as for a normal."""
    dim = rows.shape[1]
    inv = 1.0 / np.maximum(variances, 0.01 * float(variances.mean()))
    logs = np.log((((rows - mean) ** 2) * inv).sum(axis=1) + 1e-6) - math.log(dim)
    total = np.clip(logs, -LOG_D2_CLIP, LOG_D2_CLIP).sum()
    offset = (total + rng.normal(0.0, sigma * LOG_D2_CLIP)) / count
    deviation = np.abs(np.clip(logs - offset, -LOG_D2_CLIP, LOG_D2_CLIP)).sum()
    deviation = max(deviation + rng.normal(0.0, sigma * LOG_D2_CLIP), 0.0) / count
    return math.log(dim) + offset, math.pi / 2 * deviation**2


def _noisy_label_mean(
    rows: NDArray[np.float64],
    center: NDArray[np.floating[Any]],
    clip: float,
    sigma: float,
    rng: np.random.Generator,
    count: float | None = None,
) -> tuple[float, NDArray[np.float64]]:
    """Noisy count (unless ``count``, already released, is given) and mean of ``rows``."""
    c = np.asarray(center, dtype=np.float64)
    clipped = clip_rows(rows - c, clip).sum(axis=0) if rows.size else np.zeros_like(c)
    if count is None:
        return noisy_mean(rows.shape[0], clipped, c, clip, sigma, rng)
    total = clipped + rng.normal(0.0, sigma * clip, c.shape)
    return count, c + total / max(count, 1.0)


def private_counts(counts: Sequence[int], sigma: float, rng: np.random.Generator) -> list[int]:
    """Each condition's cell count plus Gaussian noise, rounded, at least 1."""
    return [max(round(c + rng.normal(0.0, sigma)), 1) for c in counts]
