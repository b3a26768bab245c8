"""Real coordinator processes on loopback for the tests, and the CLI run as a child process
(on top of the product's own local launcher, ``fedatlas.deploy.launcher``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedatlas.deploy.launcher import FEDATLAS, Service, free_port
from fedatlas.deploy.launcher import SERVING as READY
from fedatlas.deploy.launcher import wait_for_text as wait_for_pattern
from fedatlas.shared.runtime.flower import stop

__all__ = ["FEDATLAS", "Coordinator", "fedatlas", "fedatlas_json", "free_port", "start_fedatlas",
           "start_superlink", "wait_for_text", "wait_refused"]  # fmt: skip


def fedatlas(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600
) -> Any:
    """Run ``fedatlas ARGS`` in a child process (at most ``timeout`` s); the completed process."""
    run = subprocess.run(
        [*FEDATLAS, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
        check=False,
        timeout=timeout,
    )
    if check and run.returncode != 0:
        # with --json a command reports its failure on stdout (e.g. a federated run that stopped)
        raise AssertionError(
            f"fedatlas {' '.join(args)} failed ({run.returncode}):\n"
            f"stderr:\n{run.stderr}\nstdout (last 4,000 characters):\n{run.stdout[-4000:]}"
        )
    return run


def fedatlas_json(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, Any]:
    """Run ``fedatlas ARGS --json`` and parse what it prints."""
    result: dict[str, Any] = json.loads(fedatlas(*args, "--json", env=env, timeout=timeout).stdout)
    return result


class Coordinator:
    """``fedatlas coordinator serve`` in a child process (TLS, real store)."""

    def __init__(self, store: Path, *, port: int = 0, extra: Sequence[str] = ()) -> None:
        self.store = store
        self.log = store.parent / f"{store.name}-serve-{time.monotonic_ns()}.log"
        self._handle = self.log.open("w")
        self.process = subprocess.Popen(
            [*FEDATLAS, "coordinator", "serve", "--store", str(store),
             "--address", f"127.0.0.1:{port}", *extra],
            stdout=self._handle, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        self.port = self._wait_ready()
        self.address = f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log.read_text())
            if match:
                return int(match.group(2))
            if self.process.poll() is not None:
                raise AssertionError(f"coordinator exited:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"coordinator did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM and wait (a graceful stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._handle.close()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._handle.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_fedatlas(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``fedatlas ARGS`` as a child process logging to ``log``."""
    return subprocess.Popen(
        [*FEDATLAS, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )  # fmt: skip


def start_superlink(store: Path, address: str, log: Path) -> subprocess.Popen[bytes]:
    """``fedatlas coordinator superlink`` for ``store``: the Fleet API on the public ``address``,
    the SuperLink itself (Control API) on a free loopback port; a child process logging to
    ``log`` (wait for "superlink on" in it)."""
    return start_fedatlas(
        ["coordinator", "superlink", "--store", str(store), "--address", address,
         "--control-port", str(free_port())],
        log,
    )  # fmt: skip


def wait_for_text(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until ``text`` appears in ``log`` (fail if ``process`` exits first)."""
    wait_for_pattern(Service(log.stem, process, log), re.escape(text), timeout)


def wait_refused(node: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    """Wait for a SuperNode (``site node`` or ``flower-supernode``) to exit, and check that the
    SuperLink refused it: its key is not registered."""
    try:
        node.wait(timeout=timeout)
    finally:
        stop(node)
    assert node.returncode != 0
    assert "Failed to activate SuperNode" in log.read_text(errors="replace")
