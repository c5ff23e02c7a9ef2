"""``report.html``: one run (or several side by side) as a page of figures and facts, from its files alone.

Everything comes from the run directory: ``metrics.jsonl`` (the curves), ``results.json`` (absent when
the run stopped before testing), ``predictions_test.csv`` (the test figures), ``config.yaml`` (the
settings, and the git commit and library versions in its header) and the newest state's
``progress.json`` (where a stopped run stands). The page is one self-contained HTML file: figures as
base64 PNGs, inline CSS, no script and no network, so it opens from disk, from a mail or an archive.

    python -m train.report runs/my-run                      # -> runs/my-run/report.html
    python -m train.report runs/a runs/b --output ab.html   # overlaid curves, results side by side,
                                                            # the config keys that differ

The trainer writes ``<run_dir>/report.html`` at the end of every run (and when it stops to be resumed)
through ``train.loop.publish_report``; docs/REPORT.md describes the page. Figures are drawn on
matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, no pyplot): no display is needed,
and no global backend or figure list of the calling process is touched. matplotlib is imported only
when a figure is drawn, so ``import train.report`` and the readers work without it.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from train.errors import UserError, run_cli
from train.fsutil import atomic_write_text
from train.records import read_metrics

FIGURE_SIZE = (7.0, 4.0)  # inches; at 100 dpi a 700 x 400 PNG
DPI = 100
WORST_ROWS = 10
THUMBNAIL_PX = 72
NOT_COMPARED = {"experiment.name"}  # the run's name heads its column in the comparison already
RESUME_NOTE = "stopped before testing: resume with --resume auto"


# --------------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A logged value as a float (``"nan"``/``"inf"`` are how metrics.jsonl writes non-finite ones)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def read_config(run_dir: Path) -> tuple[dict[str, str], dict]:
    """``(header, config)`` of ``config.yaml``: the ``# key: value`` lines at its top (git commit,
    python and library versions) and the resolved config; both empty when the file is missing."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}, {}
    text = path.read_text(encoding="utf-8")
    header = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].strip().partition(": ")
        if sep and key and " " not in key:
            header[key] = value.strip()
    config = yaml.safe_load(text)
    return header, config if isinstance(config, dict) else {}


def read_results(run_dir: Path) -> dict | None:
    """``results.json``, or None when the run has not been tested (it stopped before, or is running)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return results if isinstance(results, dict) else None


def read_progress(run_dir: Path) -> dict | None:
    """The newest state's ``progress.json`` (epoch, step, batches done), or None without a state."""
    for path in sorted((Path(run_dir) / "checkpoints" / "state").glob("step_*/progress.json"), reverse=True):
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(progress, dict):
            return {**progress, "state_dir": str(path.parent)}
    return None


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"training.optimizer.lr": 0.002, ...}``: dotted keys as the command line's overrides use;
    a list is one value."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


@dataclass
class Curves:
    """What ``metrics.jsonl`` holds, as arrays: per epoch (``epochs`` and ``per_epoch[key]``, NaN
    where an epoch lacks the key) and per log step (``per_step[key] = (steps, values)``)."""

    epochs: np.ndarray
    per_epoch: dict[str, np.ndarray]
    per_step: dict[str, tuple[np.ndarray, np.ndarray]]
    last_step: int | None = None
    stopped_epoch: int | None = None  # early stopping
    stop_reason: str | None = None
    best_epoch: int | None = None

    @property
    def steps_per_epoch(self) -> float | None:
        """Optimizer steps per epoch from the epoch records' steps (to draw step data on the epoch axis)."""
        steps = self.per_epoch.get("_step")
        if steps is None or not len(steps) or not self.epochs[-1]:
            return None
        return float(steps[-1]) / float(self.epochs[-1])

    def epoch_of(self, steps: np.ndarray) -> np.ndarray:
        spe = self.steps_per_epoch
        return np.asarray(steps, dtype=float) / spe if spe else np.asarray(steps, dtype=float)

    @property
    def x_label(self) -> str:
        return "epoch" if self.steps_per_epoch else "optimizer step"


