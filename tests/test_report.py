"""`fedatlas site report`: the figures, page and numbers of a mapping, and refusals of bad input."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from anndata import AnnData
from conftest import cells_of
from PIL import Image
from processes import fedatlas

from fedatlas.cli import main
from fedatlas.shared.data.h5ad import write_h5ad
from fedatlas.shared.model.annotations import annotate
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import train_reference
from fedatlas.shared.model.release import Release
from fedatlas.site_client.report import write_report

PNGS = ("umap_labels", "umap_uncertainty", "uncertainty_histogram", "condition_pca")


def _release_and_mapping(
    root: Path, reference: AnnData, query: AnnData, preset: str
) -> tuple[Path, Path]:
    """A tiny release of ``preset`` and ``query`` mapped onto it (labels hidden), as files."""
    built = train_reference(
        cells_of(reference), preset=preset, epochs=3, n_top_genes=150, seed=0, progress=False
    )
    release_dir = built.release.save(root / f"{preset}-release")
    result = map_onto(
        built.release,
        cells_of(query, None),
        MappingOptions(site_id="site1", epochs=2),
        progress=False,
    )
    mapped = query.copy()
    annotate(mapped, result)
    out = root / f"{preset}-mapped.h5ad"
    write_h5ad(mapped, out)
    return release_dir, out


@pytest.fixture(scope="module")
def scpoli(
    tmp_path_factory: pytest.TempPathFactory, reference_adata: AnnData, query_adata: AnnData
) -> tuple[Path, Path]:
    return _release_and_mapping(
        tmp_path_factory.mktemp("report"), reference_adata, query_adata, "scpoli"
    )


def _assert_picture(path: Path) -> None:
    """A readable PNG of a real size that is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert width > 400
    assert height > 300
    assert len(np.unique(pixels, axis=0)) > 20


def test_report_cli_writes_figures_page_and_numbers(
    scpoli: tuple[Path, Path], tmp_path: Path
) -> None:
    release_dir, mapped_path = scpoli
    out = tmp_path / "report"
    run = fedatlas(
        "site", "report", "--data", str(mapped_path), "--out", str(out),
        "--reference", str(release_dir), "--label-key", "cell_type", "--json",
    )  # fmt: skip
    assert "[fedatlas] report: UMAP of 360 reference cells, 160 query cells and 3 prototypes" in (
        run.stderr
    )
    printed = json.loads(run.stdout)
    saved = json.loads((out / "report.json").read_text())
    assert printed == saved

    page = (out / "index.html").read_text()
    assert set(saved["figures"]) == set(PNGS)
    for name in PNGS:
        png = out / f"{name}.png"
        assert saved["figures"][name] == png.name
        _assert_picture(png)
        assert (
            base64.b64encode(png.read_bytes()).decode() in page
        )  # embedded: the page stands alone

    mapped = ad.read_h5ad(mapped_path)
    called = mapped.obs["fedatlas_label"].astype(str).to_numpy()
    uncertainty = mapped.obs["fedatlas_uncertainty"].to_numpy()
    unknown = mapped.obs["fedatlas_unknown"].to_numpy()
    info = mapped.uns["fedatlas"]
    assert saved["n_cells"] == 160
    names, counts = np.unique(called, return_counts=True)
    assert saved["label_counts"] == dict(zip(names.tolist(), counts.tolist(), strict=True))
    assert saved["n_unknown"] == int(unknown.sum())
    assert saved["unknown_share"] == pytest.approx(unknown.mean())
    assert saved["mean_uncertainty"] == pytest.approx(uncertainty.mean())
    assert saved["unknown_threshold"] == info["unknown_thresholds"]["cell_type"] == 0.5
    assert saved["release_id"] == info["release_id"] == Release.load(release_dir).content_hash
    assert saved["gene_overlap"]["n_found"] == info["gene_overlap"]["n_found"] == 150
    assert saved["umap_cells"] == {"reference": 360, "query": 160, "prototypes": 3}

    truth = mapped.obs["cell_type"].astype(str).to_numpy()
    seen = truth != "D"  # the reference has A, B and C
    scores = saved["truth"]
    assert scores["unseen_types"] == ["D"]
    assert scores["n_known_type_cells"] == int(seen.sum())
    assert scores["accuracy"] == pytest.approx(np.mean(called[seen] == truth[seen]))
    assert scores["unseen_called_unknown"] == pytest.approx(np.mean(called[~seen] == "unknown"))
    assert sum(scores["confusion"]["D"].values()) == int((~seen).sum())
    for number in (saved["n_cells"], saved["n_unknown"], f"{saved['unknown_share']:.1%}"):
        assert str(number) in page
    assert info["release_id"] in page
    assert f"{scores['accuracy']:.1%}" in page


