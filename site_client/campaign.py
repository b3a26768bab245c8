"""The site side of a Flower adaptor campaign (runs inside the site's ClientApp).

Everything about the site's data comes from its SuperNode's own configuration (written by
``fedatlas site node``) and never leaves the site: the data path, batch and label keys, the
signing key. The ClientApp checks the composite's signature against the coordinator key the
site trusts, trains the adaptor on its cells and answers with the signed bundle only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedatlas.shared.flower import BUNDLE_RECORD, COMPOSITE_RECORD


def train(message: Any, context: Any) -> Any:
    """Handle a campaign message: map the site's cells, reply with its signed bundle."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedatlas.shared.annotations import annotate
    from fedatlas.shared.bundle import make_bundle
    from fedatlas.shared.composite import CompositeStatement
    from fedatlas.shared.dataset import extract_cells
    from fedatlas.shared.h5ad import read_h5ad, write_h5ad
    from fedatlas.shared.mapping import map_cells
    from fedatlas.shared.release import Release
    from fedatlas.shared.signing import load_public_key, load_signing_key
    from fedatlas.site_client.trust import trusted_key

    node = context.node_config
    site_id = str(node["site-id"])
    received = message.content[COMPOSITE_RECORD]
    release = Release.from_bytes(
        str(received["manifest"]), bytes(received["weights"]), source="campaign composite"
    )
    statement = CompositeStatement(str(received["statement"]), bytes(received["signature"]))
    explicit = str(node.get("coordinator-key", ""))
    trusted = trusted_key(
        str(node["superlink"]),
        statement.coordinator_key,
        known_file=Path(str(node["known-coordinators"])),
        explicit=load_public_key(Path(explicit)) if explicit else None,
    )
    statement.verify(release, trusted, source=f"campaign from {node['superlink']}")
    key = load_signing_key(Path(str(node["key"])))
    adata = read_h5ad(Path(str(node["data"])))
    labels = [str(node["label-key"])] if str(node.get("label-key", "")) else []
    cells = extract_cells(
        adata, source=str(node["data"]), batch_key=str(node["batch-key"]), label_keys=labels
    )
    result = map_cells(
        release, cells, site_id=site_id, seed=int(node.get("seed", 0)), progress=False
    )
    if result.adaptor is None:
        raise ValueError(f"site {site_id}: every batch is already in the composite")
    if str(node.get("out", "")):
        annotate(adata, result)
        write_h5ad(adata, Path(str(node["out"])))
    bundle = make_bundle(result.adaptor, key)
    reply = ConfigRecord({"bundle": bundle.raw, "site-id": site_id})
    return Message(RecordDict({BUNDLE_RECORD: reply}), reply_to=message)
