"""Only the operator reaches Flower's Control API: ``coordinator superlink`` runs the SuperLink on
loopback behind a proxy that lets through the Fleet API alone, and its node sync removes every
node key that is not an enrolled site's. Real processes: the SuperLink, the ``flwr`` CLI,
``flower-supernode``."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import free_port, start_superlink, wait_for_text, wait_refused

from fedatlas.cli import main
from fedatlas.coordinator import fleet_proxy
from fedatlas.coordinator.cli import NODE_SYNC_SECONDS
from fedatlas.coordinator.fleet_proxy import MAX_REQUEST_BYTES, FleetProxyServer
from fedatlas.coordinator.flower_runs import (
    APP_DIR,
    ControlApi,
    SuperLinkAddresses,
    control_address,
)
from fedatlas.shared.runtime.flower import (
    CONNECTION,
    FlowerError,
    flower_bin,
    flower_env,
    flwr,
    stop,
    write_connection,
)

PROTOBUF = {"content-type": "application/protobuf"}


@dataclass
class Coordinator:
    """A store with one enrolled site (h1), its running SuperLink, and an intruder's keys."""

    root: Path
    store: Path
    public: str  # the address every site (and anyone holding ca.pem) reaches
    control: str  # the SuperLink itself, on loopback
    log: Path

    @property
    def ca(self) -> Path:
        return self.store / "ca.pem"

    def flwr_home(self, name: str, address: str) -> Path:
        """A ``flwr`` configuration holding only ``address`` and ``root-certificates``."""
        home = self.root / name
        write_connection(home, address, self.ca)
        return home


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("control-api")
    store = root / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    for keys in ("h1", "intruder"):
        assert main(["-q", "site", "keygen", "--out", str(root / keys)]) == 0
    assert main(["-q", "admin", "site", "enroll", "--store", str(store), "--site-id", "h1",
                 "--public-key", str(root / "h1" / "site.pub")]) == 0  # fmt: skip
    public, log = f"127.0.0.1:{free_port()}", root / "superlink.log"
    superlink = start_superlink(store, public, log)
    try:
        wait_for_text(log, "superlink on", superlink, 120)
        recorded = SuperLinkAddresses.load(store)
        assert recorded is not None
        assert recorded.fleet == public
        yield Coordinator(root, store, public, recorded.control, log)
    finally:
        stop(superlink)


