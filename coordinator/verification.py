"""Verification of a submitted bundle, before anything about it is stored.

Every check has a stable reason code (returned to the site with a sentence that says what was
wrong and what was expected). The same function serves the gRPC submit and the Flower campaign.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fedatlas.coordinator.store import SiteRecord, Store
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.hashing import dtype_name
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.release import MODEL_PREFIX, Release, prototype_prefix
from fedatlas.shared.model.surgery import split
from fedatlas.shared.wire.bundle import (
    NONCE_BYTES,
    BundleError,
    BundleHashError,
    SignedBundle,
    parse_bundle,
)
from fedatlas.shared.wire.signing import fingerprint

Approval = Literal["auto", "hold"]

# reason code -> what it means (also the documentation of the codes)
REASONS: dict[str, str] = {
    "oversize": "the bundle is larger than the coordinator accepts",
    "malformed": "the bytes are not a well-formed fedatlas bundle",
    "unknown_site": "no site with this id is enrolled",
    "revoked_site": "the site's enrolment was revoked",
    "key_mismatch": "the bundle is signed by a key other than the site's enrolled key",
    "bad_signature": "the signature does not match the bundle's contents",
    "replayed_nonce": "another bundle of this site already used this nonce",
    "wrong_release": "the adaptor was not trained against the coordinator's current reference",
    "condition_owned": "a condition of the bundle already belongs to the reference or a site",
    "bad_tensors": "tensor names, shapes or dtypes do not fit the reference",
    "non_finite": "a tensor holds NaN or infinite values",
    "norm_outlier": "condition parameters are far larger than any the reference has",
    "small_prototype": "a prototype aggregates fewer cells than the coordinator requires",
}


@dataclass(frozen=True)
class Policy:
    """The coordinator's acceptance policy (stored in the registry, set by the operator).

    Attributes:
        approval: ``auto`` registers verified bundles as accepted; ``hold`` keeps them for an
            operator to approve or reject.
        min_prototype_cells: smallest cell count a prototype may aggregate (k).
        norm_factor: a condition row may be at most this many times longer (L2) than the
            longest row of the same table in the reference.
        max_bundle_bytes: largest serialised bundle accepted.
    """

    approval: Approval = "auto"
    min_prototype_cells: int = 10
    norm_factor: float = 10.0
    max_bundle_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if self.approval not in ("auto", "hold"):
            raise ConfigError(f"approval must be auto or hold, got {self.approval!r}")
        if self.min_prototype_cells < 1 or self.norm_factor <= 1 or self.max_bundle_bytes < 1:
            raise ConfigError(
                "min_prototype_cells must be >= 1, norm_factor > 1, max_bundle_bytes >= 1"
            )

    def to_json(self) -> str:
        """Stored form."""
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Policy:
        """Inverse of :meth:`to_json` (the defaults when nothing is stored)."""
        return cls(**json.loads(text)) if text else cls()


@dataclass(frozen=True)
class Rejection(Exception):  # noqa: N818 (a verdict, not an error of the coordinator)
    """A bundle failed a check."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Reference:
    """What bundles are checked against: the current release and the ids of its composites."""

    release: Release
    accepted_ids: frozenset[str]  # the release's id and its composites' content hashes
    table_norms: dict[str, float] = field(default_factory=dict)  # longest row per table

    @classmethod
    def of(cls, release: Release, composite_ids: Iterable[str]) -> Reference:
        """The reference for ``release`` and its composites."""
        tables = split(release.model_tensors())[1]
        norms = {
            MODEL_PREFIX + name: float(torch.linalg.vector_norm(t.double(), dim=-1).max())
            if t.shape[0]
            else 0.0
            for name, t in tables.items()
        }
        return cls(release, frozenset({release.content_hash, *composite_ids}), norms)


@dataclass(frozen=True)
class Verified:
    """A bundle that passed every check."""

    bundle: SignedBundle
    adaptor: Adaptor
    site: SiteRecord


