"""Own every process a command starts, however it detaches (Linux).

Flower's SuperExec children run in their own session, and Ray's GCS, raylet, agents and
workers outlive the driver that started them; some rename themselves, which also blanks what
``/proc`` shows of their command line and environment. While this process is a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``) every orphaned descendant is re-parented to it
instead of to PID 1, so its descendants are exactly the processes it started, and
:func:`end_descendants` stops them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from fedatlas.shared.errors import FedatlasError

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Within the block, orphaned descendants of this process become its children."""
    if not sys.platform.startswith("linux"):
        raise FedatlasError("owning the processes a command starts needs Linux (prctl, /proc)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def descendants(pid: int | None = None, *, spare: Collection[int] = ()) -> list[int]:
    """Live (not zombie) descendants of ``pid`` (default: this process), leaving out the
    processes in ``spare`` and their own descendants."""
    children, zombies = _process_table()
    found, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child in spare:
                continue
            todo.append(child)
            if child not in zombies:
                found.append(child)
    return found


def end_descendants(*, spare: Collection[int] = (), grace: float = 10.0) -> list[int]:
    """SIGTERM every descendant of this process (but ``spare`` and theirs), SIGKILL those left
    after ``grace`` seconds and reap the zombie children; the processes that were running."""
    running = descendants(spare=spare)
    _signal(running, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := descendants(spare=spare)) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.2)
    _signal(left, signal.SIGKILL)
    time.sleep(0.1 if left else 0.0)
    _reap()
    return running


def end_processes(pids: Collection[int], *, grace: float = 10.0) -> None:
    """SIGTERM ``pids`` (processes that may no longer be our descendants), SIGKILL those still
    running after ``grace`` seconds; a zombie counts as ended."""
    _signal(list(pids), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := _running(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal(left, signal.SIGKILL)


def _running(pids: Collection[int]) -> list[int]:
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def _process_table() -> tuple[dict[int, list[int]], set[int]]:
    """Children of every process, and the zombies."""
    children: dict[int, list[int]] = {}
    zombies = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses
        state, ppid = stat.rpartition(")")[2].split()[:2]
        children.setdefault(int(ppid), []).append(int(entry.name))
        if state == "Z":
            zombies.add(int(entry.name))
    return children, zombies


def _reap() -> None:
    """Collect this process's exited children (adopted orphans among them)."""
    children, zombies = _process_table()
    for pid in set(children.get(os.getpid(), [])) & zombies:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
