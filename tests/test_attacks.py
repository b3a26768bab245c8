"""An enrolled, hostile member against the real path: its bundles, re-signed with its own valid
key, go to ``fedatlas coordinator serve`` over gRPC; an honest third party then runs ``site pull``
and ``site map`` and is scored on its hidden truth (:mod:`fedatlas.benchmarks.attacks`). Every
attack of issue 15 is refused with its reason code or, where it stays within the policy's
bounds, moves the third party's results by less than the issue allows: accuracy at least
0.95 x and the novel type's unknown share at least 0.8 x the honest federation's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from processes import Coordinator

from fedatlas.benchmarks import attacks
from fedatlas.cli import main
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.wire.bundle import make_bundle
from fedatlas.shared.wire.signing import load_signing_key

pytestmark = pytest.mark.slow

# What each attack may get. Issue 15's rows are refused outright, except the swap sent as 20
# bundles with honest counts: where the world's types overlap (this one: A's and B's means lie
# within each other's radius) it passes the position check and the merge has to hold it. The
# bounded attacks stay inside the policy's bounds on purpose; whether the checks still catch
# them depends on how the site's own spread sits in the bounds. Measured in this world (600
# genes, seed 0): the swap, the spread x 9.5 and the shift accepted, the radius x 2.9 refused.
EXPECTED = {
    "variance_1e30": {"prototype_outlier"},
    "one_variance_x1e4": {"prototype_outlier"},
    "swap_count_1e9": {"implausible_count"},
    "swap_20_bundles": {"accepted", "prototype_outlier"},
    "confusable_label": {"confusable_label"},
    "radius_plus_20": {"implausible_count"},
    "count_2_63": {"implausible_count"},
    "long_names": {"malformed"},
    "bounded_spread": {"accepted", "prototype_outlier"},
    "bounded_radius": {"accepted", "prototype_outlier"},
    "bounded_shift": {"accepted", "prototype_outlier"},
}


@dataclass
class Arena:
    """A running coordinator with the honest federation's composite, and the attacker."""

    fed: attacks.Federation
    address: str
    attacker: Adaptor
    honest: attacks.Scores
    honest_bundles: list[str]


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    root = tmp_path_factory.mktemp("attacks")
    fed = attacks.prepare_federation(root, main)
    adaptors = {s: attacks.site_adaptor(fed, main, s)
                for s in (*attacks.HONEST_SITES, attacks.ATTACKER)}  # fmt: skip
    with Coordinator(fed.store) as coordinator:
        honest = [make_bundle(adaptors[s], load_signing_key(fed.key(s))).raw
                  for s in attacks.HONEST_SITES]  # fmt: skip
        answers = attacks.submit(coordinator.address, fed, honest)
        assert [a.state for a in answers] == ["accepted", "accepted"], answers
        scores = attacks.third_party_scores(coordinator.address, fed, main)
        print(f"\nhonest federation: {scores}")
        # measured (600 genes, seed 0): accuracy 0.736, novel type called unknown 0.237
        assert scores.accuracy >= 0.65
        assert scores.novel_unknown >= 0.15
        yield Arena(fed, coordinator.address, adaptors[attacks.ATTACKER], scores,
                    [a.bundle_id for a in answers])  # fmt: skip


def test_every_attack_is_listed() -> None:
    assert set(EXPECTED) == set(attacks.ATTACKS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_member_moves_the_others_only_within_bounds(arena: Arena, name: str) -> None:
    outcome = attacks.run_attack(name, arena.attacker, arena.fed, arena.address, main, arena.honest)
    print(f"\n{name}: {outcome.codes} accuracy {outcome.accuracy:.3f} "
          f"novel unknown {outcome.novel_unknown:.3f}")  # fmt: skip
    assert len(outcome.codes) == 1, outcome.codes  # all its bundles fare alike
    assert set(outcome.codes) <= EXPECTED[name], outcome.codes
    accuracy, novel = attacks.relative(outcome, arena.honest)
    assert accuracy >= 0.95, f"third-party accuracy fell to {accuracy:.2f} x the honest one"
    assert novel >= 0.8, f"novel type called unknown fell to {novel:.2f} x the honest share"
    with SQLiteStore.open(arena.fed.store / "registry.sqlite") as db:
        latest = db.latest_composite()
        assert latest is not None
        # accepted bundles were withdrawn after scoring: the composite is the honest one again
        assert set(latest.bundle_ids) == set(arena.honest_bundles)
        if "accepted" in outcome.codes:
            withdrawn = [e for e in db.audit_entries() if e.event == "bundle.withdraw"]
            assert len(withdrawn) >= outcome.codes["accepted"]
        else:  # refused: nothing stored, every refusal in the rejection log
            logged = db.rejections(site_id=attacks.ATTACKER, limit=100_000)
            code = next(iter(outcome.codes))
            assert sum(r.reason_code == code for r in logged) >= outcome.codes[code]