def curve_data(run_dir: Path, monitor: str = "val/rmse") -> Curves:
    """The curves of ``<run_dir>/metrics.jsonl`` (a resumed epoch's later record wins)."""
    epoch_records: dict[int, dict] = {}
    step_points: dict[str, dict[int, float]] = {}
    stopped_epoch, reason, last_step = None, None, None
    for rec in read_metrics(Path(run_dir) / "metrics.jsonl"):
        step = rec.get("step")
        last_step = step if isinstance(step, int) and (last_step is None or step > last_step) else last_step
        if _num(rec.get("epoch")) is not None:
            epoch_records[int(_num(rec["epoch"]))] = {**rec, "_step": step}
        elif "early_stopping/stopped_epoch" in rec:
            stopped_epoch = int(_num(rec["early_stopping/stopped_epoch"]) or 0)
            reason = rec.get("early_stopping/reason")
        elif isinstance(step, int):
            for key, value in rec.items():
                if (key == "train/loss_step" or key == "lr" or key.startswith("lr/")) and _num(value) is not None:
                    step_points.setdefault(key, {})[step] = _num(value)
    epochs = np.array(sorted(epoch_records), dtype=int)
    keys = {k for rec in epoch_records.values() for k in rec if k not in ("step", "wall_time")}
    per_epoch = {k: np.array([_num(epoch_records[e].get(k)) for e in epochs], dtype=float) for k in keys}
    per_step = {k: (np.array(sorted(p), dtype=float), np.array([p[s] for s in sorted(p)], dtype=float))
                for k, p in step_points.items()}
    curves = Curves(epochs, per_epoch, per_step, last_step, stopped_epoch, reason)
    curves.best_epoch = _best_epoch(curves, "best/" + monitor.split("/")[-1])
    return curves


def _best_epoch(curves: Curves, best_key: str) -> int | None:
    """The first epoch whose running best equals the final best (``best/<metric>`` per epoch)."""
    best = curves.per_epoch.get(best_key)
    if best is None or not np.isfinite(best).any():
        return None
    final = best[np.isfinite(best)][-1]
    return int(curves.epochs[np.flatnonzero(best == final)[0]])


@dataclass
class Predictions:
    """``predictions_test.csv``: one entry per test image, and ``intervals[level] = (low, high)`` for
    each ``low_<level>``/``high_<level>`` column pair (e.g. ``low_80``, ``high_80``)."""

    images: list[str]
    true: np.ndarray
    predicted: np.ndarray
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def error(self) -> np.ndarray:
        """Predicted minus true year (positive: the model dates the image too late)."""
        return self.predicted - self.true


def read_predictions(run_dir: Path) -> Predictions | None:
    """The test predictions, or None when the run has none. The one reader the test figures use."""
    path = Path(run_dir) / "predictions_test.csv"
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []

    def column(name: str) -> np.ndarray:
        return np.array([_num_or_nan(r.get(name)) for r in rows], dtype=float)

    levels = [m.group(1) for c in columns if (m := re.fullmatch(r"low_(\w+)", c)) and f"high_{m.group(1)}" in columns]
    intervals = {level: (column(f"low_{level}"), column(f"high_{level}")) for level in levels}
    return Predictions([r.get("image", "") for r in rows], column("true_year"), column("predicted_year"), intervals)


