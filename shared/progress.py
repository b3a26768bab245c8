"""Progress reporting for long work (training epochs, cells mapped) on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts work done towards a total and prints a line at most every ``interval`` seconds
    (and always at the end), e.g. ``[fedatlas] training reference: epoch 12/50 loss=812.3``;
    with ``rate`` also units per second, e.g. ``mapping: cell 20,000/40,000 (1.1s, 18,182
    cells/s)``."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str,
        *,
        stream: TextIO | None = None,
        interval: float = 1.0,
        enabled: bool = True,
        rate: bool = False,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.rate = rate  # also show units per second
        self.done = 0
        self._last_print = -float("inf")
        self._started = time.perf_counter()

    def advance(self, n: int = 1, **metrics: float) -> None:
        """Record ``n`` more units of work; ``metrics`` are shown with the next line."""
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last_print >= self.interval or self.done >= self.total):
            self._last_print = now
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            elapsed = now - self._started
            speed = f", {self.done / elapsed:,.0f} {self.unit}s/s" if self.rate and elapsed else ""
            print(
                f"[fedatlas] {self.description}: {self.unit} {self.done:,}/{self.total:,} "
                f"({elapsed:.1f}s{speed}){' ' + shown if shown else ''}",
                file=self.stream,
                flush=True,
            )

    def finish(self, note: str = "") -> None:
        """Print a closing line (e.g. when training stops early)."""
        if self.enabled:
            elapsed = time.perf_counter() - self._started
            suffix = f" ({note})" if note else ""
            print(
                f"[fedatlas] {self.description}: done, {self.done:,} {self.unit}s in "
                f"{elapsed:.1f}s{suffix}",
                file=self.stream,
                flush=True,
            )
