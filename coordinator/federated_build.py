"""The coordinator side of a federated reference build (runs inside Flower's ServerApp).

Steps (see :mod:`fedatlas.shared.model.federated`): ask every SuperNode for its gene names, then for
its gene votes over their union; elect the genes; run the FedAvg/FedProx rounds; publish the
final trunk as a signed release in the store; send it to the sites, whose signed adaptors are
registered through :meth:`Registry.submit` exactly like campaign bundles. A site that fails or
does not answer a step, or answers with a trunk that does not fit, is reported and left out of
the later steps. Each round's updates are combined by
:func:`~fedatlas.shared.model.federated.aggregate_round`, which trusts no site's claim: an
update with an invalid cell count or an outlying norm is left out of that round (reported in the
round's record). The build stops when fewer than ``min-sites`` sites answer a step or have their
update combined in a round.
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
from fedatlas.shared.data.preprocessing import GeneVotes
from fedatlas.shared.errors import FedatlasError
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
    try:
        _build(grid, store, plan, timeout, min_sites, report)
        report["completed"] = True
    except BuildAbortedError as exc:
        report["error"] = str(exc)
    write_report(report_path, report)
    return report


def _build(grid: Grid, store: Path, plan: FederatedPlan, timeout: float, min_sites: int,
           report: dict[str, Any]) -> None:  # fmt: skip
    steps = _Steps(grid, plan, timeout, min_sites, report)
    nodes = wait_for_nodes(grid, min_sites, timeout)
    answers = steps.ask(nodes, "query.genes", {})
    steps.site_of = {
        n: str_field(r.content[FEDERATED_RECORD], "site-id") for n, r in answers.items()
    }
    universe = gene_universe(
        [strings_field(r.content[FEDERATED_RECORD], "genes") for r in answers.values()]
    )
    answers = steps.ask(sorted(answers), "query.votes", {"universe": universe})
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
        report["rounds"].append(round_record(r, updates, aggregate, time.perf_counter() - started))
        log.info("federated round %d/%d done", r + 1, plan.rounds)
    release = federated_release(
        plan, genes, trunk, n_cells=sum(n_cells.values()), sites=sorted(n_cells),
        history=report["rounds"],
    )  # fmt: skip
    with Registry(store) as registry:
        registry.publish_release(release, actor="federated build")
        report["release_id"] = release.content_hash
        report["genes"] = len(genes)
        report["generation"], payload = composite_record(registry)
        finished = steps.ask(sorted(answers), "train.finish", {}, composite=payload)
        for node, reply in sorted(finished.items()):
            report["sites"].append(register_reply(registry, node, reply))
        report.update(latest_composite(registry))
