"""Progress reporting for long loops: one refreshed line on a terminal, periodic
lines in logs (CI, files)."""

from __future__ import annotations

import sys
import time


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(done, **fields)`` prints ``desc done/total [fields] elapsed<eta``."""

    def __init__(self, total: int, desc: str, start: int = 0, every: int = 1, stream=None):
        self.total, self.desc, self.every = total, desc, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start_done, self.start_time = start, time.perf_counter()

    def update(self, done: int, force: bool = False, **fields) -> None:
        """Report that ``done`` of ``total`` units are finished."""
        if not (force or self.tty or done % self.every == 0 or done == self.total):
            return
        elapsed = time.perf_counter() - self.start_time
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        parts = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
        )
        line = (
            f"{self.desc} {done}/{self.total} {parts} [{_fmt_seconds(elapsed)}<{_fmt_seconds(eta)}]"
        )
        if self.tty:
            end = "\n" if done >= self.total else ""
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (ends a refreshed line first)."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
