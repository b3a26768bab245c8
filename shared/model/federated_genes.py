"""What a site says about its genes in the first step of a federated build (``query.genes``).

A site's full gene list can itself be sensitive: custom constructs, transgenes, private
annotations or identifiers of an unpublished assay. So a site never sends it. Two cases:

* **The build has a gene list** (a release's genes, or a list the operator gives): the
  coordinator sends that list and each site answers with one bit per listed gene — whether it
  holds that gene (:func:`held_mask`). Nothing else about its genes leaves it.
* **No gene list**: the site sends only those of its gene names that are also in a *public gene
  universe* its node settings name (``fedatlas site node --gene-universe FILE``, e.g. the union
  of the public annotations: Ensembl, GENCODE, HGNC), :func:`public_genes`. Without such a file
  the site refuses to answer.

Why a public universe and not hashed names: gene names come from a small, public vocabulary
(some 60,000 symbols and ids per species), so a hash of a name is reversed by hashing that
vocabulary — it hides only the names outside it, exactly those a universe filter withholds
anyway. A key shared by the sites only would hide the names from the coordinator, but the
coordinator must name the elected genes in the release it publishes. A public universe is
honest about what is sent: names anyone could list, and nothing outside them.

The coordinator's universe (the genes the sites then vote on) is the sorted union of what the
sites answered (:func:`~fedatlas.shared.model.federated.gene_universe`): the listed genes held
by at least one site (:func:`held_genes`), or the public names the sites sent. When every
site's genes are in its public universe, it answers with its whole gene list and the genes
elected are those of a build that sent every name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedatlas.shared.errors import ConfigError, InputDataError
from fedatlas.shared.model.release import Release


def read_gene_file(path: Path, what: str) -> list[str]:
    """The gene names of a text file, one per line (blank lines and ``#`` comments skipped);
    ``what`` names the file in errors (e.g. "gene universe")."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    names = [line.strip() for line in text.splitlines()]
    genes = [n for n in names if n and not n.startswith("#")]
    if not genes:
        raise ConfigError(f"{what} {path}: no gene name in it (expected one name per line)")
    return genes


def read_gene_list(path: Path) -> list[str]:
    """A build's gene list (``--gene-list``): a release directory's genes, or the names of a
    text file."""
    if path.is_dir():
        return Release.load(path).genes
    return read_gene_file(path, "gene list")


def public_genes(site_genes: Sequence[str], universe: Sequence[str]) -> list[str]:
    """The site's gene names that are also in the public ``universe`` (sorted): all it sends
    when the build has no gene list."""
    return sorted(set(site_genes) & set(universe))


def held_mask(site_genes: Sequence[str], listed: Sequence[str]) -> bytes:
    """One bit per gene of ``listed`` (in order, most significant bit first): set when the site
    holds that gene. All a site sends about its genes when the build has a gene list."""
    held = set(site_genes)
    return np.packbits(np.array([g in held for g in listed], dtype=bool)).tobytes()


def held_genes(listed: Sequence[str], mask: bytes, source: str = "a site") -> list[str]:
    """The genes of ``listed`` that a site's :func:`held_mask` answer says it holds (in list
    order); a mask of the wrong length is refused (``source`` names the sender)."""
    expected = (len(listed) + 7) // 8
    if len(mask) != expected:
        raise InputDataError(
            f"{source}: gene mask of {len(mask)} bytes, expected {expected} (one bit per listed "
            f"gene, {len(listed)} genes)"
        )
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8))[: len(listed)]
    return [g for g, bit in zip(listed, bits, strict=True) if bit]
