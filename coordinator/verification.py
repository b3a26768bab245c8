"""Verification of a submitted bundle, before anything about it is stored.

Every check has a stable reason code (returned to the site with a sentence that says what was
wrong and what was expected). The same function serves the gRPC submit and the Flower campaign.
The order matters: only the outer message is decoded before the signature is checked with the
site's enrolled key, over the exact bytes the site signed; then the signed body is decoded, its
JSON parsed strictly, and every number and name bounded (:mod:`fedatlas.shared.names`,
:mod:`fedatlas.coordinator.prototype_checks`). Whatever the bytes, the result is a
:class:`Verified` bundle or a :class:`Rejection`, never another exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.privacy_ledger import site_spend
from fedatlas.coordinator.prototype_checks import (
    PrototypeProblem,
    check_prototypes,
    claimed_cells,
)
from fedatlas.coordinator.store import SiteRecord, Store
from fedatlas.shared.hashing import dtype_name
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.privacy import epsilon_for, record_problem
from fedatlas.shared.model.prototypes import PrototypeSet
from fedatlas.shared.model.release import MODEL_PREFIX, Release, prototype_prefix
from fedatlas.shared.model.surgery import split
from fedatlas.shared.names import condition_problem, site_id_problem
from fedatlas.shared.wire.bundle import (
    NONCE_BYTES,
    BundleError,
    BundleHashError,
    Fields,
    SignedBundle,
    parse_bundle,
)
from fedatlas.shared.wire.signing import PUBLIC_KEY_BYTES, fingerprint

MAX_CONDITIONS = 1_000  # conditions (batches) one bundle may bring
MAX_HASH_TEXT = 80  # "sha256:" and 64 hex digits
MAX_TIME_TEXT = 64

# reason code -> what it means (also the documentation of the codes)
REASONS: dict[str, str] = {
    "oversize": "the bundle is larger than the coordinator accepts",
    "malformed": "the bytes are not a well-formed fedatlas bundle, or a field is out of bounds",
    "unknown_site": "no site with this id is enrolled",
    "revoked_site": "the site's enrolment was revoked",
    "key_mismatch": "the bundle is signed by a key other than the site's enrolled key",
    "bad_signature": "the signature does not match the bundle's contents",
    "replayed_nonce": "another bundle of this site already used this nonce",
    "wrong_release": "the adaptor was not trained against the coordinator's current reference",
    "condition_owned": "a condition of the bundle already belongs to the reference or a site",
    "bad_condition": "a condition name is not SITE_ID/BATCH with a safe batch name",
    "bad_tensors": "tensor names, shapes or dtypes do not fit the reference",
    "non_finite": "a tensor holds NaN or infinite values",
    "norm_outlier": "condition parameters are far larger than any the reference has",
    "small_prototype": "a prototype aggregates fewer cells than the coordinator requires",
    "implausible_count": "a count is more than the policy or the bundle's own conditions allow",
    "bad_label": "a label holds characters that could mislead, or is reserved",
    "confusable_label": "a new label looks like another label of the catalogue",
    "prototype_outlier": "a prototype sits or spreads unlike its label in the catalogue",
    "uncomposable": "the composite with the bundle cannot be built or would exceed its limits",
    "over_budget": "the bundle would take the site past its differential-privacy budget for "
    "the release, or it was made without differential privacy where the policy requires it",
}


@dataclass(frozen=True)
class Rejection(Exception):  # noqa: N818 (a verdict, not an error of the coordinator)
    """A bundle failed a check."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Reference:
    """What bundles are checked against: the current release, the ids of its composites and
    the current composite's prototype catalogue (one set per label level)."""

    release: Release
    accepted_ids: frozenset[str]  # the release's id and its composites' content hashes
    catalogue: tuple[PrototypeSet, ...] = ()
    table_norms: dict[str, float] = field(default_factory=dict)  # longest row per table

    @classmethod
    def of(
        cls,
        release: Release,
        composite_ids: Iterable[str],
        catalogue: Sequence[PrototypeSet] | None = None,
    ) -> Reference:
        """The reference for ``release``, its composites and the catalogue in force (default:
        the release's own prototypes)."""
        tables = split(release.model_tensors())[1]
        norms = {
            MODEL_PREFIX + name: float(torch.linalg.vector_norm(t.double(), dim=-1).max())
            if t.shape[0]
            else 0.0
            for name, t in tables.items()
        }
        if catalogue is None:
            catalogue = [release.prototypes(level) for level in release.label_levels]
        ids = frozenset({release.content_hash, *composite_ids})
        return cls(release, ids, tuple(catalogue), norms)


