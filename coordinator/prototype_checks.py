"""Bounds on what one site's prototypes may do to everyone's labels.

A prototype is an aggregate a site computes on cells nobody else sees, so the coordinator cannot
check it against data. It checks it against the catalogue instead (the current composite's
prototypes, the reference's and every accepted site's): a known label's prototype must sit where
that label sits and spread about as much; a new label must not look like a known one, nor sit on
top of one; counts must fit the cells the site's conditions claim. Each failure is a
:class:`~fedatlas.coordinator.verification.Rejection` with its reason code. Together with the
capped, per-site merge of :func:`fedatlas.shared.model.adaptor.compose`, this bounds how far one
member moves another site's labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedatlas.coordinator.policy import Policy
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.privacy import count_slack
from fedatlas.shared.model.prototypes import PrototypeSet, standardized_sq_distances
from fedatlas.shared.names import label_problem, skeleton

# A new label's mean must lie outside this share of every known label's typical squared
# distance (the median of its own cells', in its standardised units): a copy of a known
# prototype under a new name sits at 0. Measured on honest sites (CellBench S2's unseen lines
# under all three presets, synthetic data): the closest new label sat at 0.63 of a known
# label's typical distance, most at 1.0 to 42.
NEW_LABEL_CORE = 0.25


@dataclass(frozen=True)
class PrototypeProblem(Exception):  # noqa: N818 (a finding, turned into a rejection)
    """Why a site's prototypes are refused: a reason code and a sentence."""

    code: str
    message: str


def _spread(pset: PrototypeSet) -> np.ndarray:
    """Each prototype's spread: the mean of its per-dimension variances."""
    return pset.variances.astype(np.float64).mean(axis=1)


def _within(value: float, low: float, high: float) -> bool:
    return bool(np.isfinite(value)) and low <= value <= high


def claimed_cells(adaptor: Adaptor, n_levels: int) -> int:
    """The cells an adaptor's conditions claim, which its prototypes may count at most; for a
    DP adaptor (noisy counts on both sides) plus the slack its stated noise allows."""
    claimed = sum(int(c["n_cells"]) for c in adaptor.content["conditions"])
    privacy = adaptor.content.get("privacy")
    if privacy is not None:
        n_labels = sum(len(adaptor.prototypes(i)) for i in range(n_levels))
        claimed += count_slack(privacy, n_labels, len(adaptor.condition_names), claimed)
    return claimed


def check_prototypes(
    level: str, pset: PrototypeSet, catalogue: PrototypeSet, claimed_cells: int, policy: Policy
) -> list[str]:
    """Check a site's prototypes of ``level`` against the ``catalogue`` of that level; returns
    the labels new to the catalogue. Raises :class:`PrototypeProblem`."""
    where = f"level {level!r}"
    counts = pset.counts.astype(np.int64)
    small = [f"{lab} ({n})" for lab, n in zip(pset.labels, counts.tolist(), strict=True)
             if n < policy.min_prototype_cells]  # fmt: skip
    if small:
        raise PrototypeProblem(
            "small_prototype",
            f"{where}: prototypes over fewer than {policy.min_prototype_cells} cells: "
            f"{', '.join(small)}",
        )
    total = sum(int(n) for n in counts.tolist())  # Python integers: no int64 overflow
    if total > claimed_cells:
        raise PrototypeProblem(
            "implausible_count",
            f"{where}: the prototypes count {total:,} cells, more than the "
            f"{claimed_cells:,} the bundle's conditions claim",
        )
    if (pset.variances < 0).any() or (pset.log_d2[:, 1] < 0).any():
        raise PrototypeProblem("bad_tensors", f"{where}: negative prototype variances")
    for label in pset.labels:
        problem = label_problem(label)
        if problem:
            raise PrototypeProblem("bad_label", f"{where}: {problem}")
    known = {label: k for k, label in enumerate(catalogue.labels)}
    new = [j for j, label in enumerate(pset.labels) if label not in known]
    _check_confusable(where, pset, catalogue, new)
    f_s, f_r = policy.spread_factor, policy.radius_factor
    spreads, radii = _spread(pset), pset.radii
    cat_spreads, cat_radii = _spread(catalogue), catalogue.radii
    for j, label in enumerate(pset.labels):
        k = known.get(label)
        if k is not None:
            low_s, high_s = cat_spreads[k] / f_s, cat_spreads[k] * f_s
            low_r, high_r = cat_radii[k] / f_r, cat_radii[k] * f_r
        elif len(catalogue):
            low_s, high_s = cat_spreads.min() / f_s, cat_spreads.max() * f_s
            low_r, high_r = cat_radii.min() / f_r, cat_radii.max() * f_r
        else:
            continue  # nothing to compare a first label with (a federated release's start)
        if not _within(float(spreads[j]), low_s, high_s):
            raise PrototypeProblem(
                "prototype_outlier",
                f"{where}: label {label!r} spreads {spreads[j]:.4g} (mean variance); the "
                f"catalogue accepts {low_s:.4g} to {high_s:.4g}",
            )
        if not _within(float(radii[j]), low_r, high_r):
            raise PrototypeProblem(
                "prototype_outlier",
                f"{where}: label {label!r} has radius {radii[j]:.4g}; the catalogue accepts "
                f"{low_r:.4g} to {high_r:.4g}",
            )
    _check_positions(where, pset, catalogue, known, policy.mean_radius_factor)
    return [pset.labels[j] for j in new]


def _check_confusable(
    where: str, pset: PrototypeSet, catalogue: PrototypeSet, new: list[int]
) -> None:
    """A new label must not share its skeleton with another label of the catalogue or of the
    site's own set."""
    seen = {skeleton(label): label for label in catalogue.labels}
    for j, label in enumerate(pset.labels):
        if j not in new:
            continue
        other = seen.get(skeleton(label))
        if other is not None and other != label:
            raise PrototypeProblem(
                "confusable_label",
                f"{where}: new label {label!r} looks like label {other!r}; use a distinct name",
            )
        seen[skeleton(label)] = label


def _check_positions(
    where: str,
    pset: PrototypeSet,
    catalogue: PrototypeSet,
    known: dict[str, int],
    factor: float,
) -> None:
    """A known label's mean lies within ``factor`` radii of its catalogue prototype; a new
    label's mean lies outside the core of every catalogue prototype (:data:`NEW_LABEL_CORE`)."""
    if not len(catalogue):
        return
    d2 = standardized_sq_distances(pset.means, catalogue.means, catalogue.variances)
    limits = factor * catalogue.radii
    cores = NEW_LABEL_CORE * np.exp(catalogue.log_d2[:, 0].astype(np.float64))
    for j, label in enumerate(pset.labels):
        k = known.get(label)
        if k is not None and not d2[j, k] <= limits[k]:
            raise PrototypeProblem(
                "prototype_outlier",
                f"{where}: label {label!r} sits {d2[j, k]:.4g} (standardised squared distance) "
                f"from its prototype, beyond {limits[k]:.4g} ({factor:g} times its radius)",
            )
        if k is None:
            inside = np.flatnonzero(~(d2[j] > cores))
            if inside.size:
                other = int(inside[0])
                raise PrototypeProblem(
                    "prototype_outlier",
                    f"{where}: new label {label!r} sits in the core of label "
                    f"{catalogue.labels[other]!r} (standardised squared distance "
                    f"{d2[j, other]:.4g}, within {cores[other]:.4g})",
                )
