"""What the run prints for a person: the per-epoch block of the original design and the test summary."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def _value(v: float | None) -> str:
    return "none finite yet" if v is None else f"{v:.6f}"


def epoch_block(epoch: int, epochs: int, m: dict, improved: bool, patience: int | None = None,
                bad_epochs: int = 0, best_value: float | None = None, best_epoch: int = 0,
                seconds_left: float | None = None) -> str:
    """The original design's per-epoch console block, with units, plus the early-stopping count when
    it moves (``patience`` None: early stopping is off) and the time the rest of the run should take."""
    star = "  (best so far, saved)" if improved else ""
    block = (
        f"\nEpoch [{epoch}/{epochs}] Results:{star}\n"
        f"  Train Loss: {m['train/loss']:.6f}  |  Train RMSE: {m['train/rmse']:.3f} years\n"
        f"  Val Loss:   {m['val/loss']:.6f}  |  Val RMSE:   {m['val/rmse']:.3f} years\n"
        f"  Val MAE: {m['val/mae']:.1f} years | within 5 years: {100 * m['val/acc_5y']:.1f}% | "
        f"decade: {100 * m['val/acc_decade']:.1f}%\n"
        f"  Learning Rate: {m['lr']:.2e}"
    )
    if patience is not None and bad_epochs:
        where = f" at epoch {best_epoch}" if best_epoch else ""
        block += (f"\n  Early stopping: no improvement for {bad_epochs}/{patience} epochs "
                  f"(best {_value(best_value)}{where})")
    if seconds_left is not None:
        left = f", about {duration(seconds_left)} left" if seconds_left > 0 else ""  # 0: the last epoch
        block += f"\n  Time: {duration(m['epoch_time_s'])} training this epoch{left}"
    return block


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def startup_summary(facts: dict) -> str:
    """What the run is about to do, before its first step (the way Lightning prints its model summary).
    ``facts``: the keys used below (``train.loop.startup_facts`` gathers them)."""
    f = facts
    lines = [
        f"Run:        {f['name']}  ({f['run_dir']})",
        f"Model:      {f['model']}, {_count(f['trainable'])} trainable / {_count(f['total'])} parameters, "
        f"{f['bytes'] / 2**20:.2f} MiB",
        f"Data:       {f['data']} {f['image_size']}x{f['image_size']} px: {f['n_train']:,} train / "
        f"{f['n_val']:,} val / {f['n_test']:,} test images{f['cache']}",
        f"Processes:  {f['processes']} x {f['device']}, precision {f['precision']}, {f['threads']} CPU threads each",
        f"Schedule:   {f['epochs']} epochs x {f['steps_per_epoch']:,} optimizer steps = {f['total_steps']:,} steps "
        f"(batch {f['batch']} per process, {f['accumulation']} micro-batch(es) per step){f['resume']}",
        f"Trackers:   {', '.join(f['trackers']) or 'none'}",
    ]
    for split in ("val", "test"):
        if f[f"n_{split}"] < SMALL_SPLIT:
            lines.append(f"warning: the {split} split has only {f['n_' + split]} images: its metrics will be noisy "
                         f"(RMSE over fewer than {SMALL_SPLIT} images)")
    return "\n".join(lines)


SMALL_SPLIT = 100  # below this a split's RMSE moves by several percent from image to image


def early_stop_reason(monitor: str, min_delta: float, patience: int, best_value: float | None, best_epoch: int) -> str:
    where = f" at epoch {best_epoch}" if best_epoch else ""
    return (f"{monitor} did not improve by more than {min_delta} for {patience} epochs "
            f"(best {_value(best_value)}{where})")


def print_results(r: dict) -> None:
    lines = [
        f"\nTest results (best weights from epoch {r['best_epoch']}, {r['test_samples']} images):",
        f"  Test Loss: {r['test/loss']:.6f}  |  Test RMSE: {r['test/rmse']:.3f} years  |  "
        f"Test MAE: {r['test/mae']:.3f} years",
        f"  Within 5 years: {100 * r['test/acc_5y']:.1f}%  |  Decade: {100 * r['test/acc_decade']:.1f}%",
    ]
    lines += _interval_lines(r)
    if "test_gray/mae" in r:
        lines.append(f"  Grayscale copies: MAE {r['test_gray/mae']:.3f} years, within 5 years "
                     f"{100 * r['test_gray/acc_5y']:.1f}% (colour removed)")
    lines += [
        f"  Baseline RMSE, predict the train mean:       {r['baseline/mean_rmse']:.3f} years "
        f"(CNN/baseline = {r['test/rmse_over_mean_baseline']:.2f})",
        f"  Baseline RMSE, linear on colour mean/std:    {r['baseline/colour_linear_rmse']:.3f} years "
        f"(CNN/baseline = {r['test/rmse_over_colour_linear_baseline']:.2f})",
    ]
    if "floor/rmse" in r:
        lines.append(f"  Floor, a predictor that reads the apparent age exactly: RMSE {r['floor/rmse']:.3f} years, "
                     f"MAE {r['floor/mae']:.3f} years (CNN/floor RMSE = {r['test/rmse'] / r['floor/rmse']:.2f})")
    decades = r.get("test/by_decade") or {}
    if decades:
        lines.append("  MAE by decade: " + ", ".join(f"{d} {v['mae']:.1f}" for d, v in decades.items()))
    lines.append(f"  Results: {Path(r['run_dir']) / 'results.json'}")
    print("\n".join(lines))


def _interval_lines(r: dict) -> list[str]:
    cal = r.get("calibration")
    if not cal:
        return []
    parts = [f"{round(lv * 100)}%: coverage {100 * r[f'test/coverage_{round(lv * 100)}']:.1f}%, mean width "
             f"{r[f'test/width_{round(lv * 100)}']:.1f} years" for lv in cal["levels"]]
    return [f"  Date intervals (calibrated on {cal['n']} val images): " + " | ".join(parts)]


class PlainProgress:
    """Progress for a log that is not a terminal (a file, a Slurm log): one plain line per ``percent``
    of the epoch instead of tqdm's carriage-return updates, which fill such files. ``update`` is a
    counter and a comparison, cheap enough for every step."""

    def __init__(self, total: int, initial: int, desc: str, percent: int = 10, unit: str = "batches"):
        self.total, self.n, self.start, self.desc, self.unit = total, initial, initial, desc, unit
        self.every = max(1, math.ceil(total * percent / 100))
        self.next = (initial // self.every + 1) * self.every
        self.postfix = ""
        self.t0 = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self.next:
            self.next += self.every
            rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            print(f"{self.desc}: {100 * self.n // self.total:3d}% ({self.n}/{self.total} {self.unit}, {rate:.1f}/s)"
                  f"{self.postfix}", flush=True)

    def set_postfix(self, loss: str) -> None:
        self.postfix = f", loss {loss}"

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, desc: str, show: bool, unit: str = "batches"):
    """tqdm on a terminal, ``PlainProgress`` lines when stderr is redirected, nothing when not shown."""
    if show and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc, unit=unit)
    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not show, unit=unit[:-1] or unit)
