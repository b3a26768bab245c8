"""The coordinator's Flower processes: the SuperLink beside the store, and campaigns on it."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fedatlas.coordinator.registry import StoreLayout
from fedatlas.coordinator.store import SQLiteStore
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
# the loopback address that reaches a SuperLink listening on every interface
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


def flower_dir(store: Path) -> Path:
    """Where the coordinator keeps Flower's state (SuperLink database, FLWR_HOME, reports)."""
    return store / "flower"


def start_superlink(store: Path, address: str) -> subprocess.Popen[bytes]:
    """``flower-superlink`` with the store's TLS material and SuperNode authentication on;
    returns once it is healthy and every enrolled site's node key is registered."""
    layout = StoreLayout(store)
    host, _, port = address.rpartition(":")
    home = flower_dir(store) / "home"
    # Listening on every interface (0.0.0.0, [::]), the SuperLink's own health check and flwr
    # CLI reach it on loopback, a name every store's server certificate holds (admin init).
    local = f"{LOOPBACK.get(host, host)}:{port}"
    write_connection(home, local, layout.ca_certificate)
    log_file = (flower_dir(store) / "superlink.log").open("ab")
    process = subprocess.Popen(
        [flower_bin("flower-superlink"),
         "--ssl-ca-certfile", str(layout.ca_certificate),
         "--ssl-certfile", str(layout.server_certificate),
         "--ssl-keyfile", str(layout.server_key),
         "--enable-supernode-auth", "--disable-runtime-dependency-installation",
         "--database", str(flower_dir(store) / "state.db"),
         "--host", host, "--port", port],
        env=flower_env(home), stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_healthy(local, layout.ca_certificate, process)
        sync_nodes(store)
    except BaseException:
        stop(process)  # never leave a SuperLink behind that nobody supervises
        raise
    return process


def sync_nodes(store: Path) -> dict[str, int]:
    """Register the node key of every enrolled site with the SuperLink and unregister the
    nodes of revoked sites; the SuperLink then accepts exactly the enrolled sites' nodes."""
    home = flower_dir(store) / "home"
    known_file = flower_dir(store) / "nodes.json"
    known: dict[str, int] = json.loads(known_file.read_text()) if known_file.exists() else {}
    with SQLiteStore.open(StoreLayout(store).database) as db:
        sites = db.list_sites()
    for site in sites:
        if site.status == "revoked" and site.site_id in known:
            flwr(["supernode", "unregister", str(known.pop(site.site_id)), CONNECTION], home)
            log.info("unregistered the Flower node of revoked site %s", site.site_id)
        elif site.status == "enrolled" and site.node_public_key and site.site_id not in known:
            with tempfile.NamedTemporaryFile("w", suffix=".pub", delete=False) as key_file:
                key_file.write(site.node_public_key + "\n")
            try:
                answer = flwr(["supernode", "register", key_file.name, CONNECTION], home)
            finally:
                Path(key_file.name).unlink()
            known[site.site_id] = int(str(answer["node-id"]))
            log.info("registered the Flower node of site %s", site.site_id)
    known_file.write_text(json.dumps(known, indent=1, sort_keys=True))
    return known


def run_campaign(
    store: Path, superlink: str, *, min_sites: int, timeout: float, app: Path = APP_DIR
) -> dict[str, Any]:
    """Run the adaptor campaign (the Flower app ``app``) on the SuperLink and wait for it;
    the campaign's report."""
    home = _run_home(store, superlink)
    return run_campaign_app(store, home, min_sites=min_sites, timeout=timeout, app=app)


def _run_home(store: Path, superlink: str) -> Path:
    """The ``flwr`` CLI's home for runs the coordinator starts on its SuperLink (over TLS)."""
    home = flower_dir(store) / "campaign-home"
    write_connection(home, superlink, StoreLayout(store).ca_certificate)
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
    store: Path, superlink: str, plan: FederatedPlan, *, min_sites: int, timeout: float
) -> dict[str, Any]:
    """Run a federated reference build (the Flower app's ``federated-build`` task) on the
    SuperLink and wait for it; the build's report."""
    return run_campaign_app(
        store, _run_home(store, superlink), min_sites=min_sites, timeout=timeout,
        run_config={"task": "federated-build", "plan": plan.to_json()},
        phases=plan.rounds + 4,
    )  # fmt: skip


def _run_config_string(key: str, value: str) -> str:
    """``value`` quoted for ``flwr run --run-config``, whose parser allows no escaped quote:
    a TOML literal string ('...'), or a basic one ("...") when the value holds a single quote."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    raise FlowerError(f"run setting {key}: {value!r} cannot be passed to flwr run (quotes)")
