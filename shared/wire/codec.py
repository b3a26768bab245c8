"""The one encoding of everything that crosses machines as numbers: tensors and their dtypes,
sets of tensors, and the protocol's enumerations.

A tensor travels as a ``fedatlas.v1.Tensor`` (name, dtype name, shape, raw little-endian bytes
in C order) whichever way it goes: inside a bundle, inside a composite (which gRPC streams in
chunks and a Flower campaign carries whole), or as a federated build's trunk and gene votes
(``fedatlas.v1.TensorSet`` bytes in a Flower record). Decoding checks every field before any
value is used: a dtype on the list below, a bounded number of non-negative dimensions, a byte
count that matches, unique names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError as ProtobufDecodeError
from torch import Tensor

from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.hashing import dtype_name, tensor_bytes
from fedatlas.v1 import coordinator_pb2 as pb

# dtypes a tensor may have on the wire, and their little-endian numpy equivalents
DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}
MAX_DIMENSIONS = 8  # no tensor of the model family has more
# submission states as the protocol enumerates them
SUBMISSION_STATES: dict[str, pb.SubmissionState] = {
    "accepted": pb.SUBMISSION_STATE_ACCEPTED,
    "held": pb.SUBMISSION_STATE_HELD,
    "rejected": pb.SUBMISSION_STATE_REJECTED,
}


class WireError(FedatlasError):
    """Bytes received from another machine do not decode into what they claim to be."""


def tensor_message(name: str, tensor: Tensor) -> pb.Tensor:
    """``tensor`` as a ``fedatlas.v1.Tensor`` message."""
    dtype = dtype_name(tensor)
    if dtype not in DTYPES:
        raise WireError(f"tensor {name!r}: dtype {dtype} cannot travel on the wire")
    return pb.Tensor(name=name, dtype=dtype, shape=list(tensor.shape), data=tensor_bytes(tensor))


def tensor_from_message(message: pb.Tensor) -> Tensor:
    """Rebuild a tensor from its message, checking dtype, shape and byte count."""
    name, dtype, shape = message.name, message.dtype, list(message.shape)
    if dtype not in DTYPES:
        raise WireError(f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if len(shape) > MAX_DIMENSIONS or any(d < 0 for d in shape):
        raise WireError(
            f"tensor {name!r}: shape {shape[: MAX_DIMENSIONS + 1]} (at most {MAX_DIMENSIONS} "
            "non-negative dimensions)"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(message.data) != expected:
        raise WireError(
            f"tensor {name!r}: {len(message.data)} bytes, expected {expected} for {dtype} {shape}"
        )
    array = np.frombuffer(message.data, dtype=DTYPES[dtype]).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def tensors_from_messages(messages: Any, *, source: str) -> dict[str, Tensor]:
    """Named tensors from repeated ``Tensor`` messages (each name once)."""
    tensors: dict[str, Tensor] = {}
    for message in messages:
        if message.name in tensors:
            raise WireError(f"{source}: tensor {message.name!r} appears twice")
        tensors[message.name] = tensor_from_message(message)
    return tensors


def encode_tensors(tensors: Mapping[str, Tensor]) -> bytes:
    """Named tensors as the bytes of a ``fedatlas.v1.TensorSet`` (names in sorted order)."""
    message = pb.TensorSet(tensors=[tensor_message(n, t) for n, t in sorted(tensors.items())])
    return message.SerializeToString(deterministic=True)


def decode_tensors(data: bytes, *, source: str) -> dict[str, Tensor]:
    """Inverse of :func:`encode_tensors`; :class:`WireError` for anything else."""
    try:
        message = pb.TensorSet.FromString(data)
    except ProtobufDecodeError as exc:
        raise WireError(f"{source}: not a tensor set ({exc})") from None
    return tensors_from_messages(message.tensors, source=source)


def state_from_wire(value: int) -> str:
    """The name of a ``SubmissionState`` value (``unknown`` for one this version lacks)."""
    names = {int(number): name for name, number in SUBMISSION_STATES.items()}
    return names.get(value, "unknown")