def test_report_without_reference_draws_the_query_only(
    scpoli: tuple[Path, Path], tmp_path: Path
) -> None:
    _, mapped_path = scpoli
    summary = write_report(ad.read_h5ad(mapped_path), tmp_path, source=str(mapped_path))
    assert summary.umap_cells == {"reference": 0, "query": 160, "prototypes": 0}
    assert set(summary.figures) == {"umap_labels", "umap_uncertainty", "uncertainty_histogram"}
    assert any("No reference release given" in note for note in summary.notes)
    for file in summary.figures.values():
        _assert_picture(tmp_path / file)
    assert "No reference release given" in (tmp_path / "index.html").read_text()
    # a file mapped before thresholds were kept per level recorded one threshold
    earlier = ad.read_h5ad(mapped_path)
    info = dict(earlier.uns["fedatlas"])
    info.pop("unknown_thresholds")
    earlier.uns["fedatlas"] = {**info, "unknown_threshold": 0.3}
    assert write_report(earlier, tmp_path / "earlier").unknown_threshold == 0.3


def test_report_of_a_preset_without_condition_embeddings_skips_the_pca(
    tmp_path: Path, reference_adata: AnnData, query_adata: AnnData
) -> None:
    release_dir, mapped_path = _release_and_mapping(
        tmp_path, reference_adata, query_adata, "scarches"
    )
    summary = write_report(
        ad.read_h5ad(mapped_path), tmp_path / "report", Release.load(release_dir),
        max_reference_cells=100,
    )  # fmt: skip
    assert "condition_pca" not in summary.figures
    assert any("scarches preset learns none" in note for note in summary.notes)
    assert any("random 100 of the release's 360 reference cells" in n for n in summary.notes)
    assert summary.umap_cells == {"reference": 100, "query": 160, "prototypes": 3}


def test_report_refuses_bad_input(
    scpoli: tuple[Path, Path],
    tmp_path: Path,
    query_adata: AnnData,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release_dir, mapped_path = scpoli
    raw = tmp_path / "raw.h5ad"
    query_adata.write_h5ad(raw)
    other = train_reference(
        cells_of(query_adata), preset="scpoli", epochs=1, n_top_genes=150, seed=1, progress=False
    ).release.save(tmp_path / "other-release")
    out = str(tmp_path / "report")
    cases = [
        (["--data", str(tmp_path / "missing.h5ad")], "missing.h5ad: no such file"),
        (["--data", str(raw)], f"{raw}: not a fedatlas map output, run `fedatlas site map` first"),
        (
            ["--data", str(mapped_path), "--label-key", "truth"],
            f"{mapped_path}: --label-key 'truth' is not an obs column",
        ),
        (
            ["--data", str(mapped_path), "--reference", str(tmp_path)],
            f"{tmp_path}: not a release directory",
        ),
        (
            ["--data", str(mapped_path), "--reference", str(other)],
            f"is not the network {mapped_path} was mapped with",
        ),
    ]
    for args, message in cases:
        assert main(["site", "report", *args, "--out", out]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("fedatlas: error: ")
        assert message in error
        assert "\n" not in error
    assert not (tmp_path / "report").exists()  # nothing is written for refused input
    assert release_dir.is_dir()
