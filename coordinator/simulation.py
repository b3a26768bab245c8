"""Adaptor campaigns with virtual sites on Flower's Simulation Engine (``coordinator simulate``).

The same Flower app as ``coordinator campaign`` runs on a simulation SuperLink that this
command starts on a free loopback port and owns; Flower's Ray backend plays one SuperNode per
virtual site (see :mod:`fedatlas.shared.runtime.virtual_sites`) and the ServerApp registers their
bundles through the usual verification, so a virtual site that is not enrolled is rejected
(``unknown_site``) like any other. Flower's managed ``:local:`` SuperLink is not used: it
outlives ``flwr``.

Every process started here (the SuperLink, its SuperExec, ``flwr-simulation``, Ray's GCS,
raylet, agents and workers) stays a descendant of this one (it adopts orphans, see
:mod:`fedatlas.shared.runtime.process_tree`); on success, failure, Ctrl-C or SIGTERM the
SuperLink is stopped, every other process started meanwhile is ended and Ray's session directory is
removed. Each ClientApp's torch uses one thread; ``parallel`` clients train at a time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedatlas.coordinator.flower_runs import flower_dir, run_campaign_app
from fedatlas.coordinator.registry import StoreLayout
from fedatlas.shared.errors import ConfigError
from fedatlas.shared.runtime.flower import (
    FlowerError,
    flower_bin,
    flower_env,
    stop,
    wait_healthy,
    write_connection,
)
from fedatlas.shared.runtime.process_tree import adopting_orphans, descendants, end_descendants
from fedatlas.shared.runtime.virtual_sites import read_sites_file, write_federation

log = logging.getLogger(__name__)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def simulate(
    store: Path, sites_file: Path, *, timeout: float = 600.0, parallel: int = 2
) -> dict[str, Any]:
    """Run one adaptor campaign with the virtual sites of ``sites_file`` on the Simulation
    Engine; the campaign's report, plus ``simulation`` (sites, timings, log file)."""
    layout = StoreLayout(store)
    if not layout.public_key.exists():
        raise ConfigError(f"{store}: not a coordinator store (run `fedatlas admin init` first)")
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "Flower's Simulation Engine needs Ray, which is not installed: "
            "pip install 'fedatlas[simulation]' (or 'flwr[simulation]==1.41.0')"
        )
    sites = read_sites_file(sites_file)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    run_dir = flower_dir(store.resolve()) / "simulations" / stamp
    address = f"127.0.0.1:{_free_port()}"
    for site in sites:
        site["coordinator-key"] = site["coordinator-key"] or str(layout.public_key.resolve())
        site["superlink"] = f"simulation of {store.resolve()}"
        site["known-coordinators"] = str(run_dir / "known" / f"{site['site-id']}.json")
    federation = run_dir / "federation.json"  # what the ClientApps read
    write_federation(federation, sites)
    home = run_dir / "home"
    write_connection(home, address, None)
    # Ray's sockets live under its temporary directory: keep the path short (108-byte limit)
    ray_dir = Path(tempfile.mkdtemp(prefix="fedatlas-ray-"))
    env = {**flower_env(home), **ONE_THREAD, "RAY_TMPDIR": str(ray_dir)}
    env.pop("RAY_ADDRESS", None)  # never join a Ray cluster that happens to be configured
    superlink_log = run_dir / "superlink.log"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    earlier = descendants()  # of a caller that started processes of its own
    with _sigterm_interrupts(), adopting_orphans(), superlink_log.open("ab") as log_file:
        try:
            process = subprocess.Popen(
                [flower_bin("flower-superlink"), "--insecure", "--simulation",
                 "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", address.rpartition(":")[2]],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                wait_healthy(address, None, process)
                times["superlink_seconds"] = time.monotonic() - t0
                report = run_campaign_app(
                    store, home, min_sites=len(sites), timeout=timeout,
                    run_config={"simulation-sites": str(federation)},
                    federation_config=f"num-supernodes={len(sites)} "
                    f"client-resources-num-cpus=1 init-args-num-cpus={parallel}",
                )  # fmt: skip
                times["run_seconds"] = time.monotonic() - t0 - times["superlink_seconds"]
            finally:
                stop(process)
        except FlowerError as exc:
            raise FlowerError(f"{exc} (simulation SuperLink log: {superlink_log})") from None
        finally:
            leftovers = end_descendants(spare=earlier)  # SuperExec and Ray processes
            shutil.rmtree(ray_dir, ignore_errors=True)
            log.info("simulation: SuperLink stopped, %d leftover processes ended", len(leftovers))
    total = time.monotonic() - t0
    report["simulation"] = {
        "sites": len(sites),
        "parallel": parallel,
        "federation": str(federation),
        "log": str(superlink_log),
        **times,
        "cleanup_seconds": total - times["superlink_seconds"] - times["run_seconds"],
        "total_seconds": total,
    }
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C while the simulation runs, so cleanup always runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
