"""A site's connection to the coordinator: pull the signed composite, send bundles.

Every call goes over TLS, verified against the CA certificate the operator handed out. Sending
retries transient failures (coordinator unreachable, deadline exceeded) with exponential
backoff, always with the same bundle bytes: the coordinator answers a repeat with the recorded
outcome, so a bundle is never registered twice nor re-sent under a new nonce.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from fedatlas.shared.errors import FedatlasError, ReleaseError
from fedatlas.shared.hashing import digest
from fedatlas.shared.wire.composite import SignedComposite
from fedatlas.shared.wire.transport import CHANNEL_OPTIONS, MAX_COMPOSITE_BYTES, MAX_MESSAGE_BYTES
from fedatlas.v1 import coordinator_pb2 as pb
from fedatlas.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

T = TypeVar("T")


class CoordinatorError(FedatlasError):
    """The coordinator could not be reached or refused a request."""


class CoordinatorClient:
    """gRPC client of one coordinator."""

    def __init__(
        self,
        address: str,
        ca_certificate: Path,
        *,
        client_certificate: Path | None = None,
        client_key: Path | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        try:
            root = ca_certificate.read_bytes()
        except OSError as exc:
            raise CoordinatorError(
                f"{ca_certificate}: cannot read the CA certificate ({exc.strerror})"
            ) from None
        chain = client_certificate.read_bytes() if client_certificate else None
        key = client_key.read_bytes() if client_key else None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root, private_key=key, certificate_chain=chain
        )
        self._channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> pb.HealthResponse:
        """The coordinator's health answer."""
        return self._call("health check", lambda: self._stub.Health(pb.HealthRequest(), timeout=10))

    def pull(self) -> SignedComposite:
        """Download the current composite and check its hashes (the caller checks the
        signature against the key it trusts: :func:`fedatlas.site_client.trust.accept`)."""
        source = f"composite stream from {self.address}"

        def download() -> bytes:
            header: pb.CompositeHeader | None = None
            buffer = bytearray()
            for chunk in self._stub.GetComposite(pb.GetCompositeRequest(), timeout=self.timeout):
                if chunk.HasField("header"):
                    if header is not None:
                        raise CoordinatorError(f"{source}: a second header")
                    header = chunk.header
                    if header.total_bytes > MAX_COMPOSITE_BYTES:
                        raise CoordinatorError(
                            f"{source}: {header.total_bytes:,} bytes announced, more than the "
                            f"{MAX_COMPOSITE_BYTES:,} a composite may have"
                        )
                    continue
                if header is None or len(buffer) + len(chunk.data) > header.total_bytes:
                    raise CoordinatorError(f"{source}: data outside the announced composite")
                buffer.extend(chunk.data)
            if header is None or len(buffer) != header.total_bytes:
                raise CoordinatorError(f"{source}: ended before the composite was complete")
            if digest(bytes(buffer)) != header.sha256:
                raise CoordinatorError(f"{source}: the bytes do not match the announced SHA-256")
            return bytes(buffer)

        data = self._call("pull", download)
        try:
            return SignedComposite.decode(data, source=source)
        except ReleaseError as exc:
            raise CoordinatorError(str(exc)) from None

    def submit(self, bundle: bytes) -> pb.SubmissionStatus:
        """Send serialised bundle bytes (retried unchanged on transient errors)."""
        return self._call(
            "submit",
            lambda: self._stub.SubmitBundle(
                pb.SubmitBundleRequest(bundle=bundle), timeout=self.timeout
            ),
        )

    def status(self, bundle_id: str) -> pb.SubmissionStatus:
        """The recorded state of a registered bundle."""
        return self._call(
            "status",
            lambda: self._stub.GetSubmissionStatus(
                pb.GetSubmissionStatusRequest(bundle_id=bundle_id), timeout=self.timeout
            ),
        )

    def list_adaptors(self, site_id: str = "") -> list[pb.SubmissionStatus]:
        """Registered bundles (of one site when ``site_id`` is given)."""
        response = self._call(
            "list adaptors",
            lambda: self._stub.ListAdaptors(
                pb.ListAdaptorsRequest(site_id=site_id), timeout=self.timeout
            ),
        )
        return list(response.adaptors)

    def list_sites(self) -> list[pb.SiteInfo]:
        """Enrolled and revoked sites."""
        response = self._call(
            "list sites", lambda: self._stub.ListSites(pb.ListSitesRequest(), timeout=self.timeout)
        )
        return list(response.sites)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                code = exc.code()
                if code in TRANSIENT and attempt < self.retries:
                    delay = self.backoff * 2**attempt
                    log.warning(
                        "%s: coordinator %s %s (%s); retrying in %.1fs",
                        what, self.address, code.name.lower(), exc.details(), delay,
                    )  # fmt: skip
                    time.sleep(delay)
                    continue
                raise CoordinatorError(_explain(what, self.address, code, exc.details())) from None
        raise AssertionError("unreachable")


def _explain(what: str, address: str, code: grpc.StatusCode, details: str | None) -> str:
    text = f"{what} at coordinator {address} failed: {code.name} ({details or 'no details'})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        text += f"; the coordinator accepts messages of at most {MAX_MESSAGE_BYTES:,} bytes"
    if code == grpc.StatusCode.UNAVAILABLE:
        text += "; check the address, that the coordinator runs, and the --ca certificate"
    return text
