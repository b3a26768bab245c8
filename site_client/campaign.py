"""The site side of a Flower adaptor campaign (runs inside the site's ClientApp).

Everything about the site's data comes from its SuperNode's own configuration (written by
``fedatlas site node``) and never leaves the site: the data path, batch and label keys, the
signing key. In a simulation (``fedatlas coordinator simulate``) a node has only a partition
id, and the same settings come from the run's federation file (``shared/virtual_sites.py``).
The ClientApp checks the composite's signature against the coordinator key the site trusts,
trains the adaptor on its cells and answers with the signed bundle only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedatlas.shared.runtime.flower import BUNDLE_RECORD, COMPOSITE_RECORD


@dataclass
class SiteData:
    """The site's cells as its SuperNode configuration names them."""

    site_id: str
    adata: Any  # anndata.AnnData
    cells: Any  # fedatlas.shared.data.dataset.CellTable


def load_site_data(node: Any) -> SiteData:
    """Read the site's ``.h5ad`` named by its node configuration (never sent anywhere)."""
    from fedatlas.shared.data.dataset import extract_cells
    from fedatlas.shared.data.h5ad import read_h5ad

    adata = read_h5ad(Path(str(node["data"])))
    labels = [str(node["label-key"])] if str(node.get("label-key", "")) else []
    cells = extract_cells(
        adata, source=str(node["data"]), batch_key=str(node["batch-key"]), label_keys=labels
    )
    return SiteData(str(node["site-id"]), adata, cells)


def verified_composite(received: Any, node: Any) -> Any:
    """The composite of a campaign message, after checking its signature against the
    coordinator key this site trusts (pinned, or ``coordinator-key`` in its configuration)."""
    from fedatlas.shared.model.release import Release
    from fedatlas.shared.wire.composite import CompositeStatement
    from fedatlas.shared.wire.signing import load_public_key
    from fedatlas.site_client.trust import trusted_key

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
    return release


def bundle_reply(message: Any, node: Any, site: SiteData, result: Any) -> Any:
    """Sign the mapping's adaptor and answer ``message`` with the bundle; annotate the site's
    own copy of its cells when its configuration names an output file."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedatlas.shared.data.h5ad import write_h5ad
    from fedatlas.shared.model.annotations import annotate
    from fedatlas.shared.wire.bundle import make_bundle
    from fedatlas.shared.wire.signing import load_signing_key

    if result.adaptor is None:
        raise ValueError(f"site {site.site_id}: every batch is already in the composite")
    if str(node.get("out", "")):
        annotate(site.adata, result)
        write_h5ad(site.adata, Path(str(node["out"])))
    bundle = make_bundle(result.adaptor, load_signing_key(Path(str(node["key"]))))
    reply = ConfigRecord({"bundle": bundle.raw, "site-id": site.site_id})
    return Message(RecordDict({BUNDLE_RECORD: reply}), reply_to=message)


def train(message: Any, context: Any) -> Any:
    """Handle a campaign message: map the site's cells, reply with its signed bundle."""
    from fedatlas.shared.model.mapping import map_cells

    node = site_settings(context)
    release = verified_composite(message.content[COMPOSITE_RECORD], node)
    site = load_site_data(node)
    result = map_cells(
        release, site.cells, site_id=site.site_id, seed=int(node.get("seed", 0)),
        epochs=int(node.get("epochs", 0)) or None, progress=False,
    )  # fmt: skip
    return bundle_reply(message, node, site, result)


def site_settings(context: Any) -> Mapping[str, Any]:
    """This node's site configuration: its SuperNode's own (a real site), else the entry of its
    partition in the run's simulation federation file (a virtual site)."""
    from fedatlas.shared.runtime.virtual_sites import virtual_site

    node = context.node_config
    if "site-id" in node:
        return dict(node)
    federation = str(context.run_config.get("simulation-sites", ""))
    if not federation or "partition-id" not in node:
        raise ValueError(
            "this SuperNode has no site configuration: start it with `fedatlas site node`, or "
            "run a simulation with `fedatlas coordinator simulate`"
        )
    return virtual_site(Path(federation), int(node["partition-id"]))
