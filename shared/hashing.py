"""Canonical bytes and content hashes for manifests, tensors and adaptors."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from torch import Tensor

HASH_PREFIX = "sha256:"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


def content_hash(obj: Any) -> str:
    """Hash of an object's canonical JSON."""
    return digest(canonical_json(obj))


def dtype_name(tensor: Tensor) -> str:
    """A tensor's dtype as manifests and the wire spell it: torch's name without ``torch.``."""
    return str(tensor.dtype).removeprefix("torch.")


def tensor_bytes(tensor: Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order."""
    array = tensor.detach().cpu().contiguous().numpy()
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def tensor_digest(tensor: Tensor) -> str:
    """Hash of dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    header = canonical_json({"dtype": str(tensor.dtype), "shape": list(tensor.shape)})
    return digest(header + b"\0" + tensor_bytes(tensor))


def tensor_index(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Per-tensor dtype, shape and digest, as recorded in manifests."""
    return {
        name: {
            "dtype": dtype_name(t),
            "shape": list(t.shape),
            "sha256": tensor_digest(t),
        }
        for name, t in sorted(tensors.items())
    }


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """True when two tensors have the same dtype, shape and bytes (NaNs compare equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)
