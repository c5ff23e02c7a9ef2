"""The run's plain records next to the trackers: ``metrics.jsonl`` and ``predictions_test.csv``.

``metrics.jsonl`` is a third tracker behind Accelerate's tracker API (like the TensorBoard one): one
JSON object per ``accelerator.log`` call, ``{"step": N, "wall_time": unix seconds, "<key>": value,
...}``, written and flushed line by line on the main process, so a running or crashed run can be
read (a sweep's pruning reads it while the trial runs; ``train.report`` draws it). On a resume the
lines at or after the resumed step are dropped first, as TensorBoard's ``purge_step`` does, so the
file never holds a step twice. Read it with ``read_metrics``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.tracking import GeneralTracker, on_main_process

from train.fsutil import atomic_file, atomic_write_bytes


def _plain(value: Any) -> Any:
    """A JSON value for a logged value, or None when it is not a scalar (tensors of several values)."""
    if isinstance(value, str):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, bool):
        return value
    if hasattr(value, "__float__"):
        v = float(value)
        return v if math.isfinite(v) else str(v)  # JSON has no nan/inf: "nan", "inf"
    return None


class JsonlTracker(GeneralTracker):
    """``<run_dir>/metrics.jsonl``: every scalar of every ``accelerator.log`` call, one line each."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path, purge_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.purge_step = purge_step
        self.file = None

    @on_main_process
    def start(self):
        if self.purge_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if (rec := _parse(line)) is not None and rec.get("step", -1) < self.purge_step]
            atomic_write_bytes(self.path, "".join(kept).encode())
        self.file = open(self.path, "a", buffering=1)  # line-buffered: each record reaches the file at once

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the config is in config.yaml

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        record: dict[str, Any] = {"step": step, "wall_time": time.time()}
        for key, value in values.items():
            plain = _plain(value)
            if plain is not None:
                record[key] = plain
        self.file.write(json.dumps(record) + "\n")

    @on_main_process
    def finish(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def _parse(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None  # a line torn by a kill -9
    return rec if isinstance(rec, dict) else None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order; a torn last line is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    return [rec for line in p.read_text().splitlines() if (rec := _parse(line)) is not None]


PREDICTION_COLUMNS = ["image", "true_year", "predicted_year", "abs_error_years"]


def write_predictions(path: Path, names: list[str], true: np.ndarray, predicted: np.ndarray,
                      bounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """``predictions_test.csv``: one row per test image (its file, or ``test #i`` for synthetic data);
    ``bounds``: ``{"80": (low, high), ...}`` calibrated intervals, as ``low_80, high_80, ...`` columns."""
    bounds = bounds or {}
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_COLUMNS + [f"{side}_{lv}" for lv in bounds for side in ("low", "high")])
        for i, (name, t, p) in enumerate(zip(names, true, predicted)):
            extra = [f"{b[side][i]:.2f}" for b in bounds.values() for side in (0, 1)]
            w.writerow([name, f"{t:.4f}", f"{p:.4f}", f"{abs(p - t):.4f}", *extra])
