"""Optional logging, all off by default: each is a small function the training loop calls.

- ``log_predictions``: predictions on the val split (and the test split at the end). W&B gets a table
  of a fixed sample of images (thumbnail, true year, predicted year, absolute error); both trackers
  get RMSE by decade and a histogram of residuals; TensorBoard gets a markdown table of the worst
  predictions. Everything comes from the predictions ``evaluate`` already gathered: no extra forward.
- ``log_gradients``: per-layer gradient norms (every ``log_every_n_steps``) and histograms (every
  ``histograms_every_n_steps``), computed once on the main process and sent to both trackers.
- ``watch_model``: ``wandb.watch`` on the unwrapped model; parameters only when ``log_gradients``
  already histograms the gradients.
- ``system_metrics``: process RSS, CPU % and CUDA memory into TensorBoard (W&B records its own).

Rich values (histograms, tables, text) do not fit ``accelerator.log``'s one-dict-for-every-tracker
model, so ``log_rich`` hands each tracker what it understands, on the main process only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from train.config import Config


@dataclass
class Histogram:
    """Counts over ``edges`` (len(counts) + 1) plus the moments TensorBoard stores with them."""

    counts: np.ndarray
    edges: np.ndarray
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float

    @classmethod
    def of(cls, values: torch.Tensor, bins: int = 64) -> "Histogram":
        v = values.detach().flatten().float().cpu()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            v = torch.zeros(1)
        lo, hi = v.min().item(), v.max().item()
        if lo == hi:  # a constant tensor still gets a (narrow) bin
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = torch.histogram(v, bins=bins, range=(lo, hi))
        d = v.double()
        return cls(counts.numpy(), edges.numpy(), lo, hi, v.numel(), d.sum().item(), d.pow(2).sum().item())


@dataclass
class WandbTable:
    """A W&B table; image columns hold HxWx3 uint8 arrays (turned into ``wandb.Image``)."""

    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Markdown:
    """Text for TensorBoard's TEXT tab; trackers without a text view skip it."""

    text: str


def log_rich(accelerator: Accelerator, values: dict[str, Any], step: int) -> None:
    """Log floats, ``Histogram``, ``WandbTable`` and ``Markdown`` values to every tracker that can show them."""
    for tracker in accelerator.trackers:  # empty on every process but the main one
        if tracker.name == "tensorboard":
            w = tracker.writer
            for key, v in values.items():
                if isinstance(v, Histogram):
                    w.add_histogram_raw(key, v.min, v.max, v.num, v.sum, v.sum_squares, v.edges[1:].tolist(), v.counts.tolist(), global_step=step)
                elif isinstance(v, Markdown):
                    w.add_text(key, v.text, global_step=step)
                elif isinstance(v, (int, float)):
                    w.add_scalar(key, v, global_step=step)
            w.flush()
        elif tracker.name == "wandb":
            import wandb

            out = {}
            for key, v in values.items():
                if isinstance(v, Histogram):
                    out[key] = wandb.Histogram(np_histogram=(v.counts.tolist(), v.edges.tolist()))
                elif isinstance(v, WandbTable):
                    rows = [[wandb.Image(c) if isinstance(c, np.ndarray) else c for c in row] for row in v.rows]
                    out[key] = wandb.Table(columns=v.columns, data=rows)
                elif isinstance(v, (int, float)):
                    out[key] = v
            tracker.run.log(out, step=step)


# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------


