"""Real coordinator processes on loopback for the tests, and the CLI run as a child process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FEDATLAS = [sys.executable, "-m", "fedatlas.shared.cli"]
READY = re.compile(r"serving on (\S+):(\d+)")


def fedatlas(*args: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
    """Run ``fedatlas ARGS`` in a child process; the completed process."""
    run = subprocess.run(
        [*FEDATLAS, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
        check=False,
        timeout=600,
    )
    if check and run.returncode != 0:
        raise AssertionError(f"fedatlas {' '.join(args)} failed ({run.returncode}):\n{run.stderr}")
    return run


def fedatlas_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``fedatlas ARGS --json`` and parse what it prints."""
    result: dict[str, Any] = json.loads(fedatlas(*args, "--json", env=env).stdout)
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
