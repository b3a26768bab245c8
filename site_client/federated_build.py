"""The site side of a federated reference build (runs inside the site's ClientApp).

Each message carries the build's plan; the site reads its own cells (as configured on its
SuperNode) and answers with what that step needs — its gene names, its per-batch gene votes, its
trained trunk and cell count — and finally its signed adaptor. Its condition rows are kept in
the node's Flower state between rounds and never leave the site except as that adaptor.
"""

from __future__ import annotations

from typing import Any

from fedatlas.shared.runtime.flower import COMPOSITE_RECORD, FEDERATED_RECORD, TRUNK_RECORD

ROWS_STATE = "fedatlas.rows"  # this site's condition rows, kept between rounds


def _trainer(message: Any, context: Any) -> Any:
    from fedatlas.shared.model.federated import FederatedPlan, SiteTrainer
    from fedatlas.site_client.campaign import load_site_data, site_settings

    plan = FederatedPlan.from_json(str(message.content[FEDERATED_RECORD]["plan"]))
    site = load_site_data(site_settings(context))
    trainer = SiteTrainer(site.cells, site.site_id, plan)
    if ROWS_STATE in context.state:
        trainer.rows = context.state[ROWS_STATE].to_torch_state_dict()
    return site, trainer


def genes(message: Any, context: Any) -> Any:
    """Answer with the site's gene names (for the build's gene universe)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    site, trainer = _trainer(message, context)
    reply = ConfigRecord({"site-id": site.site_id, "genes": trainer.gene_names()})
    return Message(RecordDict({FEDERATED_RECORD: reply}), reply_to=message)


def votes(message: Any, context: Any) -> Any:
    """Answer with the site's per-batch gene dispersions over the announced universe."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    site, trainer = _trainer(message, context)
    universe = [str(g) for g in message.content[FEDERATED_RECORD]["universe"]]
    cast = trainer.votes(universe)
    arrays = ArrayRecord(
        {"detected": _array(cast.detected), "dispersions": _array(cast.dispersions)}
    )
    return Message(
        RecordDict(
            {FEDERATED_RECORD: ConfigRecord({"site-id": site.site_id}), TRUNK_RECORD: arrays}
        ),
        reply_to=message,
    )


def train_round(message: Any, context: Any) -> Any:
    """Train the sent trunk and this site's rows for one round; answer with the trunk."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    site, trainer = _trainer(message, context)
    config = message.content[FEDERATED_RECORD]
    trunk = message.content[TRUNK_RECORD].to_torch_state_dict()
    update = trainer.train_round([str(g) for g in config["genes"]], trunk, int(config["round"]))
    context.state[ROWS_STATE] = ArrayRecord(torch_state_dict=trainer.rows)
    answer = ConfigRecord({"site-id": site.site_id, "n-cells": update.n_cells, "loss": update.loss})
    return Message(
        RecordDict(
            {FEDERATED_RECORD: answer, TRUNK_RECORD: ArrayRecord(torch_state_dict=update.trunk)}
        ),
        reply_to=message,
    )


def finish(message: Any, context: Any) -> Any:
    """Turn the kept rows into this site's adaptor on the signed federated release; answer
    with the signed bundle (as an adaptor campaign does)."""
    from fedatlas.site_client.campaign import bundle_reply, site_settings, verified_composite

    node = site_settings(context)
    release = verified_composite(message.content[COMPOSITE_RECORD], node)
    site, trainer = _trainer(message, context)
    if not trainer.rows:
        raise ValueError(f"site {site.site_id}: no condition rows kept; it took part in no round")
    return bundle_reply(message, node, site, trainer.finish(release))


def _array(values: Any) -> Any:
    from flwr.app import Array

    return Array(values)
