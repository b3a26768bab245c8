"""The coordinator side of a federated reference build (runs inside Flower's ServerApp).

Steps (see :mod:`fedatlas.shared.model.federated`): ask every SuperNode which genes it holds —
of the build's gene list (run setting ``gene-list``, a file of names) when there is one, else of
its public gene universe (:mod:`fedatlas.shared.model.federated_genes`) — then for its gene votes
over their union; elect the genes; run the FedAvg/FedProx rounds; publish the
final trunk as a signed release in the store; send it to the sites, whose signed adaptors are
registered through :meth:`Registry.submit` exactly like campaign bundles. A site that fails or
does not answer a step, or answers with a trunk that does not fit, is reported and left out of
the later steps. Each round's updates are combined by
:func:`~fedatlas.shared.model.federated.aggregate_round`, which trusts no site's claim: an
update with an invalid cell count or an outlying norm is left out of that round (reported in the
round's record). The build stops when fewer than ``min-sites`` sites answer a step or have their
update combined in a round.

With the plan's ``secure_aggregation`` the rounds run Flower's SecAgg+ instead
(:func:`_secure_rounds`, :mod:`fedatlas.coordinator.secure_rounds`): the sites' cell counts are
asked first (``query.cells``), and each round the coordinator learns only the cell-weighted
mean of the sites' clipped updates; what that leaves of the checks above is in
:mod:`fedatlas.shared.model.secure_aggregation`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedatlas.coordinator.campaign import (
    composite_record,
    latest_composite,
    register_reply,
    wait_for_nodes,
    write_report,
)
from fedatlas.coordinator.registry import Registry
from fedatlas.coordinator.secure_rounds import round_instructions, run_secure_round
from fedatlas.shared.data.preprocessing import GeneVotes
from fedatlas.shared.errors import FedatlasError, InputDataError
from fedatlas.shared.model.federated import (
    FederatedPlan,
    RoundAggregate,
    RoundUpdate,
    Trunk,
    aggregate_round,
    elect_genes,
    federated_release,
    gene_universe,
    initial_trunk,
    round_record,
    trunk_problem,
)
from fedatlas.shared.model.federated_genes import held_genes, read_gene_file
from fedatlas.shared.model.secure_aggregation import (
    aggregated_trunk,
    clip_bound,
    noise_std,
    secure_round_record,
)
from fedatlas.shared.wire.codec import WireError, decode_tensors, encode_tensors
from fedatlas.shared.wire.messages import (
    COMPOSITE_RECORD,
    FEDERATED_RECORD,
    TENSORS,
    TRUNK_RECORD,
    bytes_field,
    float_field,
    int_field,
    str_field,
    strings_field,
)

log = logging.getLogger(__name__)


class BuildAbortedError(FedatlasError):
    """Too few sites remain for a federated build to go on."""


class _Steps:
    """Sends one step's message to the remaining nodes and keeps track of who dropped out."""

    def __init__(self, grid: Grid, plan: FederatedPlan, timeout: float, min_sites: int,
                 report: dict[str, Any]) -> None:  # fmt: skip
        self.grid, self.plan, self.timeout, self.min_sites = grid, plan, timeout, min_sites
        self.report = report
        self.site_of: dict[int, str] = {}

    def ask(self, nodes: list[int], message_type: str, settings: Mapping[str, Any],
            tensors: bytes | None = None,
            composite: ConfigRecord | None = None) -> dict[int, Message]:  # fmt: skip
        """The replies (by node) of ``nodes`` to one step; failed or silent nodes are reported."""
        config = ConfigRecord({"plan": self.plan.to_json(), **settings})
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {FEDERATED_RECORD: config}
        if tensors is not None:
            records[TRUNK_RECORD] = ConfigRecord({TENSORS: tensors})
        if composite is not None:
            records[COMPOSITE_RECORD] = composite
        messages = [
            Message(content=RecordDict(records), dst_node_id=n, message_type=message_type)
            for n in nodes
        ]
        return self.collect(
            nodes, message_type, self.grid.send_and_receive(messages, timeout=self.timeout)
        )

    def collect(
        self, nodes: list[int], message_type: str, answers: Iterable[Message]
    ) -> dict[int, Message]:
        """The good replies among ``answers`` to a step sent to ``nodes``; the others dropped."""
        replies: dict[int, Message] = {}
        failed: set[int] = set()
        for reply in answers:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                failed.add(node)
                self._drop(node, message_type, f"failed: {reply.error.reason}")
            else:
                replies[node] = reply
        for node in sorted(set(nodes) - set(replies) - failed):
            self._drop(node, message_type, f"no answer within {self.timeout:g} s")
        if len(replies) < self.min_sites:
            raise BuildAbortedError(
                f"federated build stopped at {message_type}: {len(replies)} site(s) answered, "
                f"{self.min_sites} required"
            )
        return replies

    def site_genes(
        self, answers: Mapping[int, Message], listed: list[str] | None
    ) -> dict[int, list[str]]:
        """Each site's genes for the vote: the listed genes its mask says it holds (the build
        has a gene list), else the public gene names it sent; a malformed answer drops it."""
        genes: dict[int, list[str]] = {}
        for node, reply in answers.items():
            config = reply.content[FEDERATED_RECORD]
            try:
                if listed is None:
                    genes[node] = strings_field(config, "genes")
                else:
                    genes[node] = held_genes(listed, bytes_field(config, "held"), f"node {node}")
            except (WireError, InputDataError) as exc:
                self._drop(node, "query.genes", f"unusable reply: {exc}")
        if len(genes) < self.min_sites:
            raise BuildAbortedError(
                f"federated build stopped at query.genes: {len(genes)} usable answer(s), "
                f"{self.min_sites} required"
            )
        return genes

    def usable_updates(
        self, sent: Trunk, answers: Mapping[int, Message], step: str
    ) -> dict[str, RoundUpdate]:
        """The sites' round updates whose reply is well formed and whose trunk fits the one
        sent (the other sites are dropped from the build)."""
        updates: dict[str, RoundUpdate] = {}
        for node, reply in answers.items():
            try:
                config = reply.content[FEDERATED_RECORD]
                returned = decode_tensors(
                    bytes_field(reply.content[TRUNK_RECORD], TENSORS), source=f"node {node}'s trunk"
                )
                n_cells, loss = int_field(config, "n-cells"), float_field(config, "loss")
            except (KeyError, WireError) as exc:
                what = f"no {exc} record" if isinstance(exc, KeyError) else str(exc)
                self._drop(node, step, f"unusable reply: {what}")
                continue
            problem = trunk_problem(sent, returned)
            if problem:
                self._drop(node, step, f"unusable trunk: {problem}")
                continue
            updates[self.site_of[node]] = RoundUpdate(returned, n_cells, loss)
        return updates

    def aggregate(
        self, sent: Trunk, updates: Mapping[str, RoundUpdate], step: str
    ) -> RoundAggregate:
        """The round's updates combined by :func:`aggregate_round` (which leaves out invalid
        counts and outliers); the build stops when fewer than ``min-sites`` went in."""
        aggregate = aggregate_round(self.plan, sent, updates)
        if len(aggregate.weights) < self.min_sites:
            raise BuildAbortedError(
                f"federated build stopped at {step}: {len(aggregate.weights)} usable update(s), "
                f"{self.min_sites} required (left out: {aggregate.left_out})"
            )
        return aggregate

    def cell_counts(self, answers: Mapping[int, Message]) -> dict[int, int]:
        """The sites' cell counts (``query.cells``) capped at the plan's ``max_site_cells``; a
        site whose count is not a positive integer is dropped."""
        counts: dict[int, int] = {}
        for node, reply in answers.items():
            try:
                count = int_field(reply.content[FEDERATED_RECORD], "n-cells")
            except (KeyError, WireError) as exc:
                self._drop(node, "query.cells", f"unusable reply: {exc}")
                continue
            if count < 1:
                self._drop(node, "query.cells", f"claims {count} cells")
                continue
            counts[node] = min(count, self.plan.max_site_cells)
        if len(counts) < self.min_sites:
            raise BuildAbortedError(
                f"federated build stopped at query.cells: {len(counts)} usable count(s), "
                f"{self.min_sites} required"
            )
        return counts

    def _drop(self, node: int, step: str, reason: str) -> None:
        site = self.site_of.get(node, "")
        log.warning("node %d (%s) left the build at %s: %s", node, site or "?", step, reason)
        self.report["dropped"][str(node)] = {"site_id": site, "step": step, "reason": reason}