def verify_bundle(raw: bytes, store: Store, reference: Reference, policy: Policy) -> Verified:
    """Run every check on ``raw`` (a serialised bundle); raises :class:`Rejection`."""
    if len(raw) > policy.max_bundle_bytes:
        raise Rejection(
            "oversize", f"{len(raw):,} bytes; this coordinator accepts at most "
            f"{policy.max_bundle_bytes:,} bytes per bundle",
        )  # fmt: skip
    try:
        bundle = parse_bundle(raw)
        bundle.adaptor_content()
    except BundleError as exc:
        raise Rejection("malformed", str(exc)) from None
    site = _check_site(bundle, store)
    if not bundle.signature_valid(site.public_key):
        raise Rejection("bad_signature", "the Ed25519 signature does not verify")
    if len(bundle.nonce) != NONCE_BYTES:
        raise Rejection("malformed", f"nonce of {len(bundle.nonce)} bytes, expected {NONCE_BYTES}")
    previous = store.find_nonce(site.site_id, bundle.nonce)
    if previous is not None:
        raise Rejection(
            "replayed_nonce", f"nonce {bundle.nonce.hex()} was already used by bundle {previous}"
        )
    _check_release(bundle, reference)
    try:
        adaptor = bundle.adaptor()
    except BundleHashError as exc:  # the tensors are not those the signed content lists
        raise Rejection("bad_signature", str(exc)) from None
    except BundleError as exc:
        raise Rejection("bad_tensors", str(exc)) from None
    _check_consistency(bundle, adaptor)
    _check_conditions(adaptor, store, reference)
    _check_tensors(adaptor, reference)
    _check_values(adaptor, reference, policy)
    return Verified(bundle, adaptor, site)


def _check_site(bundle: SignedBundle, store: Store) -> SiteRecord:
    site = store.get_site(bundle.site_id)
    if site is None:
        raise Rejection(
            "unknown_site", f"site {bundle.site_id!r} is not enrolled at this coordinator"
        )
    if site.status != "enrolled":
        raise Rejection("revoked_site", f"site {bundle.site_id!r} was revoked on {site.revoked_at}")
    signer = bytes(bundle.message.signer_public_key)
    if signer != site.public_key:
        raise Rejection(
            "key_mismatch",
            f"signed by key {fingerprint(signer)}, but site {site.site_id!r} is enrolled with "
            f"key {fingerprint(site.public_key)}",
        )
    return site


def _check_release(bundle: SignedBundle, reference: Reference) -> None:
    release_id = bundle.message.release_id
    if release_id not in reference.accepted_ids or (
        bundle.message.trunk_id != reference.release.trunk_id
    ):
        raise Rejection(
            "wrong_release",
            f"trained against {release_id}, which is not release "
            f"{reference.release.content_hash} or one of its composites; pull the current "
            "composite and train again",
        )


def _check_consistency(bundle: SignedBundle, adaptor: Adaptor) -> None:
    content = adaptor.content
    for key, expected in (
        ("site_id", bundle.site_id),
        ("release_id", bundle.message.release_id),
        ("trunk_id", bundle.message.trunk_id),
    ):
        if content.get(key) != expected:
            raise Rejection(
                "malformed", f"the adaptor's {key} {content.get(key)!r} differs from the "
                f"bundle's {expected!r}",
            )  # fmt: skip


def _check_conditions(adaptor: Adaptor, store: Store, reference: Reference) -> None:
    names = adaptor.condition_names
    if not names:
        raise Rejection("malformed", "the adaptor has no conditions")
    if len(set(names)) != len(names):
        raise Rejection("malformed", "the adaptor lists a condition twice")
    release_conditions = set(reference.release.condition_names)
    for name in names:
        if name in release_conditions:
            raise Rejection(
                "condition_owned", f"condition {name!r} belongs to the reference release"
            )
        owner = store.condition_owner(name)
        if owner is not None:
            raise Rejection(
                "condition_owned",
                f"condition {name!r} already belongs to site {owner[0]!r} (bundle {owner[1]})",
            )
        if not name.startswith(adaptor.site_id + "/"):
            raise Rejection(
                "condition_owned",
                f"condition {name!r} is outside site {adaptor.site_id!r}'s namespace "
                f"({adaptor.site_id}/BATCH)",
            )


