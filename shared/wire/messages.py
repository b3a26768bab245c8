"""fedatlas' messages: what each one carries, and the table of everything a site sends.

Every Flower message of fedatlas holds ``ConfigRecord`` entries only: strings, numbers and
bytes, read back with the typed accessors below, which refuse anything else. Tensors travel as
:func:`~fedatlas.shared.wire.codec.encode_tensors` bytes, a composite as
:meth:`~fedatlas.shared.wire.composite.SignedComposite.encode` bytes.

What a site sends, in every workflow, is :data:`SITE_MESSAGES`: message type -> field -> what
the field holds and what its size scales with (:data:`SCALES`; never the site's cells).
``shared/wire/MESSAGES.md`` is its readable rendering (:func:`render_site_messages`), and
``tests/test_wire_messages.py`` runs the real workflows at two site sizes and checks that every
message a site sends is listed there, field by field, and that no field grows with the cells.

What the coordinator sends to sites:
    gRPC                  the composite (``GetComposite``) and answers about bundles and sites
    adaptor campaign      ``train``: ``{"composite": SignedComposite bytes}``
    federated build       every message carries ``federated.plan`` (the plan as JSON);
                          ``query.genes``: the build's gene list (``federated.listed``) if it
                          has one; ``query.votes``: ``federated.universe`` (gene names);
                          ``train.round``: ``federated.genes``, ``federated.round``,
                          ``trunk.tensors`` (the trunk); ``train.finish``: ``composite``
    ... with secure aggregation  ``query.cells`` (the plan only); instead of ``train.round``,
                          per round Flower's four SecAgg+ stages as ``train`` messages
                          (``secaggplus_configs``: the protocol's settings, the other sites'
                          public keys, the encrypted key shares addressed to the site, the
                          active and dropped sites); the ``collect_masked_vectors`` stage also
                          carries ``fitins.config``: ``plan``, ``genes`` (JSON), ``round``,
                          ``tensors`` (the trunk) and ``clip`` (the round's bound)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedatlas.shared.wire.codec import WireError

COMPOSITE_RECORD = "composite"  # the signed composite sent to sites
BUNDLE_RECORD = "bundle"  # a site's signed bundle
FEDERATED_RECORD = "federated"  # a federated build's plan and per-step settings or answers
TRUNK_RECORD = "trunk"  # a federated build's tensors: the trunk, or a site's gene votes
TENSORS = "tensors"  # the field of TRUNK_RECORD holding encode_tensors() bytes

# What the size of a field a site sends can grow with. A field with none of them is fixed (an
# id, a hash, a number); none of them is the site's number of cells.
SCALES = {
    "genes": "the build's genes (gene list, public universe or elected genes)",
    "conditions": "the site's conditions (its batches)",
    "labels": "the site's cell-type labels",
    "network": "the network's tensors (its configuration: layers, latent size)",
    "sites": "the build's sites (SecAgg+ exchanges key shares with every other site)",
}


@dataclass(frozen=True)
class SiteField:
    """One field of a message a site sends: what it holds, what its size scales with (keys of
    :data:`SCALES`; empty: fixed) and when it is sent ("": always)."""

    holds: str
    scales: tuple[str, ...] = ()
    only: str = ""


@dataclass(frozen=True)
class SiteMessage:
    """A message type a site sends: its workflow, how it travels, and its fields (for Flower,
    ``record.field`` of the reply's content; for gRPC and the bundle, the protobuf fields).
    Keys of :data:`SITE_MESSAGES`: the protobuf message's full name, or for a Flower reply
    ``campaign/TYPE`` or ``build/TYPE`` (TYPE: the message type it answers; ``build/train
    (SecAgg+)``: the replies to Flower's SecAgg+ stages, all of type ``train``)."""

    workflow: str
    carrier: str
    fields: Mapping[str, SiteField]


_SITE_ID = SiteField("the site's enrolled id (at most 64 characters)")
_BUNDLE_REPLY = {
    f"{BUNDLE_RECORD}.bundle": SiteField(
        "the site's signed bundle (fedatlas.v1.Bundle bytes)", ("conditions", "labels", "network")
    ),
    f"{BUNDLE_RECORD}.site-id": _SITE_ID,
}
_FLOWER_REPLY = "Flower reply (ConfigRecords)"

SITE_MESSAGES: dict[str, SiteMessage] = {
    # ---- gRPC (fedatlas.v1.Coordinator): requests a site's client sends
    "fedatlas.v1.GetCompositeRequest": SiteMessage("gRPC", "GetComposite request", {}),
    "fedatlas.v1.SubmitBundleRequest": SiteMessage(
        "gRPC",
        "SubmitBundle request",
        {
            "bundle": SiteField(
                "the site's signed bundle (fedatlas.v1.Bundle bytes)",
                ("conditions", "labels", "network"),
            )
        },
    ),
    "fedatlas.v1.GetSubmissionStatusRequest": SiteMessage(
        "gRPC",
        "GetSubmissionStatus request",
        {"bundle_id": SiteField("SHA-256 of a bundle the site sent")},
    ),
    "fedatlas.v1.ListAdaptorsRequest": SiteMessage(
        "gRPC",
        "ListAdaptors request (mutual TLS)",
        {"site_id": SiteField("a site id to filter by", only="when filtering")},
    ),
    "fedatlas.v1.ListSitesRequest": SiteMessage("gRPC", "ListSites request (mutual TLS)", {}),
    "fedatlas.v1.HealthRequest": SiteMessage("gRPC", "Health request", {}),
    # ---- inside every bundle (gRPC SubmitBundle, and a campaign's or a build's bundle reply)
    "fedatlas.v1.Bundle": SiteMessage(
        "bundle",
        "the bytes of every bundle field (gRPC and Flower)",
        {
            "format_version": SiteField("the bundle format (2)"),
            "site_id": _SITE_ID,
            "signer_public_key": SiteField("the site's Ed25519 public key (32 bytes)"),
            "signature": SiteField("Ed25519 signature over the body (64 bytes)"),
            "body": SiteField(
                "the signed fedatlas.v1.BundleBody bytes", ("conditions", "labels", "network")
            ),
        },
    ),
    "fedatlas.v1.BundleBody": SiteMessage(
        "bundle",
        "the signed body of a bundle",
        {
            "site_id": _SITE_ID,
            "release_id": SiteField("content hash of the release trained against"),
            "trunk_id": SiteField("hash of the frozen network the adaptor fits"),
            "adaptor_json": SiteField(
                "canonical JSON: condition names and cell counts, label levels, prototype "
                "metadata (label, cell count, spread), training summary (epochs, final loss; "
                "with DP only the recipe and the noisy cell count), tensor hashes, and with DP "
                "the privacy record (epsilon, delta, rho and each mechanism's noise)",
                ("conditions", "labels", "network"),
            ),
            "tensors": SiteField(
                "the adaptor's tensors: condition rows (conditions x network width) and "
                "prototypes with their spread (labels x latent size)",
                ("conditions", "labels", "network"),
            ),
            "created_at": SiteField("creation time (ISO 8601)"),
            "nonce": SiteField("16 random bytes"),
        },
    ),
    # ---- Flower: "WORKFLOW/MESSAGE TYPE" (campaign or build) of the reply
    # adaptor campaign: the reply to "train"
    "campaign/train": SiteMessage("adaptor campaign", _FLOWER_REPLY, _BUNDLE_REPLY),
    # ---- Flower federated build with secure aggregation: Flower's SecAgg+ sends each of its
    # four stages as a plain "train" message, and secaggplus_mod answers; the coordinator only
    # ever unmasks the sum of the masked vectors (fedatlas.shared.model.secure_aggregation)
    "build/train (SecAgg+)": SiteMessage(
        "federated build, secure aggregation (Flower type 'train')",
        "Flower reply (ConfigRecords, MetricRecord)",
        {
            "secaggplus_configs.pk1": SiteField(
                "stage setup: the site's public key for pairwise masks"
            ),
            "secaggplus_configs.pk2": SiteField(
                "stage setup: the site's public key for encrypting key shares"
            ),
            "secaggplus_configs.dsts": SiteField(
                "stage share_keys: the node ids its encrypted key shares are for", ("sites",)
            ),
            "secaggplus_configs.ctxts": SiteField(
                "stage share_keys: per other site, its key shares encrypted for that site",
                ("sites",),
            ),
            "secaggplus_configs.masked_params": SiteField(
                "stage collect_masked_vectors: its quantised, clipped, weighted update (every "
                "floating tensor of the trunk, then its norm) plus pairwise and private masks "
                "(NumPy bytes, one per tensor)",
                ("network",),
            ),
            "fitres.num_examples.num_examples": SiteField(
                "stage collect_masked_vectors: the cells it weighs its update by (capped)"
            ),
            "fitres.metrics.site-id": _SITE_ID,
            "fitres.metrics.loss": SiteField("its mean training loss (one number)"),
            "fitres.status.code": SiteField("Flower's status code (0)"),
            "fitres.status.message": SiteField("Flower's status message (empty)"),
            "secaggplus_configs.nids": SiteField(
                "stage unmask: the node ids whose key shares follow", ("sites",)
            ),
            "secaggplus_configs.shares": SiteField(
                "stage unmask: its shares of the other sites' mask seeds (active sites) or keys "
                "(dropped sites)",
                ("sites",),
            ),
        },
    ),
    # federated build: the replies to each step
    "build/query.genes": SiteMessage(
        "federated build",
        _FLOWER_REPLY,
        {
            f"{FEDERATED_RECORD}.site-id": _SITE_ID,
            f"{FEDERATED_RECORD}.held": SiteField(
                "one bit per gene of the build's gene list: whether the site holds it",
                ("genes",),
                only="with a gene list",
            ),
            f"{FEDERATED_RECORD}.genes": SiteField(
                "the site's gene names that are in its public gene universe",
                ("genes",),
                only="without a gene list",
            ),
        },
    ),
    "build/query.votes": SiteMessage(
        "federated build",
        _FLOWER_REPLY,
        {
            f"{FEDERATED_RECORD}.site-id": _SITE_ID,
            f"{TRUNK_RECORD}.{TENSORS}": SiteField(
                "TensorSet: per batch and gene of the universe, the cells detecting it "
                "('detected') and its normalised dispersion ('dispersions')",
                ("conditions", "genes"),
            ),
        },
    ),
    "build/train.round": SiteMessage(
        "federated build",
        _FLOWER_REPLY,
        {
            f"{FEDERATED_RECORD}.site-id": _SITE_ID,
            f"{FEDERATED_RECORD}.n-cells": SiteField("the cells it trained on (one integer)"),
            f"{FEDERATED_RECORD}.loss": SiteField("its mean training loss (one number)"),
            f"{TRUNK_RECORD}.{TENSORS}": SiteField(
                "TensorSet: its trained trunk (every tensor but the condition tables)",
                ("network",),
            ),
        },
    ),
    "build/query.cells": SiteMessage(
        "federated build, secure aggregation",
        _FLOWER_REPLY,
        {
            f"{FEDERATED_RECORD}.site-id": _SITE_ID,
            f"{FEDERATED_RECORD}.n-cells": SiteField("the cells it trains on (one integer)"),
        },
    ),
    "build/train.finish": SiteMessage("federated build", _FLOWER_REPLY, _BUNDLE_REPLY),
}


def render_site_messages() -> str:
    """:data:`SITE_MESSAGES` as Markdown (the text of ``shared/wire/MESSAGES.md``)."""
    lines = [
        "# What a site sends",
        "",
        "Generated from `fedatlas.shared.wire.messages.SITE_MESSAGES` by "
        "`render_site_messages()`; a test checks that this file matches it and that the real "
        "workflows send nothing else. No field's size grows with the site's number of cells.",
        "",
        "Sizes scale with: " + "; ".join(f"**{k}**: {v}" for k, v in SCALES.items()) + ".",
        "",
        "| message | workflow | travels as | field | holds | size scales with | sent |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, message in SITE_MESSAGES.items():
        if not message.fields:
            lines.append(f"| `{name}` | {message.workflow} | {message.carrier} | (none) | | | |")
        for field_name, spec in message.fields.items():
            lines.append(
                f"| `{name}` | {message.workflow} | {message.carrier} | `{field_name}` | "
                f"{spec.holds} | {', '.join(spec.scales) or 'fixed'} | {spec.only or 'always'} |"
            )
    return "\n".join(lines) + "\n"


def _field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in record:
        raise WireError(f"the message has no {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WireError(f"{key!r} is {type(value).__name__}, expected {what}")
    return value


def bytes_field(record: Mapping[str, Any], key: str) -> bytes:
    """``record[key]``, which must be bytes (:class:`WireError` otherwise)."""
    return bytes(_field(record, key, bytes, "bytes"))


def str_field(record: Mapping[str, Any], key: str) -> str:
    """``record[key]``, which must be a string."""
    return str(_field(record, key, str, "a string"))


def int_field(record: Mapping[str, Any], key: str) -> int:
    """``record[key]``, which must be an integer."""
    return int(_field(record, key, int, "an integer"))


def float_field(record: Mapping[str, Any], key: str) -> float:
    """``record[key]``, which must be a number."""
    return float(_field(record, key, (int, float), "a number"))


def strings_field(record: Mapping[str, Any], key: str) -> list[str]:
    """``record[key]``, which must be a list of strings."""
    value = _field(record, key, list, "a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise WireError(f"{key!r} is not a list of strings")
    return [str(v) for v in value]
