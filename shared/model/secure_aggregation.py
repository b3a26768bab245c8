"""Secure aggregation of a federated build's rounds: what a site masks, what the coordinator
makes of the unmasked sum.

With :attr:`FederatedPlan.secure_aggregation` every round runs Flower's SecAgg+ protocol
(:mod:`fedatlas.coordinator.secure_rounds` drives ``SecAggPlusWorkflow``; the sites' ClientApps
run ``secaggplus_mod``): each site quantises its update, adds pairwise masks agreed with the
other sites and a private mask, and the coordinator can remove the masks only from the sum of
all the vectors. It learns the cell-weighted mean of the sites' updates and nothing about any
one site's update (while it follows the protocol: Flower's SecAgg+ assumes an honest-but-curious
server; one that sends different sites different dropout lists is outside its model).

The trust model's safeguards, and which of them survive:

- **weights**: each site weighs its own update by its own cell count, capped at
  ``max_site_cells`` (Flower's mod multiplies the vector by it before masking; the coordinator
  only receives the sum of the weights). The cap on a site's *share* (``max_site_share``) is
  not applied: it needs every site's count at the site, or the coordinator choosing the weights,
  and a coordinator that chooses weights can make one site's weight dominate and read its
  update off the mean. It is also moot against a hostile site under secure aggregation (below).
- **norm clipping**: site-side, before masking (:func:`site_vector`): the update (trunk minus
  trunk sent) is scaled down to the round's bound (:func:`clip_bound`): ``secure_clip_norm`` in
  the first round (in every round with DP), after that ``clip_factor`` times the previous round's
  mean update norm, which the sites aggregate securely as one more entry of the masked vector
  (the coordinator never sees a site's norm). The bound is also Flower's quantisation range:
  no coordinate of a clipped update lies outside it, so quantisation cuts nothing.
- **DP-FedAvg** (``dp_noise_multiplier`` > 0; off by default): with a fixed bound C the
  coordinator adds Gaussian noise of standard deviation ``dp_noise_multiplier * C * n_max / n``
  to every coordinate of the mean update (:func:`noise_std`; ``n_max / n`` is the largest weight
  in the mean, so ``C * n_max / n`` is what one site can move it). The noise protects the
  released trunk against its readers (central DP); the coordinator adds it, so it is no
  protection against the coordinator, which only sees the sum anyway.

What cannot be combined with secure aggregation (the coordinator never holds one site's update):

- the coordinate-wise **median** and **trimmed mean** need every site's value of each
  coordinate: a plan with secure aggregation must use ``fedavg``;
- **outlier rejection** and the coordinator's **median-norm clip** need each update's norm and
  the update itself to leave it out or shorten it; the clip moves to the sites (above), where an
  honest site applies it and a hostile one need not: Flower's SecAgg+ has no proof that a masked
  vector is clipped, so a hostile member can add any vector of the quantisation range to the sum,
  and can claim any weight;
- **checks of a returned trunk** (names, shapes, finite values) apply to the aggregate only;
- a round's record holds no per-site update norm (only the mean) and no per-site clip.

Integer tensors of the trunk (BatchNorm's batch counters) are not updates: they stay as sent.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedatlas.shared.model.federated import FederatedPlan, Trunk, update_norm

RECONSTRUCTION_THRESHOLD = 0.6  # of a site's key shares needed to remove its masks (SecAgg+)


def updated_names(sent: Mapping[str, torch.Tensor]) -> list[str]:
    """The trunk tensors a round updates (floating point), in the order they are masked: by
    name, which both sides agree on whatever order their trunk's tensors came in."""
    return sorted(name for name, tensor in sent.items() if tensor.is_floating_point())


def clip_bound(plan: FederatedPlan, previous_mean_norm: float | None) -> float:
    """The L2 bound of a site's update this round: ``secure_clip_norm`` in the first round and
    with DP (whose noise is calibrated to a fixed bound), else ``clip_factor`` times the
    previous round's mean update norm."""
    if plan.dp_noise_multiplier > 0 or not previous_mean_norm:
        return plan.secure_clip_norm
    return plan.clip_factor * previous_mean_norm


