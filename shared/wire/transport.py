"""gRPC transport limits, set explicitly and identically on the coordinator and its clients.

A bundle is further limited by the coordinator's policy (``max_bundle_bytes``, 16 MiB by
default), which answers with a readable ``oversize`` rejection; a message above the transport
limit is refused by gRPC itself (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 32 << 20
CHUNK_BYTES = 1 << 20  # a composite is streamed in pieces of at most this size
# a composite is one protobuf message (fedatlas.v1.Composite), which cannot exceed 2 GiB
MAX_COMPOSITE_BYTES = (2 << 30) - 1
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