def run_federated_build(grid: Grid, context: Context) -> dict[str, Any]:
    """Run the whole build; returns (and writes) the report, also when it is aborted."""
    config = context.run_config
    store, report_path = Path(str(config["store"])), Path(str(config["report"]))
    min_sites, timeout = int(config["min-sites"]), float(config["timeout"])
    plan = FederatedPlan.from_json(str(config["plan"]))
    report: dict[str, Any] = {
        "task": "federated-build", "plan": plan.to_dict(), "sites": [], "rounds": [],
        "dropped": {}, "completed": False,
    }  # fmt: skip
    listed_file = str(config.get("gene-list", ""))
    listed = read_gene_file(Path(listed_file), "the build's gene list") if listed_file else None
    try:
        _build(grid, store, plan, timeout, min_sites, listed, report)
        report["completed"] = True
    except BuildAbortedError as exc:
        report["error"] = str(exc)
    write_report(report_path, report)
    return report


def _build(grid: Grid, store: Path, plan: FederatedPlan, timeout: float, min_sites: int,
           listed: list[str] | None, report: dict[str, Any]) -> None:  # fmt: skip
    steps = _Steps(grid, plan, timeout, min_sites, report)
    nodes = wait_for_nodes(grid, min_sites, timeout)
    answers = steps.ask(nodes, "query.genes", {} if listed is None else {"listed": listed})
    steps.site_of = {
        n: str_field(r.content[FEDERATED_RECORD], "site-id") for n, r in answers.items()
    }
    site_genes = steps.site_genes(answers, listed)
    universe = gene_universe(list(site_genes.values()))
    report["gene_list"] = len(listed) if listed is not None else None
    report["universe"] = len(universe)
    answers = steps.ask(sorted(site_genes), "query.votes", {"universe": universe})
    votes = []
    for node, reply in answers.items():
        cast = decode_tensors(
            bytes_field(reply.content[TRUNK_RECORD], TENSORS), source=f"node {node}"
        )
        votes.append(GeneVotes(cast["detected"].numpy(), cast["dispersions"].numpy()))
    genes = elect_genes(universe, votes, plan)
    log.info("federated build: %d sites, %d genes elected of %d", len(answers), len(genes),
             len(universe))  # fmt: skip
    trunk = initial_trunk(plan, len(genes))
    n_cells: dict[str, int] = {}  # per site whose update went in: its (capped) count, latest
    if plan.secure_aggregation:
        trunk, nodes = _secure_rounds(steps, genes, trunk, sorted(answers), n_cells)
    else:
        for r in range(plan.rounds):
            started, step = time.perf_counter(), f"train.round {r + 1}"
            answers = steps.ask(
                sorted(answers), "train.round", {"genes": genes, "round": r},
                tensors=encode_tensors(trunk),
            )  # fmt: skip
            updates = steps.usable_updates(trunk, answers, step)
            answers = {n: a for n, a in answers.items() if steps.site_of[n] in updates}
            aggregate = steps.aggregate(trunk, updates, step)
            trunk = aggregate.trunk
            n_cells.update(aggregate.cells)
            elapsed = time.perf_counter() - started
            report["rounds"].append(round_record(r, updates, aggregate, elapsed))
            log.info("federated round %d/%d done", r + 1, plan.rounds)
        nodes = sorted(answers)
    release = federated_release(
        plan, genes, trunk, n_cells=sum(n_cells.values()), sites=sorted(n_cells),
        history=report["rounds"],
    )  # fmt: skip
    with Registry(store) as registry:
        registry.publish_release(release, actor="federated build")
        report["release_id"] = release.content_hash
        report["genes"] = len(genes)
        report["generation"], payload = composite_record(registry)
        finished = steps.ask(nodes, "train.finish", {}, composite=payload)
        for node, reply in sorted(finished.items()):
            report["sites"].append(register_reply(registry, node, reply))
        report.update(latest_composite(registry))


