"""What a site says about its genes in a federated build's first step
(:mod:`fedatlas.shared.model.federated_genes`): the rules, their errors, and that the genes
elected on CellBench S1 are those of a build in which every site sent every gene name."""

from __future__ import annotations

from pathlib import Path

import pytest
from anndata import AnnData
from conftest import cells_of

from fedatlas.benchmarks.cellbench import REFERENCE_STEMS, load_scenario
from fedatlas.shared.data.dataset import extract_cells
from fedatlas.shared.errors import ConfigError, InputDataError
from fedatlas.shared.model.federated import FederatedPlan, SiteTrainer, elect_genes, gene_universe
from fedatlas.shared.model.federated_genes import (
    held_genes,
    held_mask,
    public_genes,
    read_gene_file,
    read_gene_list,
)
from fedatlas.shared.model.reference import train_reference

LISTED = ["G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8", "G9"]  # 9 genes: a second mask byte


def test_a_mask_says_which_listed_genes_a_site_holds_and_nothing_else() -> None:
    site = ["G9", "PRIVATE", "G2", "G3"]
    mask = held_mask(site, LISTED)
    assert len(mask) == 2
    assert held_genes(LISTED, mask) == ["G2", "G3", "G9"]
    assert held_mask(["PRIVATE", "OTHER"], LISTED) == held_mask([], LISTED) == bytes(2)


def test_a_mask_of_the_wrong_length_is_refused_with_its_sender() -> None:
    with pytest.raises(InputDataError, match=r"node 7: gene mask of 1 bytes, expected 2"):
        held_genes(LISTED, b"\xff", "node 7")


def test_only_public_genes_are_named() -> None:
    assert public_genes(["B", "PRIVATE", "A"], ["A", "B", "C"]) == ["A", "B"]


def test_a_gene_file_skips_comments_and_refuses_an_empty_or_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "universe.txt"
    path.write_text("# public genes\nA\n\n  B  \n")
    assert read_gene_file(path, "gene universe") == ["A", "B"]
    path.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=r"gene universe .*universe.txt: no gene name"):
        read_gene_file(path, "gene universe")
    with pytest.raises(ConfigError, match=r"gene universe .*absent.txt: cannot read it"):
        read_gene_file(tmp_path / "absent.txt", "gene universe")


def test_a_gene_list_is_a_file_of_names_or_a_releases_genes(
    tmp_path: Path, reference_adata: AnnData
) -> None:
    (tmp_path / "genes.txt").write_text("G2\nG1\n")
    assert read_gene_list(tmp_path / "genes.txt") == ["G2", "G1"]
    build = train_reference(
        cells_of(reference_adata), preset="scpoli", epochs=1, n_top_genes=50, progress=False
    )
    build.release.save(tmp_path / "release")
    assert read_gene_list(tmp_path / "release") == build.release.genes
    assert len(build.release.genes) == 50
    with pytest.raises(ConfigError, match=r"gene list .*absent: cannot read it"):
        read_gene_list(tmp_path / "absent")


@pytest.mark.cellbench
def test_public_names_elect_the_same_genes_on_cellbench_s1(cellbench_dir: Path) -> None:
    """With every site's genes in the public universe (their union, as annotations hold), the
    genes elected are those elected from every site's full gene list; a gene left out of the
    universe is never voted on."""
    reference = load_scenario(cellbench_dir, "S1").reference
    trainers = [
        SiteTrainer(
            extract_cells(
                reference[reference.obs["batch"] == stem].copy(),
                source=stem,
                batch_key="batch",
                label_keys=["cell_line"],
            ),
            stem,
            FederatedPlan(label_level="cell_line"),
        )
        for stem in REFERENCE_STEMS
    ]
    plan = trainers[0].plan
    every = gene_universe([t.gene_names() for t in trainers])
    before = elect_genes(every, [t.votes(every) for t in trainers], plan)
    universe = gene_universe([public_genes(t.gene_names(), every) for t in trainers])
    assert universe == every
    assert elect_genes(universe, [t.votes(universe) for t in trainers], plan) == before
    assert len(before) == plan.n_top_genes
    # a public universe without the first elected gene: it is not voted on, nor elected
    smaller = [g for g in every if g != before[0]]
    named = gene_universe([public_genes(t.gene_names(), smaller) for t in trainers])
    assert before[0] not in elect_genes(named, [t.votes(named) for t in trainers], plan)
