"""A site's Flower node: the settings its ClientApp works with, and the two things it does with
every composite it receives (check it; answer with the site's signed bundle).

``fedatlas site node`` writes the settings into its SuperNode's own configuration, so the data
path, the keys and the mapping options stay at the site. In a simulation (``fedatlas
coordinator simulate``) a virtual site's settings come from the run's federation file
(:mod:`fedatlas.shared.runtime.virtual_sites`), found by the node's partition id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import Tensor

from fedatlas.shared.data.dataset import DataSource
from fedatlas.shared.model.mapping import MappingOptions
from fedatlas.shared.model.privacy import DEFAULT_DELTA, PrivacySpec
from fedatlas.shared.model.release import Release
from fedatlas.shared.runtime.virtual_sites import virtual_site
from fedatlas.shared.wire.composite import SignedComposite
from fedatlas.shared.wire.messages import BUNDLE_RECORD, COMPOSITE_RECORD, bytes_field
from fedatlas.shared.wire.signing import load_public_key, load_signing_key
from fedatlas.site_client.trust import accept
from fedatlas.site_client.workflow import prepare_bundle


@dataclass(frozen=True)
class NodeSettings:
    """What a site's ClientApp needs: its id, its cells, how to map them, its keys."""

    source: DataSource
    options: MappingOptions
    key: Path  # the site's signing key (site.key)
    superlink: str  # the address the coordinator's key is pinned under
    known_coordinators: Path
    coordinator_key: Path | None = None  # explicit coordinator.pub (else pinned)
    out: Path | None = None  # also write the mapped cells here
    gene_universe: Path | None = None  # public gene names a federated build may learn of

    @property
    def site_id(self) -> str:
        """The site's enrolled id."""
        return self.options.site_id

    def node_config(self) -> dict[str, str | int | float]:
        """The settings as SuperNode configuration entries (``--node-config``)."""
        config: dict[str, str | int | float] = {
            "site-id": self.site_id,
            "data": str(self.source.path),
            "batch-key": self.source.batch_key,
            "label-key": self.source.label_keys[0] if self.source.label_keys else "",
            "key": str(self.key),
            "out": str(self.out or ""),
            "coordinator-key": str(self.coordinator_key or ""),
            "superlink": self.superlink,
            "known-coordinators": str(self.known_coordinators),
            "gene-universe": str(self.gene_universe or ""),
            "seed": self.options.seed,
            "epochs": self.options.epochs or 0,
            "train-cells": self.options.train_cells,
        }
        if self.options.chunk_size is not None:
            config["chunk-size"] = self.options.chunk_size
        if self.options.privacy is not None:
            config["epsilon"] = self.options.privacy.epsilon
            config["delta"] = self.options.privacy.delta
        return config

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> NodeSettings:
        """Inverse of :meth:`node_config` (missing optional entries take their defaults)."""
        label = str(values.get("label-key", ""))
        chunk = values.get("chunk-size")
        return cls(
            source=DataSource(
                Path(str(values["data"])), str(values["batch-key"]), (label,) if label else ()
            ),
            options=MappingOptions(
                site_id=str(values["site-id"]),
                seed=int(values.get("seed", 0)),
                epochs=int(values.get("epochs", 0)) or None,
                chunk_size=None if chunk is None else int(chunk),
                train_cells=int(values.get("train-cells", MappingOptions.train_cells)),
                privacy=PrivacySpec(
                    float(values["epsilon"]), float(values.get("delta", DEFAULT_DELTA))
                )
                if "epsilon" in values
                else None,
            ),
            key=Path(str(values["key"])),
            superlink=str(values["superlink"]),
            known_coordinators=Path(str(values["known-coordinators"])),
            coordinator_key=Path(str(values["coordinator-key"]))
            if values.get("coordinator-key")
            else None,
            out=Path(str(values["out"])) if values.get("out") else None,
            gene_universe=Path(str(values["gene-universe"]))
            if values.get("gene-universe")
            else None,
        )

    @classmethod
    def of(cls, context: Context) -> NodeSettings:
        """This node's settings: its SuperNode's own (a real site), else the entry of its
        partition in the run's simulation federation file (a virtual site)."""
        node = context.node_config
        if "site-id" in node:
            return cls.from_config(node)
        federation = str(context.run_config.get("simulation-sites", ""))
        if not federation or "partition-id" not in node:
            raise ValueError(
                "this SuperNode has no site configuration: start it with `fedatlas site node`, "
                "or run a simulation with `fedatlas coordinator simulate`"
            )
        return cls.from_config(virtual_site(Path(federation), int(node["partition-id"])))

    def accept_composite(self, message: Message) -> Release:
        """The composite ``message`` carries, once its signature is checked against the
        coordinator key this site trusts (pinned, or ``coordinator-key``)."""
        source = f"campaign from {self.superlink}"
        composite = SignedComposite.decode(
            bytes_field(message.content[COMPOSITE_RECORD], COMPOSITE_RECORD), source=source
        )
        explicit = load_public_key(self.coordinator_key) if self.coordinator_key else None
        return accept(
            composite, self.superlink, known_file=self.known_coordinators, explicit=explicit
        )

    def bundle_reply(
        self,
        message: Message,
        release: Release,
        *,
        source: DataSource | None = None,
        options: MappingOptions | None = None,
        initial_rows: Mapping[str, Tensor] | None = None,
    ) -> Message:
        """Map the site's cells onto ``release`` (``source`` and ``options`` default to this
        node's), sign its adaptor and answer ``message`` with the bundle; only the bundle
        leaves the site."""
        bundle, _ = prepare_bundle(
            release, source or self.source, options or self.options, load_signing_key(self.key),
            out=self.out, initial_rows=initial_rows, progress=False,
        )  # fmt: skip
        reply = ConfigRecord({"bundle": bundle.raw, "site-id": self.site_id})
        return Message(RecordDict({BUNDLE_RECORD: reply}), reply_to=message)
