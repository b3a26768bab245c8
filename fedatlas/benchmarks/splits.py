"""The robustness suite's splits.

CellBench (:func:`suite_splits`): every leave-one-dataset-out split and every split whose
reference comes from one protocol only, each with its reference holding every query line
(``known``) and with two query lines absent from it (``novel``). Names follow the peer harness
(``../shared/peers/cellbench_peers.py:split_name``) so that our results and the peers' are
joined by name.

Synthetic (:func:`synthetic_splits`): shifts the data lacks, in a six-type world. ``protocol``:
gene-wise batch effects 2.7 times the default (log-scale SD 0.8) with the query's library size
a third of the reference's; ``stimulation``: every query batch carries a response programme
the reference never saw (see ``fedatlas.benchmarks.synthetic``), so the right answer for each
query cell is its known type. Each as ``known`` and with two types absent from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedatlas.benchmarks.cellbench import STEMS

PLATES: tuple[str, ...] = ("sc_celseq2_5cl_p1", "sc_celseq2_5cl_p2", "sc_celseq2_5cl_p3")
#: The lines each stem holds (the five plates hold five lines, the 3-line sets three).
FIVE_LINES: tuple[str, ...] = ("A549", "H1975", "H2228", "H838", "HCC827")
THREE_LINES: tuple[str, ...] = ("H1975", "H2228", "HCC827")
#: Lines held out of the reference in a ``novel`` split, the first pair both the reference and the
#: query hold.
NOVEL_PAIRS: tuple[tuple[str, str], ...] = (("A549", "H838"), ("H1975", "HCC827"))


def lines_of(stem: str) -> tuple[str, ...]:
    """Cell lines in one CellBench stem."""
    return FIVE_LINES if stem in PLATES else THREE_LINES


@dataclass(frozen=True)
class Split:
    """A reference/query split of CellBench stems, with lines dropped from the reference."""

    family: str  # "lodo" or "protocol"
    reference: tuple[str, ...]
    query: tuple[str, ...]
    drop: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The peer harness's name of this split."""
        short = "+".join(s.removeprefix("sc_") for s in self.reference)
        name = f"ref-{short}__query-{'+'.join(s.removeprefix('sc_') for s in self.query)}"
        return f"{name}__drop-{'+'.join(self.drop)}" if self.drop else name

    @property
    def kind(self) -> str:
        """``novel`` when some query line is absent from the reference, else ``known``."""
        return "novel" if self.novel_lines else "known"

    @property
    def reference_lines(self) -> frozenset[str]:
        """Lines the reference holds after the drop."""
        held = {line for stem in self.reference for line in lines_of(stem)}
        return frozenset(held - set(self.drop))

    @property
    def novel_lines(self) -> frozenset[str]:
        """Query lines the reference does not hold."""
        held = {line for stem in self.query for line in lines_of(stem)}
        return frozenset(held - self.reference_lines)


@dataclass(frozen=True)
class SyntheticSplit:
    """A synthetic world with a shift between reference and query, types held out of the
    reference."""

    world: str  # "protocol" or "stimulation"
    drop: tuple[str, ...] = ()
    family: str = "synthetic"

    @property
    def name(self) -> str:
        """``synthetic-WORLD`` with the held-out types."""
        return f"synthetic-{self.world}" + (f"__drop-{'+'.join(self.drop)}" if self.drop else "")

    @property
    def kind(self) -> str:
        """``novel`` when types are held out of the reference, else ``known``."""
        return "novel" if self.drop else "known"

    @property
    def novel_lines(self) -> frozenset[str]:
        """Query types the reference does not hold."""
        return frozenset(self.drop)


SYNTHETIC_WORLDS: tuple[str, ...] = ("protocol", "stimulation")
SYNTHETIC_NOVEL: tuple[str, ...] = ("type_4", "type_5")


def synthetic_splits() -> tuple[SyntheticSplit, ...]:
    """The synthetic worlds, ``known`` and ``novel`` variants."""
    return tuple(
        SyntheticSplit(world, drop) for world in SYNTHETIC_WORLDS for drop in ((), SYNTHETIC_NOVEL)
    )


def _novel_pair(reference: tuple[str, ...], query: tuple[str, ...]) -> tuple[str, ...]:
    ref_lines = {line for stem in reference for line in lines_of(stem)}
    query_lines = {line for stem in query for line in lines_of(stem)}
    for pair in NOVEL_PAIRS:
        if set(pair) <= ref_lines & query_lines:
            return pair
    raise ValueError(f"no pair of lines both {reference} and {query} hold")


def suite_splits() -> tuple[Split, ...]:
    """Every split of the suite, ``known`` and ``novel`` variants.

    Leave-one-dataset-out: the reference is four stems, the query the fifth; the novel variant
    drops A549 and H838 (H1975 and HCC827 where the query is a 3-line set). One protocol: the
    reference is the plates, CEL-seq2 3-line or Drop-seq alone. The plates' novel variant drops a
    pair; a 3-line reference's known variant maps the other 3-line set and its novel variant
    maps every other stem (A549 and H838 are then novel without a drop).
    """
    splits: list[Split] = []
    for held_out in STEMS:
        reference = tuple(s for s in STEMS if s != held_out)
        query = (held_out,)
        splits.append(Split("lodo", reference, query))
        splits.append(Split("lodo", reference, query, _novel_pair(reference, query)))
    others = ("sc_celseq2", "sc_dropseq")
    splits.append(Split("protocol", PLATES, others))
    splits.append(Split("protocol", PLATES, others, _novel_pair(PLATES, others)))
    for alone in others:
        other = next(s for s in others if s != alone)
        splits.append(Split("protocol", (alone,), (other,)))
        splits.append(Split("protocol", (alone,), tuple(s for s in STEMS if s != alone)))
    return tuple(splits)


def split_by_name(name: str) -> Split | SyntheticSplit:
    """The suite's split called ``name``."""
    candidates: tuple[Split | SyntheticSplit, ...] = (*suite_splits(), *synthetic_splits())
    for split in candidates:
        if split.name == name:
            return split
    raise KeyError(f"no suite split named {name!r}")
