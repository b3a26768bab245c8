"""The coordinator's acceptance policy: what a bundle may hold and how far one site may move
what the others receive. Stored in the registry; set with ``fedatlas admin policy set``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.privacy import DEFAULT_DELTA, rho_for
from fedatlas.shared.wire.transport import CHUNK_BYTES, MAX_COMPOSITE_BYTES

Approval = Literal["auto", "hold"]
NewLabels = Literal["accept", "hold"]


@dataclass(frozen=True)
class Policy:
    """The coordinator's acceptance policy.

    Attributes:
        approval: ``auto`` registers verified bundles as accepted; ``hold`` keeps them for an
            operator to approve or reject.
        min_prototype_cells: smallest cell count a prototype may aggregate (k).
        norm_factor: a condition row may be at most this many times longer (L2) than the
            longest row of the same table in the reference.
        max_bundle_bytes: largest serialised bundle accepted.
        max_condition_cells: most cells one condition (a site's batch) may claim; a
            prototype's count is bounded by the cells its conditions claim.
        spread_factor: a prototype's spread (mean per-dimension latent variance) must lie
            within this factor, either way, of the catalogue's for that label (for a label new
            to the catalogue: of the catalogue's range).
        radius_factor: the same for its radius (the standardised squared distance holding
            99 % of its cells).
        mean_radius_factor: a known label's mean must lie within this many times its radius
            of the catalogue's prototype (standardised squared distance).
        max_composite_bytes: largest composite a new bundle may make (its wire form); a
            bundle that would make it larger is refused (``uncomposable``).
        new_labels: ``accept`` a label new to the catalogue (it reaches every site, marked with
            its single source), or ``hold`` its bundle for the operator's approval.
        max_epsilon: each site's differential-privacy budget per release: the epsilon (at
            ``dp_delta``) that all its bundles against the release may spend together (zCDP
            composition, :mod:`~fedatlas.shared.model.privacy`); a bundle that would exceed
            it, or one released without DP, is refused (``over_budget``). None: no budget.
        dp_delta: the delta at which budgets are stated.
        require_dp: refuse every bundle released without DP (``over_budget``), budget or not.

    The defaults leave room for honest sites. Measured on CellBench S1/S2 (each query plate
    mapped by each preset) and on the synthetic worlds of ``bench/attacks.py`` (600 and 2,000
    genes, seeds 0-2), their known labels' spreads were 0.51-3.35 times the catalogue's (the
    wider worlds' reference latents are tight, a new batch scatters more), their radii
    0.55-1.57 times, and their means at most 0.43 radii from it. Within these bounds the merge
    (a weighted median once a label has three sources) limits what one site moves.
    """

    approval: Approval = "auto"
    min_prototype_cells: int = 10
    norm_factor: float = 10.0
    max_bundle_bytes: int = 16 << 20
    max_condition_cells: int = 10_000_000
    spread_factor: float = 10.0
    radius_factor: float = 3.0
    mean_radius_factor: float = 1.0
    max_composite_bytes: int = MAX_COMPOSITE_BYTES - CHUNK_BYTES
    new_labels: NewLabels = "accept"
    max_epsilon: float | None = None
    dp_delta: float = DEFAULT_DELTA
    require_dp: bool = False

    def __post_init__(self) -> None:
        if self.approval not in ("auto", "hold") or self.new_labels not in ("accept", "hold"):
            raise ConfigError(
                f"approval must be auto or hold (got {self.approval!r}), new labels accept or "
                f"hold (got {self.new_labels!r})"
            )
        if (
            self.min_prototype_cells < 1
            or self.norm_factor <= 1
            or self.max_bundle_bytes < 1
            or self.max_condition_cells < 1
            or self.spread_factor <= 1
            or self.radius_factor <= 1
            or self.mean_radius_factor <= 0
            or not 0 < self.max_composite_bytes <= MAX_COMPOSITE_BYTES - CHUNK_BYTES
        ):
            raise ConfigError(
                "min_prototype_cells must be >= 1, norm_factor > 1, max_bundle_bytes >= 1, "
                "max_condition_cells >= 1, spread_factor and radius_factor > 1, "
                "mean_radius_factor > 0 and "
                f"max_composite_bytes in 1..{MAX_COMPOSITE_BYTES - CHUNK_BYTES}"
            )
        if self.max_epsilon is not None and not (
            self.max_epsilon > 0 and math.isfinite(self.max_epsilon)
        ):
            raise ConfigError(f"max_epsilon must be a positive number, got {self.max_epsilon}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")

    @property
    def max_rho(self) -> float:
        """Each site's zCDP budget per release (infinite without ``max_epsilon``)."""
        return math.inf if self.max_epsilon is None else rho_for(self.max_epsilon, self.dp_delta)

    def to_json(self) -> str:
        """Stored form."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Policy:
        """Inverse of :meth:`to_json` (the defaults when nothing is stored; fields a stored
        policy lacks take their defaults)."""
        if not text:
            return cls()
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"stored policy has unknown fields {unknown}")
        return cls(**values)
