"""The coordinator's service logic: a store directory, bundle registration and composition.

A store directory holds everything a coordinator has::

    STORE/registry.sqlite     the registry (sites, releases, bundles, composites, audit log)
    STORE/coordinator.key     Ed25519 key that signs composites (0600); coordinator.pub beside it
    STORE/ca.pem, ca.key      the local certificate authority sites verify the server with
    STORE/server.pem, .key    the gRPC server's certificate

:class:`Registry` is used alike by the gRPC server, the admin CLI and the Flower ServerApp, so a
bundle takes one code path whichever way it arrives. The composite is rebuilt
deterministically from the current release and every accepted bundle (composition is
order-independent), content-hashed, signed and stored with the next generation number.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.privacy_ledger import Spend, site_spend
from fedatlas.coordinator.store import (
    BundleRecord,
    CompositeRecord,
    RejectionRecord,
    SQLiteStore,
    StoreConflictError,
    StoreError,
    utc_now,
)
from fedatlas.coordinator.tls import DEFAULT_HOSTS, issue, make_ca
from fedatlas.coordinator.verification import Reference, Rejection, verify_bundle
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.hashing import digest
from fedatlas.shared.model.adaptor import Adaptor, compose
from fedatlas.shared.model.release import Release
from fedatlas.shared.names import MAX_SITE_ID
from fedatlas.shared.wire.bundle import parse_bundle
from fedatlas.shared.wire.composite import CompositeStatement, SignedComposite, sign_composite
from fedatlas.shared.wire.signing import (
    fingerprint,
    load_public_key,
    load_signing_key,
    public_bytes,
    write_keypair,
)

log = logging.getLogger(__name__)

POLICY_KEY = "policy"
COMPOSE_ATTEMPTS = 5


class RegistryError(FedatlasError):
    """An operator's request cannot be carried out (unknown bundle, no release yet, ...)."""


class GenerationTaken(Exception):  # noqa: N818
    """Another writer published the composite generation this one was about to publish."""


@dataclass(frozen=True)
class StoreLayout:
    """Paths inside a store directory."""

    root: Path

    @property
    def database(self) -> Path:
        """The SQLite registry."""
        return self.root / "registry.sqlite"

    @property
    def signing_key(self) -> Path:
        """The coordinator's Ed25519 private key."""
        return self.root / "coordinator.key"

    @property
    def public_key(self) -> Path:
        """The coordinator's Ed25519 public key (what sites may pin)."""
        return self.root / "coordinator.pub"

    @property
    def ca_certificate(self) -> Path:
        """The local CA's certificate (given to sites as CA.pem)."""
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The local CA's key."""
        return self.root / "ca.key"

    @property
    def server_certificate(self) -> Path:
        """The gRPC server's certificate."""
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        """The gRPC server's TLS key."""
        return self.root / "server.key"

    @property
    def retired(self) -> Path:
        """Keys and certificates replaced by a rotation (``TIMESTAMP-NAME``)."""
        return self.root / "retired"

    def coordinator_keys(self) -> set[bytes]:
        """Every signing key this coordinator has had: the current one and the retired."""
        retired = sorted(self.retired.glob("*-coordinator.pub")) if self.retired.is_dir() else []
        return {load_public_key(path) for path in [self.public_key, *retired]}


def init_store(root: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, policy: Policy) -> StoreLayout:
    """Create a store directory: coordinator key, CA, server certificate and an empty registry."""
    layout = StoreLayout(root)
    if root.exists() and any(root.iterdir()):
        raise RegistryError(f"{root}: already exists and is not empty; choose a new --store")
    root.mkdir(parents=True, exist_ok=True)
    write_keypair(root, "coordinator")
    ca = make_ca(root, "fedatlas coordinator CA")
    issue(
        ca, layout.server_certificate, layout.server_key,
        common_name="fedatlas coordinator", hosts=list(hosts),
    )  # fmt: skip
    with SQLiteStore.create(layout.database) as store:
        store.set_meta(POLICY_KEY, policy.to_json(), actor="admin init")
    return layout


@dataclass(frozen=True)
class Outcome:
    """What happened to a submitted bundle."""

    bundle_id: str
    state: str  # accepted | held | rejected
    site_id: str
    reason_code: str = ""
    reason: str = ""
    conditions: tuple[str, ...] = ()
    received_at: str = ""
    decided_at: str = ""
    generation: int = 0  # first composite generation holding it (0: none)

    @classmethod
    def of(cls, record: BundleRecord, generation: int) -> Outcome:
        """The outcome recorded for a stored bundle."""
        return cls(
            record.bundle_id, record.state, record.site_id,
            "rejected_by_operator" if record.state == "rejected" else "", record.reason,
            record.conditions, record.received_at, record.decided_at, generation,
        )  # fmt: skip


