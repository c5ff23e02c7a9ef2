"""Stopping on purpose and on failure: signals (preemption), a wall-clock limit, the non-finite guard.

A signal handler only sets a flag; the loop looks at it at "agreement points" (log steps and epoch
ends), where every process reaches the same line. With several processes the flags are summed in
one small all-reduce there, so a signal delivered to one process only still stops all of them at
the same step (no hang), without a collective on every step. A single process looks every step.

``StopControl`` is the whole protocol in one object: the loop calls ``at_log_step``, ``each_step``
and ``at_epoch_end``, each of which returns the stop reason (``"signal"``, ``"max_time"`` or None),
and ``stopped`` turns a reason into the ``Stopped`` exit after the state was saved.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from train.errors import EXIT_STOPPED, Stopped
from train.redaction import redact_text


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
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: abort now, without saving
        if not self.received:
            print(f"\n{name} received: finishing this step, saving a full state, then exiting ({EXIT_STOPPED})",
                  flush=True)
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


def sum_over_processes(accelerator, values: list[torch.Tensor | float]) -> list[float]:
    """Sum small per-process values over all processes in one all-reduce (a host sync point)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(()) for v in values])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, "sum")
    return t.tolist()


def all_finite(accelerator, model: torch.nn.Module, sums: torch.Tensor) -> bool:
    """True when the epoch's loss sums and every weight are finite on every process."""
    local = torch.isfinite(sums).all() & torch.stack([torch.isfinite(t).all() for t in model.parameters()]).all()
    return sum_over_processes(accelerator, [~local])[0] == 0


def _reason(signalled: float | bool, time_up: float | bool) -> str | None:
    return "signal" if signalled else "max_time" if time_up else None


class StopControl:
    """Signals and the time limit, checked at the loop's agreement points; see the module docstring.

    ``max_time``: the config's ``training.max_time`` text (None: no limit) and its seconds.
    ``run_dir`` and ``run_name`` go into the resume command the stop prints.
    """

    def __init__(self, accelerator, max_time: str | None, max_time_s: float | None, run_dir: Path, run_name: str):
        self.accelerator = accelerator
        self.signals = StopSignals()
        self.time_limit = TimeLimit(max_time_s)
        self.max_time, self.run_dir, self.run_name = max_time, run_dir, run_name

    def __enter__(self) -> "StopControl":
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    def elapsed(self) -> float:
        return time.monotonic() - self.time_limit.start

    def record_save(self, seconds: float) -> None:
        """A full state took ``seconds`` to write: the time limit keeps room for the next one."""
        self.time_limit.last_save = seconds

    def at_log_step(self, loss: torch.Tensor, nonfinite: torch.Tensor) -> tuple[float, str | None, bool]:
        """One collective for the log line, the stop flags and the finiteness check:
        ``(loss summed over processes, stop reason, any process non-finite)``."""
        loss_sum, signalled, time_up, bad = sum_over_processes(
            self.accelerator, [loss, self.signals.received is not None, self.time_limit.nearly_up(), nonfinite]
        )
        return loss_sum, _reason(signalled, time_up), bool(bad)

    def each_step(self) -> str | None:
        """Between log steps, with one process only (no collective to agree in)."""
        return _reason(self.signals.received, self.time_limit.nearly_up())

    def at_epoch_end(self, finished: bool) -> str | None:
        """The epoch-end agreement; a time limit no longer matters once training is over."""
        signalled, time_up = sum_over_processes(
            self.accelerator, [self.signals.received is not None, self.time_limit.nearly_up()]
        )
        return _reason(signalled, time_up and not finished)

    def stopped(self, reason: str, epoch: int, global_step: int, state_dir: Path) -> Stopped:
        """The exit after a stop whose state is saved. The main process prints the lines once
        before any process exits: torchrun ends the other workers as soon as one exits non-zero,
        which could otherwise swallow them."""
        lines = self.message(reason, epoch, global_step, state_dir)
        if self.accelerator.is_main_process:
            print("\n".join(lines), file=sys.stderr, flush=True)
        self.accelerator.wait_for_everyone()
        return Stopped(lines, printed=True)

    def message(self, reason: str, epoch: int, global_step: int, state_dir: Path) -> list[str]:
        if reason == "signal":
            why = f"{self.signals.received or 'a signal to another process'} received"
        else:
            why = f"training.max_time ({self.max_time}) nearly reached"
        launcher = "accelerate launch [same launcher options]" if "LOCAL_RANK" in os.environ else "python"
        return [
            f"Stopped: {why}; full state saved at epoch {epoch}, step {global_step} in {state_dir}",
            # Redacted: a secret given on the command line is not echoed (put it back when you run it).
            f"Resume with: {launcher} train/main.py {redact_text(resume_arguments(sys.argv[1:]))} "
            f"experiment.name={self.run_name} --resume auto",
        ]


def resume_arguments(argv: list[str]) -> str:
    """This run's command-line arguments without ``--resume`` and ``experiment.name`` (the resume
    command adds its own), quoted for a shell."""
    kept, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a in ("--resume", "--restart"):
            skip_next = a == "--resume"
        elif not a.startswith(("--resume=", "experiment.name=")):
            kept.append(a)
    return " ".join(shlex.quote(a) for a in kept)