def _expected_tensors(adaptor: Adaptor, release: Release) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor an adaptor for ``release`` must have."""
    n = len(adaptor.condition_names)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, table in split(release.model_tensors())[1].items():
        expected[MODEL_PREFIX + name] = ("float32", (n, *table.shape[1:]))
    latent = release.model_config.latent_dim
    meta = adaptor.content.get("prototypes", {})
    for i, level in enumerate(release.label_levels):
        labels = len(meta.get(level, {}).get("labels", []))
        prefix = prototype_prefix(i)
        expected[f"{prefix}.mean"] = ("float32", (labels, latent))
        expected[f"{prefix}.var"] = ("float32", (labels, latent))
        expected[f"{prefix}.count"] = ("int64", (labels,))
        expected[f"{prefix}.log_d2"] = ("float32", (labels, 2))
    return expected


def _check_tensors(adaptor: Adaptor, reference: Reference) -> None:
    release = reference.release
    if adaptor.content.get("label_levels") != release.label_levels:
        raise Rejection(
            "bad_tensors", f"label levels {adaptor.content.get('label_levels')}, expected "
            f"{release.label_levels}",
        )  # fmt: skip
    expected = _expected_tensors(adaptor, release)
    missing = sorted(set(expected) - set(adaptor.tensors))
    extra = sorted(set(adaptor.tensors) - set(expected))
    if missing or extra:
        raise Rejection("bad_tensors", f"missing tensors {missing}, unexpected tensors {extra}")
    for name, (dtype, shape) in expected.items():
        got = adaptor.tensors[name]
        got_dtype = dtype_name(got)
        if got_dtype != dtype or tuple(got.shape) != shape:
            raise Rejection(
                "bad_tensors",
                f"tensor {name!r} is {got_dtype} {list(got.shape)}, expected {dtype} {list(shape)}",
            )
    try:
        for i in range(len(release.label_levels)):
            adaptor.prototypes(i)
    except (KeyError, ValueError, TypeError) as exc:
        raise Rejection(
            "bad_tensors", f"prototype metadata does not fit its tensors ({exc})"
        ) from None


def _check_values(adaptor: Adaptor, reference: Reference, policy: Policy) -> None:
    for name, tensor in sorted(adaptor.tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise Rejection("non_finite", f"tensor {name!r} holds NaN or infinite values")
    for name, limit in reference.table_norms.items():
        _check_norms(name, adaptor.tensors[name], limit, policy.norm_factor)
    for i, level in enumerate(reference.release.label_levels):
        pset = adaptor.prototypes(i)
        if len(pset) and int(pset.counts.min()) < policy.min_prototype_cells:
            small = [
                f"{label} ({count})"
                for label, count in zip(pset.labels, pset.counts.tolist(), strict=True)
                if count < policy.min_prototype_cells
            ]
            raise Rejection(
                "small_prototype",
                f"level {level!r}: prototypes over fewer than {policy.min_prototype_cells} "
                f"cells: {', '.join(small)}",
            )
        if len(pset) and (pset.variances < 0).any():
            raise Rejection("bad_tensors", f"level {level!r}: negative prototype variances")
        release_means = reference.release.prototypes(level).means
        if len(pset) and release_means.shape[0]:
            limit = float(torch.linalg.vector_norm(torch.from_numpy(release_means), dim=-1).max())
            _check_norms(
                f"{prototype_prefix(i)}.mean", torch.from_numpy(pset.means), limit,
                policy.norm_factor,
            )  # fmt: skip


def _check_norms(name: str, rows: Tensor, reference_max: float, factor: float) -> None:
    """Refuse rows longer than ``factor`` times the reference's longest; where the reference
    has no rows (a federated release), longer than ``factor`` times sqrt(row size), i.e. a
    root-mean-square entry above ``factor``."""
    if rows.shape[0] == 0:
        return
    flat = rows.double().reshape(rows.shape[0], -1)
    scale = reference_max if reference_max > 0 else math.sqrt(flat.shape[1])
    limit = factor * scale
    worst = float(torch.linalg.vector_norm(flat, dim=-1).max())
    if not math.isfinite(worst) or worst > limit:
        basis = (
            f"the reference's longest is {reference_max:.4g}"
            if reference_max > 0
            else f"the reference has no rows to compare, so the bound is sqrt(row size) "
            f"= {scale:.4g}"
        )
        raise Rejection(
            "norm_outlier",
            f"tensor {name!r} has a row of L2 norm {worst:.4g}; {basis} and at most "
            f"{factor:g} times that ({limit:.4g}) is accepted",
        )
