"""The coordinator's registry: every rejection reason (store unchanged after each), policies,
idempotent resubmission and composites. Real store files, real keys, real signatures."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from anndata import AnnData
from conftest import cells_of
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedatlas.benchmarks.synthetic import SyntheticWorld
from fedatlas.cli import main
from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.registry import Registry, RegistryError, init_store
from fedatlas.coordinator.store import BundleRecord
from fedatlas.coordinator.verification import REASONS
from fedatlas.shared.hashing import content_hash, tensor_index
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.privacy import PrivacySpec, epsilon_for
from fedatlas.shared.model.reference import BuildResult, train_reference
from fedatlas.shared.model.release import MODEL_PREFIX, Release
from fedatlas.shared.wire.bundle import make_bundle, parse_bundle
from fedatlas.shared.wire.signing import load_signing_key, write_keypair
from fedatlas.v1 import coordinator_pb2 as pb

EMBEDDING = MODEL_PREFIX + "embedding.table"
DP_EPSILON = 8.0  # two such bundles compose to epsilon 11.9 (zCDP, delta 1e-5)


@dataclass
class Site:
    site_id: str
    key: Ed25519PrivateKey
    public_path: Path


@pytest.fixture(scope="module")
def release(reference_adata: AnnData) -> Release:
    """A reference trained long enough that its three types sit apart: measured, the types'
    prototypes lie 54-339 (standardised squared distance) from each other, their radii 47-53."""
    return train_reference(
        cells_of(reference_adata), preset="scpoli", epochs=150, n_top_genes=200, progress=False
    ).release


@pytest.fixture(scope="module")
def site_cells(world: SyntheticWorld) -> dict[str, AnnData]:
    """Labelled cells of two batches for site h1 and one for h2 (all four types)."""
    return {
        "h1": world.sample(90, batches=("b1",), seed=21),
        "h1-second": world.sample(90, batches=("b2",), seed=22),
        "h2": world.sample(90, batches=("b1",), seed=23),
    }


@pytest.fixture(scope="module")
def adaptors(release: Release, site_cells: dict[str, AnnData]) -> dict[str, Adaptor]:
    """Adaptors trained against the release (h1/b1, h1/b2, h2/b1), and h1's two made with
    differential privacy at epsilon 8 from unlabelled cells ("dp-h1", "dp-h1-second")."""
    out = {}
    for name, adata in site_cells.items():
        site = name.split("-")[0]
        options = MappingOptions(site_id=site, epochs=3, min_prototype_cells=10)
        result = map_onto(release, cells_of(adata), options, progress=False)
        assert result.adaptor is not None
        out[name] = result.adaptor
        if site == "h1":
            options = replace(options, privacy=PrivacySpec(DP_EPSILON))
            private = map_onto(release, cells_of(adata, None), options, progress=False)
            assert private.adaptor is not None
            out[f"dp-{name}"] = private.adaptor
    return out


@pytest.fixture
def registry(tmp_path: Path, release: Release) -> Iterator[Registry]:
    init_store(tmp_path / "store", policy=Policy())
    with Registry(tmp_path / "store") as reg:
        reg.publish_release(release, actor="test")
        yield reg


@pytest.fixture
def sites(tmp_path: Path, registry: Registry) -> dict[str, Site]:
    out = {}
    for site_id in ("h1", "h2", "gone"):
        pair = write_keypair(tmp_path / "keys" / site_id, "site")
        out[site_id] = Site(site_id, load_signing_key(pair.private), pair.public)
        registry.store.enroll_site(site_id, _raw_public(pair.public), "", actor="test")
    registry.store.revoke_site("gone", actor="test", reason="left the consortium")
    return out


def _raw_public(path: Path) -> bytes:
    from fedatlas.shared.wire.signing import load_public_key

    return load_public_key(path)


def resigned(
    adaptor: Adaptor,
    key: Ed25519PrivateKey,
    *,
    content: dict[str, object] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """A correctly signed bundle of a modified adaptor (content and tensor index updated)."""
    tensors = dict(adaptor.tensors if tensors is None else tensors)
    body = dict(adaptor.content if content is None else content)
    body["tensors"] = tensor_index(tensors)
    return make_bundle(Adaptor(body, tensors), key).raw


def with_conditions(adaptor: Adaptor, names: list[str], site_id: str | None = None) -> Adaptor:
    """The same adaptor claiming other condition names (and optionally another site)."""
    content = dict(adaptor.content)
    content["conditions"] = [
        {**c, "name": n} for c, n in zip(adaptor.content["conditions"], names, strict=True)
    ]
    if site_id is not None:
        content["site_id"] = site_id
    return Adaptor(content, adaptor.tensors)


def assert_rejected(registry: Registry, raw: bytes, code: str) -> None:
    before = registry.store.snapshot()
    outcome = registry.submit(raw, actor="test")
    assert outcome.state == "rejected", outcome
    assert outcome.reason_code == code, outcome.reason
    assert outcome.reason  # a sentence for the site
    assert registry.store.snapshot() == before, "a rejected bundle changed the store"
    # the rejection is logged (no payload) and its status can be asked for
    logged = registry.store.rejections(bundle_id=outcome.bundle_id)
    assert [(r.reason_code, r.reason) for r in logged][:1] == [(code, outcome.reason)]
    assert registry.status(outcome.bundle_id) == outcome


def test_a_valid_bundle_is_accepted_into_a_new_composite(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    first = registry.store.latest_composite()
    assert first is not None
    assert first.generation == 1
    outcome = registry.submit(make_bundle(adaptors["h1"], sites["h1"].key).raw, actor="test")
    assert outcome.state == "accepted", outcome.reason
    assert outcome.conditions == ("h1/b1",)
    assert outcome.generation == 2
    record, composite, statement = registry.current_composite()
    assert record.bundle_ids == (outcome.bundle_id,)
    assert "h1/b1" in composite.condition_names
    statement.verify(composite, registry.public_key, source="test")
    assert registry.store.verify_audit() == []


def test_the_same_bytes_twice_register_once(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    raw = make_bundle(adaptors["h1"], sites["h1"].key).raw
    first = registry.submit(raw, actor="test")
    entries = len(registry.store.audit_entries())
    again = registry.submit(raw, actor="test")
    assert again == first
    assert len(registry.store.audit_entries()) == entries


REJECTIONS: dict[str, Callable[[Registry, dict[str, Site], dict[str, Adaptor]], bytes]] = {}


def rejection(code: str) -> Callable[[Callable[..., bytes]], Callable[..., bytes]]:
    def register(make: Callable[..., bytes]) -> Callable[..., bytes]:
        REJECTIONS[f"{code}:{make.__name__}"] = make
        return make

    return register


@rejection("oversize")
def _larger_than_the_policy(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    raw = make_bundle(ad["h1"], sites["h1"].key).raw
    reg.set_policy(replace(reg.policy, max_bundle_bytes=len(raw) - 1), actor="test")
    return raw


@rejection("malformed")
def _not_a_bundle(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return b"\x00\x01 this is not a protobuf bundle \xff" * 3


@rejection("malformed")
def _truncated(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return make_bundle(ad["h1"], sites["h1"].key).raw[:-40]


@rejection("unknown_site")
def _unknown_site(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    stranger = with_conditions(ad["h1"], ["nobody/b1"], site_id="nobody")
    return make_bundle(stranger, Ed25519PrivateKey.generate()).raw


@rejection("revoked_site")
def _revoked_site(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return make_bundle(with_conditions(ad["h1"], ["gone/b1"], "gone"), sites["gone"].key).raw


@rejection("key_mismatch")
def _signed_by_another_key(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return make_bundle(ad["h1"], sites["h2"].key).raw


@rejection("bad_signature")
def _signature_altered(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    message = parse_bundle(make_bundle(ad["h1"], sites["h1"].key).raw).message
    message.signature = bytes([message.signature[0] ^ 1]) + message.signature[1:]
    return message.SerializeToString()


@rejection("bad_signature")
def _tensor_altered(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    message = parse_bundle(make_bundle(ad["h1"], sites["h1"].key).raw).message
    body = pb.BundleBody.FromString(message.body)
    body.tensors[0].data = bytes([body.tensors[0].data[0] ^ 1]) + body.tensors[0].data[1:]
    message.body = body.SerializeToString()
    return message.SerializeToString()


@rejection("bad_signature")
def _site_id_altered(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    message = parse_bundle(make_bundle(ad["h2"], sites["h2"].key).raw).message
    message.site_id = "h1"  # claims to be h1, still carries h2's signature
    message.signer_public_key = parse_bundle(
        make_bundle(ad["h1"], sites["h1"].key).raw
    ).message.signer_public_key
    return message.SerializeToString()


@rejection("replayed_nonce")
def _nonce_reused(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    first = make_bundle(ad["h1"], sites["h1"].key)
    assert reg.submit(first.raw, actor="test").state == "accepted"
    return make_bundle(ad["h1-second"], sites["h1"].key, nonce=first.fields().nonce).raw


@rejection("wrong_release")
def _other_release(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    content = {**ad["h1"].content, "release_id": content_hash({"some": "other release"})}
    return resigned(ad["h1"], sites["h1"].key, content=content)


@rejection("condition_owned")
def _condition_of_another_site(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    assert reg.submit(make_bundle(ad["h1"], sites["h1"].key).raw, actor="test").state == "accepted"
    return make_bundle(with_conditions(ad["h2"], ["h1/b1"]), sites["h2"].key).raw


@rejection("condition_owned")
def _condition_of_the_release(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    name = reg.current_release().condition_names[0]
    return make_bundle(with_conditions(ad["h2"], [name]), sites["h2"].key).raw


@rejection("bad_condition")
def _condition_outside_namespace(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    return make_bundle(with_conditions(ad["h2"], ["h1/never-used"]), sites["h2"].key).raw


@rejection("bad_tensors")
def _tensor_missing(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = {k: v for k, v in ad["h1"].tensors.items() if k != EMBEDDING}
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("bad_tensors")
def _tensor_wrong_shape(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors[EMBEDDING] = torch.zeros(1, tensors[EMBEDDING].shape[1] + 1)
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("bad_tensors")
def _tensor_wrong_dtype(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors[EMBEDDING] = tensors[EMBEDDING].double()
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("non_finite")
def _nan(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors[EMBEDDING] = tensors[EMBEDDING].clone()
    tensors[EMBEDDING][0, 0] = float("nan")
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("non_finite")
def _inf_prototype(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors["prototypes.0.mean"] = tensors["prototypes.0.mean"].clone()
    tensors["prototypes.0.mean"][0, 0] = float("inf")
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("norm_outlier")
def _huge_embedding(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors[EMBEDDING] = tensors[EMBEDDING] * 1e4
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("small_prototype")
def _prototype_of_few_cells(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    tensors = dict(ad["h1"].tensors)
    tensors["prototypes.0.count"] = tensors["prototypes.0.count"].clone()
    tensors["prototypes.0.count"][0] = 3
    return resigned(ad["h1"], sites["h1"].key, tensors=tensors)


@rejection("bad_condition")
def _path_like_batch(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return make_bundle(with_conditions(ad["h2"], ["h2/.."]), sites["h2"].key).raw


@rejection("bad_condition")
def _bidi_override_in_batch(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return make_bundle(with_conditions(ad["h2"], ["h2/b1\u202e"]), sites["h2"].key).raw


@rejection("implausible_count")
def _a_billion_cells(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    conditions = [{**c, "n_cells": 10**9} for c in ad["h1"].content["conditions"]]
    return resigned(
        ad["h1"], sites["h1"].key, content={**ad["h1"].content, "conditions": conditions}
    )


@rejection("implausible_count")
def _more_prototype_cells_than_conditions(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, count=lambda c: c * 1000)


@rejection("bad_label")
def _label_with_a_bidi_override(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, rename={"D": "D\u202e"})


@rejection("bad_label")
def _label_unknown(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, rename={"D": "unknown"})


@rejection("confusable_label")
def _greek_capital_alpha(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, rename={"D": "\u0391"})  # looks like A


@rejection("prototype_outlier")
def _variance_blown_up(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, var=lambda v: v * 1e4)


@rejection("prototype_outlier")
def _means_swapped(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, mean=lambda m: m[[2, 1, 0, 3]])  # A, C


@rejection("prototype_outlier")
def _radius_widened(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    return _with_prototypes(ad["h1"], sites["h1"].key, log_d2=lambda d: d + torch.tensor([20.0, 0]))


@rejection("prototype_outlier")
def _new_label_on_a_known_one(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    # D (new to the catalogue) given the catalogue's C prototype: it would take C's cells
    c = reg.current_release().prototypes("cell_type")
    copy = {"mean": torch.from_numpy(c.means[2]), "var": torch.from_numpy(c.variances[2])}

    def onto_c(part: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda rows: torch.cat([rows[:3], copy[part][None]])

    return _with_prototypes(ad["h1"], sites["h1"].key, mean=onto_c("mean"), var=onto_c("var"))


@rejection("uncomposable")
def _composite_too_large(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    reg.set_policy(replace(reg.policy, max_composite_bytes=1000), actor="test")
    return make_bundle(ad["h1"], sites["h1"].key).raw


@rejection("over_budget")
def _made_without_dp_where_required(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    reg.set_policy(replace(reg.policy, require_dp=True), actor="test")
    return make_bundle(ad["h1"], sites["h1"].key).raw


@rejection("over_budget")
def _past_the_sites_budget(reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]) -> bytes:
    reg.set_policy(replace(reg.policy, max_epsilon=10.0), actor="test")
    first = reg.submit(make_bundle(ad["dp-h1"], sites["h1"].key).raw, actor="test")
    assert first.state == "accepted", first.reason
    return make_bundle(ad["dp-h1-second"], sites["h1"].key).raw


@rejection("malformed")
def _privacy_record_understated(
    reg: Registry, sites: dict[str, Site], ad: dict[str, Adaptor]
) -> bytes:
    content = json.loads(json.dumps(ad["dp-h1"].content))
    content["privacy"]["epsilon"] = 0.1  # the noise it states spends far more
    return resigned(ad["dp-h1"], sites["h1"].key, content=content)


def _with_prototypes(
    adaptor: Adaptor,
    key: Ed25519PrivateKey,
    *,
    rename: dict[str, str] | None = None,
    **change: Callable[[torch.Tensor], torch.Tensor],
) -> bytes:
    """A correctly signed bundle of ``adaptor`` with its level-0 prototypes changed: labels
    renamed, tensors (``mean``, ``var``, ``count``, ``log_d2``) transformed."""
    assert adaptor.content["prototypes"]["cell_type"]["labels"] == ["A", "B", "C", "D"]
    tensors = dict(adaptor.tensors)
    for part, transform in change.items():
        tensors[f"prototypes.0.{part}"] = transform(tensors[f"prototypes.0.{part}"].clone())
    content = json.loads(json.dumps(adaptor.content))
    meta = content["prototypes"]["cell_type"]
    meta["labels"] = [(rename or {}).get(label, label) for label in meta["labels"]]
    return resigned(adaptor, key, content=content, tensors=tensors)


def test_every_reason_code_has_a_rejection_test() -> None:
    assert {case.split(":")[0] for case in REJECTIONS} == set(REASONS)


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejection_leaves_the_store_unchanged(
    case: str, registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    raw = REJECTIONS[case](registry, sites, adaptors)
    assert_rejected(registry, raw, case.split(":")[0])
    assert registry.store.verify_audit() == []


def test_held_bundles_wait_for_the_operator(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    registry.set_policy(replace(registry.policy, approval="hold"), actor="test")
    held = registry.submit(make_bundle(adaptors["h1"], sites["h1"].key).raw, actor="test")
    other = registry.submit(make_bundle(adaptors["h2"], sites["h2"].key).raw, actor="test")
    assert (held.state, other.state) == ("held", "held")
    assert registry.store.latest_composite().generation == 1  # type: ignore[union-attr]
    # a held bundle already reserves its conditions
    taken = make_bundle(with_conditions(adaptors["h1-second"], ["h1/b1"]), sites["h1"].key)
    assert registry.submit(taken.raw, actor="test").reason_code == "condition_owned"

    approved = registry.decide(held.bundle_id, "accepted", actor="admin", reason="looks fine")
    assert approved.state == "accepted"
    assert approved.generation == 2
    rejected = registry.decide(other.bundle_id[:20], "rejected", actor="admin", reason="no")
    assert rejected.state == "rejected"
    record, composite, _ = registry.current_composite()
    assert record.bundle_ids == (held.bundle_id,)
    assert "h2/b1" not in composite.condition_names
    with pytest.raises(RegistryError, match="held"):
        registry.decide(held.bundle_id, "rejected", actor="admin", reason="too late")
    # the rejected bundle's condition is free again
    again = registry.submit(make_bundle(adaptors["h2"], sites["h2"].key).raw, actor="test")
    assert again.state == "held"
    assert registry.store.verify_audit() == []


def test_a_new_release_refuses_bundles_for_the_old_one(
    registry: Registry,
    sites: dict[str, Site],
    adaptors: dict[str, Adaptor],
    tiny_builds: dict[str, BuildResult],
) -> None:
    assert registry.submit(make_bundle(adaptors["h1"], sites["h1"].key).raw, actor="t").state == (
        "accepted"
    )
    newer = tiny_builds["scarches"].release
    composite = registry.publish_release(newer, actor="test")
    assert composite.bundle_ids == ()
    assert composite.base_release_id == newer.content_hash
    outcome = registry.submit(make_bundle(adaptors["h1-second"], sites["h1"].key).raw, actor="t")
    assert outcome.reason_code == "wrong_release"


def test_status_messages_carry_the_outcome(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    from fedatlas.coordinator.server import status_message

    outcome = registry.submit(make_bundle(adaptors["h1"], sites["h1"].key).raw, actor="test")
    message = status_message(outcome)
    assert message.state == pb.SUBMISSION_STATE_ACCEPTED
    assert message.composite_generation == 2
    assert registry.status(outcome.bundle_id) == outcome
    assert registry.status("sha256:" + "0" * 64) is None


def test_a_condition_taken_by_another_process_meanwhile_is_a_rejection(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    rival = make_bundle(adaptors["h1"], sites["h1"].key)  # condition h1/b1
    mine = make_bundle(with_conditions(adaptors["h1-second"], ["h1/b1"]), sites["h1"].key)
    original = registry.store.add_bundle

    def racing_add(record: BundleRecord, *, actor: str) -> BundleRecord:
        # a second coordinator process registers the rival between our checks and our write
        with Registry(registry.layout.root) as other:
            assert other.submit(rival.raw, actor="other process").state == "accepted"
        return original(record, actor=actor)

    registry.store.add_bundle = racing_add  # type: ignore[method-assign]
    outcome = registry.submit(mine.raw, actor="test")
    assert outcome.state == "rejected"
    assert outcome.reason_code == "condition_owned"
    assert "h1/b1" in outcome.reason
    assert [b.bundle_id for b in registry.store.list_bundles()] == [rival.bundle_id]
    assert registry.store.verify_audit() == []


def test_the_ledger_sums_each_sites_spend_and_the_composite_states_it(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor], tmp_path: Path
) -> None:
    registry.set_policy(replace(registry.policy, max_epsilon=12.0), actor="test")
    for name in ("dp-h1", "dp-h1-second"):
        outcome = registry.submit(make_bundle(adaptors[name], sites["h1"].key).raw, actor="t")
        assert outcome.state == "accepted", outcome.reason
    plain = registry.submit(make_bundle(adaptors["h2"], sites["h2"].key).raw, actor="t")
    assert plain.reason_code == "over_budget"  # a budget is set: h2's exact bundle is refused
    rho = sum(float(adaptors[n].content["privacy"]["rho"]) for n in ("dp-h1", "dp-h1-second"))
    expected = epsilon_for(rho, 1e-5)
    assert 8.0 < expected < 12.0  # zCDP composes two epsilon-8 bundles to about 11.9
    spend = registry.privacy_ledger()["h1"]
    assert (spend.private_bundles, spend.other_bundles) == (2, 0)
    assert spend.epsilon(1e-5) == pytest.approx(expected)
    _, composite, _ = registry.current_composite()
    stated = composite.content["privacy"]["h1"]
    assert stated["private"]
    assert stated["epsilon"] == pytest.approx(expected)
    assert stated["adaptors"] == 2
    registry.close()
    out = tmp_path / "sites.json"
    with out.open("w") as handle, contextlib.redirect_stdout(handle):
        assert main(["admin", "site", "list", "--store", str(tmp_path / "store"), "--json"]) == 0
    listed = {s["site_id"]: s["privacy"] for s in json.loads(out.read_text())["sites"]}
    assert listed["h1"]["epsilon"] == pytest.approx(expected)
    assert listed["h1"]["budget"] == 12.0
    assert listed["h2"]["epsilon"] == 0.0


def test_two_bundles_at_once_cannot_both_fit_a_budget_only_one_fits(
    registry: Registry, sites: dict[str, Site], adaptors: dict[str, Adaptor]
) -> None:
    registry.set_policy(replace(registry.policy, max_epsilon=10.0), actor="test")
    raws = [make_bundle(adaptors[n], sites["h1"].key).raw for n in ("dp-h1", "dp-h1-second")]
    start = threading.Barrier(2)

    def send(raw: bytes) -> str:
        start.wait()
        return registry.submit(raw, actor="test").reason_code or "accepted"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(send, raws))
    assert outcomes == ["accepted", "over_budget"]
    assert registry.privacy_ledger()["h1"].private_bundles == 1
