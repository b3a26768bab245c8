"""Running Flower's own processes (SuperLink, SuperNode, the ``flwr`` CLI) for fedatlas.

Flower 1.41 traps handled here (../shared/FLOWER_NOTES.md): its processes start
``flower-superexec`` by bare name, so the environment's ``bin`` goes first on PATH; every
process gets its own ``FLWR_HOME``; runtime dependency installation stays off; the SuperExec
children run in their own session, so stopping a process also stops the children it started.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedatlas.shared.errors import FedatlasError
from fedatlas.shared.runtime.process_tree import descendants, end_processes

CONNECTION = "fedatlas"  # the connection name in $FLWR_HOME/config.toml


class FlowerError(FedatlasError):
    """A Flower process could not be started or a Flower run did not complete."""


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed beside this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FlowerError(f"{path}: not found; install fedatlas with its dependencies (flwr)")
    return str(path)


def flower_env(home: Path) -> dict[str, str]:
    """Environment for a Flower process whose state lives in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def write_connection(home: Path, address: str, ca_certificate: Path | None) -> None:
    """The ``flwr`` CLI's connection to the SuperLink at ``address`` (TLS with
    ``ca_certificate``; plain HTTP on loopback when it is None: a simulation SuperLink)."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        "insecure = true\n"
        if ca_certificate is None
        else f"root-certificates = {json.dumps(str(ca_certificate.resolve()))}\n"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\n{security}"
    )


def wait_healthy(address: str, ca_certificate: Path | None, process: subprocess.Popen[bytes], *,
                 timeout: float = 60.0) -> None:  # fmt: skip
    """Wait until the SuperLink at ``address`` answers ``/health`` (over TLS unless
    ``ca_certificate`` is None)."""
    if ca_certificate is None:
        url, context = f"http://{address}/health", None
    else:
        url = f"https://{address}/health"
        context = ssl.create_default_context(cafile=str(ca_certificate))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"flower-superlink exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise FlowerError(f"the SuperLink at {address} did not become healthy in {timeout:.0f} s")


def flwr(args: Sequence[str], home: Path, *, timeout: float = 120.0) -> dict[str, Any]:
    """Run the ``flwr`` CLI with ``--format json``; its parsed answer."""
    run = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        capture_output=True, text=True, env=flower_env(home), timeout=timeout, check=False,
    )  # fmt: skip
    try:
        answer: dict[str, Any] = json.loads(run.stdout)
    except json.JSONDecodeError:
        raise FlowerError(
            f"flwr {' '.join(args)} failed ({run.returncode}): {run.stderr.strip()[-500:]}"
        ) from None
    if not answer.get("success", False):
        raise FlowerError(f"flwr {' '.join(args)}: {answer.get('error-message', answer)}")
    return answer


def supervise(
    process: subprocess.Popen[bytes],
    *,
    every: float = 1.0,
    tick: Callable[[], object] | None = None,
    shutdown: Callable[[], object] | None = None,
) -> int:
    """Keep ``process`` running until SIGINT or SIGTERM, calling ``tick`` every ``every``
    seconds; then stop it with its children (or call ``shutdown``, which does). Returns 0, or
    1 if it exited on its own."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(every):
        if process.poll() is not None:
            print(f"the Flower process exited with status {process.returncode}", flush=True)
            return 1
        if tick is not None:
            tick()
    if shutdown is None:
        stop(process)
    else:
        shutdown()
    return 0


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a Flower process, wait for it, then end every process it had started below it
    (SuperExec and the ServerApp/ClientApp processes SuperExec runs), which detach into their
    own sessions and would otherwise outlive it where nothing reaps their parent."""
    below = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    end_processes(below)
