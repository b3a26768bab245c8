"""The site side of a federated reference build (runs inside the site's ClientApp).

Each message carries the build's plan; the site reads its own cells (as its node's settings
name them) and answers with what that step needs — its gene names, its per-batch gene votes,
its trained trunk and cell count — and finally its signed adaptor, made like a campaign's
(:meth:`~fedatlas.site_client.node.NodeSettings.bundle_reply`). Its condition rows are kept in
the node's Flower state between rounds and never leave the site except in that adaptor. The
messages are listed in :mod:`fedatlas.shared.wire.messages`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import Tensor

from fedatlas.shared.model.federated import FederatedPlan, SiteTrainer
from fedatlas.shared.wire.codec import decode_tensors, encode_tensors
from fedatlas.shared.wire.messages import (
    FEDERATED_RECORD,
    TENSORS,
    TRUNK_RECORD,
    bytes_field,
    int_field,
    str_field,
    strings_field,
)
from fedatlas.site_client.node import NodeSettings

ROWS_STATE = "fedatlas.rows"  # this site's condition rows, kept between rounds


def _plan(message: Message) -> FederatedPlan:
    return FederatedPlan.from_json(str_field(message.content[FEDERATED_RECORD], "plan"))


def _kept_rows(context: Context) -> dict[str, Tensor]:
    """The condition rows this node kept from earlier rounds (none before the first)."""
    if ROWS_STATE not in context.state:
        return {}
    kept = bytes_field(context.state[ROWS_STATE], TENSORS)
    return decode_tensors(kept, source="this node's kept rows")


def _trainer(message: Message, context: Context) -> tuple[NodeSettings, SiteTrainer]:
    """The node's settings and a trainer of its cells (loaded), with the rows it kept."""
    node = NodeSettings.of(context)
    _, cells = node.source.load()
    trainer = SiteTrainer(cells, node.site_id, _plan(message), rows=_kept_rows(context))
    return node, trainer


def _reply(message: Message, answer: ConfigRecord, tensors: bytes | None = None) -> Message:
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {FEDERATED_RECORD: answer}
    if tensors is not None:
        records[TRUNK_RECORD] = ConfigRecord({TENSORS: tensors})
    return Message(RecordDict(records), reply_to=message)


def genes(message: Message, context: Context) -> Message:
    """Answer with the site's gene names (for the build's gene universe)."""
    node, trainer = _trainer(message, context)
    return _reply(message, ConfigRecord({"site-id": node.site_id, "genes": trainer.gene_names()}))


def votes(message: Message, context: Context) -> Message:
    """Answer with the site's per-batch gene dispersions over the announced universe."""
    node, trainer = _trainer(message, context)
    universe = strings_field(message.content[FEDERATED_RECORD], "universe")
    cast = trainer.votes(universe)
    tensors = encode_tensors(
        {
            "detected": torch.from_numpy(cast.detected),
            "dispersions": torch.from_numpy(cast.dispersions),
        }
    )
    return _reply(message, ConfigRecord({"site-id": node.site_id}), tensors)


def train_round(message: Message, context: Context) -> Message:
    """Train the sent trunk and this site's rows for one round; answer with the trunk."""
    node, trainer = _trainer(message, context)
    config = message.content[FEDERATED_RECORD]
    trunk = decode_tensors(bytes_field(message.content[TRUNK_RECORD], TENSORS), source="the trunk")
    update = trainer.train_round(strings_field(config, "genes"), trunk, int_field(config, "round"))
    context.state[ROWS_STATE] = ConfigRecord({TENSORS: encode_tensors(trainer.rows)})
    answer = ConfigRecord({"site-id": node.site_id, "n-cells": update.n_cells, "loss": update.loss})
    return _reply(message, answer, encode_tensors(update.trunk))


def finish(message: Message, context: Context) -> Message:
    """Turn the kept rows into this site's adaptor on the signed federated release; answer
    with the signed bundle (as an adaptor campaign does)."""
    node = NodeSettings.of(context)
    release = node.accept_composite(message)
    rows = _kept_rows(context)
    if not rows:
        raise ValueError(f"site {node.site_id}: no condition rows kept; it took part in no round")
    plan = _plan(message)
    options = replace(node.options, epochs=plan.finish_epochs, seed=plan.seed)
    source = node.source if release.label_levels else replace(node.source, label_keys=())
    return node.bundle_reply(message, release, source=source, options=options, initial_rows=rows)
