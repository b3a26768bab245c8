"""Adaptors as first-class objects: extraction, files, and order-independent composition."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from anndata import AnnData
from conftest import cells_of
from hypothesis import given, settings
from hypothesis import strategies as st

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.shared.errors import AdaptorError
from fedatlas.shared.model.adaptor import Adaptor, compose
from fedatlas.shared.model.mapping import MappingOptions, MappingResult, map_onto
from fedatlas.shared.model.prototypes import PrototypeSet, capped_merge
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.release import Release

SITES = ("s1", "s2", "s3")


@pytest.fixture(scope="module")
def site_data(world: SyntheticWorld) -> dict[str, AnnData]:
    """Three sites with one batch each; every site has labelled cells of all four types."""
    return {s: world.sample(80, batches=(f"batch_{s}",), seed=10 + i) for i, s in enumerate(SITES)}


@pytest.fixture(scope="module")
def mapped(
    tiny_builds: dict[str, BuildResult], site_data: dict[str, AnnData]
) -> dict[str, MappingResult]:
    release = tiny_builds["scpoli"].release
    return {
        s: map_onto(
            release,
            cells_of(a),
            MappingOptions(site_id=s, epochs=4, min_prototype_cells=5),
            progress=False,
        )
        for s, a in site_data.items()
    }


def _adaptors(mapped: dict[str, MappingResult]) -> list[Adaptor]:
    out = [m.adaptor for m in mapped.values()]
    assert all(a is not None for a in out)
    return out  # type: ignore[return-value]


def test_composite_hash_is_the_same_for_every_order(
    tiny_builds: dict[str, BuildResult], mapped: dict[str, MappingResult]
) -> None:
    release = tiny_builds["scpoli"].release
    adaptors = _adaptors(mapped)
    hashes = {compose(release, list(p)).content_hash for p in itertools.permutations(adaptors)}
    assert len(hashes) == 1
    composite = compose(release, adaptors)
    assert composite.content_hash != release.content_hash
    assert composite.trunk_id == release.trunk_id
    assert composite.condition_names[-3:] == sorted(f"{s}/batch_{s}" for s in SITES)


def test_composite_embeds_each_site_as_its_own_mapping_did(
    tiny_builds: dict[str, BuildResult],
    mapped: dict[str, MappingResult],
    site_data: dict[str, AnnData],
) -> None:
    composite = compose(tiny_builds["scpoli"].release, _adaptors(mapped))
    for site, adata in site_data.items():
        again = map_onto(
            composite, cells_of(adata, None), MappingOptions(site_id=site), progress=False
        )
        assert all(a.known for a in again.assignments)
        assert again.trained_parameters == 0
        np.testing.assert_allclose(again.latent, mapped[site].latent, rtol=0, atol=1e-5)


def test_catalogue_merges_sites_with_capped_weights(
    tiny_builds: dict[str, BuildResult], mapped: dict[str, MappingResult]
) -> None:
    """A label the reference lacks: each site weighs at most the median of the sites' counts
    (for a reference label, at most the reference's count), three sources merge by weighted
    coordinate-wise median, and the composite says who gave what."""
    release = tiny_builds["scpoli"].release
    composite = compose(release, _adaptors(mapped))
    merged = composite.prototypes("cell_type")
    assert "D" in merged.labels
    assert "D" not in release.prototypes("cell_type").labels
    i = merged.labels.index("D")
    site_sets = {s: m.adaptor.prototypes(0) for s, m in mapped.items() if m.adaptor}
    counts = {s: int(p.counts[p.labels.index("D")]) for s, p in site_sets.items()}
    cap = int(np.median(list(counts.values())))
    weights = {s: min(n, cap) for s, n in counts.items()}
    assert max(counts.values()) > cap  # the cap binds for one site here
    assert merged.counts[i] == sum(weights.values())
    means = {s: p.means[p.labels.index("D")].astype(np.float64) for s, p in site_sets.items()}
    for j in range(merged.means.shape[1]):  # per coordinate: the weighted median, written out
        ranked = sorted(weights, key=lambda s: (means[s][j], SITES.index(s)))
        held = 0
        for s in ranked:
            held += weights[s]
            if held >= sum(weights.values()) / 2:
                assert merged.means[i, j] == pytest.approx(means[s][j], rel=1e-6)
                break
    assert set(merged.sources[i]) == set(SITES)
    assert composite.content["contributions"]["cell_type"]["D"] == weights
    reference_a = int(release.prototypes("cell_type").counts[0])
    assert all(
        w <= reference_a for w in composite.content["contributions"]["cell_type"]["A"].values()
    )


def test_adaptor_file_round_trip_and_tampering(
    mapped: dict[str, MappingResult], tmp_path: Path
) -> None:
    adaptor = _adaptors(mapped)[0]
    path = adaptor.save(tmp_path / "s1.adaptor")
    loaded = Adaptor.load(path)
    assert loaded.content_hash == adaptor.content_hash
    assert all(torch.equal(loaded.tensors[k], v) for k, v in adaptor.tensors.items())
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # flip one bit of the last tensor value
    (tmp_path / "bad.adaptor").write_bytes(bytes(raw))
    with pytest.raises(AdaptorError, match="does not match its recorded hash"):
        Adaptor.load(tmp_path / "bad.adaptor")
    (tmp_path / "junk.adaptor").write_bytes(b"\x80\x04K\x01.")  # a pickle, never unpickled
    with pytest.raises(AdaptorError, match="not a fedatlas adaptor"):
        Adaptor.load(tmp_path / "junk.adaptor")


def test_adaptor_size_does_not_grow_with_cells(
    tiny_builds: dict[str, BuildResult], world: SyntheticWorld
) -> None:
    release = tiny_builds["scpoli"].release
    sizes = []
    for n in (100, 2000):
        cells = cells_of(world.sample(n, batches=("grow",), seed=3))
        result = map_onto(release, cells, MappingOptions(site_id="g", epochs=1), progress=False)
        assert result.adaptor is not None
        sizes.append(len(result.adaptor.to_bytes()))
    # only the digits of counts (cells per condition and prototype) may differ
    assert abs(sizes[1] - sizes[0]) <= 16, sizes


def test_conflicts_and_foreign_adaptors_are_refused(
    tiny_builds: dict[str, BuildResult],
    mapped: dict[str, MappingResult],
    site_data: dict[str, AnnData],
) -> None:
    release = tiny_builds["scpoli"].release
    first = _adaptors(mapped)[0]
    twin = map_onto(
        release, cells_of(site_data["s1"]), MappingOptions(site_id="s1", epochs=1), progress=False
    )
    assert twin.adaptor is not None
    with pytest.raises(AdaptorError, match="already belongs to adaptor"):
        compose(release, [first, twin.adaptor])
    composite = compose(release, [first])
    with pytest.raises(AdaptorError, match="already belongs to the release"):
        compose(composite, [first])
    other = tiny_builds["scarches"].release
    with pytest.raises(AdaptorError, match="another reference network"):
        compose(other, [first])


def test_composite_survives_save_and_load(
    tiny_builds: dict[str, BuildResult], mapped: dict[str, MappingResult], tmp_path: Path
) -> None:
    composite = compose(tiny_builds["scpoli"].release, _adaptors(mapped))
    loaded = Release.load(composite.save(tmp_path / "composite"))
    assert loaded.content_hash == composite.content_hash
    assert loaded.content["lineage"]["adaptors"] == sorted(
        a.content_hash for a in _adaptors(mapped)
    )


def _one_label(label: str, mean: float, count: int, source: str, dim: int = 4) -> PrototypeSet:
    return PrototypeSet(
        (label,), np.full((1, dim), mean, np.float32), np.ones((1, dim), np.float32),
        np.asarray([count], np.int64), np.asarray([[0.5, 0.1]], np.float32), ((source,),),
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    honest=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=5),
    shift=st.floats(-1e6, 1e6),
    claimed=st.integers(1, 10**12),
    bundles=st.integers(1, 25),
)
def test_one_site_cannot_drag_a_label_outside_the_honest_range(
    honest: list[float], shift: float, claimed: int, bundles: int
) -> None:
    """Whatever one site claims and however many bundles it splits its prototypes into, a
    label with the reference and at least two honest sites stays inside their range."""
    base = _one_label("A", 0.0, 500, "reference")
    sites = {f"h{k}": [_one_label("A", m, 300, f"h{k}")] for k, m in enumerate(honest)}
    sites["evil"] = [_one_label("A", shift, claimed, "evil") for _ in range(bundles)]
    merged, shares = capped_merge(base, sites)
    low, high = min([0.0, *honest]), max([0.0, *honest])
    assert np.all(merged.means[0] >= low - 1e-6)
    assert np.all(merged.means[0] <= high + 1e-6)
    assert shares["A"]["evil"] <= 500  # its weight is capped at the reference's count
