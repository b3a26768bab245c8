"""The CellBench loader: real data (skipped when absent, required under CI) and malformed inputs."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fedatlas.benchmarks import cellbench
from fedatlas.benchmarks.cellbench import (
    QUERY_STEMS,
    REFERENCE_STEMS,
    STEMS,
    UNSEEN_IN_S2,
    Scenario,
    find_cellbench_dir,
    load_scenario,
    load_stem,
)
from fedatlas.shared.errors import ConfigError, InputDataError

ALL_LINES = {"A549", "H1975", "H2228", "H838", "HCC827"}
THREE_LINES = {"H1975", "H2228", "HCC827"}
SINGLETS = {
    "sc_celseq2": 240,
    "sc_dropseq": 210,
    "sc_celseq2_5cl_p1": 156,
    "sc_celseq2_5cl_p2": 163,
    "sc_celseq2_5cl_p3": 252,
}


@pytest.fixture(scope="module")
def s1(cellbench_dir: Path) -> Scenario:
    return load_scenario(cellbench_dir, "S1")


@pytest.fixture(scope="module")
def s2(cellbench_dir: Path) -> Scenario:
    return load_scenario(cellbench_dir, "S2")


# ----------------------------------------------------------------------------------- real data


@pytest.mark.cellbench
@pytest.mark.parametrize("stem", STEMS)
def test_stem_singlets_fields_and_counts(cellbench_dir: Path, stem: str) -> None:
    adata = load_stem(cellbench_dir, stem)
    assert adata.n_obs == SINGLETS[stem]
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    data = adata.X.data
    assert (data >= 0).all()
    assert np.array_equal(data, np.round(data))
    assert adata.X.sum() > 0

    obs = adata.obs
    assert list(obs.columns) == ["batch", "cell_line", "protocol"]
    for col in obs.columns:
        assert isinstance(obs[col].dtype, pd.CategoricalDtype)
    assert list(obs["batch"].cat.categories) == [stem]
    expected_protocol = "Drop-seq" if stem == "sc_dropseq" else "CEL-seq2"
    assert set(obs["protocol"]) == {expected_protocol}
    expected_lines = THREE_LINES if stem in ("sc_celseq2", "sc_dropseq") else ALL_LINES
    assert set(obs["cell_line"]) == expected_lines
    assert set(obs["cell_line"].cat.categories) == expected_lines

    assert adata.obs_names.is_unique
    assert all(name.startswith(f"{stem}:") for name in adata.obs_names)
    assert adata.var_names.is_unique
    assert all(g.startswith("ENSG") for g in adata.var_names)  # ERCC spike-ins dropped
    assert list(adata.var_names) == sorted(adata.var_names)


@pytest.mark.cellbench
@pytest.mark.parametrize("stem", ["sc_celseq2", "sc_celseq2_5cl_p1"])
def test_labels_come_from_the_readme_column(cellbench_dir: Path, stem: str) -> None:
    meta = pd.read_csv(cellbench_dir / f"{stem}.metadata.csv.gz", index_col=0)
    meta = meta[meta["demuxlet_cls"] == "SNG"]
    column = "cell_line" if stem == "sc_celseq2" else "cell_line_demuxlet"
    adata = load_stem(cellbench_dir, stem)
    expected = pd.Series(meta[column].to_numpy(), index=[f"{stem}:{b}" for b in meta.index])
    assert (adata.obs["cell_line"].astype(str) == expected.loc[adata.obs_names]).all()


@pytest.mark.cellbench
def test_spike_ins_on_request_and_copies(cellbench_dir: Path) -> None:
    with_ercc = load_stem(cellbench_dir, "sc_celseq2", keep_spike_ins=True)
    without = load_stem(cellbench_dir, "sc_celseq2")
    n_ercc = sum(g.startswith("ERCC-") for g in with_ercc.var_names)
    assert n_ercc > 0
    assert with_ercc.n_vars == without.n_vars + n_ercc
    # Results are copies: changing one does not change the next load.
    without.X.data[:] = -1
    without.obs["cell_line"] = "x"
    again = load_stem(cellbench_dir, "sc_celseq2")
    assert (again.X.data >= 0).all()
    assert set(again.obs["cell_line"]) == THREE_LINES


@pytest.mark.cellbench
def test_s1_composition(cellbench_dir: Path, s1: Scenario) -> None:
    ref = s1.reference
    assert s1.name == "S1"
    assert s1.unseen_labels == frozenset()
    assert list(ref.obs["batch"].cat.categories) == list(REFERENCE_STEMS)
    assert ref.obs["batch"].value_counts().to_dict() == {s: SINGLETS[s] for s in REFERENCE_STEMS}
    assert set(ref.obs["cell_line"]) == ALL_LINES
    assert set(ref.obs["protocol"]) == {"CEL-seq2", "Drop-seq"}
    assert isinstance(ref.X, sp.csr_matrix)
    assert ref.X.dtype == np.float32
    # Barcodes repeat across stems (the plates share well names) but not once prefixed.
    cells = [*ref.obs_names, *(n for q in s1.queries.values() for n in q.obs_names)]
    barcodes = [name.split(":", 1)[1] for name in cells]
    assert len(set(barcodes)) < len(barcodes)
    assert len(set(cells)) == len(cells)
    assert ref.obs_names.is_unique
    assert all(
        name.split(":", 1)[0] == b for name, b in zip(ref.obs_names, ref.obs["batch"], strict=True)
    )

    # Genes: sorted union of the three stems; each stem's counts are kept, zero elsewhere.
    stems = {s: load_stem(cellbench_dir, s) for s in REFERENCE_STEMS}
    union = sorted(set().union(*(a.var_names for a in stems.values())))
    assert list(ref.var_names) == union
    for stem, adata in stems.items():
        rows = (ref.obs["batch"] == stem).to_numpy()
        block = ref.X[rows]
        cols = ref.var_names.get_indexer(adata.var_names)
        assert (block[:, cols] != adata.X).nnz == 0
        assert block.sum() == pytest.approx(adata.X.sum())

    assert set(s1.queries) == set(QUERY_STEMS)
    for stem, query in s1.queries.items():
        assert query.n_obs == SINGLETS[stem]
        assert set(query.obs["cell_line"]) == ALL_LINES
        assert list(query.obs["batch"].cat.categories) == [stem]


@pytest.mark.cellbench
def test_s2_removes_unseen_lines_from_reference_only(s1: Scenario, s2: Scenario) -> None:
    assert s2.name == "S2"
    assert s2.unseen_labels == UNSEEN_IN_S2 == frozenset({"A549", "H838"})
    ref = s2.reference
    assert set(ref.obs["cell_line"]) == THREE_LINES
    assert set(ref.obs["cell_line"].cat.categories) == THREE_LINES
    removed = s1.reference.obs["cell_line"].isin(UNSEEN_IN_S2).sum()
    assert removed == 77
    assert ref.n_obs == s1.reference.n_obs - removed
    assert list(ref.var_names) == list(s1.reference.var_names)
    for stem, query in s2.queries.items():
        assert set(query.obs["cell_line"]) == ALL_LINES
        assert query.n_obs == s1.queries[stem].n_obs


def test_unknown_scenario_and_stem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="S3"):
        load_scenario(tmp_path, "S3")
    with pytest.raises(ConfigError, match="sc_10x"):
        load_stem(tmp_path, "sc_10x")


# ------------------------------------------------------------------- small hand-written files


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Keep the disk cache of these tests out of the user's cache and forget in-process entries."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("FEDATLAS_DISK_CACHE", "1")
    cellbench._load_stem_cached.cache_clear()
    yield cache / "fedatlas"
    cellbench._load_stem_cached.cache_clear()


def _write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def _write_stem(
    data_dir: Path,
    stem: str = "sc_celseq2",
    *,
    empty_corner: bool = False,
    counts_body: str | None = None,
    meta_barcodes: tuple[str, ...] = ("A1", "A2", "A3"),
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    header = ('"",' if empty_corner else "") + '"A1","A2","A3"\n'
    body = counts_body or '"ENSG2",0,3,1\n"ENSG1",2,0,0\n"ERCC-00002",5,5,5\n'
    _write_gz(data_dir / f"{stem}.count.csv.gz", header + body)
    label = "cell_line" if stem in ("sc_celseq2", "sc_dropseq") else "cell_line_demuxlet"
    meta = f'"{label}","demuxlet_cls"\n'
    classes = ("SNG", "DBL", "SNG")
    lines = ("H1975", "H2228", "HCC827")
    for barcode, cls, line in zip(meta_barcodes, classes, lines, strict=False):
        meta += f'"{barcode}","{line}","{cls}"\n'
    _write_gz(data_dir / f"{stem}.metadata.csv.gz", meta)


@pytest.mark.parametrize("empty_corner", [False, True])
@pytest.mark.usefixtures("private_cache")
def test_small_stem_parses_both_header_styles(tmp_path: Path, empty_corner: bool) -> None:
    _write_stem(tmp_path, empty_corner=empty_corner)
    adata = load_stem(tmp_path, "sc_celseq2")
    assert list(adata.obs_names) == ["sc_celseq2:A1", "sc_celseq2:A3"]
    assert list(adata.var_names) == ["ENSG1", "ENSG2"]
    assert adata.X.toarray().tolist() == [[2, 0], [0, 1]]
    assert list(adata.obs["cell_line"]) == ["H1975", "HCC827"]


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize("missing", ["count", "metadata"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    _write_stem(tmp_path)
    (tmp_path / f"sc_celseq2.{missing}.csv.gz").unlink()
    with pytest.raises(InputDataError, match=f"{missing} file is missing"):
        load_stem(tmp_path, "sc_celseq2")
    with pytest.raises(InputDataError, match="missing"):
        load_scenario(tmp_path, "S1")


@pytest.mark.usefixtures("private_cache")
def test_malformed_files(tmp_path: Path) -> None:
    _write_stem(tmp_path / "mismatch", meta_barcodes=("A1", "A2", "B9"))
    with pytest.raises(InputDataError, match="do not match"):
        load_stem(tmp_path / "mismatch", "sc_celseq2")

    _write_stem(tmp_path / "fraction", counts_body='"ENSG1",0.5,1,2\n')
    with pytest.raises(InputDataError, match="non-negative integers"):
        load_stem(tmp_path / "fraction", "sc_celseq2")

    _write_stem(tmp_path / "text", counts_body='"ENSG1",0,x,2\n')
    with pytest.raises(InputDataError, match="non-numeric"):
        load_stem(tmp_path / "text", "sc_celseq2")

    # The plates carry their label in cell_line_demuxlet; cell_line is not accepted there.
    _write_stem(tmp_path / "label", stem="sc_celseq2_5cl_p1")
    meta = tmp_path / "label" / "sc_celseq2_5cl_p1.metadata.csv.gz"
    _write_gz(meta, '"cell_line","demuxlet_cls"\n"A1","H1975","SNG"\n"A2","H1975","SNG"\n')
    with pytest.raises(InputDataError, match="cell_line_demuxlet"):
        load_stem(tmp_path / "label", "sc_celseq2_5cl_p1")

    bad_gzip = tmp_path / "gzip"
    _write_stem(bad_gzip)
    (bad_gzip / "sc_celseq2.count.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputDataError, match="cannot be read"):
        load_stem(bad_gzip, "sc_celseq2")


def test_disk_cache_survives_a_corrupt_entry(tmp_path: Path, private_cache: Path) -> None:
    _write_stem(tmp_path / "data")
    first = load_stem(tmp_path / "data", "sc_celseq2")
    entries = list(private_cache.glob("cellbench-sc_celseq2-*.h5ad"))
    assert len(entries) == 1
    assert not list(private_cache.glob("*.tmp"))
    entries[0].write_bytes(b"truncated")
    cellbench._load_stem_cached.cache_clear()
    again = load_stem(tmp_path / "data", "sc_celseq2")
    assert (again.X != first.X).nnz == 0
    assert list(again.obs_names) == list(first.obs_names)


def test_find_cellbench_dir_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDATLAS_CELLBENCH", str(tmp_path))
    assert find_cellbench_dir() is None  # directory exists, files do not
    for stem in STEMS:
        _write_stem(tmp_path, stem)
    assert find_cellbench_dir() == tmp_path
    monkeypatch.setenv("FEDATLAS_CELLBENCH", str(tmp_path / "absent"))
    assert find_cellbench_dir() is None
