"""Hostile members against a real coordinator: what an enrolled site can make its bundles say,
and what that does to an honest third party's labels.

A synthetic world of five cell types: the reference knows A-D, and E is a type nobody
contributes (the third party should call it unknown). Two honest sites and one attacker
("evil", enrolled like them) map their own labelled cells; the attacker then alters what its
adaptor says (:data:`ATTACKS`), re-signs it with its own valid key and submits it over gRPC. A
third party pulls the composite (``site pull``) and maps its unlabelled cells (``site map``);
its accuracy on A-D (``unknown`` counts as a miss) and the share of E called unknown are
compared with the honest federation's. Accepted attack bundles are withdrawn afterwards
(``admin adaptors withdraw``), so every attack starts from the honest composite.

Used by ``bench/attacks.py`` (every attack, a table and JSON) and ``tests/test_attacks.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.coordinator.flower_runs import APP_DIR
from fedatlas.coordinator.registry import Registry
from fedatlas.shared.data.h5ad import read_h5ad, write_h5ad
from fedatlas.shared.hashing import tensor_index
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.release import Release
from fedatlas.shared.runtime.flower import CONNECTION, FlowerError, flwr, write_connection
from fedatlas.shared.wire.bundle import make_bundle
from fedatlas.shared.wire.codec import state_from_wire
from fedatlas.shared.wire.signing import load_signing_key
from fedatlas.site_client.client import CoordinatorClient

KNOWN = ("A", "B", "C", "D")
NOVEL = "E"
HONEST_SITES = ("h1", "h2")
ATTACKER = "evil"
THIRD_PARTY = "third"
LEVEL = "cell_type"
Command = Callable[[Sequence[str]], int]  # a fedatlas command line -> exit status


@dataclass
class Federation:
    """The parties' files: the release, the store, each site's cells and keys."""

    root: Path
    release_dir: Path
    store: Path
    epochs: int  # sites' adaptor epochs

    def cells(self, party: str) -> Path:
        """The party's own .h5ad."""
        return self.root / party / "cells.h5ad"

    def key(self, site: str) -> Path:
        """The site's signing key."""
        return self.root / site / "keys" / "site.key"


def prepare_federation(
    root: Path, run: Command, *, seed: int = 0, n_genes: int = 600, epochs: int = 60,
    site_epochs: int = 10,
) -> Federation:  # fmt: skip
    """Build the reference, the store (release published) and every party's cells and keys,
    with the real commands (``run`` is the root command's ``main``)."""
    world = SyntheticWorld(seed=seed, n_genes=n_genes, cell_types=(*KNOWN, NOVEL))
    fed = Federation(root, root / "release", root / "store", site_epochs)
    reference = world.sample(800, batches=("r1", "r2"), cell_types=KNOWN, seed=seed + 1)
    write_h5ad(reference, root / "reference.h5ad")
    parties = {
        **{s: world.sample(300, batches=("b1",), cell_types=KNOWN, seed=seed + 2 + i, site=s)
           for i, s in enumerate((*HONEST_SITES, ATTACKER))},
        THIRD_PARTY: world.sample(400, batches=("t1",), seed=seed + 9, site=THIRD_PARTY),
    }  # fmt: skip
    for party, adata in parties.items():
        write_h5ad(adata, fed.cells(party))
    _run(
        run,
        "admin",
        "reference",
        "build",
        "--data",
        str(root / "reference.h5ad"),
        "--batch-key",
        "batch",
        "--label-key",
        LEVEL,
        "--model",
        "scpoli",
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--n-top-genes",
        str(min(n_genes, 1000)),
        "--out",
        str(fed.release_dir),
    )
    _run(run, "admin", "init", "--store", str(fed.store))
    _run(run, "admin", "release", "publish", "--store", str(fed.store), "--release",
         str(fed.release_dir))  # fmt: skip
    for site in (*HONEST_SITES, ATTACKER):
        keys = root / site / "keys"
        _run(run, "site", "keygen", "--out", str(keys))
        _run(run, "admin", "site", "enroll", "--store", str(fed.store), "--site-id", site,
             "--public-key", str(keys / "site.pub"))  # fmt: skip
    return fed


