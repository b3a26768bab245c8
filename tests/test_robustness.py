"""The robustness suite's fast part: its splits hold what they claim on the real CellBench data,
the command line on files written as sites hold them gives exactly what the benchmark loader
gives through the Python API, and the peer harness's scorer reads our joint latent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedatlas.benchmarks import robustness
from fedatlas.benchmarks.cellbench import _concat_union_genes, load_stem
from fedatlas.benchmarks.splits import split_by_name, suite_splits
from fedatlas.cli import main
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.data.h5ad import read_h5ad
from fedatlas.shared.model.annotations import LABEL_KEY, LATENT_KEY
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release

EPOCHS = 4  # enough to make every tensor depend on the data; the suite's quality is the bench's


def test_every_split_holds_the_lines_it_claims(cellbench_dir: Path) -> None:
    splits = suite_splits()
    stems = {stem for split in splits for stem in (*split.reference, *split.query)}
    lines = {s: set(load_stem(cellbench_dir, s).obs["cell_line"].astype(str)) for s in stems}
    assert len({s.name for s in splits}) == len(splits) == 16
    for split in splits:
        reference = set().union(*(lines[s] for s in split.reference)) - set(split.drop)
        query = set().union(*(lines[s] for s in split.query))
        assert split.reference_lines == reference, split.name
        assert split.novel_lines == query - reference, split.name
        assert not set(split.reference) & set(split.query), split.name
        assert len(split.novel_lines) == (2 if split.kind == "novel" else 0), split.name
    # every stem is left out once, and each protocol is a reference alone once
    assert sorted(s.query[0] for s in splits if s.family == "lodo" and s.kind == "known") == sorted(
        lines
    )
    assert split_by_name(splits[3].name) == splits[3]


def test_the_cli_on_site_files_equals_the_loader_through_the_api(
    cellbench_dir: Path, tmp_path: Path
) -> None:
    # LODO with plate 3 as the query and A549/H838 novel: three stems of the reference hold
    # genes the others lack, so the file's zero-filled union and the loader's must agree.
    split = next(s for s in suite_splits() if s.query == ("sc_celseq2_5cl_p3",) and s.drop)
    reference, queries = robustness.write_site_files(cellbench_dir, split, tmp_path)
    done = robustness.run_split(
        main, reference, queries, tmp_path, preset="scpoli", seed=0, epochs=EPOCHS,
        map_epochs=EPOCHS,
    )  # fmt: skip
    from_files = Release.load(done.release)

    loaded = _concat_union_genes([load_stem(cellbench_dir, s) for s in split.reference])
    loaded = loaded[~loaded.obs["cell_line"].isin(split.drop).to_numpy()].copy()
    cells = extract_cells(loaded, source="loader", batch_key="batch", label_keys=["cell_line"])
    built = train_reference(cells, preset="scpoli", seed=0, epochs=EPOCHS, progress=False)
    assert built.release.genes == from_files.genes
    kept_api, kept_files = built.release.reference_latents(), from_files.reference_latents()
    assert kept_api is not None
    assert kept_files is not None
    np.testing.assert_array_equal(kept_api[0], kept_files[0])

    stem = split.query[0]
    query = extract_cells(load_stem(cellbench_dir, stem), source=stem, batch_key="batch")
    options = MappingOptions(site_id="site1", epochs=EPOCHS, seed=0)
    result = map_onto(built.release, query, options, progress=False)
    mapped = read_h5ad(done.mapped[stem])
    np.testing.assert_array_equal(result.latent, mapped.obsm[LATENT_KEY])
    assert list(result.transfers["cell_line"].called) == list(mapped.obs[LABEL_KEY].astype(str))

    # The harness scores the joint latent; its accuracy counts "unknown" as a miss.
    joint = robustness.joint_latent(done, reference)
    assert int(joint.obs["is_query"].sum()) == mapped.n_obs
    assert joint.obsm["X_latent"].shape == (len(cells.batches) + mapped.n_obs, 10)
    joint_path = tmp_path / "joint.h5ad"
    joint.write_h5ad(joint_path)
    scores = robustness.score(joint_path)
    truth = mapped.obs[robustness.TRUTH].astype(str).to_numpy()
    called = mapped.obs[LABEL_KEY].astype(str).to_numpy()
    known = ~np.isin(truth, sorted(split.novel_lines))
    assert scores["label_transfer"]["accuracy"] == pytest.approx(
        np.mean(called[known] == truth[known])
    )
    assert scores["unknown_detection"]["unseen_types"] == sorted(split.novel_lines)
    shares = robustness.unknown_shares(joint, split.novel_lines)
    assert shares["novel_called_unknown"] == pytest.approx(np.mean(called[~known] == "unknown"))
    assert 0.0 <= scores["overall"] <= 1.0