def test_the_public_port_serves_the_fleet_api_and_nothing_else(coordinator: Coordinator) -> None:
    # the flwr CLI of anyone holding ca.pem and the address: no runs listed, no node key
    # registered, no app run
    outsider = coordinator.flwr_home("outsider", coordinator.public)
    for args in (["ls"], ["supernode", "register", str(coordinator.root / "intruder" /
                 "flower_node.pub")], ["run", str(APP_DIR)]):  # fmt: skip
        with pytest.raises(FlowerError, match="Not Found"):
            flwr([*args, CONNECTION], outsider)
    # every other route, method and spelling of a path: 404 (a percent-encoded path would
    # reach the Control API, as it does on loopback)
    assert _request(coordinator.control, coordinator.ca, "/v1/%63ontrol/list-runs")[0] == 200
    refused = [
        ("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"),
        ("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/%63ontrol/list-runs"), ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "//v1/control/list-runs"), ("POST", "/v1/fleet/%67et-run"),
        ("POST", "/v1/fleet/get-run?x=1"), ("POST", "/v1/fleet/get-run/"),
        ("POST", "/v1/FLEET/get-run"), ("GET", "/v1/fleet/get-run"),
        ("POST", "/v1/fleet/register-node"), ("POST", "/v1/fleet/unregister-node"),
        ("POST", f"https://{coordinator.control}/v1/control/list-runs"),
    ]  # fmt: skip
    for method, target in refused:
        status, body = _request(coordinator.public, coordinator.ca, target, method=method)
        assert (status, json.loads(body)) == (404, {"detail": "Not Found"}), (method, target)
    # a Fleet route is forwarded: the SuperLink itself refuses the missing node signature
    status, body = _request(coordinator.public, coordinator.ca, "/v1/fleet/get-run")
    assert (status, json.loads(body)) == (401, {"detail": "Invalid SuperNode authentication"})
    # every request of a connection is judged on its own, pipelined ones too
    replies = _exchange(
        coordinator.public, coordinator.ca,
        b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Type: application/protobuf\r\n\r\n"
        b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Type: application/protobuf\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", replies) == [b"401", b"404"], replies
    # and no request changed the SuperLink's nodes: only h1's key, as enrolled
    with _control(coordinator) as control:
        assert [n.status for n in control.nodes()] == ["registered"]
    assert "fleet proxy: refused POST b'/v1/control/register-node'" in coordinator.log.read_text()


def test_a_node_key_registered_behind_the_coordinators_back_is_removed(
    coordinator: Coordinator,
) -> None:
    """As an attacker who reached the loopback Control API earlier would: the key is gone
    within a sync period, its SuperNode cannot join, and the key stays spent."""
    insider = coordinator.flwr_home("insider", coordinator.control)
    intruder = coordinator.root / "intruder"
    node_id = int(flwr(["supernode", "register", str(intruder / "flower_node.pub"), CONNECTION],
                       insider)["node-id"])  # fmt: skip
    registered = time.monotonic()
    with _control(coordinator) as control:
        while _status(control, node_id) != "unregistered":
            assert time.monotonic() - registered < 2 * NODE_SYNC_SECONDS + 10, "never removed"
            time.sleep(0.2)
    print(f"\nremoved {time.monotonic() - registered:.1f} s after it was registered")
    log = coordinator.log.read_text()
    assert f"unregistered Flower node {node_id}: its key is no enrolled site's" in log

    node_log = coordinator.root / "intruder-node.log"
    with node_log.open("wb") as handle:
        node = subprocess.Popen(
            [flower_bin("flower-supernode"), "--root-certificates", str(coordinator.ca),
             "--superlink", coordinator.public, "--port", str(free_port()),
             "--auth-supernode-private-key", str(intruder / "flower_node.key")],
            env=flower_env(coordinator.root / "intruder-home"), stdout=handle,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_refused(node, node_log)

    # the spent key enrolled for a site later cannot be registered again: reported, not retried
    assert main(["-q", "admin", "site", "enroll", "--store", str(coordinator.store),
                 "--site-id", "late", "--public-key", str(intruder / "site.pub")]) == 0  # fmt: skip
    nodes_file = coordinator.store / "flower" / "nodes.json"
    deadline = time.monotonic() + 2 * NODE_SYNC_SECONDS + 10
    while json.loads(nodes_file.read_text())["blocked"] != ["late"]:
        assert time.monotonic() < deadline, nodes_file.read_text()
        time.sleep(0.2)
    assert list(json.loads(nodes_file.read_text())["registered"]) == ["h1"]
    assert "site late cannot join" in coordinator.log.read_text()


def test_runs_find_the_control_api_through_the_store(coordinator: Coordinator) -> None:
    store = coordinator.store
    assert control_address(store) == coordinator.control
    assert control_address(store, coordinator.public) == coordinator.control
    assert control_address(store, "127.0.0.1:9999") == "127.0.0.1:9999"  # another SuperLink


def test_the_proxy_answers_502_without_a_superlink_and_bounds_request_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    assert main(["-q", "admin", "init", "--store", str(store)]) == 0
    port, ca = free_port(), store / "ca.pem"
    with FleetProxyServer(
        "127.0.0.1", port, upstream=f"127.0.0.1:{free_port()}", certificate=store / "server.pem",
        key=store / "server.key", ca_certificate=ca,
    ):  # fmt: skip
        address = f"127.0.0.1:{port}"
        assert _request(address, ca, "/v1/fleet/pull-messages")[0] == 502  # SuperNodes retry
        too_long = {"content-length": str(MAX_REQUEST_BYTES + 1)}
        assert _request(address, ca, "/v1/fleet/push-object", headers=too_long)[0] == 413
        assert _request(address, ca, "/v1/control/list-runs")[0] == 404
        # what all requests together may hold: beyond it, 503 (retried) until memory is free
        monkeypatch.setattr(fleet_proxy, "MAX_BUFFERED_BYTES", 1000)
        assert _request(address, ca, "/v1/fleet/push-object", body=b"x" * 1001)[0] == 503
        assert _request(address, ca, "/v1/fleet/push-object", body=b"x" * 1000)[0] == 502
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def _control(coordinator: Coordinator) -> ControlApi:
    return ControlApi(coordinator.control, coordinator.ca)


def _status(control: ControlApi, node_id: int) -> str:
    return next(n.status for n in control.nodes() if n.node_id == node_id)


def _request(
    address: str, ca: Path, target: str, *, method: str = "POST",
    headers: dict[str, str] | None = None, body: bytes = b"",
) -> tuple[int, bytes]:  # fmt: skip
    """One HTTPS request (request target sent as written); status and body."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        connection.request(method, target, body=body, headers={**PROTOBUF, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _exchange(address: str, ca: Path, data: bytes) -> bytes:
    """Send raw bytes over one TLS connection; everything read until the server closes it."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(data)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
    return received