@dataclass(frozen=True)
class Verified:
    """A bundle that passed every check, with its signed fields and adaptor."""

    bundle: SignedBundle
    fields: Fields  # the signed BundleBody
    adaptor: Adaptor
    site: SiteRecord
    new_labels: tuple[str, ...]  # labels the catalogue did not have


def verify_bundle(raw: bytes, store: Store, reference: Reference, policy: Policy) -> Verified:
    """Run every check on ``raw`` (a serialised bundle); raises :class:`Rejection`."""
    if len(raw) > policy.max_bundle_bytes:
        raise Rejection(
            "oversize", f"{len(raw):,} bytes; this coordinator accepts at most "
            f"{policy.max_bundle_bytes:,} bytes per bundle",
        )  # fmt: skip
    try:
        bundle = parse_bundle(raw)
    except BundleError as exc:
        raise Rejection("malformed", str(exc)) from None
    site = _check_site(bundle, store)
    if bundle.legacy:
        raise Rejection(
            "malformed", "bundle format 1 is no longer accepted; prepare it with a current fedatlas"
        )
    if not bundle.signature_valid(site.public_key):
        raise Rejection("bad_signature", "the Ed25519 signature does not verify")
    try:
        fields = bundle.fields()
        _check_field_sizes(fields)
        content = bundle.adaptor_content()
    except BundleError as exc:
        raise Rejection("malformed", str(exc)) from None
    nonce = bytes(fields.nonce)
    previous = store.find_nonce(site.site_id, nonce)
    if previous is not None:
        raise Rejection(
            "replayed_nonce", f"nonce {nonce.hex()} was already used by bundle {previous}"
        )
    _check_release(fields, reference)
    _check_consistency(bundle, fields, content)
    try:
        adaptor = bundle.adaptor()
    except BundleHashError as exc:  # signed by the site, but not what its content lists
        raise Rejection("malformed", str(exc)) from None
    except BundleError as exc:
        raise Rejection("bad_tensors", str(exc)) from None
    _check_conditions(adaptor, store, reference, policy)
    _check_tensors(adaptor, reference)
    _check_privacy(adaptor, site, store, reference, policy)
    new_labels = _check_values(adaptor, reference, policy)
    return Verified(bundle, fields, adaptor, site, tuple(new_labels))


def _check_field_sizes(fields: Fields) -> None:
    """The signed body's fields within their bounds (the adaptor JSON is bounded when read)."""
    if len(fields.nonce) != NONCE_BYTES:
        raise BundleError(f"nonce of {len(fields.nonce)} bytes, expected {NONCE_BYTES}")
    for name, limit in (("release_id", MAX_HASH_TEXT), ("trunk_id", MAX_HASH_TEXT),
                        ("created_at", MAX_TIME_TEXT)):  # fmt: skip
        if len(getattr(fields, name)) > limit:
            raise BundleError(
                f"{name} of {len(getattr(fields, name)):,} characters, at most {limit}"
            )


def _check_site(bundle: SignedBundle, store: Store) -> SiteRecord:
    problem = site_id_problem(bundle.site_id)
    if problem:
        raise Rejection("malformed", problem)
    site = store.get_site(bundle.site_id)
    if site is None:
        raise Rejection(
            "unknown_site", f"site {bundle.site_id!r} is not enrolled at this coordinator"
        )
    if site.status != "enrolled":
        raise Rejection("revoked_site", f"site {bundle.site_id!r} was revoked on {site.revoked_at}")
    signer = bytes(bundle.message.signer_public_key)
    if len(signer) != PUBLIC_KEY_BYTES:
        raise Rejection("malformed", f"signer key of {len(signer)} bytes, expected 32")
    if signer != site.public_key:
        raise Rejection(
            "key_mismatch",
            f"signed by key {fingerprint(signer)}, but site {site.site_id!r} is enrolled with "
            f"key {fingerprint(site.public_key)}",
        )
    return site


