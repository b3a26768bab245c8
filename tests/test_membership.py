"""Membership inference (``fedatlas.benchmarks.membership``): the attacks find members where a
site must leak them (a tiny site, overfit), find nothing in cells the site never saw, and are
scored on disjoint, equally many members and non-members.

The site: 60 cells of the shared test world (types A-D), mapped onto the small ``scarches``
reference (one-hot columns and a dispersion row per condition: 2,256 values fitted to 60 cells)
for 100 epochs, against 8 shadow sites. Measured on seeds 0-3: combined LiRA AUC 0.749-0.837,
adaptor LiRA 0.662-0.779; at epsilon = 1 (seeds 0-1) combined 0.533-0.573. With 60 members and
60 non-members a statistic that knows nothing has AUC 0.5 +- 0.053 (one standard deviation).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedatlas.benchmarks import membership as mia
from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.data.dataset import CellTable
from fedatlas.shared.model.mapping import MappingOptions
from fedatlas.shared.model.privacy import PrivacySpec
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.release import Release

SITE_CELLS, SHADOWS, EPOCHS = 60, 8, 100
NULL_SD = mia.null_auc_sd(SITE_CELLS, SITE_CELLS)  # 0.053
EXPOSED_COMBINED = 0.65  # measured 0.749-0.837; 2.8 null sd above chance
EXPOSED_ADAPTOR = 0.62  # measured 0.662-0.779
CHANCE_BAND = 3 * NULL_SD  # cells the site never saw: every statistic within 0.5 +- this


@pytest.fixture(scope="module")
def release(tiny_builds: dict[str, BuildResult]) -> Release:
    return tiny_builds["scarches"].release


@pytest.fixture(scope="module")
def sample(world: SyntheticWorld) -> mia.SiteSample:
    return mia.synthetic_sample(world, SITE_CELLS, n_shadows=SHADOWS, seed=0, max_candidates=1000)


@pytest.fixture(scope="module")
def scores(release: Release, sample: mia.SiteSample) -> mia.Scores:
    return mia.run_attacks(release, sample, MappingOptions(epochs=EPOCHS, seed=0))


def test_an_overfit_tiny_site_is_exposed(scores: mia.Scores) -> None:
    metrics = mia.evaluate(scores)
    assert metrics["combined"]["lira"]["auc"] > EXPOSED_COMBINED, metrics
    assert metrics["adaptor"]["lira"]["auc"] > EXPOSED_ADAPTOR, metrics
    # per-candidate calibration is what gives the attack its power here
    assert metrics["combined"]["lira"]["auc"] > metrics["combined"]["global"]["auc"], metrics


def test_cells_the_site_never_saw_look_like_non_members(
    release: Release, sample: mia.SiteSample, scores: mia.Scores, world: SyntheticWorld
) -> None:
    """The same target and shadows, with fresh cells of the population in the members' place:
    nothing in the scoring may tell them apart from the non-members."""
    unseen = mia.synthetic_sample(world, SITE_CELLS, n_shadows=0, seed=99, max_candidates=1000)
    candidates = mia.concatenate([unseen.members, sample.non_members])
    on_target, on_shadows = mia.score_candidates(
        release, scores.target_adaptor, scores.shadow_adaptors, candidates
    )
    fake = mia.Scores(on_target, on_shadows, scores.is_member, scores.target_adaptor, [])
    for attack, by_calibration in mia.evaluate(fake).items():
        for calibration, values in by_calibration.items():
            assert abs(values["auc"] - 0.5) < CHANCE_BAND, (attack, calibration, values)


def test_differential_privacy_blunts_the_attack(release: Release, sample: mia.SiteSample) -> None:
    options = MappingOptions(epochs=EPOCHS, seed=0, privacy=PrivacySpec(1.0))
    metrics = mia.evaluate(mia.run_attacks(release, sample, options))
    assert metrics["combined"]["lira"]["auc"] < EXPOSED_COMBINED, metrics


def test_members_and_non_members_are_disjoint_and_equally_many(world: SyntheticWorld) -> None:
    pool = _numbered(world, 400)
    sample = mia.cellbench_sample(pool, 100, n_shadows=3, seed=0, max_candidates=60)
    candidates, is_member = sample.candidates()
    ids = candidates.labels["id"]
    assert is_member.sum() == (~is_member).sum() == 60
    assert len(set(ids)) == ids.size  # no cell is both
    members = set(sample.members.labels["id"])
    assert set(ids[is_member]) <= members
    assert not set(ids[~is_member]) & members
    for shadow in sample.shadows:
        assert shadow.n_cells == 100
        assert not set(shadow.labels["id"]) & set(ids)
    with pytest.raises(ValueError, match="needs 402 pool cells"):
        mia.cellbench_sample(pool, 134, n_shadows=1, seed=0, max_candidates=134)
    drawn = mia.synthetic_sample(world, 80, n_shadows=2, seed=1, max_candidates=50)
    candidates, is_member = drawn.candidates()
    assert drawn.members.n_cells == 80
    assert is_member.sum() == (~is_member).sum() == 50
    assert [s.n_cells for s in drawn.shadows] == [80, 80]


def test_auc_and_tpr_on_known_orderings() -> None:
    is_member = np.arange(200) < 100
    rising = np.arange(200, dtype=np.float64)[::-1]  # members highest
    assert mia.auc(rising, is_member) == 1.0
    assert mia.tpr_at_fpr(rising, is_member) == 1.0
    assert mia.auc(-rising, is_member) == 0.0
    assert mia.tpr_at_fpr(-rising, is_member) == 0.0
    flat = np.zeros(200)
    assert mia.auc(flat, is_member) == 0.5
    assert mia.tpr_at_fpr(flat, is_member) == 0.0
    # one non-member above every member is the 1 % of 100 that the threshold lets through
    one_false = np.concatenate([np.full(100, 1.0), [2.0], np.zeros(99)])
    assert mia.tpr_at_fpr(one_false, is_member) == 1.0


def _numbered(world: SyntheticWorld, n_cells: int) -> CellTable:
    """``n_cells`` cells with their row number as a second label key, ``id``."""
    cells = mia.synthetic_sample(world, n_cells, n_shadows=0, seed=5, max_candidates=1).members
    ids = np.asarray([str(i) for i in range(n_cells)], dtype=object)
    return CellTable(cells.counts, cells.genes, cells.batches, {**cells.labels, "id": ids})
