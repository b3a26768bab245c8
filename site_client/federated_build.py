"""The site side of a federated reference build (runs inside the site's ClientApp).

Each message carries the build's plan; the site reads its own cells (as its node's settings
name them) and answers with what that step needs — which genes it holds (only of the build's
gene list, or of its public gene universe: :mod:`~fedatlas.shared.model.federated_genes`),
its per-batch gene votes, its trained trunk and cell count — and finally its signed adaptor,
made like a campaign's (:meth:`~fedatlas.site_client.node.NodeSettings.bundle_reply`). Its
condition rows are kept in the node's Flower state between rounds and never leave the site
except in that adaptor. The messages are listed in :mod:`fedatlas.shared.wire.messages`.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from torch import Tensor

from fedatlas.shared.errors import ConfigError
from fedatlas.shared.model.federated import FederatedPlan, SiteTrainer
from fedatlas.shared.model.federated_genes import held_mask, public_genes, read_gene_file
from fedatlas.shared.model.secure_aggregation import seed_quantisation, site_vector
from fedatlas.shared.wire.codec import WireError, decode_tensors, encode_tensors
from fedatlas.shared.wire.messages import (
    FEDERATED_RECORD,
    TENSORS,
    TRUNK_RECORD,
    bytes_field,
    float_field,
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
    """Answer the gene step: which of the build's listed genes this site holds, or (no list)
    its genes that are in its node's public gene universe — never its whole gene list."""
    node, trainer = _trainer(message, context)
    config = message.content[FEDERATED_RECORD]
    answer = ConfigRecord({"site-id": node.site_id})
    if "listed" in config:
        answer["held"] = held_mask(trainer.gene_names(), strings_field(config, "listed"))
    else:
        answer["genes"] = public_genes(trainer.gene_names(), _gene_universe(node))
    return _reply(message, answer)


def _gene_universe(node: NodeSettings) -> list[str]:
    """The public gene names this node may name in a build without a gene list."""
    if node.gene_universe is None:
        raise ConfigError(
            f"site {node.site_id}: the federated build sent no gene list and this node names no "
            "public gene universe, so it sends no gene name; start it with `fedatlas site node "
            "--gene-universe FILE` (public gene names, one per line)"
        )
    return read_gene_file(node.gene_universe, f"site {node.site_id}'s gene universe")


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


def cells(message: Message, context: Context) -> Message:
    """Answer with the number of cells this site trains on (secure aggregation: the coordinator
    sizes SecAgg+'s weight range by the largest)."""
    node, trainer = _trainer(message, context)
    return _reply(
        message, ConfigRecord({"site-id": node.site_id, "n-cells": trainer.cells.n_cells})
    )


def is_secure_round(message: Message) -> bool:
    """Whether a ``train`` message is a stage of a secure round (it carries SecAgg+'s settings)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def secure_round(message: Message, context: Context) -> Message:
    """A secure round's training, inside Flower's ``secaggplus_mod`` (its
    ``collect_masked_vectors`` stage), which masks the answer: train the sent trunk and this
    site's rows; answer in Flower's ``FitRes`` form with the update clipped to the round's bound
    (:func:`~fedatlas.shared.model.secure_aggregation.site_vector`), weighed by this site's own
    cell count (capped at the plan's ``max_site_cells``), and the site id and loss in plain."""
    config = recorddict_to_fitins(message.content, keep_input=True).config
    plan = FederatedPlan.from_json(str_field(config, "plan"))
    genes = json.loads(str_field(config, "genes"))
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        raise WireError("'genes' is not a JSON list of strings")
    node = NodeSettings.of(context)
    _, site_cells = node.source.load()
    trainer = SiteTrainer(site_cells, node.site_id, plan, rows=_kept_rows(context))
    sent = decode_tensors(bytes_field(config, TENSORS), source="the trunk")
    update = trainer.train_round(genes, sent, int_field(config, "round"))
    context.state[ROWS_STATE] = ConfigRecord({TENSORS: encode_tensors(trainer.rows)})
    seed_quantisation(plan, int_field(config, "round"), node.site_id)
    result = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(
            site_vector(sent, update.trunk, float_field(config, "clip"))
        ),
        num_examples=min(update.n_cells, plan.max_site_cells),
        metrics={"site-id": node.site_id, "loss": update.loss},
    )
    return Message(fitres_to_recorddict(result, keep_input=False), reply_to=message)


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
