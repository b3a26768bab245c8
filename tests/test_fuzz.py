"""Property-based fuzzing of everything that reads bytes from another party: the bundle decoder,
the coordinator's verifier and the release/manifest loader. Whatever the input, the result is a
value or one of the project's own errors (a reason code at the coordinator), never another
exception."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from anndata import AnnData
from conftest import cells_of
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedatlas.coordinator.policy import Policy
from fedatlas.coordinator.registry import Registry, init_store
from fedatlas.coordinator.verification import REASONS
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.hashing import canonical_json, content_hash
from fedatlas.shared.model.adaptor import Adaptor
from fedatlas.shared.model.mapping import MappingOptions, map_onto
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.model.release import Release
from fedatlas.shared.wire.bundle import SIGNED_PREFIX, make_bundle, parse_bundle
from fedatlas.shared.wire.signing import public_bytes, sign
from fedatlas.v1 import coordinator_pb2 as pb

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# JSON a hostile writer may send (Python's json module writes NaN/Infinity and deep nesting)
HOSTILE_TEXT = [
    '{"format": NaN}',
    '{"format": 1e999}',
    '"\\ud800"',
    "1" * 5000,
    "[" * 100_000 + "]" * 100_000,
    '{"conditions": ["a", "b"]}',
    "null",
    '{"a": {"b": {"c": 0}}}',
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def release(tiny_builds: dict[str, BuildResult]) -> Release:
    return tiny_builds["scpoli"].release


@pytest.fixture(scope="module")
def adaptor(release: Release, query_adata: AnnData) -> Adaptor:
    result = map_onto(release, cells_of(query_adata), MappingOptions(site_id="h1", epochs=1),
                      progress=False)  # fmt: skip
    assert result.adaptor is not None
    return result.adaptor


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, release: Release, key: Ed25519PrivateKey
) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("fuzz") / "store"
    init_store(root, policy=Policy())
    with Registry(root) as reg:
        reg.publish_release(release, actor="test")
        reg.store.enroll_site("h1", public_bytes(key), "", actor="test")
        yield reg


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    """``raw`` with a few bytes flipped, inserted, deleted, or cut off."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at : at + data.draw(st.integers(1, 8))]
        else:
            del out[at:]
    return bytes(out)


def _resigned_body(adaptor: Adaptor, key: Ed25519PrivateKey, adaptor_json: str) -> bytes:
    """A bundle of site h1, correctly signed, whose adaptor JSON is ``adaptor_json``."""
    message = parse_bundle(make_bundle(adaptor, key).raw).message
    body = pb.BundleBody.FromString(message.body)
    body.adaptor_json = adaptor_json
    message.body = body.SerializeToString()
    message.signature = sign(key, SIGNED_PREFIX + message.body)
    return message.SerializeToString()


@FUZZ
@given(data=st.data())
def test_the_bundle_decoder_raises_only_its_own_errors(
    adaptor: Adaptor, key: Ed25519PrivateKey, data: st.DataObject
) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=300), st.just(make_bundle(adaptor, key).raw)))
    raw = _mutate(raw, data) if data.draw(st.booleans()) else raw
    try:
        bundle = parse_bundle(raw)
        bundle.signature_valid(public_bytes(key))
        bundle.adaptor()
    except FedatlasError:
        pass


@FUZZ
@given(data=st.data())
def test_the_verifier_answers_every_byte_string_with_a_reason_code(
    registry: Registry, adaptor: Adaptor, key: Ed25519PrivateKey, data: st.DataObject
) -> None:
    raw = _mutate(make_bundle(adaptor, key).raw, data)
    outcome = registry.submit(raw, actor="fuzz")
    assert outcome.state in ("accepted", "held", "rejected")
    if outcome.state == "rejected":
        assert outcome.reason_code in REASONS


@FUZZ
@given(data=st.data())
def test_signed_hostile_adaptor_json_is_a_reason_code(
    registry: Registry, adaptor: Adaptor, key: Ed25519PrivateKey, data: st.DataObject
) -> None:
    """What used to crash before the signature check: valid signatures over hostile JSON."""
    content = copy.deepcopy(adaptor.content)
    path = data.draw(st.sampled_from(_paths(content)))
    _set(content, path, data.draw(json_values))
    text = data.draw(st.sampled_from([*HOSTILE_TEXT, json.dumps(content)]))
    outcome = registry.submit(_resigned_body(adaptor, key, text), actor="fuzz")
    assert outcome.state == "rejected", outcome
    assert outcome.reason_code in REASONS


@FUZZ
@given(data=st.data())
def test_the_release_loader_raises_only_release_errors(
    release: Release, data: st.DataObject
) -> None:
    """Manifests whose hashes are self-consistent (the content hash recomputed after every
    change), with any field replaced by any JSON value."""
    content = copy.deepcopy(release.content)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(content)))
        _set(content, path, data.draw(json_values))
    try:
        claimed = content_hash(content)
    except (TypeError, ValueError):  # e.g. NaN drawn: no honest writer could hash it either
        claimed = "sha256:" + "0" * 64
    manifest = json.dumps({"content": content, "content_hash": claimed})
    try:
        loaded = Release.from_manifest(manifest, dict(release.tensors), source="fuzz")
        loaded.build_model()
    except FedatlasError:
        pass


def test_hostile_json_is_refused_by_name(
    registry: Registry, adaptor: Adaptor, key: Ed25519PrivateKey
) -> None:
    for text in HOSTILE_TEXT:
        outcome = registry.submit(_resigned_body(adaptor, key, text), actor="test")
        assert outcome.reason_code == "malformed", (text[:30], outcome)
    assert canonical_json(adaptor.content)  # the honest content still encodes


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists (the root excluded)."""
    paths: list[tuple[Any, ...]] = []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        paths.append((*prefix, key))
        if len(paths) < 400:
            paths += _paths(item, (*prefix, key))
    return paths


def _set(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def test_paths_reach_nested_values() -> None:
    value = {"a": [1, {"b": 2}]}
    assert ("a", 1, "b") in _paths(value)
    _set(value, ("a", 1, "b"), 3)
    assert value == {"a": [1, {"b": 3}]}
