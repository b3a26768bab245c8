"""The coordinator's Flower processes: the SuperLink beside the store, and campaigns on it.

Flower 1.41 serves its Control API (``flwr run``, ``flwr ls``, node registration; no
authentication) on the same port as the Fleet API the sites' SuperNodes use. So
``flower-superlink`` listens on loopback only (``CONTROL_HOST``, ``--control-port``), where the
coordinator's runs and the operator's ``flwr`` reach it, and the public address is served by a
proxy that forwards the Fleet API alone (:mod:`fedatlas.coordinator.fleet_proxy`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    RegisterNodeRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.constant import NodeStatus
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import ApiErrorCode
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

from fedatlas.coordinator.fleet_proxy import FleetProxyServer
from fedatlas.coordinator.registry import StoreLayout
from fedatlas.coordinator.store import SQLiteStore
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.hashing import digest
from fedatlas.shared.model.federated import FederatedPlan
from fedatlas.shared.runtime.flower import (
    CONNECTION,
    FlowerError,
    flower_bin,
    flower_env,
    flwr,
    stop,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)

# fedatlas' Flower app (ServerApp and ClientApp), shipped as data of the fedatlas package
APP_DIR = Path(str(resources.files("fedatlas").joinpath("flower_app")))
CONTROL_HOST = "127.0.0.1"  # the SuperLink itself listens here only; the certificate names it
DEFAULT_CONTROL_PORT = 9093  # Flower's own Control API port before 1.41 served all on one
# the loopback address that reaches a server listening on every interface
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}
Request = TypeVar("Request")
Answer = TypeVar("Answer")


def flower_dir(store: Path) -> Path:
    """Where the coordinator keeps Flower's state (SuperLink database, FLWR_HOME, reports)."""
    return store / "flower"


@dataclass(frozen=True)
class SuperLinkAddresses:
    """Where a store's SuperLink is reached: ``fleet``, the public address of its Fleet-only
    proxy (the sites' SuperNodes), and ``control``, its loopback address (the Control API: the
    coordinator's runs and the operator's ``flwr``). ``coordinator superlink`` records them in
    ``STORE/flower/superlink.json``."""

    fleet: str
    control: str

    @staticmethod
    def path(store: Path) -> Path:
        """The record's file."""
        return flower_dir(store) / "superlink.json"

    def save(self, store: Path) -> None:
        """Record these addresses for ``store``."""
        self.path(store).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, store: Path) -> SuperLinkAddresses | None:
        """The addresses recorded for ``store``, if any."""
        path = cls.path(store)
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a SuperLink record ({exc})") from None


@dataclass(frozen=True)
class FlowerNode:
    """A node the SuperLink knows: its id, status and public key (PEM SubjectPublicKeyInfo)."""

    node_id: int
    status: str  # registered | online | offline | unregistered
    public_key: bytes


