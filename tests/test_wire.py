"""The one wire encoding: tensors and tensor sets, submission states, and the composite that
gRPC and Flower both carry, decoded and verified one way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedatlas.shared.errors import ReleaseError
from fedatlas.shared.model.reference import BuildResult
from fedatlas.shared.wire.codec import (
    DTYPES,
    SUBMISSION_STATES,
    WireError,
    decode_tensors,
    encode_tensors,
    state_from_wire,
    tensor_from_message,
    tensor_message,
)
from fedatlas.shared.wire.composite import SignedComposite, sign_composite
from fedatlas.shared.wire.signing import load_signing_key, public_bytes, write_keypair
from fedatlas.v1 import coordinator_pb2 as pb


def test_tensors_of_every_wire_dtype_round_trip_bit_for_bit() -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.tensor([[1, -(2**40)]], dtype=torch.int64),
        "i32": torch.tensor([7], dtype=torch.int32),
        "empty": torch.zeros(0, 10),
    }
    assert {str(t.dtype).removeprefix("torch.") for t in tensors.values()} == set(DTYPES)
    decoded = decode_tensors(encode_tensors(tensors), source="test")
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor)
    assert encode_tensors(tensors) == encode_tensors(dict(reversed(tensors.items())))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float16"}, "is not one of"),
        ({"shape": [-1, 4]}, "non-negative dimensions"),
        ({"shape": [1] * 9}, "at most 8"),
        ({"shape": [4, 4]}, "bytes, expected 64"),
        ({"data": b"\x00" * 7}, "7 bytes, expected 48"),
    ],
)
def test_a_tensor_message_that_does_not_fit_is_refused(
    change: dict[str, object], message: str
) -> None:
    good = tensor_message("t", torch.ones(3, 4))
    bad = pb.Tensor(**{"name": good.name, "dtype": good.dtype, "shape": list(good.shape),
                       "data": good.data, **change})  # fmt: skip
    with pytest.raises(WireError, match=message):
        tensor_from_message(bad)
    with pytest.raises(WireError, match="cannot travel"):
        tensor_message("h", torch.ones(2, dtype=torch.float16))


def test_a_tensor_set_names_each_tensor_once() -> None:
    twice = pb.TensorSet(tensors=[tensor_message("t", torch.ones(1))] * 2)
    with pytest.raises(WireError, match="appears twice"):
        decode_tensors(twice.SerializeToString(), source="a site")
    with pytest.raises(WireError, match="not a tensor set"):
        decode_tensors(b"\xff\xff\xff", source="a site")


def test_submission_states_map_both_ways() -> None:
    assert {state_from_wire(int(v)) for v in SUBMISSION_STATES.values()} == set(SUBMISSION_STATES)
    assert state_from_wire(99) == "unknown"


def test_a_composite_travels_and_verifies_in_one_form(
    tiny_builds: dict[str, BuildResult], tmp_path: Path
) -> None:
    keys = write_keypair(tmp_path, "coordinator")
    key = load_signing_key(keys.private)
    release = tiny_builds["scarches"].release
    statement = sign_composite(
        key, release, generation=3, base_release_id=release.content_hash, bundle_ids=[],
        created_at="2026-01-01T00:00:00+00:00", audit_head=(7, "sha256:" + "a" * 64),
    )  # fmt: skip
    data = SignedComposite(release, statement).encode()
    received = SignedComposite.decode(data, source="test")
    assert received.generation == 3
    assert received.verify(public_bytes(key), source="test").content_hash == release.content_hash
    # any altered byte of a tensor is caught by the manifest's hashes
    message = pb.Composite.FromString(data)
    message.tensors[0].data = bytes([message.tensors[0].data[0] ^ 1]) + message.tensors[0].data[1:]
    with pytest.raises(ReleaseError, match="does not match its recorded hash"):
        SignedComposite.decode(message.SerializeToString(), source="test")
    # another key's signature is refused
    other = load_signing_key(write_keypair(tmp_path, "other").private)
    with pytest.raises(ReleaseError, match="but the trusted key is"):
        received.verify(public_bytes(other), source="test")
    with pytest.raises(ReleaseError, match="not a composite"):
        SignedComposite.decode(b"\x08\x01garbage", source="test")
