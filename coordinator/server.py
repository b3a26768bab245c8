"""The coordinator's gRPC server (``fedatlas coordinator serve``): TLS on, mutual TLS optional."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc

import fedatlas.shared as fs
from fedatlas.coordinator.registry import Outcome, Registry, RegistryError
from fedatlas.coordinator.tls import read_pem
from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.hashing import digest
from fedatlas.shared.wire.codec import SUBMISSION_STATES
from fedatlas.shared.wire.signing import fingerprint
from fedatlas.shared.wire.transport import CHANNEL_OPTIONS, CHUNK_BYTES
from fedatlas.v1 import coordinator_pb2 as pb
from fedatlas.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def status_message(outcome: Outcome) -> pb.SubmissionStatus:
    """An :class:`Outcome` as a protocol message."""
    return pb.SubmissionStatus(
        bundle_id=outcome.bundle_id,
        state=SUBMISSION_STATES[outcome.state],
        site_id=outcome.site_id,
        reason_code=outcome.reason_code,
        reason=outcome.reason,
        received_at=outcome.received_at,
        decided_at=outcome.decided_at,
        composite_generation=outcome.generation,
        conditions=list(outcome.conditions),
    )


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """The ``fedatlas.v1.Coordinator`` service over a :class:`Registry`."""

    def __init__(self, registry: Registry, *, clients_authenticated: bool) -> None:
        self.registry = registry
        # listings name every site and condition: only for clients with a certificate
        self.clients_authenticated = clients_authenticated

    def _require_client_certificate(self, context: Any) -> None:
        if not self.clients_authenticated:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "listing sites and adaptors needs mutual TLS: the coordinator must run with "
                "`coordinator serve --require-client-cert`, and the caller needs a client "
                "certificate (`admin tls client-cert`)",
            )

    def GetComposite(self, request: pb.GetCompositeRequest, context: Any) -> Iterator[Any]:
        """Stream the current composite: a header, then its wire form in pieces."""
        try:
            record, data = self.registry.composite_bytes()
        except FedatlasError as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        yield pb.CompositeChunk(
            header=pb.CompositeHeader(
                generation=record.generation,
                content_hash=record.content_hash,
                total_bytes=len(data),
                sha256=digest(data),
            )
        )
        for offset in range(0, len(data), CHUNK_BYTES):
            yield pb.CompositeChunk(data=data[offset : offset + CHUNK_BYTES])

    def SubmitBundle(self, request: pb.SubmitBundleRequest, context: Any) -> pb.SubmissionStatus:
        """Verify and register a bundle; the answer says accepted, held or rejected (why)."""
        try:
            outcome = self.registry.submit(bytes(request.bundle), actor=f"grpc {context.peer()}")
        except FedatlasError as exc:  # e.g. no release published yet
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return status_message(outcome)

    def GetSubmissionStatus(
        self, request: pb.GetSubmissionStatusRequest, context: Any
    ) -> pb.SubmissionStatus:
        """The recorded state of a stored bundle."""
        outcome = self.registry.status(request.bundle_id)
        if outcome is None:
            _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no bundle {request.bundle_id} was received (or its rejection left the log)",
            )
        return status_message(outcome)

    def ListAdaptors(
        self, request: pb.ListAdaptorsRequest, context: Any
    ) -> pb.ListAdaptorsResponse:
        """Registered bundles (optionally of one site); mutual TLS only."""
        self._require_client_certificate(context)
        records = self.registry.store.list_bundles(site_id=request.site_id or None)
        return pb.ListAdaptorsResponse(
            adaptors=[
                status_message(Outcome.of(r, self.registry.generation_of(r.bundle_id)))
                for r in records
            ]
        )

    def ListSites(self, request: pb.ListSitesRequest, context: Any) -> pb.ListSitesResponse:
        """Enrolled and revoked sites; mutual TLS only."""
        self._require_client_certificate(context)
        counts = self.registry.bundles_per_site()
        return pb.ListSitesResponse(
            sites=[
                pb.SiteInfo(
                    site_id=s.site_id,
                    status=s.status,
                    enrolled_at=s.enrolled_at,
                    key_fingerprint=fingerprint(s.public_key),
                    n_adaptors=counts.get(s.site_id, 0),
                )
                for s in self.registry.store.list_sites()
            ]
        )

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        """Liveness and the current composite."""
        latest = self.registry.store.latest_composite()
        return pb.HealthResponse(
            status="serving",
            version=fs.__version__,
            composite_generation=latest.generation if latest else 0,
            composite_hash=latest.content_hash if latest else "",
            coordinator_key_fingerprint=self.registry.key_fingerprint,
        )


def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` (``context.abort`` raises)."""
    context.abort(code, message)
    raise AssertionError("unreachable")


def start_server(
    store: Path,
    address: str,
    *,
    require_client_cert: bool = False,
    max_workers: int = 8,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int, Registry]:
    """Start serving ``store`` on ``address`` with TLS; returns the server, the bound port and
    the registry. ``require_client_cert`` turns on mutual TLS (clients need a certificate
    issued by the store's CA); ``interceptors`` see every call first (e.g. to log them)."""
    registry = Registry(store)
    layout = registry.layout
    credentials = grpc.ssl_server_credentials(
        [(read_pem(layout.server_key, "server key"), read_pem(layout.server_certificate, "cert"))],
        root_certificates=read_pem(layout.ca_certificate, "CA certificate")
        if require_client_cert
        else None,
        require_client_auth=require_client_cert,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=CHANNEL_OPTIONS,
        interceptors=list(interceptors),
    )
    service = CoordinatorService(registry, clients_authenticated=require_client_cert)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise RegistryError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise RegistryError(f"cannot listen on {address} (in use, or not a HOST:PORT address)")
    server.start()
    registry.ensure_composite(actor="coordinator start")  # finish what a crash interrupted
    return server, port, registry


def serve_forever(server: grpc.Server, registry: Registry) -> None:
    """Block until SIGINT or SIGTERM, then stop gracefully (in-flight calls get 5 s)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(grace=5).wait()
    registry.close()