class ControlApiError(FlowerError):
    """The SuperLink's Control API refused a call; ``code`` is Flower's error code."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class ControlApi:
    """The node calls of a SuperLink's Control API at ``address`` (TLS verified with
    ``ca_certificate``), made in this process: ``flwr supernode ls`` shows no public keys."""

    def __init__(self, address: str, ca_certificate: Path) -> None:
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=False, root_certificates=ca_certificate.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )  # fmt: skip

    def nodes(self) -> list[FlowerNode]:
        """Every node the SuperLink knows, unregistered ones included."""
        answer = self._call(self._client.ListNodes, ListNodesRequest())
        return [FlowerNode(n.node_id, n.status, n.public_key) for n in answer.nodes_info]

    def register(self, public_key: bytes) -> int:
        """Register a node key (PEM); its node id."""
        return self._call(
            self._client.RegisterNode, RegisterNodeRequest(public_key=public_key)
        ).node_id

    def unregister(self, node_id: int) -> None:
        """Unregister a node; its key can never be registered again."""
        self._call(self._client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> ControlApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[[Request], Answer], request: Request) -> Answer:
        try:
            return method(request)
        except httpx.HTTPStatusError as exc:
            try:  # Flower's errors: {"code": N, "detail": "..."}
                error = dict(exc.response.json())
            except (ValueError, TypeError):
                error = {}
            code = error.get("code")
            raise ControlApiError(
                f"{type(request).__name__} at the SuperLink's Control API ({self.address}): "
                f"{error.get('detail') or exc}",
                code if isinstance(code, int) else None,
            ) from None
        except httpx.HTTPError as exc:
            raise FlowerError(f"the SuperLink's Control API at {self.address} is unreachable: "
                              f"{exc!r}") from None  # fmt: skip


class SuperLink:
    """A store's running SuperLink: ``flower-superlink`` on loopback (TLS, SuperNode
    authentication on), the Fleet-only proxy on the public address, and the Control API
    client that keeps its node keys those of the enrolled sites. Stops it all on leaving."""

    def __init__(self, store: Path, addresses: SuperLinkAddresses,
                 process: subprocess.Popen[bytes], proxy: FleetProxyServer) -> None:  # fmt: skip
        self.store = store
        self.addresses = addresses
        self.process = process
        self.proxy = proxy
        self.control = ControlApi(addresses.control, StoreLayout(store).ca_certificate)

    def tick(self) -> None:
        """One supervision step: the proxy must still serve; the node keys follow the store."""
        self.proxy.check()
        sync_nodes(self.store, self.control)

    def stop(self) -> None:
        """Stop the proxy, then the SuperLink and its children."""
        self.proxy.stop()
        self.control.close()
        stop(self.process)

    def __enter__(self) -> SuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_superlink(
    store: Path, address: str, *, control_port: int = DEFAULT_CONTROL_PORT
) -> SuperLink:
    """``flower-superlink`` on loopback ``control_port`` and the Fleet proxy on the public
    ``address``; returns once both serve, the SuperLink's node keys are exactly the enrolled
    sites' (before the public port opens) and the addresses are recorded for the runs."""
    layout = StoreLayout(store)
    host, port = split_address(address)
    if control_port == port or not 0 < control_port < 65536:
        raise ConfigError(f"--control-port {control_port}: a free port other than {port} is "
                          "needed for the SuperLink's loopback address")  # fmt: skip
    addresses = SuperLinkAddresses(fleet=address, control=f"{CONTROL_HOST}:{control_port}")
    # the operator's flwr: FLWR_HOME=STORE/flower/home flwr ls
    write_connection(flower_dir(store) / "home", addresses.control, layout.ca_certificate)
    with (flower_dir(store) / "superlink.log").open("ab") as log_file:
        process = subprocess.Popen(
            [flower_bin("flower-superlink"),
             "--ssl-ca-certfile", str(layout.ca_certificate),
             "--ssl-certfile", str(layout.server_certificate),
             "--ssl-keyfile", str(layout.server_key),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation",
             "--database", str(flower_dir(store) / "state.db"),
             "--host", CONTROL_HOST, "--port", str(control_port)],
            env=flower_env(flower_dir(store) / "home"), stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    proxy = FleetProxyServer(
        host, port, upstream=addresses.control, certificate=layout.server_certificate,
        key=layout.server_key, ca_certificate=layout.ca_certificate,
    )  # fmt: skip
    superlink = SuperLink(store, addresses, process, proxy)
    try:
        wait_healthy(addresses.control, layout.ca_certificate, process)
        sync_nodes(store, superlink.control)
        proxy.start()
        addresses.save(store)
    except BaseException:
        superlink.stop()  # never leave a SuperLink behind that nobody supervises
        raise
    return superlink


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as host (no brackets) and port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{address!r}: HOST:PORT expected (e.g. 0.0.0.0:9092)")
    return host.removeprefix("[").removesuffix("]"), int(port)


def sync_nodes(store: Path, control: ControlApi) -> dict[str, Any]:
    """Make the node keys the SuperLink accepts exactly those of the enrolled, unrevoked sites:
    unregister every other active node (revoked sites' and keys registered by anyone else),
    register the enrolled keys it lacks. A key Flower once unregistered can never be registered
    again (1.41: "Public key already in use"), so an enrolled site with such a key is reported
    as blocked: it needs a new node key. The state, ``{"registered": {site: node id},
    "blocked": [site, ...]}``, is written to ``STORE/flower/nodes.json`` and returned."""
    with SQLiteStore.open(StoreLayout(store).database) as db:
        sites = db.list_sites()
    owners: dict[str, dict[bytes, str]] = {"enrolled": {}, "revoked": {}}  # status: key -> site
    for site in sites:
        if site.node_public_key:
            key = _node_key(site.node_public_key.encode(), openssh=True)
            owners.setdefault(site.status, {})[key] = site.site_id
    wanted, revoked = owners["enrolled"], owners["revoked"]
    registered: dict[str, int] = {}
    spent = set()
    for node in control.nodes():
        key = _node_key(node.public_key)
        if node.status == NodeStatus.UNREGISTERED:
            spent.add(key)
        elif key in wanted:
            registered[wanted[key]] = node.node_id
        else:
            _unregister(control, node.node_id)
            owner = f"revoked site {revoked[key]}" if key in revoked else "no enrolled site"
            log.warning("unregistered Flower node %d: its key is %s's", node.node_id, owner)
    blocked = []
    for key, site_id in wanted.items():
        if site_id in registered:
            continue
        if key in spent:
            blocked.append(site_id)
            continue
        try:
            registered[site_id] = control.register(key)
        except ControlApiError as exc:
            if exc.code != ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
                raise
            continue  # registered by someone meanwhile: the next sync finds it
        log.info("registered the Flower node of site %s", site_id)
    state = {"registered": dict(sorted(registered.items())), "blocked": sorted(blocked)}
    _record_node_state(store, state)
    return state


def _unregister(control: ControlApi, node_id: int) -> None:
    """Unregister a node, which someone may have unregistered meanwhile."""
    try:
        control.unregister(node_id)
    except ControlApiError as exc:
        if exc.code != ApiErrorCode.NODE_NOT_FOUND:
            raise


def _record_node_state(store: Path, state: dict[str, Any]) -> None:
    """Write ``STORE/flower/nodes.json``; report sites that became blocked."""
    path = flower_dir(store) / "nodes.json"
    before = json.loads(path.read_text()).get("blocked", []) if path.exists() else []
    for site_id in sorted(set(state["blocked"]) - set(before)):
        log.error(
            "site %s cannot join: its Flower node key was unregistered before, and Flower never "
            "registers a key again; give the site a new key pair (fedatlas site keygen) and "
            "enrol it under a new site id (deploy/README.md, 'Rotate keys')", site_id,
        )  # fmt: skip
    path.write_text(json.dumps(state, indent=1) + "\n")


def _node_key(key: bytes, *, openssh: bool = False) -> bytes:
    """A public key (PEM, or an OpenSSH line) as PEM SubjectPublicKeyInfo, the form Flower
    keeps, so that equal keys compare equal; b"" if it cannot be read."""
    try:
        loaded = (
            serialization.load_ssh_public_key(key) if openssh
            else serialization.load_pem_public_key(key)
        )  # fmt: skip
    except (ValueError, UnsupportedAlgorithm):
        return b""
    return loaded.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def run_campaign(
    store: Path, superlink: str | None, *, min_sites: int, timeout: float, app: Path = APP_DIR
) -> dict[str, Any]:
    """Run the adaptor campaign (the Flower app ``app``) on the SuperLink and wait for it;
    the campaign's report. ``superlink``: see :func:`control_address`."""
    home = _run_home(store, superlink)
    return run_campaign_app(store, home, min_sites=min_sites, timeout=timeout, app=app)


def control_address(store: Path, superlink: str | None = None) -> str:
    """The Control API address of the coordinator's runs: the loopback address recorded by
    ``coordinator superlink`` for ``store`` when ``superlink`` is None or that SuperLink's
    public address (which serves the Fleet API only); else ``superlink`` itself."""
    recorded = SuperLinkAddresses.load(store)
    if recorded is not None and (superlink is None or _local(superlink) == _local(recorded.fleet)):
        return recorded.control
    if superlink is None:
        raise ConfigError(
            f"{SuperLinkAddresses.path(store)}: not found; start `fedatlas coordinator superlink "
            f"--store {store}` first or give --superlink CONTROL_HOST:PORT"
        )
    return superlink


def _local(address: str) -> str:
    """``address`` with a wildcard host (every interface) replaced by loopback."""
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK.get(host, host)}:{port}"


