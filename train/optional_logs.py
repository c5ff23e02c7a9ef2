"""Optional logging, all off by default: what each option logs, and ``OptionalLogs``, which the loop
calls at fixed points (after backward, at each log step, after validation, after the test).

- ``log_predictions``: predictions on the val split (and the test split at the end). W&B gets a table
  of a fixed sample of images (thumbnail, true year, predicted year, absolute error); both trackers
  get RMSE by decade and a histogram of residuals; TensorBoard gets a markdown table of the worst
  predictions. Everything comes from the predictions ``evaluate`` already gathered: no extra forward.
- ``log_gradients``: per-layer gradient norms (every ``log_every_n_steps``) and histograms (every
  ``histograms_every_n_steps``), computed once on the main process and sent to both trackers.
- ``watch_model``: ``wandb.watch`` on the unwrapped model; parameters only when ``log_gradients``
  already histograms the gradients.
- ``system_metrics``: process RSS, CPU % and CUDA memory into TensorBoard (W&B records its own).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from train.config import Config
from train.metrics import by_decade
from train.tracking import Histogram, Markdown, WandbTable, log_rich, wandb_run


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
    decades = by_decade(true, guess)
    for d, m in decades.items():
        values[f"{split}/rmse_by_decade/{d}s"] = m["rmse"]
    rows = [[f"{d}s", m["n"], m["rmse"]] for d, m in decades.items()]
    values[f"{split}/rmse_by_decade"] = WandbTable(["decade", "images", "rmse_years"], rows)

    def name(i: int) -> str:
        return Path(dataset.paths[i]).name if dataset.paths is not None else f"{split} #{i}"

    rows = []
    for i in sample:
        img = dataset.raw(int(i)).numpy().transpose(1, 2, 0)  # uint8 HxWx3
        rows.append([name(int(i)), img, round(float(true[i]), 2), round(float(guess[i]), 2),
                     round(float(abs(err[i])), 2)])
    values[f"{split}/predictions"] = WandbTable(["image_id", "image", "true_year", "pred_year", "abs_error_years"],
                                                rows)

    worst = np.argsort(-np.abs(err))[:worst_k]
    lines = [f"Worst {len(worst)} of {len(err)} {split} predictions (years)", "",
             "| image | true | predicted | error |", "|---|---:|---:|---:|"]
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
    if not (cfg.logging.wandb.enabled and cfg.logging.wandb.watch_model):
        return
    run = wandb_run(accelerator)
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
        out = {"system/rss_gb": self.process.memory_info().rss / gb,
               "system/cpu_percent": self.process.cpu_percent(None)}
        if self.device.type == "cuda":
            out["system/cuda_allocated_gb"] = torch.cuda.memory_allocated(self.device) / gb
            out["system/cuda_reserved_gb"] = torch.cuda.memory_reserved(self.device) / gb
            out["system/cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / gb
        return out


# --------------------------------------------------------------------------------------------------
# What the loop calls
# --------------------------------------------------------------------------------------------------

WORST_ROWS = 10  # rows of the worst-predictions table (log_predictions)


class OptionalLogs:
    """The optional logs of one run. Each method is a no-op when its option is off, and logs only
    on the main process (the others have no trackers); none adds a collective."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, cfg: Config, data):
        lg = cfg.logging
        main = accelerator.is_main_process
        self.accelerator, self.cfg, self.data = accelerator, cfg, data
        self.grad_layers = gradient_layers(accelerator.unwrap_model(model)) if lg.log_gradients and main else None
        self.grad_norms: dict[str, float] = {}  # the last log step's, sent with its train/loss_step
        self.system = SystemMetrics(accelerator.device) if lg.system_metrics and main else None
        self.val_sample = prediction_sample(len(data.val), lg.num_predictions, cfg.experiment.seed)
        self.test_sample = prediction_sample(len(data.test), lg.num_predictions, cfg.experiment.seed)
        watch_model(accelerator, model, cfg)

    def after_backward(self, next_step: int) -> None:
        """Gradient norms and histograms of the coming optimizer step: on the all-reduced gradients,
        before clipping, divided by fp16's loss scale. Only called when ``grad_layers`` is set."""
        lg = self.cfg.logging
        if next_step % lg.log_every_n_steps == 0:
            self.grad_norms = gradient_norms(self.grad_layers, gradient_scale(self.accelerator))
        if next_step % lg.histograms_every_n_steps == 0:
            values = gradient_histograms(self.grad_layers, gradient_scale(self.accelerator))
            log_rich(self.accelerator, values, step=next_step)

    def step_values(self) -> dict[str, float]:
        """What a log step adds to ``train/loss_step`` (gradient norms, when on)."""
        return self.grad_norms if self.grad_layers is not None else {}

    def after_validation(self, val: dict, epoch: int, last: bool, step: int) -> None:
        lg = self.cfg.logging
        if (lg.log_predictions and (epoch % lg.predictions_every_n_epochs == 0 or last)
                and self.accelerator.is_main_process):
            self._predictions("val", self.data.val, val, self.val_sample, step)
        if self.system is not None:
            # TensorBoard only: W&B already samples the same things in its own System tab.
            log_rich(self.accelerator, self.system.read(), step=step, wandb=False)

    def after_test(self, test: dict, step: int) -> None:
        if self.cfg.logging.log_predictions and self.accelerator.is_main_process:
            self._predictions("test", self.data.test, test, self.test_sample, step)

    def _predictions(self, split: str, dataset, out: dict, sample: np.ndarray, step: int) -> None:
        d = self.data
        values = prediction_values(split, dataset, out["pred"], out["y"], d.target_mean, d.target_std, sample,
                                   WORST_ROWS)
        log_rich(self.accelerator, values, step=step)
