"""Start fedatlas' services on one machine (loopback) and stop every one of them, whatever happens.

The demo and the tests run a whole federation with it: ``coordinator serve`` (gRPC, TLS, the
SQLite store), ``coordinator superlink`` (Flower: the SuperLink on loopback behind its
Fleet-only proxy, as deployed) and one ``site node`` per site, each a real child process with
its own log. Real deployments run the same commands from the systemd units in
``deploy/systemd/``.

:class:`LocalLauncher` is a context manager: leaving it (normally, on an exception, or on
Ctrl-C/SIGTERM turned into :class:`KeyboardInterrupt` by :func:`interrupt_on_sigterm`) stops the
services in reverse order, each with the Flower children it started. The process id of every
service started is written to ``LOGS/processes.json``, so a supervisor can check none is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.runtime.flower import stop

FEDATLAS = [sys.executable, "-m", "fedatlas"]
SERVING = re.compile(r"serving on (\S+):(\d+)")
START_TIMEOUT = 120.0  # seconds for a service to report that it is up (2 busy cores)


class LaunchError(FedatlasError):
    """A local service did not start."""


@dataclass
class Service:
    """A running fedatlas service: its name, process and log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 3000) -> str:
        """The end of its log, for error messages."""
        return self.log.read_text(errors="replace")[-n:]


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(service: Service, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
    """Wait until ``pattern`` (a regular expression) appears in the service's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, service.log.read_text(errors="replace"))
        if match:
            return match
        if service.process.poll() is not None:
            raise LaunchError(
                f"{service.name} exited with status {service.process.returncode} before "
                f"it was ready; end of {service.log}:\n{service.tail()}"
            )
        time.sleep(0.2)
    raise LaunchError(
        f"{service.name} was not ready after {timeout:g} s; end of {service.log}:\n{service.tail()}"
    )


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LocalLauncher:
    """The fedatlas services of one local federation, logging into ``logs``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.services: list[Service] = []
        self.started: dict[str, int] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: Sequence[str]) -> Service:
        """Start ``fedatlas ARGS`` as service ``name`` (not waiting for it to be ready)."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                [*FEDATLAS, *args], stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
            )  # fmt: skip
        service = Service(name, process, log)
        self.services.append(service)
        self.started[name] = process.pid
        (self.logs / "processes.json").write_text(json.dumps(self.started, indent=1))
        return service

    def coordinator(self, store: Path, *, extra: Sequence[str] = ()) -> str:
        """``coordinator serve`` on a free loopback port; its address once it serves."""
        service = self.start(
            "coordinator",
            ["coordinator", "serve", "--store", str(store), "--address", "127.0.0.1:0", *extra],
        )
        match = wait_for_text(service, SERVING.pattern)
        return f"127.0.0.1:{match.group(2)}"

    def superlink(self, store: Path) -> str:
        """``coordinator superlink`` on free loopback ports; once it serves, its public (Fleet
        API) address, which the sites' nodes use. The coordinator's runs find its Control API
        through the store (``coordinator campaign`` needs no ``--superlink``)."""
        address = f"127.0.0.1:{free_port()}"
        service = self.start(
            "superlink",
            ["coordinator", "superlink", "--store", str(store), "--address", address,
             "--control-port", str(free_port())],
        )  # fmt: skip
        wait_for_text(service, re.escape("superlink on"))
        return address

    def site_node(self, site_id: str, *, superlink: str, ca: Path, key: Path, data: Path,
                  batch_key: str, label_key: str | None = None, coordinator_key: Path | None = None,
                  out: Path | None = None, gene_universe: Path | None = None,
                  epochs: int | None = None, epsilon: float | None = None) -> Service:  # fmt: skip
        """``site node`` for ``site_id``; returns once its SuperNode has joined the SuperLink.
        ``epsilon``: its bundles' differential privacy (None: the command's default)."""
        args = ["site", "node", "--superlink", superlink, "--ca", str(ca), "--site-id", site_id,
                "--key", str(key), "--data", str(data), "--batch-key", batch_key,
                "--port", str(free_port())]  # fmt: skip
        if label_key:
            args += ["--label-key", label_key]
        if coordinator_key is not None:
            args += ["--coordinator-key", str(coordinator_key)]
        if out is not None:
            args += ["--out", str(out)]
        if gene_universe is not None:
            args += ["--gene-universe", str(gene_universe)]
        if epochs is not None:
            args += ["--epochs", str(epochs)]
        if epsilon is not None:
            args += ["--epsilon", str(epsilon)]
        service = self.start(f"node-{site_id}", args)
        wait_for_text(service, re.escape("SuperNode ID"))
        return service

    def stop_all(self) -> None:
        """Stop every service, newest first, each with the Flower children it started."""
        while self.services:
            stop(self.services.pop().process)

    def __enter__(self) -> LocalLauncher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop_all()