class Registry:
    """Bundle registration and composites over one store directory (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.layout = StoreLayout(root)
        if not self.layout.database.is_file():
            raise RegistryError(
                f"{root}: not a coordinator store (no registry.sqlite); create one with "
                f"`fedatlas admin init --store {root}`"
            )
        self.store = SQLiteStore.open(self.layout.database)
        self._key = load_signing_key(self.layout.signing_key)
        self._lock = threading.RLock()
        self._budget_lock = threading.Lock()
        self._adaptors: dict[str, Adaptor] = {}
        self._releases: dict[str, Release] = {}
        self._materialized: tuple[int, Release] | None = None
        self._candidate: tuple[str, list[str], Release] | None = None  # compose before commit
        self._encoded: tuple[int, bytes] | None = None  # the latest composite's wire form
        # composite index: content hashes per base release, first generation of each bundle
        self._indexed = 0
        self._composites_of: dict[str, list[str]] = {}
        self._first_generation: dict[str, int] = {}
        self._reference: tuple[tuple[str, int], Reference] | None = None
        self._uncomposable: list[str] | None = None  # accepted bundles that did not compose
        self.problem = ""  # why the latest composite lacks an accepted bundle ("" if it does not)

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ identity and policy
    @property
    def public_key(self) -> bytes:
        """The coordinator's raw Ed25519 public key."""
        return public_bytes(self._key)

    @property
    def key_fingerprint(self) -> str:
        """Readable fingerprint of the coordinator key."""
        return fingerprint(self.public_key)

    @property
    def policy(self) -> Policy:
        """The acceptance policy in force."""
        return Policy.from_json(self.store.get_meta(POLICY_KEY))

    def set_policy(self, policy: Policy, *, actor: str) -> None:
        """Change the acceptance policy."""
        self.store.set_meta(POLICY_KEY, policy.to_json(), actor=actor)

    # ------------------------------------------------------------------ releases
    def publish_release(self, release: Release, *, actor: str) -> CompositeRecord:
        """Publish ``release`` as the current one and build its first composite."""
        with self._lock:
            self.store.add_release(
                release.content_hash, release.manifest_json(), release.weights_bytes(),
                actor=actor,
            )  # fmt: skip
            self._releases[release.content_hash] = release
            composite = self.ensure_composite(actor=actor)
            assert composite is not None
            return composite

    def current_release(self) -> Release:
        """The most recently published release."""
        record = self.store.current_release()
        if record is None:
            raise RegistryError("no reference release is published yet (admin release publish)")
        return self._release(record.release_id)

    def _release(self, release_id: str) -> Release:
        if release_id not in self._releases:
            record = self.store.get_release(release_id)
            if record is None:
                raise RegistryError(f"release {release_id} is not in the store")
            self._releases[release_id] = Release.from_bytes(
                record.manifest_json, record.weights, source=f"stored release {release_id}"
            )
        return self._releases[release_id]

    def reference(self) -> Reference:
        """What bundles are verified against: the current release, its composites' ids and the
        latest composite's prototype catalogue."""
        with self._lock:
            release = self.current_release()
            self._index_composites()
            ids = self._composites_of.get(release.content_hash, [])
            key = (release.content_hash, len(ids))
            if self._reference is None or self._reference[0] != key:
                latest = self.store.latest_composite()
                catalogue = None
                if latest is not None and latest.base_release_id == release.content_hash:
                    composite = self._materialize(latest)
                    catalogue = [composite.prototypes(lv) for lv in release.label_levels]
                self._reference = (key, Reference.of(release, ids, catalogue))
            return self._reference[1]

    def _index_composites(self) -> None:
        """Bring the composite index up to the latest generation (composites only append);
        the caller holds the lock."""
        latest = self.store.latest_composite()
        for generation in range(self._indexed + 1, (latest.generation if latest else 0) + 1):
            record = self.store.get_composite(generation)
            if record is None:
                raise RegistryError(f"composite generation {generation} is missing from the store")
            self._composites_of.setdefault(record.base_release_id, []).append(record.content_hash)
            for bundle_id in record.bundle_ids:
                self._first_generation.setdefault(bundle_id, generation)
            self._indexed = generation

    # ------------------------------------------------------------------ bundles
    def submit(self, raw: bytes, *, actor: str) -> Outcome:
        """Verify and register a serialised bundle; accepted bundles enter a new composite.

        Sending the same bytes again returns the recorded outcome (nothing is registered
        twice); a rejected bundle leaves the store unchanged.
        """
        bundle_id = digest(raw)
        existing = self.store.get_bundle(bundle_id)
        if existing is not None:
            return Outcome.of(existing, self.generation_of(bundle_id))
        policy = self.policy
        # Under a privacy budget, one bundle at a time is checked against the ledger and
        # registered, so two concurrent bundles cannot both fit a budget only one fits.
        budget = self._budget_lock if policy.max_epsilon is not None else contextlib.nullcontext()
        with budget:
            return self._register(bundle_id, raw, policy, actor=actor)

    def _register(self, bundle_id: str, raw: bytes, policy: Policy, *, actor: str) -> Outcome:
        """Verify and register a bundle not registered yet (see :meth:`submit`)."""
        # Checks and registration run concurrently across requests: the store's constraints
        # settle races (a condition or nonce taken meanwhile is reported as such below).
        try:
            verified = verify_bundle(raw, self.store, self.reference(), policy)
            self._check_composable(bundle_id, verified.adaptor, policy.max_composite_bytes)
        except Rejection as rejection:
            return self._rejected(bundle_id, raw, rejection, actor)
        held = policy.approval == "hold" or (verified.new_labels and policy.new_labels == "hold")
        state = "held" if held else "accepted"
        record = BundleRecord(
            bundle_id=bundle_id,
            site_id=verified.site.site_id,
            release_id=verified.fields.release_id,
            nonce=bytes(verified.fields.nonce),
            conditions=tuple(verified.adaptor.condition_names),
            state=state,
            blob=raw,
            received_at=utc_now(),
            decided_at=utc_now() if state == "accepted" else "",
            decided_by="policy: auto-accept" if state == "accepted" else "",
            reason="",
        )
        try:
            self.store.add_bundle(record, actor=actor)
        except StoreConflictError:
            existing = self.store.get_bundle(bundle_id)
            if existing is not None:  # the same bytes arrived twice at once
                return Outcome.of(existing, self.generation_of(bundle_id))
            try:  # another request took a condition or the nonce since the checks: say which
                verify_bundle(raw, self.store, self.reference(), policy)
            except Rejection as rejection:
                return self._rejected(bundle_id, raw, rejection, actor)
            raise
        self._adaptors[bundle_id] = verified.adaptor
        log.info("registered bundle %s from %s: %s", bundle_id[:19], record.site_id, state)
        if state == "accepted":
            # Whoever composes next includes every bundle accepted so far, so concurrent
            # submissions share one rebuild instead of queueing one each.
            self.ensure_composite(actor=actor)
        stored = self.store.get_bundle(bundle_id)
        assert stored is not None
        return Outcome.of(stored, self.generation_of(bundle_id))

    def decide(self, bundle_id: str, state: str, *, actor: str, reason: str) -> Outcome:
        """Approve (``accepted``) or reject a held bundle; approval rebuilds the composite."""
        with self._lock:
            record = self.bundle(bundle_id)
            try:
                self.store.decide_bundle(record.bundle_id, state, actor=actor, reason=reason)
            except StoreError as exc:
                raise RegistryError(str(exc)) from None
            generation = 0
            if state == "accepted":
                composite = self.ensure_composite(actor=actor)
                generation = composite.generation if composite else 0
            return Outcome.of(self.bundle(record.bundle_id), generation)

    def withdraw(self, bundle_id: str, *, actor: str, reason: str) -> Outcome:
        """Withdraw an accepted bundle: the next composite generation is built without it (its
        conditions become free again); audited as ``bundle.withdraw``."""
        with self._lock:
            record = self.bundle(bundle_id)
            try:
                self.store.withdraw_bundle(record.bundle_id, actor=actor, reason=reason)
            except StoreError as exc:
                raise RegistryError(str(exc)) from None
            composite = self.ensure_composite(actor=actor)
            generation = composite.generation if composite else 0
            return Outcome.of(self.bundle(record.bundle_id), generation)

    def bundle(self, bundle_id: str) -> BundleRecord:
        """A stored bundle by id or unique prefix of its hex digest."""
        record = self.store.get_bundle(bundle_id)
        if record is None and len(bundle_id) >= 8:
            prefix = bundle_id if bundle_id.startswith("sha256:") else f"sha256:{bundle_id}"
            matches = [b for b in self.store.list_bundles() if b.bundle_id.startswith(prefix)]
            if len(matches) == 1:
                record = matches[0]
        if record is None:
            raise RegistryError(f"no bundle {bundle_id} in the store")
        return record

    def status(self, bundle_id: str) -> Outcome | None:
        """The recorded outcome of a bundle: a stored one's, else its latest logged rejection
        (None when the coordinator never saw it, or its rejection left the log)."""
        with self._lock:
            record = self.store.get_bundle(bundle_id)
            if record is not None:
                return Outcome.of(record, self.generation_of(bundle_id))
            logged = self.store.rejections(bundle_id=bundle_id, limit=1)
            if not logged:
                return None
            r = logged[0]
            return Outcome(r.bundle_id, "rejected", r.site_id, r.reason_code, r.reason,
                           received_at=r.received_at)  # fmt: skip

    def _rejected(self, bundle_id: str, raw: bytes, rejection: Rejection, actor: str) -> Outcome:
        """The outcome of a refused submission, logged (never its bytes)."""
        log.info("rejected bundle %s: %s", bundle_id[:19], rejection)
        received = utc_now()
        outcome = Outcome(bundle_id, "rejected", _claimed_site(raw), rejection.code,
                          rejection.message, received_at=received)  # fmt: skip
        self.store.add_rejection(
            RejectionRecord(
                bundle_id, outcome.site_id, rejection.code, rejection.message, received, actor
            )
        )
        return outcome

    def bundles_per_site(self) -> dict[str, int]:
        """How many bundles each site has registered (any state)."""
        counts: dict[str, int] = {}
        for record in self.store.list_bundles():
            counts[record.site_id] = counts.get(record.site_id, 0) + 1
        return counts

    def privacy_ledger(self) -> dict[str, Spend]:
        """Each site's differential-privacy spend on the current release
        (:mod:`~fedatlas.coordinator.privacy_ledger`); sites that sent nothing are absent
        (everyone, before a release is published)."""
        if self.store.current_release() is None:
            return {}
        ids = self.reference().accepted_ids
        sites = {r.site_id for r in self.store.list_bundles() if r.release_id in ids}
        return {site: site_spend(self.store, site, ids) for site in sorted(sites)}

    def generation_of(self, bundle_id: str) -> int:
        """The first composite generation holding ``bundle_id`` (0: none)."""
        with self._lock:
            self._index_composites()
            return self._first_generation.get(bundle_id, 0)

    def adaptor(self, bundle_id: str) -> Adaptor:
        """The adaptor of a stored bundle (parsed once)."""
        if bundle_id not in self._adaptors:
            record = self.bundle(bundle_id)
            self._adaptors[bundle_id] = parse_bundle(record.blob).adaptor()
        return self._adaptors[bundle_id]

    # ------------------------------------------------------------------ composites
    def ensure_composite(self, *, actor: str) -> CompositeRecord | None:
        """The latest composite, rebuilt first if it lacks an accepted bundle of the current
        release (e.g. after a crash between registering a bundle and composing)."""
        for _ in range(COMPOSE_ATTEMPTS):
            try:
                return self._ensure_composite(actor)
            except GenerationTaken:
                continue  # another process published a composite meanwhile: look again
        raise RegistryError("could not publish a composite: other writers kept publishing")

    def _ensure_composite(self, actor: str) -> CompositeRecord | None:
        with self._lock:
            if self.store.current_release() is None:
                return None
            reference = self.reference()
            release = reference.release
            wanted = sorted(
                b.bundle_id
                for b in self.store.accepted_bundles()
                if b.release_id in reference.accepted_ids
            )
            latest = self.store.latest_composite()
            if (
                latest is not None
                and latest.base_release_id == release.content_hash
                and sorted(latest.bundle_ids) == wanted
            ):
                return latest
            composite = self._compose_or_explain(release, wanted)
            if composite is None:
                return latest  # the last good composite; problem says why
            generation = (latest.generation if latest else 0) + 1
            created = utc_now()
            statement = sign_composite(
                self._key, composite, generation=generation,
                base_release_id=release.content_hash, bundle_ids=wanted, created_at=created,
                audit_head=self.store.audit_head(),
            )  # fmt: skip
            record = CompositeRecord(
                generation=generation,
                content_hash=composite.content_hash,
                base_release_id=release.content_hash,
                bundle_ids=tuple(wanted),
                manifest_json=composite.manifest_json(),
                statement_json=statement.statement_json,
                signature=statement.signature,
                created_at=created,
            )
            try:
                self.store.add_composite(record, actor=actor)
            except StoreConflictError as exc:
                latest_now = self.store.latest_composite()
                if latest_now is not None and latest_now.generation >= generation:
                    raise GenerationTaken from exc
                raise
            self._materialized = (generation, composite)
            log.info(
                "composite generation %d: %s (%d adaptors)",
                generation, composite.content_hash, len(wanted),
            )  # fmt: skip
            return record

    def _compose_or_explain(self, release: Release, wanted: list[str]) -> Release | None:
        """The composite of ``release`` and the bundles ``wanted``, or None when they do not
        compose (a bundle stored by an earlier version, a damaged blob): the reason is logged
        and kept in :attr:`problem`, and the same set is not tried again."""
        if self._uncomposable == wanted:
            return None
        if self._candidate is not None and self._candidate[:2] == (release.content_hash, wanted):
            return self._candidate[2]  # checked when its last bundle arrived
        try:
            composite = compose(release, [self.adaptor(b) for b in wanted])
        except (FedatlasError, ValueError, OverflowError) as exc:
            self._uncomposable = wanted
            self.problem = (
                f"the accepted bundles do not compose ({exc}); serving the last good composite. "
                "Withdraw the bundle named with `fedatlas admin adaptors withdraw BUNDLE`"
            )
            log.error("%s", self.problem)
            return None
        self._uncomposable, self.problem = None, ""
        return composite

    def _check_composable(self, bundle_id: str, adaptor: Adaptor, limit: int) -> None:
        """Raise ``uncomposable`` unless the latest composite with ``adaptor`` builds and stays
        within ``limit`` bytes (compose before commit). The candidate is kept for the composite
        that follows its acceptance."""
        with self._lock:
            release = self.current_release()
            latest = self.store.latest_composite()
            bundles = (
                latest.bundle_ids
                if latest and latest.base_release_id == release.content_hash
                else ()
            )
            try:
                candidate = compose(release, [*(self.adaptor(b) for b in bundles), adaptor])
            except (FedatlasError, ValueError, OverflowError) as exc:
                raise Rejection(
                    "uncomposable", f"the composite with it does not build: {exc}"
                ) from None
            size = len(candidate.manifest_json()) + sum(
                t.numel() * t.element_size() for t in candidate.tensors.values()
            )
            if size > limit:
                raise Rejection(
                    "uncomposable",
                    f"the composite with it would hold {size:,} bytes, more than the "
                    f"{limit:,} this coordinator allows",
                )
            self._candidate = (release.content_hash, sorted([*bundles, bundle_id]), candidate)

    def _materialize(self, record: CompositeRecord) -> Release:
        """The composite of ``record``, recomposed from its bundles and checked against its
        hash (cached for the latest generation)."""
        if self._materialized is None or self._materialized[0] != record.generation:
            base = self._release(record.base_release_id)
            composite = compose(base, [self.adaptor(b) for b in record.bundle_ids])
            if composite.content_hash != record.content_hash:
                raise RegistryError(
                    f"composite generation {record.generation} does not recompose to its "
                    f"recorded hash {record.content_hash}; run `fedatlas admin audit verify`"
                )
            self._materialized = (record.generation, composite)
        return self._materialized[1]

    def current_composite(self) -> tuple[CompositeRecord, Release, CompositeStatement]:
        """The latest composite with its weights (recomposed and checked when not cached)."""
        with self._lock:
            record = self.ensure_composite(actor="coordinator")
            if record is None:
                raise RegistryError("no reference release is published yet")
            composite = self._materialize(record)
            statement = CompositeStatement(record.statement_json, record.signature)
            return record, composite, statement

    def composite_bytes(self) -> tuple[CompositeRecord, bytes]:
        """The latest composite in its one wire form (:meth:`SignedComposite.encode`, what gRPC
        streams and a Flower campaign carries), encoded once per generation."""
        with self._lock:
            record, release, statement = self.current_composite()
            if self._encoded is None or self._encoded[0] != record.generation:
                self._encoded = (record.generation, SignedComposite(release, statement).encode())
            return record, self._encoded[1]


def _claimed_site(raw: bytes) -> str:
    """The site id a (possibly broken) bundle claims, for the rejection log (bounded)."""
    try:
        return parse_bundle(raw).site_id[:MAX_SITE_ID]
    except FedatlasError:
        return ""
