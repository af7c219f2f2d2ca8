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


def training_summary(
    steps: int,
    tokens_per_step: int,
    flops_per_step: float,
    wall_s: float,
    first_step_s: float,
    loop_s: float,
    resumed_from: int = 0,
) -> dict[str, float | int]:
    """What one training session did and how fast. ``wall_s`` is all of it, ``loop_s``
    the steps, ``first_step_s`` the first step with its compilation; the speeds
    (tokens/s, FLOP/s from :func:`dem_jax.model.flops.train_flops`) are over the
    steps after the first, or over all of them when there is one."""
    timed_steps, timed_s = steps - 1, loop_s - first_step_s
    if timed_steps < 1 or timed_s <= 0:
        timed_steps, timed_s = steps, loop_s
    rate = timed_steps / timed_s if timed_s > 0 else 0.0
    return {
        "steps_run": steps,
        "resumed_from": resumed_from,
        "tokens": steps * tokens_per_step,
        "flops": steps * flops_per_step,
        "wall_s": round(wall_s, 3),
        "first_step_s": round(first_step_s, 3),
        "tokens_per_s": rate * tokens_per_step,
        "flops_per_s": rate * flops_per_step,
    }


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} "


def format_summary(name: str, summary: dict, metrics_path, tensorboard_dir) -> str:
    """The line that ends a training run: its speed, and where its curves are."""
    resumed = f", resumed at step {summary['resumed_from']}" if summary["resumed_from"] else ""
    return (
        f"[{name}] done: {summary['steps_run']} steps in {summary['wall_s']:.1f} s "
        f"(first step with compilation {summary['first_step_s']:.1f} s{resumed}), "
        f"{summary['tokens']:,} tokens; {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{_si(summary['flops_per_s'])}FLOP/s; metrics: {metrics_path}; TensorBoard: "
        f"tensorboard --logdir {tensorboard_dir}"
    )
