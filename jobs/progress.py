"""Progress people can read: done / total of some item (images, units, tars), rate and ETA.

On a terminal, one bar redrawn in place; otherwise (a log, a Ray job's output) a line at most
every ``interval`` seconds and at the end. ``quiet`` prints nothing. One helper for every job:

    bar = ProgressBar("audit", total=1280, unit="images")
    bar.advance(64, detail="images/unit-00003.tar")
    bar.close()
"""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    def __init__(self, label: str, total: int, unit: str = "items", interval: float = 10.0, stream=None,
                 quiet: bool = False, tty: bool | None = None, clock=time.monotonic):
        self.label, self.total, self.unit, self.interval = label, max(int(total), 0), unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._last_line = None

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before the first item."""
        elapsed = self.clock() - self.started
        if self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self, detail: str = "") -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        eta = self.eta()
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {self.done / elapsed:.2f} {self.unit}/s, "
                f"elapsed {format_seconds(elapsed)}, ETA {format_seconds(eta) if eta is not None else '?'}")
        return text + (f" [{detail}]" if detail else "")

    def advance(self, n: int = 1, detail: str = "") -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if self.quiet:
            return
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total) if self.total else 0
            print(f"\r[{'#' * filled:<{width}}] {self.line(detail)}\033[K", end="", file=self.stream, flush=True)
            return
        now = self.clock()
        if self._last_line is None or now - self._last_line >= self.interval or self.done >= self.total:
            self._last_line = now
            print(self.line(detail), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=self.stream, flush=True)