def _run_home(store: Path, superlink: str | None) -> Path:
    """The ``flwr`` CLI's home for runs the coordinator starts on its SuperLink (over TLS)."""
    home = flower_dir(store) / "campaign-home"
    write_connection(home, control_address(store, superlink), StoreLayout(store).ca_certificate)
    return home


def run_campaign_app(
    store: Path,
    home: Path,
    *,
    min_sites: int,
    timeout: float,
    app: Path = APP_DIR,
    run_config: Mapping[str, str] | None = None,
    federation_config: str = "",
    phases: int = 2,
) -> dict[str, Any]:
    """``flwr run`` the campaign app on the SuperLink of ``home``'s connection, wait until the
    run finished and return the campaign's report; ``run_config`` adds app settings (strings),
    ``federation_config`` is ``flwr run --federation-config`` (simulation runs); the run may
    take ``phases`` times ``timeout`` (plus start-up) before it is given up."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    report = flower_dir(store) / "campaigns" / f"{stamp}.json"
    settings = {
        "store": str(store.resolve()),
        "report": str(report.resolve()),
        **(run_config or {}),
    }
    overrides = " ".join(f"{k}={_run_config_string(k, v)}" for k, v in settings.items())
    overrides += f" min-sites={min_sites} timeout={float(timeout)}"
    extra = ["--federation-config", federation_config] if federation_config else []
    started = flwr(["run", str(app), CONNECTION, "--run-config", overrides, *extra], home)
    run_id = str(started["run-id"])
    deadline = time.monotonic() + timeout * phases + 120
    status, details = "pending", ""
    while time.monotonic() < deadline:
        runs = flwr(["ls", "--run-id", run_id, CONNECTION], home)["runs"]
        info = runs[0]
        status, details = str(info["status"]), str(info.get("status-details", ""))
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    if status != "finished:completed" or not report.exists():
        raise FlowerError(f"campaign run {run_id} ended as {status!r}: {details or 'no details'}")
    result: dict[str, Any] = json.loads(report.read_text())
    result["run_id"] = run_id
    result["status"] = status
    return result


def run_federated_build(
    store: Path,
    superlink: str | None,
    plan: FederatedPlan,
    *,
    min_sites: int,
    timeout: float,
    gene_list: Sequence[str] | None = None,
    app: Path = APP_DIR,
) -> dict[str, Any]:
    """Run a federated reference build (the Flower app's ``federated-build`` task) on the
    SuperLink and wait for it; the build's report. ``superlink``: see :func:`control_address`.
    With ``gene_list`` the sites only say which of those genes they hold (it is written to
    ``STORE/flower/gene-lists/`` for the ServerApp). ``app``: the Flower app to run."""
    run_config = {"task": "federated-build", "plan": plan.to_json()}
    if gene_list is not None:
        text = "".join(f"{g}\n" for g in gene_list)
        path = flower_dir(store) / "gene-lists" / f"{digest(text.encode())[7:23]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        run_config["gene-list"] = str(path.resolve())
    return run_campaign_app(
        store, _run_home(store, superlink), min_sites=min_sites, timeout=timeout,
        run_config=run_config, phases=_phases(plan), app=app,
    )  # fmt: skip


def _phases(plan: FederatedPlan) -> int:
    """The steps of a build, each of which may take the run's timeout: the gene, vote and
    finish steps and each round's (SecAgg+: its four stages, after the cell counts)."""
    if plan.secure_aggregation:
        return 4 * plan.rounds + 5
    return plan.rounds + 4


def _run_config_string(key: str, value: str) -> str:
    """``value`` quoted for ``flwr run --run-config``, whose parser allows no escaped quote:
    a TOML literal string ('...'), or a basic one ("...") when the value holds a single quote."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    raise FlowerError(f"run setting {key}: {value!r} cannot be passed to flwr run (quotes)")