def _secure_rounds(steps: _Steps, genes: list[str], trunk: Trunk, nodes: list[int],
                   n_cells: dict[str, int]) -> tuple[Trunk, list[int]]:  # fmt: skip
    """The rounds under secure aggregation (:mod:`fedatlas.coordinator.secure_rounds`): the
    sites' cell counts first (the largest sizes SecAgg+'s weight range), then per round the
    unmasked mean of the sites' clipped updates becomes the next trunk. Returns the final trunk
    and the nodes whose vector went into the last round; fills ``n_cells``."""
    plan = steps.plan
    counts = steps.cell_counts(steps.ask(nodes, "query.cells", {}))
    nodes, mean_norm = sorted(counts), None
    for r in range(plan.rounds):
        started, step = time.perf_counter(), f"train.round {r + 1}"
        clip = clip_bound(plan, mean_norm)
        instructions = round_instructions(plan.to_json(), genes, r, encode_tensors(trunk), clip)
        try:
            outcome = run_secure_round(
                steps.grid, dict.fromkeys(nodes, instructions), round_number=r + 1, clip=clip,
                max_weight=max(counts[n] for n in nodes), timeout=steps.timeout,
            )  # fmt: skip
            for node in sorted(set(nodes) - set(outcome.weights)):
                steps._drop(node, step, "no masked vector in the secure round")
            nodes = sorted(outcome.weights)
            if outcome.mean is None or len(nodes) < steps.min_sites:
                raise ValueError(f"{len(nodes)} masked vector(s) unmasked, {steps.min_sites} "
                                 f"required (failures: {outcome.failures})")  # fmt: skip
            cells = {steps.site_of[n]: outcome.weights[n] for n in nodes}
            std = noise_std(plan, clip, list(cells.values()))
            trunk, mean_norm = aggregated_trunk(trunk, outcome.mean, std)
            losses = {steps.site_of[n]: float_field(outcome.answers[n], "loss") for n in nodes}
        except (KeyError, TypeError, ValueError, WireError) as exc:
            raise BuildAbortedError(
                f"federated build stopped at {step}: secure aggregation failed: {exc}"
            ) from None
        n_cells.update(cells)
        steps.report["rounds"].append(secure_round_record(
            r, time.perf_counter() - started, losses=losses, cells=cells, clip=clip,
            mean_norm=mean_norm, std=std,
        ))  # fmt: skip
        log.info("federated round %d/%d done (secure aggregation)", r + 1, plan.rounds)
    return trunk, nodes