def _num_or_nan(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunFiles:
    """One run directory, read once."""

    run_dir: Path
    name: str
    header: dict[str, str]
    config: dict
    results: dict | None
    progress: dict | None
    curves: Curves
    predictions: Predictions | None

    @property
    def tested(self) -> bool:
        return self.results is not None


def check_run_dir(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be reported on, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return f"run directory '{run_dir}' does not exist"
    if not (run_dir / "metrics.jsonl").is_file():
        return (f"'{run_dir}' has no metrics.jsonl: not a run directory, or a run from before metrics.jsonl "
                "(or with logging.jsonl=false); its curves are in its tensorboard/ folder")
    return None


def load_run(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    problem = check_run_dir(run_dir)
    if problem:
        raise UserError(problem)
    header, config = read_config(run_dir)
    monitor = flatten(config).get("training.early_stopping.monitor") or "val/rmse"
    name = str(flatten(config).get("experiment.name") or run_dir.name)
    curves = curve_data(run_dir, monitor)
    results = read_results(run_dir)
    if results and isinstance(results.get("best_epoch"), int) and results["best_epoch"] > 0:
        curves.best_epoch = results["best_epoch"]
    return RunFiles(run_dir, name, header, config, results, read_progress(run_dir), curves,
                    read_predictions(run_dir))


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def _new_figure(ncols: int = 1):
    """A ``Figure`` on an Agg canvas and its axes (one, or a row of ``ncols``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError(f"drawing the report needs matplotlib ({e}): pip install 'matplotlib>=3.7'") from None
    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _mark_events(ax, run: RunFiles) -> None:
    """The best epoch, an early stop, and for a run that stopped before testing, where it stopped."""
    c = run.curves
    if c.best_epoch and c.steps_per_epoch:
        ax.axvline(c.best_epoch, color="tab:green", ls="--", lw=1.2, label=f"best epoch {c.best_epoch}")
    if c.stopped_epoch and c.steps_per_epoch:
        ax.axvline(c.stopped_epoch, color="tab:red", ls=":", lw=1.5, label=f"early stop (epoch {c.stopped_epoch})")
    if not run.tested:
        step = (run.progress or {}).get("global_step", c.last_step)
        if step:
            ax.axvline(float(c.epoch_of(np.array([step]))[0]), color="tab:orange", ls="-.", lw=1.5,
                       label=f"stopped at step {step}, not tested")


def _finish_axes(ax, title: str, x_label: str, y_label: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 4:  # beside the axes, where it hides no curve
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif handles:
        ax.legend(fontsize=8, loc="best")


def figure_loss(run: RunFiles) -> bytes:
    """Train and validation loss per epoch (and the logged per-step train loss, faint), one axis."""
    c = run.curves
    fig, ax = _new_figure()
    if "train/loss_step" in c.per_step:
        steps, values = c.per_step["train/loss_step"]
        ax.plot(c.epoch_of(steps), values, color="tab:blue", alpha=0.3, lw=1, label="train loss (log steps)")
    for key, colour in (("train/loss", "tab:blue"), ("val/loss", "tab:orange")):
        if key in c.per_epoch and c.steps_per_epoch:
            ax.plot(c.epochs, c.per_epoch[key], "o-", color=colour, ms=4, label=key.replace("/", " "))
    if not len(c.epochs) and "train/loss_step" not in c.per_step:
        ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    _mark_events(ax, run)
    _finish_axes(ax, f"{run.name}: loss", c.x_label, "loss (normalized years)")
    return _png(fig)


def figure_error_years(run: RunFiles) -> bytes:
    """Validation RMSE and MAE (and train RMSE) in years per epoch; test RMSE and the baselines as lines."""
    c = run.curves
    fig, ax = _new_figure()
    styles = (("train/rmse", "tab:blue", "-"), ("val/rmse", "tab:orange", "-"), ("val/mae", "tab:orange", "--"))
    for key, colour, ls in styles:
        if key in c.per_epoch:
            ax.plot(c.epochs, c.per_epoch[key], marker="o", ms=4, color=colour, ls=ls, label=key.replace("/", " "))
    results = run.results or {}
    lines = (("test/rmse", "test RMSE", "tab:purple"), ("baseline/mean_rmse", "mean-year baseline", "grey"),
             ("baseline/colour_linear_rmse", "colour baseline", "black"))
    for key, label, colour in lines:
        if isinstance(results.get(key), (int, float)):
            ax.axhline(results[key], color=colour, ls=":", lw=1.2, label=f"{label} {results[key]:.2f}")
    if not len(c.epochs):
        ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center", transform=ax.transAxes)
    else:
        _mark_events(ax, run)
    _finish_axes(ax, f"{run.name}: error in years", "epoch", "years")
    return _png(fig)


def figure_lr(run: RunFiles) -> bytes:
    """The learning rate at each log step; every parameter group whose lr differs from ``lr``."""
    c = run.curves
    fig, ax = _new_figure()
    base = c.per_step.get("lr")
    if base is not None:
        ax.plot(c.epoch_of(base[0]), base[1], color="tab:blue", label="lr")
    for key, (steps, values) in sorted(c.per_step.items()):
        if key.startswith("lr/") and (base is None or len(values) != len(base[1]) or not np.allclose(values, base[1])):
            ax.plot(c.epoch_of(steps), values, lw=1, label=key)
    if not c.per_step.get("lr"):
        ax.text(0.5, 0.5, "no learning rate logged yet", ha="center", va="center", transform=ax.transAxes)
    _mark_events(ax, run)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish_axes(ax, f"{run.name}: learning rate", c.x_label, "learning rate")
    return _png(fig)


def figure_scatter(run: RunFiles, p: Predictions) -> bytes:
    """Predicted against true year for every test image, with the identity line."""
    fig, ax = _new_figure()
    ax.scatter(p.true, p.predicted, s=12, alpha=0.7, color="tab:blue", label=f"{len(p.true)} test images")
    finite = np.concatenate([p.true, p.predicted])
    finite = finite[np.isfinite(finite)]
    if len(finite):
        lo, hi = float(finite.min()), float(finite.max())
        pad = max(1.0, 0.03 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, ls="--", label="predicted = true")
    _finish_axes(ax, f"{run.name}: test predictions", "true year", "predicted year")
    return _png(fig)


def figure_decades(run: RunFiles, p: Predictions) -> bytes:
    """MAE per decade of the true year, with the number of test images on each bar."""
    from train.metrics import by_decade

    fig, ax = _new_figure()
    ok = np.isfinite(p.true) & np.isfinite(p.predicted)
    decades = by_decade(p.true[ok], p.predicted[ok])
    xs = [f"{d}s" for d in decades]
    bars = ax.bar(xs, [v["mae"] for v in decades.values()], color="tab:blue", alpha=0.8)
    for bar, v in zip(bars, decades.values()):
        ax.annotate(f"n={v['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    _finish_axes(ax, f"{run.name}: test MAE by decade of the true year", "decade", "MAE (years)")
    return _png(fig)


def figure_residuals(run: RunFiles, p: Predictions) -> bytes:
    """Histogram of predicted minus true year."""
    fig, ax = _new_figure()
    err = p.error[np.isfinite(p.error)]
    ax.hist(err, bins=min(40, max(10, len(err) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", lw=1)
    if len(err):
        ax.axvline(float(err.mean()), color="tab:red", ls="--", lw=1.2,
                   label=f"mean {err.mean():+.2f}, sd {err.std():.2f} years")
    _finish_axes(ax, f"{run.name}: residuals (predicted - true)", "years", "test images")
    return _png(fig)


def interval_stats(p: Predictions) -> dict[str, dict[str, float]]:
    """Per interval level: nominal coverage (``80`` -> 0.8), the share of true years inside, mean width."""
    out = {}
    for level, (low, high) in p.intervals.items():
        ok = np.isfinite(low) & np.isfinite(high) & np.isfinite(p.true)
        nominal = _num(level)
        inside = (low[ok] <= p.true[ok]) & (p.true[ok] <= high[ok])
        out[level] = {"nominal": nominal / 100 if nominal and nominal > 1 else (nominal or math.nan),
                      "coverage": float(inside.mean()) if ok.any() else math.nan,
                      "width": float((high[ok] - low[ok]).mean()) if ok.any() else math.nan}
    return out


def figure_intervals(run: RunFiles, p: Predictions) -> bytes:
    """Empirical coverage against the nominal level, and mean width, per prediction-interval level."""
    stats = interval_stats(p)
    fig, (cov, width) = _new_figure(ncols=2)
    labels = list(stats)
    xs = np.arange(len(labels))
    cov.bar(xs - 0.2, [s["coverage"] for s in stats.values()], width=0.4, color="tab:blue", label="observed")
    cov.bar(xs + 0.2, [s["nominal"] for s in stats.values()], width=0.4, color="lightgrey", label="nominal")
    cov.set_xticks(xs, labels)
    cov.set_ylim(0, 1.05)
    width.bar(xs, [s["width"] for s in stats.values()], color="tab:orange")
    width.set_xticks(xs, labels)
    _finish_axes(cov, "interval coverage", "level", "share of true years inside")
    _finish_axes(width, "interval width", "level", "mean width (years)")
    fig.suptitle(f"{run.name}: prediction intervals", fontsize=11)
    return _png(fig)


def _figures_of(run: RunFiles) -> dict[str, bytes]:
    figures = {"loss": figure_loss(run), "error_years": figure_error_years(run), "lr": figure_lr(run)}
    p = run.predictions
    if p is not None and len(p.true):
        figures.update(scatter=figure_scatter(run, p), mae_by_decade=figure_decades(run, p),
                       residuals=figure_residuals(run, p))
        if p.intervals:
            figures["intervals"] = figure_intervals(run, p)
    return figures


def run_figures(run_dir: Path) -> dict[str, bytes]:
    """PNG bytes per figure of one run: ``loss``, ``error_years``, ``lr``; with test predictions also
    ``scatter``, ``mae_by_decade``, ``residuals``; with interval columns ``intervals``."""
    return _figures_of(load_run(run_dir))


def compare_figures(runs: list[RunFiles]) -> dict[str, bytes]:
    """Several runs overlaid: validation RMSE, and train (solid) and validation (dashed) loss, per epoch."""
    labels = _labels(runs)
    fig, ax = _new_figure()
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = run.curves
        if "val/rmse" in c.per_epoch:
            line, = ax.plot(c.epochs, c.per_epoch["val/rmse"], "o-", ms=3, color=f"C{i % 10}", label=label)
            if c.best_epoch in set(c.epochs.tolist()):
                ax.plot([c.best_epoch], [c.per_epoch["val/rmse"][list(c.epochs).index(c.best_epoch)]], "*",
                        ms=12, color=line.get_color())
    _finish_axes(ax, "validation RMSE (star: best epoch)", "epoch", "years")
    rmse = _png(fig)
    fig, ax = _new_figure()
    for i, (run, label) in enumerate(zip(runs, labels)):
        c = run.curves
        for key, ls in (("train/loss", "-"), ("val/loss", "--")):
            if key in c.per_epoch:
                ax.plot(c.epochs, c.per_epoch[key], ls=ls, marker="o", ms=3, color=f"C{i % 10}",
                        label=f"{label} {key.split('/')[0]}")
    _finish_axes(ax, "loss (solid: train, dashed: validation)", "epoch", "loss (normalized years)")
    return {"compare_val_rmse": rmse, "compare_loss": _png(fig)}


def _labels(runs: list[RunFiles]) -> list[str]:
    """Run names; the directory path where two runs share a name."""
    names = [r.name for r in runs]
    return [str(r.run_dir) if names.count(r.name) > 1 else r.name for r in runs]


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1180px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f4f4f6; padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.note { background: #fff4e0; border-left: 4px solid #f0a020; padding: 8px 12px; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; flex: 1 1 560px; max-width: 700px; }
img.figure { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
img.thumb { display: block; } .best { font-weight: bold; }
#results-compare td:first-child { white-space: nowrap; }
.grid { display: flex; flex-wrap: wrap; gap: 24px; } .grid > div { flex: 1 1 340px; }
"""

FIGURE_CAPTIONS = {
    "loss": "Train and validation loss per epoch (faint: the train loss at each log step).",
    "error_years": "Error in years per epoch; the test RMSE of the best weights and the two baselines as lines.",
    "lr": "Learning rate per log step.",
    "scatter": "Predicted against true year, one point per test image (predictions_test.csv).",
    "mae_by_decade": "Test MAE by decade of the true year (n: test images in the decade).",
    "residuals": "Predicted minus true year over the test set.",
    "intervals": "Prediction intervals: observed coverage against the nominal level, and mean width.",
    "compare_val_rmse": "Validation RMSE of every run (star: its best epoch).",
    "compare_loss": "Train (solid) and validation (dashed) loss of every run.",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.5g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _config_value(value: Any) -> str:
    """A config value as an override would spell it (``null``, ``true``, ``[8, 16]``)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _fmt(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None, table_id: str | None = None,
           row_keys: list[str] | None = None) -> str:
    """An HTML table of already-escaped cell strings; ``row_keys`` become each row's ``data-key``."""
    out = [f'<table id="{_e(table_id)}">' if table_id else "<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for i, row in enumerate(rows):
        key = f' data-key="{_e(row_keys[i])}"' if row_keys else ""
        cells = "".join(f"<th>{row[0]}</th>" if j == 0 and not head else f"<td>{c}</td>" for j, c in enumerate(row))
        out.append(f"<tr{key}>{cells}</tr>")
    return "\n".join(out + ["</table>"])


def _img(name: str, png: bytes, css_class: str = "figure", **data: Any) -> str:
    extra = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<img class="{css_class}" alt="{_e(name)}" data-figure="{_e(name)}"{extra} src="{src}">'


def _figures_html(figures: dict[str, bytes], run: RunFiles | None = None) -> str:
    items = []
    for name, png in figures.items():
        data = {"points": len(run.predictions.true)} if run and name == "scatter" and run.predictions else {}
        items.append(f"<figure>{_img(name, png, **data)}<figcaption>{_e(FIGURE_CAPTIONS.get(name, name))}"
                     "</figcaption></figure>")
    return '<div class="figures">\n' + "\n".join(items) + "\n</div>"


def _page(title: str, subtitle: str, body: list[str]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{_e(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
            f"<p class=\"sub\">{subtitle} · written {generated} by <code>python -m train.report</code></p>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


KEY_CONFIG = [
    ("model", ["model.name", "model.channels", "model.hidden", "model.dropout", "model.norm"]),
    ("optimizer", ["training.optimizer.name", "training.optimizer.lr", "training.optimizer.weight_decay"]),
    ("loss", ["training.loss"]),
    ("batch", ["data.batch_size", "training.gradient_accumulation_steps"]),
    ("schedule", ["training.scheduler.name", "training.scheduler.warmup_epochs", "training.scheduler.min_lr_ratio"]),
    ("epochs", ["training.epochs", "training.early_stopping.enabled", "training.early_stopping.monitor",
                "training.early_stopping.patience"]),
    ("seed", ["experiment.seed"]),
    ("data", ["data.kind", "data.image_size", "data.synthetic.num_train", "data.synthetic.num_val",
              "data.synthetic.num_test", "data.manifest.path", "data.manifest.val_fraction",
              "data.manifest.test_fraction"]),
    ("precision", ["training.mixed_precision", "training.compile", "training.channels_last"]),
]

RESULT_ROWS = [
    ("test/rmse", "test RMSE (years)"), ("test/mae", "test MAE (years)"), ("test/loss", "test loss"),
    ("baseline/mean_rmse", "baseline RMSE: predict the train mean"),
    ("baseline/colour_linear_rmse", "baseline RMSE: linear on colour mean/std"),
    ("test/rmse_over_mean_baseline", "test RMSE / mean baseline"),
    ("test/rmse_over_colour_linear_baseline", "test RMSE / colour baseline"),
    ("best_epoch", "best epoch"), ("epochs_run", "epochs run"), ("stopped_early", "stopped early"),
    ("global_step", "optimizer steps"), ("test_samples", "test images"), ("val_samples", "validation images"),
]


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def reproduce_command(run: RunFiles) -> str:
    """The command that trains the same config again, under a new name (a run directory is never reused)."""
    return f"python train/main.py --config {_q(run.run_dir / 'config.yaml')} experiment.name={_q(run.name + '-rerun')}"


def resume_command(run: RunFiles) -> str:
    return f"python train/main.py --config {_q(run.run_dir / 'config.yaml')} --resume auto"


def _config_rows(run: RunFiles) -> list[tuple[str, str]]:
    flat = flatten(run.config)
    rows = []
    for label, keys in KEY_CONFIG:
        if label == "data":
            kind = flat.get("data.kind")
            keys = [k for k in keys if not k.startswith("data.") or k.count(".") == 1 or k.startswith(f"data.{kind}.")]
        shown = [f"<code>{_e(k)}={_e(_config_value(flat[k]))}</code>" for k in keys if k in flat]
        if shown:
            rows.append((_e(label), " ".join(shown)))
    return rows


def _results_rows(results: dict, monitor: str) -> list[tuple[str, str]]:
    best_key = "best/" + monitor.split("/")[-1]
    order = RESULT_ROWS[:7] + [(best_key, f"best {monitor} (validation)")] + RESULT_ROWS[7:]
    return [(_e(label), _e(_fmt(results[key]))) for key, label in order if key in results]


def _hardware_rows(run: RunFiles) -> list[tuple[str, str]]:
    r, p, c = run.results or {}, run.progress or {}, run.curves
    epochs_cfg = flatten(run.config).get("training.epochs")
    epoch_times = r.get("epoch_times_s") or [t for t in c.per_epoch.get("epoch_time_s", []) if np.isfinite(t)]
    rows = [
        ("processes", _fmt(r.get("num_processes", p.get("num_processes")))),
        ("mixed precision", _fmt(r["mixed_precision"]) if "mixed_precision" in r
         else f"training.mixed_precision={flatten(run.config).get('training.mixed_precision')} (config)"),
        ("training time", _duration(r["train_time_s"]) if "train_time_s" in r
         else f"{_duration(float(sum(epoch_times)))} in finished epochs (not tested)" if epoch_times
         else "no epoch finished"),
        ("epochs", f"{_fmt(r.get('epochs_run', len(c.epochs)))} of {_fmt(epochs_cfg)}"),
    ]
    if epoch_times:
        mean = _duration(float(np.mean(epoch_times)))
        rows.append(("time per epoch", f"first {_duration(epoch_times[0])}, mean {mean} (train + validation + logs)"))
    return [(_e(k), _e(v)) for k, v in rows]


def _stop_note(run: RunFiles) -> str:
    if not run.tested:
        p = run.progress or {}
        where = (f" The newest full state is at epoch {_e(p.get('epoch'))}, step {_e(p.get('global_step'))} "
                 f"(<code>{_e(p.get('state_dir'))}</code>)." if p else " No full state was saved yet.")
        return (f'<div class="note" id="stopped-note"><b>No results.json: this run {RESUME_NOTE}</b> '
                f"(or it is still running).{where} The curves below are what it logged so far. "
                f"<pre>{_e(resume_command(run))}</pre></div>")
    if run.curves.stopped_epoch:
        return (f'<div class="note" id="early-stop-note">Early stopping at epoch {run.curves.stopped_epoch}: '
                f"{_e(run.curves.stop_reason or '')}</div>")
    return ""


def _thumbnail(image: str) -> bytes | None:
    """A small PNG of a manifest image, or None (synthetic data, a missing or unreadable file)."""
    path = Path(image)
    try:
        if not path.is_file():
            return None
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # any decoding problem: the row stays, without its picture
        return None


def _worst_html(p: Predictions) -> str:
    err = np.where(np.isfinite(p.error), np.abs(p.error), np.inf)
    worst = np.argsort(-err, kind="stable")[:WORST_ROWS]
    thumbs = {int(i): _thumbnail(p.images[i]) for i in worst}
    with_thumbs = any(t is not None for t in thumbs.values())
    rows = []
    for rank, i in enumerate(worst, start=1):
        name = p.images[i]
        cells = [str(rank), f'<span title="{_e(name)}">{_e(Path(name).name or name)}</span>',
                 _e(f"{p.true[i]:.1f}"), _e(f"{p.predicted[i]:.1f}"), _e(f"{p.error[i]:+.1f}")]
        if with_thumbs:
            t = thumbs[int(i)]
            cells.append(_img(Path(name).name, t, css_class="thumb") if t else "")
        rows.append(tuple(cells))
    head = ("#", "image", "true year", "predicted", "error (years)") + (("image",) if with_thumbs else ())
    return _table(rows, head, table_id="worst-predictions")


def _run_body(run: RunFiles, figures: dict[str, bytes]) -> list[str]:
    monitor = flatten(run.config).get("training.early_stopping.monitor") or "val/rmse"
    body = [_stop_note(run), "<h2>Reproduce</h2>", f"<pre>{_e(reproduce_command(run))}</pre>"]
    facts = ['<div class="grid"><div><h2>Results</h2>']
    facts.append(_table(_results_rows(run.results, monitor), table_id="results") if run.tested
                 else f"<p>Not tested: {RESUME_NOTE}.</p>")
    facts += ["<h2>Hardware and time</h2>", _table(_hardware_rows(run), table_id="hardware"), "</div><div>"]
    facts += ["<h2>Config</h2>", _table(_config_rows(run), table_id="config")]
    provenance = [(_e(k), f"<code>{_e(v)}</code>") for k, v in run.header.items()]
    facts += ["<h2>Code and libraries</h2>", _table(provenance + [("run directory", f"<code>{_e(run.run_dir)}</code>")],
                                                    table_id="provenance"), "</div></div>"]
    body += facts + ["<h2>Figures</h2>", _figures_html(figures, run)]
    if run.predictions is not None and len(run.predictions.true):
        body += [f"<h2>Worst {min(WORST_ROWS, len(run.predictions.true))} test predictions</h2>",
                 _worst_html(run.predictions)]
    return body


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # a key one run's config lacks (an older or newer trainer), unlike a key set to null


def config_differences(runs: list[RunFiles]) -> dict[str, list[Any]]:
    """``{dotted key: [value per run]}`` for every config key whose values are not all equal (a key one
    config lacks, ``ABSENT`` there, counts as different); ``experiment.name`` is left out, it heads
    each run's column."""
    flats = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f} - NOT_COMPARED)
    diff = {}
    for key in keys:
        values = [f.get(key, ABSENT) for f in flats]
        if any(v != values[0] for v in values[1:]):
            diff[key] = values
    return diff


def _compare_body(runs: list[RunFiles]) -> list[str]:
    labels = [_e(x) for x in _labels(runs)]
    tested = [r.results.get("test/rmse") for r in runs if r.tested and isinstance(r.results.get("test/rmse"), float)]
    best = min(tested) if tested else None
    rows = [("status", *[("tested" if r.tested else f"<b>{RESUME_NOTE}</b>") for r in runs])]
    for key, label in RESULT_ROWS:
        if any(r.tested and key in r.results for r in runs):
            rows.append((_e(label), *[_result_cell(r, key, best) for r in runs]))
    rows.append(("training time", *[_e(_duration((r.results or {}).get("train_time_s"))) for r in runs]))
    rows.append(("git commit", *[f"<code>{_e(r.header.get('git_commit', '—'))}</code>" for r in runs]))
    rows.append(("run directory", *[f"<code>{_e(r.run_dir)}</code>" for r in runs]))
    diff = config_differences(runs)
    diff_rows = [(f"<code>{_e(k)}</code>", *["<i>(absent)</i>" if v is ABSENT else _e(_config_value(v)) for v in vs])
                 for k, vs in diff.items()]
    diff_html = (_table(diff_rows, ("config key", *labels), table_id="config-diff", row_keys=list(diff)) if diff
                 else '<p id="config-diff">The configs are the same (apart from experiment.name).</p>')
    return [
        "<h2>Results side by side</h2>", _table(rows, ("", *labels), table_id="results-compare"),
        "<h2>Config keys that differ</h2>",
        "<p>Every key of the runs' <code>config.yaml</code> (dotted, as overrides spell them) whose value is not "
        "the same in all runs; <code>experiment.name</code> is the column header.</p>", diff_html,
        "<h2>Curves</h2>", _figures_html(compare_figures(runs)),
        "<h2>Reproduce</h2>", "<pre>" + "\n".join(_e(reproduce_command(r)) for r in runs) + "</pre>",
    ]


def _result_cell(run: RunFiles, key: str, best: float | None) -> str:
    if not run.tested or key not in run.results:
        return "—"
    value = run.results[key]
    mark = ' class="best"' if key == "test/rmse" and value == best and best is not None else ""
    return f"<span{mark}>{_e(_fmt(value))}</span>"


def render_report(runs: list[RunFiles]) -> str:
    """The HTML page for one run or a comparison of several."""
    if len(runs) == 1:
        run = runs[0]
        status = "tested" if run.tested else RESUME_NOTE
        return _page(f"Run {run.name}", f"{_e(status)} · <code>{_e(run.run_dir)}</code>",
                     _run_body(run, _figures_of(run)))
    names = ", ".join(_labels(runs))
    return _page(f"Comparison of {len(runs)} runs", _e(names), _compare_body(runs))


def write_report(run_dirs: list[Path], output: Path) -> Path:
    """Write the report of ``run_dirs`` (one run, or a comparison) to ``output`` atomically; return its path."""
    problems = [p for d in run_dirs if (p := check_run_dir(Path(d)))]
    if problems or not run_dirs:
        raise UserError(problems or ["no run directory given"])
    text = render_report([load_run(Path(d)) for d in run_dirs])
    output = Path(output)
    atomic_write_text(output, text)
    return output


# --------------------------------------------------------------------------------------------------
# python -m train.report
# --------------------------------------------------------------------------------------------------

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Write a self-contained HTML report of a run (figures, results, config, provenance), or a "
                    "comparison of several runs (overlaid curves, results side by side, the config keys that differ).")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory (runs/<name>)")
    p.add_argument("--output", type=Path, default=None,
                   help="the HTML file (default: RUN_DIR/report.html for one run, ./report-compare.html for several)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    def body() -> int:
        default = args.run_dirs[0] / "report.html" if len(args.run_dirs) == 1 else Path("report-compare.html")
        path = write_report(args.run_dirs, args.output or default)
        print(f"Report: {path.resolve()}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
