"""The SuperLink's public face: a TLS proxy that lets through Flower's Fleet API and nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr``: runs, node
registration) and the Runtime API (ServerApp tasks) on one port, and only the Fleet API
authenticates its callers. ``coordinator superlink`` therefore binds ``flower-superlink`` to
loopback and serves this proxy on the public address, with the same server certificate (so
sites keep their ``ca.pem``). Its rules:

- HTTP/1.1 over TLS, parsed by uvicorn's h11 protocol, which parses every request of a
  connection (pipelined ones included) and refuses ambiguous framing; each request is forwarded
  on its own to the loopback SuperLink, over TLS verified with the store's CA.
- Only ``POST`` to one of :data:`FLEET_ROUTES`, compared byte for byte with the raw request
  target (never decoded: the SuperLink percent-decodes, so ``/v1/%63ontrol/...`` would reach
  its Control API), with no query string, is forwarded. Everything else gets 404; never 401
  or 403, which a SuperNode takes for "shut down" and "run not running".
- Request bodies are read whole, at most :data:`MAX_REQUEST_BYTES` each (413 beyond) and
  :data:`MAX_BUFFERED_BYTES` all together (503 beyond, which SuperNodes retry). Headers pass
  unchanged (the SuperNode's ``flwr-*`` signature and version headers too) but for hop-by-hop
  ones and the client's ``X-Forwarded-*`` claims (replaced by its real address); the response
  (status, headers, body) comes back the same way, streamed.
- When the SuperLink cannot be reached or fails mid-request the answer is 502, which
  SuperNodes retry.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from fedatlas.shared.runtime.flower import FlowerError

log = logging.getLogger(__name__)

# The Fleet routes a SuperNode with an authentication key calls (flwr 1.41,
# flwr/superlink/routers/fleet/router.py). register-node and unregister-node are left out:
# only SuperNodes without a key call them, and the SuperLink refuses them under
# --enable-supernode-auth anyway.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}".encode()
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Flower sends arrays in chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE); the largest
# Fleet request seen is one such chunk. The bound is the gRPC API's message limit.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# request bodies are read before the SuperLink checks who sent them: all of them together are
# held in at most this much memory
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# RFC 9110 §7.6.1: meaningful for one connection only; so is every header a Connection names
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
     b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)  # fmt: skip
# set anew on the upstream request: its Host and length (the body is read whole, so no Expect);
# the client's own forwarding claims are not passed on (the SuperLink trusts them from loopback)
REQUEST_REWRITTEN = frozenset(
    {b"host", b"content-length", b"expect", b"forwarded", b"x-forwarded-for",
     b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"}
)  # fmt: skip
UPSTREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # SuperNodes wait 30 s per call
MAX_CONNECTIONS = 512  # beyond: 503, which SuperNodes retry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


class _DisconnectedError(Exception):
    """The client disconnected before its request body was complete."""


class _RefusedError(Exception):
    """A request answered by the proxy itself with ``status``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class FleetProxy:
    """ASGI application forwarding Fleet API requests to the SuperLink at ``upstream``
    (``HOST:PORT``, TLS verified with ``ca_certificate``)."""

    def __init__(self, upstream: str, ca_certificate: Path) -> None:
        self.upstream = f"https://{upstream}"
        self.client = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=str(ca_certificate)),
            timeout=UPSTREAM_TIMEOUT,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
            trust_env=False,  # no HTTP(S)_PROXY detour
        )
        self.buffered = 0  # request body bytes held now, all requests together (one event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._handle(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Close the upstream connections on the server's event loop when it shuts down."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: bytes = scope.get("raw_path") or b""
        peer = scope.get("client")
        body = bytearray()
        try:
            if scope["method"] != "POST" or scope["query_string"] or path not in FLEET_ROUTES:
                raise _RefusedError(404, "Not Found")
            await self._read_body(scope["headers"], receive, body)
            headers = end_to_end(scope["headers"], REQUEST_REWRITTEN)
            if peer:  # what the SuperLink logs as the client (it trusts loopback's word)
                headers.append((b"x-forwarded-for", str(peer[0]).encode()))
            await self._forward(path, headers, bytes(body), send)
        except _RefusedError as refusal:
            log.warning("fleet proxy: refused %s %r from %s: %d %s", scope["method"], path, peer,
                        refusal.status, refusal.detail)  # fmt: skip
            await _answer(send, refusal.status, refusal.detail)
        except _DisconnectedError:
            pass
        finally:
            self.buffered -= len(body)

    async def _read_body(self, headers: Headers, receive: Receive, body: bytearray) -> None:
        """Read the request body into ``body`` (and :attr:`buffered`); refused when it is too
        long (413) or all bodies held together would be (503, which SuperNodes retry)."""
        declared = dict(headers).get(b"content-length")  # h11 has checked that it is a number
        if declared is not None and int(declared) > MAX_REQUEST_BYTES:
            raise _RefusedError(413, "Request Entity Too Large")
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _DisconnectedError
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > MAX_REQUEST_BYTES:
                raise _RefusedError(413, "Request Entity Too Large")
            if self.buffered + len(chunk) > MAX_BUFFERED_BYTES:
                raise _RefusedError(503, "Service Unavailable")
            body += chunk
            self.buffered += len(chunk)
            if not message.get("more_body", False):
                return

    async def _forward(self, path: bytes, headers: Headers, body: bytes, send: Send) -> None:
        """Send the request to the SuperLink and its answer back (502 if it cannot be had)."""
        request = self.client.build_request(
            "POST", self.upstream + path.decode("ascii"), headers=headers, content=body
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.error("fleet proxy: %r: the SuperLink failed: %r", path, exc)
            await _answer(send, 502, "Bad Gateway")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": end_to_end(response.headers.raw)})  # fmt: skip
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as exc:  # the status is sent: uvicorn drops the connection
            log.error("fleet proxy: %r: the SuperLink broke off: %r", path, exc)
        finally:
            await response.aclose()


def end_to_end(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> Headers:
    """``headers`` (names lower-cased) without the hop-by-hop ones, those the ``Connection``
    header names, and ``drop``."""
    headers = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(name, value) for name, value in headers if name not in HOP_BY_HOP | named | drop]


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON error answer, shaped like the SuperLink's own."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class FleetProxyServer:
    """A :class:`FleetProxy` listening on ``host``:``port`` (TLS with ``certificate`` and
    ``key``) in a thread of this process. A context manager: serving inside, stopped after."""

    def __init__(self, host: str, port: int, *, upstream: str, certificate: Path, key: Path,
                 ca_certificate: Path) -> None:  # fmt: skip
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config = uvicorn.Config(
            FleetProxy(upstream, ca_certificate), host=host, port=port,
            ssl_certfile=str(certificate), ssl_keyfile=str(key),
            http="h11", ws="none", loop="asyncio", lifespan="on",
            log_config=None, access_log=False, server_header=False, date_header=False,
            proxy_headers=False, limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fleet-proxy", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; returns once the proxy listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():  # uvicorn has logged why (e.g. address in use)
                raise FlowerError(f"the Fleet proxy could not listen on {self.address}")
            if time.monotonic() > deadline:
                self.stop()
                raise FlowerError(f"the Fleet proxy on {self.address} did not start in "
                                  f"{timeout:.0f} s")  # fmt: skip
            time.sleep(0.05)

    def check(self) -> None:
        """Raise :class:`FlowerError` if the proxy no longer serves."""
        if not self._thread.is_alive():
            raise FlowerError(f"the Fleet proxy on {self.address} stopped")

    def stop(self) -> None:
        """Stop serving (requests under way get a few seconds to finish)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> FleetProxyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