def site_adaptor(fed: Federation, run: Command, site: str) -> Adaptor:
    """The site's own adaptor, trained on its labelled cells against the release."""
    out = fed.root / site / "adaptor"
    _run(
        run,
        "site",
        "map",
        "--reference",
        str(fed.release_dir),
        "--data",
        str(fed.cells(site)),
        "--batch-key",
        "batch",
        "--label-key",
        LEVEL,
        "--site-id",
        site,
        "--epochs",
        str(fed.epochs),
        "--out",
        str(fed.root / site / "mapped.h5ad"),
        "--adaptor-out",
        str(out),
        "--epsilon",
        "inf",  # honest sites' exact prototypes: the attacks' hardest case
    )
    return Adaptor.load(out)


class Answer(NamedTuple):
    """The coordinator's answer to one submitted bundle."""

    state: str
    reason_code: str
    reason: str
    bundle_id: str


def submit(address: str, fed: Federation, bundles: Sequence[bytes]) -> list[Answer]:
    """Send bundles over gRPC; the coordinator's answer to each."""
    with CoordinatorClient(address, fed.store / "ca.pem", retries=2) as client:
        answers = [client.submit(raw) for raw in bundles]
    return [Answer(state_from_wire(a.state), a.reason_code, a.reason, a.bundle_id)
            for a in answers]  # fmt: skip


@dataclass(frozen=True)
class Scores:
    """What the honest third party got."""

    accuracy: float  # on the known types; "unknown" counts as a miss
    novel_unknown: float  # share of the novel type's cells called unknown


def third_party_scores(address: str, fed: Federation, run: Command) -> Scores:
    """``site pull`` and ``site map`` by the third party, scored against its hidden truth."""
    party = fed.root / THIRD_PARTY
    _run(run, "site", "pull", "--coordinator", address, "--ca", str(fed.store / "ca.pem"),
         "--coordinator-key", str(fed.store / "coordinator.pub"), "--known-coordinators",
         str(party / "known.json"), "--out", str(party / "composite"))  # fmt: skip
    _run(run, "site", "map", "--reference", str(party / "composite"), "--data",
         str(fed.cells(THIRD_PARTY)), "--batch-key", "batch", "--site-id", THIRD_PARTY,
         "--epochs", str(fed.epochs), "--out", str(party / "mapped.h5ad"))  # fmt: skip
    mapped = read_h5ad(party / "mapped.h5ad")
    truth = mapped.obs[LEVEL].astype(str).to_numpy()
    called = mapped.obs["fedatlas_label"].astype(str).to_numpy()
    known = truth != NOVEL
    return Scores(
        float((called[known] == truth[known]).mean()),
        float((called[~known] == "unknown").mean()),
    )


def withdraw(fed: Federation, bundle_ids: Sequence[str]) -> None:
    """Withdraw accepted attack bundles (the composite returns to the honest one)."""
    with Registry(fed.store) as registry:
        for bundle_id in bundle_ids:
            registry.withdraw(bundle_id, actor="attack benchmark", reason="attack")


def control_api_probes(public: str, fed: Federation) -> dict[str, str]:
    """What the ``flwr`` CLI of someone holding only ``ca.pem`` and the SuperLink's public
    address gets: for ``ls``, ``supernode register`` (the attacker's Flower node key) and
    ``run`` (fedatlas' own app), ``refused (...)`` or ``ALLOWED``."""
    home = fed.root / "outsider-flwr"
    write_connection(home, public, fed.store / "ca.pem")
    probes = {
        "flwr ls": ["ls"],
        "flwr supernode register": ["supernode", "register",
                                    str(fed.key(ATTACKER).parent / "flower_node.pub")],
        "flwr run": ["run", str(APP_DIR)],
    }  # fmt: skip
    outcomes = {}
    for probe, args in probes.items():
        try:
            flwr([*args, CONNECTION], home, timeout=60)
            outcomes[probe] = "ALLOWED"
        except FlowerError as exc:
            outcomes[probe] = f"refused ({str(exc).strip().splitlines()[-1][:60]})"
    return outcomes