def prediction_sample(n: int, k: int, seed: int) -> np.ndarray:
    """The fixed images of the W&B table: the same indices every epoch (and on resume)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))


def prediction_values(split: str, dataset, pred: torch.Tensor, y: torch.Tensor, target_mean: float, target_std: float,
                      sample: np.ndarray, worst_k: int) -> dict[str, Any]:
    """Everything ``log_predictions`` logs for one split.

    ``pred`` and ``y`` are the standardized predictions and targets of the whole split in dataset
    order (``evaluate`` gathers them that way: the eval loader is not shuffled and
    ``gather_for_metrics`` concatenates the processes' batches back into sequence).
    """
    true = y.double().numpy() * target_std + target_mean
    guess = pred.double().numpy() * target_std + target_mean
    err = guess - true
    values: dict[str, Any] = {f"{split}/residual_years": Histogram.of(torch.from_numpy(err))}
    decades = np.floor(true / 10) * 10
    decade_rows = []
    for d in np.unique(decades):
        m = decades == d
        rmse = float(np.sqrt(np.mean(err[m] ** 2)))
        values[f"{split}/rmse_by_decade/{int(d)}s"] = rmse
        decade_rows.append([f"{int(d)}s", int(m.sum()), rmse])
    values[f"{split}/rmse_by_decade"] = WandbTable(["decade", "images", "rmse_years"], decade_rows)

    def name(i: int) -> str:
        return Path(dataset.paths[i]).name if dataset.paths is not None else f"{split} #{i}"

    rows = []
    for i in sample:
        img = dataset.raw(int(i)).numpy().transpose(1, 2, 0)  # uint8 HxWx3
        rows.append([name(int(i)), img, round(float(true[i]), 2), round(float(guess[i]), 2), round(float(abs(err[i])), 2)])
    values[f"{split}/predictions"] = WandbTable(["image_id", "image", "true_year", "pred_year", "abs_error_years"], rows)

    worst = np.argsort(-np.abs(err))[:worst_k]
    lines = [f"Worst {len(worst)} of {len(err)} {split} predictions (years)", "", "| image | true | predicted | error |", "|---|---:|---:|---:|"]
    lines += [f"| {name(int(i))} | {true[i]:.1f} | {guess[i]:.1f} | {err[i]:+.1f} |" for i in worst]
    values[f"{split}/worst_predictions"] = Markdown("\n".join(lines))
    return values


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def gradient_layers(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by the module that owns them ("features.0": weight and bias)."""
    layers: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            layers.setdefault(name.rpartition(".")[0] or name, []).append(param)
    return layers


def gradient_scale(accelerator: Accelerator) -> float:
    """fp16's loss scale (gradients are multiplied by it until the optimizer step unscales them)."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


@torch.no_grad()
def gradient_norms(layers: dict[str, list[nn.Parameter]], scale: float = 1.0) -> dict[str, float]:
    """L2 norm of each layer's gradient and of all of them (``grad_norm/total``), unscaled; one host sync."""
    names, squares = [], []
    for layer, params in layers.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            names.append(layer)
            squares.append(sum(torch.linalg.vector_norm(g.float()).pow(2) for g in grads))
    if not squares:
        return {}
    per_layer = torch.stack(squares).sqrt() / scale
    values = per_layer.tolist()
    out = {f"grad_norm/{n}": v for n, v in zip(names, values)}
    out["grad_norm/total"] = math.sqrt(sum(v * v for v in values))
    return out


@torch.no_grad()
def gradient_histograms(layers: dict[str, list[nn.Parameter]], scale: float = 1.0) -> dict[str, Histogram]:
    out = {}
    for layer, params in layers.items():
        grads = [p.grad.flatten() for p in params if p.grad is not None]
        if grads:
            out[f"grad_hist/{layer}"] = Histogram.of(torch.cat(grads).float() / scale)
    return out


def watch_model(accelerator: Accelerator, model: nn.Module, cfg: Config) -> None:
    """``wandb.watch`` on the unwrapped model, main process only.

    W&B counts ``log_freq`` in forward/backward calls: with gradient accumulation an optimizer step
    is several of them. With ``log_gradients`` on, the gradients are already histogrammed (under
    ``grad_hist/``), so W&B watches the parameters only.
    """
    if not (cfg.logging.wandb.enabled and cfg.logging.wandb.watch_model and accelerator.is_main_process):
        return
    run = next((t.run for t in accelerator.trackers if t.name == "wandb"), None)
    if run is None:
        return
    freq = cfg.logging.wandb.watch_log_freq or cfg.logging.histograms_every_n_steps
    what = "parameters" if cfg.logging.log_gradients else "all"
    run.watch(accelerator.unwrap_model(model), log=what, log_freq=freq * cfg.training.gradient_accumulation_steps)


# --------------------------------------------------------------------------------------------------
# System metrics
# --------------------------------------------------------------------------------------------------


class SystemMetrics:
    """Process memory and CPU use since the previous call, plus CUDA memory where there is a GPU."""

    def __init__(self, device: torch.device):
        import psutil

        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first call only sets the reference point
        self.device = device

    def read(self) -> dict[str, float]:
        gb = 1024**3
        out = {"system/rss_gb": self.process.memory_info().rss / gb, "system/cpu_percent": self.process.cpu_percent(None)}
        if self.device.type == "cuda":
            out["system/cuda_allocated_gb"] = torch.cuda.memory_allocated(self.device) / gb
            out["system/cuda_reserved_gb"] = torch.cuda.memory_reserved(self.device) / gb
            out["system/cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / gb
        return out


def log_system_metrics(accelerator: Accelerator, metrics: SystemMetrics | None, step: int) -> None:
    """TensorBoard only: W&B already samples the same things in its own System tab."""
    if metrics is None:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for key, value in metrics.read().items():
                tracker.writer.add_scalar(key, value, global_step=step)
            tracker.writer.flush()