def _check_release(fields: Fields, reference: Reference) -> None:
    release_id = fields.release_id
    if release_id not in reference.accepted_ids or fields.trunk_id != reference.release.trunk_id:
        raise Rejection(
            "wrong_release",
            f"trained against {release_id}, which is not release "
            f"{reference.release.content_hash} or one of its composites; pull the current "
            "composite and train again",
        )


def _check_consistency(bundle: SignedBundle, fields: Fields, content: dict[str, Any]) -> None:
    for key, expected in (
        ("site_id", bundle.site_id),
        ("release_id", fields.release_id),
        ("trunk_id", fields.trunk_id),
    ):
        if content[key] != expected:
            raise Rejection(
                "malformed", f"the adaptor's {key} {content[key]!r} differs from the "
                f"bundle's {expected!r}",
            )  # fmt: skip


def _check_conditions(adaptor: Adaptor, store: Store, reference: Reference, policy: Policy) -> None:
    conditions = adaptor.content["conditions"]
    names = adaptor.condition_names
    if not names or len(names) > MAX_CONDITIONS:
        raise Rejection("malformed", f"the adaptor has {len(names)} conditions (1 to 1,000)")
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
    for condition in conditions:
        problem = condition_problem(condition["name"], adaptor.site_id)
        if problem:
            raise Rejection("bad_condition", problem)
        if not 1 <= condition["n_cells"] <= policy.max_condition_cells:
            raise Rejection(
                "implausible_count",
                f"condition {condition['name']!r} claims {condition['n_cells']:,} cells; this "
                f"coordinator accepts 1 to {policy.max_condition_cells:,} per condition",
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


def _check_privacy(
    adaptor: Adaptor, site: SiteRecord, store: Store, reference: Reference, policy: Policy
) -> None:
    """A DP bundle's privacy record adds up, and the site's spend on the release stays within
    the policy's budget (:mod:`~fedatlas.coordinator.privacy_ledger`)."""
    record = adaptor.content.get("privacy")
    if record is not None:
        problem = record_problem(record)
        if problem:
            raise Rejection("malformed", f"privacy record: {problem}")
    elif policy.require_dp or policy.max_epsilon is not None:
        raise Rejection(
            "over_budget", "the bundle was made without differential privacy; this coordinator "
            "requires it (prepare it with --epsilon E --delta D)",
        )  # fmt: skip
    if policy.max_epsilon is None or record is None:
        return
    spent = site_spend(store, site.site_id, reference.accepted_ids)
    total = spent.rho + float(record["rho"])
    if spent.other_bundles or total > policy.max_rho * (1 + 1e-9):
        delta = policy.dp_delta
        raise Rejection(
            "over_budget", f"site {site.site_id} has spent epsilon "
            f"{spent.epsilon(delta):.4g} on this release ({spent.private_bundles} DP bundle(s)"
            f"{f', {spent.other_bundles} without DP' if spent.other_bundles else ''}); this "
            f"bundle's epsilon {float(record['epsilon']):.4g} would make "
            f"{epsilon_for(total, delta):.4g} (delta {delta:g}), over the budget of "
            f"{policy.max_epsilon:g}",
        )  # fmt: skip


def _check_values(adaptor: Adaptor, reference: Reference, policy: Policy) -> list[str]:
    """Finite tensors, condition rows of plausible length, prototypes within the catalogue's
    bounds; returns the labels new to the catalogue."""
    for name, tensor in sorted(adaptor.tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise Rejection("non_finite", f"tensor {name!r} holds NaN or infinite values")
    for name, limit in reference.table_norms.items():
        _check_norms(name, adaptor.tensors[name], limit, policy.norm_factor)
    claimed = claimed_cells(adaptor, len(reference.catalogue))
    new: list[str] = []
    for i, level in enumerate(reference.release.label_levels):
        means = torch.from_numpy(adaptor.prototypes(i).means)
        known_means = torch.from_numpy(reference.catalogue[i].means)
        if known_means.shape[0]:
            limit = float(torch.linalg.vector_norm(known_means, dim=-1).max())
            _check_norms(f"{prototype_prefix(i)}.mean", means, limit, policy.norm_factor)
        try:
            new += check_prototypes(
                level, adaptor.prototypes(i), reference.catalogue[i], claimed, policy
            )
        except PrototypeProblem as problem:
            raise Rejection(problem.code, problem.message) from None
    return new


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
