"""The coordinator side of a Flower adaptor campaign (runs inside Flower's ServerApp).

The current signed composite goes to every connected SuperNode; each site's ClientApp answers
with a signed bundle, which is registered through :meth:`Registry.submit`, exactly as a gRPC
submission. Sites that fail or do not answer in time are reported, not fatal. The outcome of
every site is written to a JSON report that ``fedatlas coordinator campaign`` prints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedatlas.coordinator.registry import Registry
from fedatlas.shared.hashing import digest
from fedatlas.shared.names import MAX_SITE_ID
from fedatlas.shared.wire.codec import WireError
from fedatlas.shared.wire.messages import (
    BUNDLE_RECORD,
    COMPOSITE_RECORD,
    bytes_field,
    str_field,
)

log = logging.getLogger(__name__)


def run_campaign(grid: Grid, context: Context) -> dict[str, Any]:
    """Announce the composite, collect bundles, register them; returns (and writes) the report."""
    config = context.run_config
    store, report_path = Path(str(config["store"])), Path(str(config["report"]))
    min_sites, timeout = int(config["min-sites"]), float(config["timeout"])
    report: dict[str, Any] = {"sites": [], "timed_out": [], "completed": False}
    with Registry(store) as registry:
        generation, payload = composite_record(registry)
        report["generation"] = generation
        nodes = wait_for_nodes(grid, min_sites, timeout)
        messages = [
            Message(
                content=RecordDict({COMPOSITE_RECORD: payload}), dst_node_id=n, message_type="train"
            )
            for n in nodes
        ]
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = int(reply.metadata.src_node_id)
            answered.add(node)
            report["sites"].append(register_reply(registry, node, reply))
        report["timed_out"] = sorted(set(nodes) - answered)
        report.update(latest_composite(registry))
    report["completed"] = True
    write_report(report_path, report)
    return report


def composite_record(registry: Registry) -> tuple[int, ConfigRecord]:
    """The current signed composite's generation, and the composite in its wire form as the
    Flower record sites receive (:mod:`fedatlas.shared.wire.messages`)."""
    record, data = registry.composite_bytes()
    return record.generation, ConfigRecord({COMPOSITE_RECORD: data})


def latest_composite(registry: Registry) -> dict[str, Any]:
    """The report's fields naming the newest composite."""
    latest = registry.store.latest_composite()
    return {
        "composite_generation": latest.generation if latest else 0,
        "composite_hash": latest.content_hash if latest else "",
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a run's JSON report where ``fedatlas coordinator`` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True))


def wait_for_nodes(grid: Grid, min_sites: int, timeout: float) -> list[int]:
    """The connected SuperNodes, once at least ``min_sites`` are there (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_sites and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    log.info("campaign: %d SuperNodes connected (%d required)", len(nodes), min_sites)
    return [int(n) for n in nodes]


def register_reply(registry: Registry, node: int, reply: Message) -> dict[str, Any]:
    """Register a site's bundle reply through :meth:`Registry.submit`; the site's outcome. A
    reply that is not a bundle reply is that site's failure, never the campaign's."""
    if reply.has_error():
        return {"node_id": node, "site_id": "", "state": "failed", "reason": str(reply.error)}
    try:
        answer = reply.content[BUNDLE_RECORD]
        raw = bytes_field(answer, "bundle")
        site_id = str_field(answer, "site-id")[:MAX_SITE_ID]
    except (KeyError, WireError) as exc:
        return {"node_id": node, "site_id": "", "state": "failed",
                "reason": f"not a bundle reply ({str(exc)[:200]})"}  # fmt: skip
    outcome = registry.submit(raw, actor=f"flower campaign, node {node}")
    return {
        "node_id": node,
        "site_id": site_id,
        "state": outcome.state,
        "reason_code": outcome.reason_code,
        "reason": outcome.reason,
        "bundle_id": digest(raw),
        "bundle_bytes": len(raw),
    }
