"""Each site's differential-privacy spend per release, read from the bundles it sent.

Every bundle a site makes with DP states, in its signed adaptor content, the zCDP rho it spent
(:mod:`fedatlas.shared.model.privacy`); the coordinator checks that the statement adds up before
it registers the bundle. The ledger sums, per site, the rho of every bundle the store holds that
was made against the current release or one of its composites, whatever became of it (held,
accepted, rejected by the operator or withdrawn: the coordinator saw it all the same). The
bundle bytes are pinned by the audit chain, so the ledger cannot change without the audit
showing it. A bundle made without DP spends an unbounded budget.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from fedatlas.coordinator.store import BundleRecord, Store
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.model.privacy import epsilon_for
from fedatlas.shared.wire.bundle import parse_bundle


@dataclass(frozen=True)
class Spend:
    """What one site has spent against one release."""

    site_id: str
    rho: float  # zCDP, summed over its DP bundles
    private_bundles: int
    other_bundles: int  # made without DP (an unbounded spend)

    def epsilon(self, delta: float) -> float:
        """The epsilon of the spend at ``delta`` (infinite once any bundle was not private)."""
        return math.inf if self.other_bundles else epsilon_for(self.rho, delta)


def bundle_rho(record: BundleRecord) -> float:
    """The rho a registered bundle states (infinite for one made without DP)."""
    try:
        content = parse_bundle(record.blob).adaptor_content()
    except FedatlasError:
        return math.inf  # registered bundles parse; an unreadable one counts as unbounded
    privacy = content.get("privacy")
    return math.inf if privacy is None else float(privacy["rho"])


def site_spend(store: Store, site_id: str, release_ids: Collection[str]) -> Spend:
    """The spend of ``site_id`` over its bundles made against any of ``release_ids``."""
    rho, private, other = 0.0, 0, 0
    for record in store.list_bundles(site_id=site_id):
        if record.release_id not in release_ids:
            continue
        spent = bundle_rho(record)
        if math.isinf(spent):
            other += 1
        else:
            rho, private = rho + spent, private + 1
    return Spend(site_id, rho, private, other)