def site_vector(
    sent: Mapping[str, torch.Tensor], trunk: Mapping[str, torch.Tensor], clip: float
) -> list[np.ndarray]:
    """What a site hands to SecAgg+: its update (``trunk - sent`` over :func:`updated_names`)
    scaled down to L2 norm ``clip`` when longer, then its update's norm (at most ``clip``)."""
    norm = update_norm(sent, trunk)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    update = [
        ((trunk[k].to(torch.float64) - sent[k].to(torch.float64)) * factor).numpy()
        for k in updated_names(sent)
    ]
    return [*update, np.array([min(norm, clip)])]


def seed_quantisation(plan: FederatedPlan, round_index: int, site_id: str) -> None:
    """Seed NumPy's global generator, which Flower's SecAgg+ quantisation rounds with
    (stochastically), from the plan's seed, the round and the site: a secure build is then as
    reproducible as a plain one. The masks do not use it (their seeds are the protocol's
    secrets), nor does the DP noise."""
    np.random.seed((plan.seed * 1_000_003 + round_index * 7_919 + zlib.crc32(site_id.encode()))
                   % 2**32)  # fmt: skip


def noise_std(plan: FederatedPlan, clip: float, weights: Sequence[float]) -> float:
    """DP-FedAvg's noise on each coordinate of the mean update: ``dp_noise_multiplier`` times
    what one site can move the mean (its clip times its share of the weights)."""
    if plan.dp_noise_multiplier <= 0 or not weights:
        return 0.0
    return plan.dp_noise_multiplier * clip * max(weights) / sum(weights)


def aggregated_trunk(
    sent: Mapping[str, torch.Tensor], mean: Sequence[np.ndarray], std: float
) -> tuple[Trunk, float]:
    """The next trunk from the unmasked mean of the sites' vectors: ``sent`` plus the mean
    update (plus Gaussian noise of ``std`` on each coordinate), integer tensors as sent; and the
    mean update norm. :class:`ValueError` when the mean does not fit the trunk or is not finite."""
    names = updated_names(sent)
    if len(mean) != len(names) + 1:
        raise ValueError(f"the aggregate holds {len(mean)} arrays, expected {len(names) + 1}")
    rng = np.random.default_rng()  # fresh entropy: noise nobody can reproduce and subtract
    trunk: Trunk = dict(sent)
    for name, values in zip(names, mean[:-1], strict=True):
        expected = tuple(sent[name].shape)
        if values.shape != expected or not np.isfinite(values).all():
            raise ValueError(f"the aggregate's {name}: shape {values.shape} (expected "
                             f"{expected}) or values not finite")  # fmt: skip
        if std > 0:
            values = values + rng.normal(0.0, std, size=values.shape)
        update = torch.from_numpy(np.asarray(values, dtype=np.float64))
        trunk[name] = (sent[name].to(torch.float64) + update).to(sent[name].dtype)
    mean_norm = float(np.asarray(mean[-1]).reshape(-1)[0])
    if not math.isfinite(mean_norm):
        raise ValueError("the aggregate's mean update norm is not finite")
    return trunk, mean_norm


def secure_round_record(
    round_index: int,
    seconds: float,
    *,
    losses: Mapping[str, float],
    cells: Mapping[str, int],
    clip: float,
    mean_norm: float,
    std: float,
) -> dict[str, Any]:
    """A secure round's line in the release's history: per site its loss and the cells it
    weighed its update by (both sent in plain), the weights they make, the round's clip bound,
    the mean update norm (from the masked sum) and the DP noise; no per-site update norm."""
    total = sum(cells.values())
    return {
        "round": round_index + 1,
        "seconds": round(seconds, 3),
        "secure_aggregation": True,
        "loss": {s: round(v, 4) for s, v in sorted(losses.items())},
        "n_cells": dict(sorted(cells.items())),
        "weights": {s: round(n / total, 4) for s, n in sorted(cells.items())},
        "clip_norm": round(clip, 4),
        "mean_update_norm": round(mean_norm, 4),
        "noise_std": std,
        "left_out": {},
    }
