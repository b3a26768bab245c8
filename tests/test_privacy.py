"""What leaves a site is aggregates only: the bundle ``site prepare`` writes (the bytes ``send``
and a campaign's reply carry) has no tensor with a cell dimension, and its size does not grow
with the site's number of cells."""

from __future__ import annotations

import pytest
from anndata import AnnData

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.wire.bundle import parse_bundle
from fedatlas.shared.wire.signing import write_keypair

SIZES = (137, 1_370)  # cell counts that no dimension of the network shares


@pytest.fixture(scope="module")
def bundles(
    tiny_builds: dict[str, BuildResult],
    world: SyntheticWorld,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[int, bytes]:
    """The signed bundle of the same site (two batches, four labelled types) at two sizes."""
    root = tmp_path_factory.mktemp("privacy")
    tiny_builds["scpoli"].release.save(root / "release")
    key = write_keypair(root, "site").private
    out = {}
    for n in SIZES:
        adata: AnnData = world.sample(n, batches=("q1", "q2"), seed=3)
        adata.write_h5ad(root / f"site{n}.h5ad")
        assert main(["-q", "site", "prepare", "--reference", str(root / "release"),
                     "--data", str(root / f"site{n}.h5ad"), "--batch-key", "batch",
                     "--label-key", "cell_type", "--site-id", "h", "--key", str(key),
                     "--epochs", "2", "--out", str(root / f"mapped{n}.h5ad"), "--epsilon", "inf",
                     "--bundle-out", str(root / f"{n}.bundle")]) == 0  # fmt: skip
        out[n] = (root / f"{n}.bundle").read_bytes()
    return out


def test_no_tensor_that_leaves_a_site_has_a_cell_dimension(bundles: dict[int, bytes]) -> None:
    for n, raw in bundles.items():
        tensors = parse_bundle(raw).adaptor().tensors
        assert tensors, "the bundle carries the adaptor's tensors"
        assert all(n not in t.shape for t in tensors.values()), {
            k: t.shape for k, t in tensors.items()
        }


def test_a_bundle_does_not_grow_with_the_sites_cells(bundles: dict[int, bytes]) -> None:
    small, large = (parse_bundle(bundles[n]).adaptor() for n in SIZES)
    shapes = {name: tuple(t.shape) for name, t in small.tensors.items()}
    assert shapes == {name: tuple(t.shape) for name, t in large.tensors.items()}
    # 10 times the cells: the same tensors; only numbers written as text (cell counts, the final
    # loss) change length
    assert abs(len(bundles[SIZES[1]]) - len(bundles[SIZES[0]])) < 64
    assert len(bundles[SIZES[1]]) < 10_000
