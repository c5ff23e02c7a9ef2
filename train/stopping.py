"""Stopping on purpose: signals (preemption), a wall-clock limit, and agreeing on it across processes.

A signal handler only sets a flag; the loop looks at it at "agreement points" (log steps and epoch
ends), where every process reaches the same line. With several processes the flags are summed in
one small all-reduce there, so a signal delivered to one process only still stops all of them at
the same step (no hang), without a collective on every step. A single process looks every step.
"""

from __future__ import annotations

import signal
import time

import torch

from train.errors import CleanExit

EXIT_STOPPED = 3  # documented in main.py and docs/CHECKPOINTS.md: state saved, resume with --resume auto


class Stopped(CleanExit):
    """The run stopped early on purpose after saving a full state."""

    exit_code = EXIT_STOPPED
    prefix = ""


class NonFiniteLoss(CleanExit):
    """``training.on_nonfinite: stop`` found NaN/inf; nothing non-finite was saved."""

    exit_code = 1


class StopSignals:
    """Turns SIGTERM / SIGINT / SIGUSR1 into a flag; a second SIGINT aborts at once."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: abort now, without saving
        if not self.received:
            print(f"\n{name} received: finishing this step, saving a full state, then exiting ({EXIT_STOPPED})", flush=True)
        self.received = self.received or name


class TimeLimit:
    """``training.max_time``: stop while there is still time to save.

    The margin is twice the longest gap seen between two agreement points plus twice the last
    state-save time, so the stop lands before the limit even though it is only checked there.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()
        self._last_check = self.start
        self.longest_gap = 0.0
        self.last_save = 0.0

    def nearly_up(self) -> bool:
        if self.seconds is None:
            return False
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - self._last_check)
        self._last_check = now
        return now - self.start + 2 * self.longest_gap + 2 * self.last_save >= self.seconds


def agree(accelerator, values: list[torch.Tensor | float]) -> list[float]:
    """Sum small per-process values over all processes in one collective (a host sync point)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(()) for v in values])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "sum")
    return t.tolist()