# ------------------------------------------------------------------------------- attacks
def altered(
    adaptor: Adaptor,
    *,
    content: dict[str, Any] | None = None,
    **tensors: Callable[[torch.Tensor], torch.Tensor],
) -> Adaptor:
    """``adaptor`` with its content replaced and level-0 prototype tensors transformed
    (``mean``, ``var``, ``count``, ``log_d2``), its tensor index updated to match."""
    new_tensors = dict(adaptor.tensors)
    for part, transform in tensors.items():
        name = f"prototypes.0.{part}"
        new_tensors[name] = transform(new_tensors[name].clone()).contiguous()
    body = copy.deepcopy(adaptor.content if content is None else content)
    body["tensors"] = tensor_index(new_tensors)
    return Adaptor(body, new_tensors)


def renamed(adaptor: Adaptor, *, batch: str = "", labels: dict[str, str] | None = None,
            n_cells: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The adaptor's content with its condition renamed (``SITE/BATCH``), labels renamed and
    conditions claiming ``n_cells``."""
    content = copy.deepcopy(adaptor.content)
    if batch:
        content["conditions"] = [{**c, "name": f"{adaptor.site_id}/{batch}"}
                                 for c in content["conditions"]]  # fmt: skip
    if n_cells is not None:
        content["conditions"] = [{**c, "n_cells": n_cells} for c in content["conditions"]]
    meta = content["prototypes"][LEVEL]
    meta["labels"] = [(labels or {}).get(label, label) for label in meta["labels"]]
    return content


def _most_cells(adaptor: Adaptor, **tensors: Callable[[torch.Tensor], torch.Tensor]) -> Adaptor:
    """``adaptor`` altered by ``tensors``, its condition claiming the most cells a condition may
    (10^7) and every prototype 2 * 10^6 of them: the largest weight the policy allows."""
    return altered(
        adaptor,
        content=renamed(adaptor, n_cells=10_000_000),
        count=lambda c: c * 0 + 2_000_000,
        **tensors,
    )


def _swap(first: int, second: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def swap(rows: torch.Tensor) -> torch.Tensor:
        order = list(range(rows.shape[0]))
        order[first], order[second] = second, first
        return rows[order]

    return swap


def _one_row(row: int, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def apply(rows: torch.Tensor) -> torch.Tensor:
        rows[row] = change(rows[row])
        return rows

    return apply


Attack = Callable[[Adaptor, Release], list[Adaptor]]


def _toward(release: Release, source: int, target: int, share: float) -> Callable[..., Any]:
    """Move label ``source``'s mean ``share`` of the way to label ``target``'s catalogue mean."""
    means = torch.from_numpy(release.prototypes(LEVEL).means)

    def move(rows: torch.Tensor) -> torch.Tensor:
        rows[source] = means[source] + share * (means[target] - means[source])
        return rows

    return move


ATTACKS: dict[str, tuple[str, Attack]] = {
    "variance_1e30": (
        "variance 1e30 on every label",
        lambda a, r: [altered(a, var=lambda v: torch.full_like(v, 1e30))],
    ),
    "one_variance_x1e4": (
        "one label's variance x 10^4",
        lambda a, r: [altered(a, var=_one_row(1, lambda v: v * 1e4))],
    ),
    "swap_count_1e9": (
        "two labels' means swapped, count 10^9",
        lambda a, r: [
            altered(
                a,
                content=renamed(a, n_cells=10**9),
                mean=_swap(0, 1),
                count=lambda c: c * 0 + 10**9,
            )
        ],
    ),
    "swap_20_bundles": (
        "the same swap with honest counts, sent as 20 bundles",
        lambda a, r: [
            altered(a, content=renamed(a, batch=f"s{i:02d}"), mean=_swap(0, 1)) for i in range(20)
        ],
    ),
    "confusable_label": (
        "a new label that looks like an old one (Greek capital alpha for A) with B's prototype",
        lambda a, r: [
            altered(
                a,
                content=renamed(a, labels={"D": "\u0391"}),
                mean=_one_row(3, lambda m: torch.from_numpy(r.prototypes(LEVEL).means[1])),
            )
        ],
    ),
    "radius_plus_20": (
        "spread radius + 20, count 10^9",
        lambda a, r: [
            altered(
                a,
                content=renamed(a, n_cells=10**9),
                log_d2=lambda d: d + torch.tensor([20.0, 0.0]),
                count=lambda c: c * 0 + 10**9,
            )
        ],
    ),
    "count_2_63": (
        "a prototype count of 2^63-1",
        lambda a, r: [altered(a, count=_one_row(0, lambda c: c * 0 + (2**63 - 1)))],
    ),
    "long_names": (
        "three bundles with 12 MB condition names",
        lambda a, r: [
            altered(a, content=renamed(a, batch=f"{i}" + "x" * 12_000_000)) for i in range(3)
        ],
    ),
    # within every bound the policy sets: what one member can still do
    "bounded_spread": (
        "every label's variance 9.5 x the catalogue's (just under the spread bound), the "
        "most cells a site may claim",
        lambda a, r: [
            _most_cells(a, var=lambda v: torch.from_numpy(r.prototypes(LEVEL).variances * 9.5))
        ],
    ),
    "bounded_radius": (
        "every label's radius 2.9 x the catalogue's (just under the radius bound), the most cells",
        lambda a, r: [
            _most_cells(
                a,
                log_d2=lambda d: (
                    torch.from_numpy(r.prototypes(LEVEL).log_d2)
                    + torch.tensor([math.log(2.9), 0.0])
                ),
            )
        ],
    ),
    "bounded_shift": (
        "label A's mean moved 45 % of the way to B's (inside A's radius), the most cells",
        lambda a, r: [_most_cells(a, mean=_toward(r, 0, 1, 0.45))],
    ),
}


@dataclass
class Outcome:
    """One attack's result."""

    attack: str
    description: str
    codes: dict[str, int]  # state or reason code -> bundles
    accuracy: float
    novel_unknown: float


def run_attack(
    name: str, base: Adaptor, fed: Federation, address: str, run: Command,
    honest: Scores,
) -> Outcome:  # fmt: skip
    """Submit one attack's bundles, score the third party, withdraw what was accepted."""
    description, attack = ATTACKS[name]
    release = Release.load(fed.release_dir)
    signing_key: Ed25519PrivateKey = load_signing_key(fed.key(ATTACKER))
    raws = [make_bundle(adaptor, signing_key).raw for adaptor in attack(base, release)]
    answers = submit(address, fed, raws)
    codes: dict[str, int] = {}
    for answer in answers:
        outcome = answer.reason_code or answer.state
        codes[outcome] = codes.get(outcome, 0) + 1
    accepted = [a.bundle_id for a in answers if a.state == "accepted"]
    scores = honest
    if accepted:
        scores = third_party_scores(address, fed, run)
        withdraw(fed, accepted)
    return Outcome(name, description, codes, scores.accuracy, scores.novel_unknown)


def _run(run: Command, *args: str) -> None:
    status = run(["-q", *args])
    if status != 0:
        raise RuntimeError(f"fedatlas {' '.join(a[:60] for a in args)} failed ({status})")


def outcome_json(outcomes: Sequence[Outcome], honest: Scores) -> dict[str, Any]:
    """The results as JSON-ready values (what ``bench/attacks.py`` writes)."""
    return {"honest": vars(honest), "attacks": [vars(o) for o in outcomes]}


def relative(outcome: Outcome, honest: Scores) -> tuple[float, float]:
    """The outcome's accuracy and novel-unknown share as fractions of the honest ones."""
    return (
        outcome.accuracy / honest.accuracy,
        outcome.novel_unknown / honest.novel_unknown if honest.novel_unknown else float(np.nan),
    )
