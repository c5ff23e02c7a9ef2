"""The training function, read top to bottom in Accelerate order, and the stages it calls.

    train:  runtime -> plan the run (new or resumed; every refusal happens here) -> data -> model
            -> check the state fits -> run directory -> Accelerator + trackers -> prepare + restore
            -> epochs -> test with the best weights -> results -> trackers closed (on every path)
    epoch:  train_epoch -> evaluate -> close_epoch (metrics, best checkpoint, early stopping, logs,
            the epoch-end state and stop)

The stages share one ``Run`` (what was built once) and its ``Progress`` (what a full state saves).
Optional logs are plain calls at fixed points (``train.optional_logs``); resumable states live in
``train.state``, the stop protocol in ``train.stopping``, the best checkpoint in ``train.checkpoints``.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from train.checkpoints import BestCheckpoint, checkpoint_metadata, load_weights_strict, read_safetensors
from train.config import Config, parse_duration
from train.console import early_stop_reason, epoch_block, print_results, progress_bar, startup_summary
from train.data import Data, baselines, build_data, make_loaders
from train.heads import Head, build_head
from train.calibration import calibrate, coverage_report, labelled_intervals, level_label, quantile_levels
from train.metrics import by_decade, date_metrics
from train.synthetic import synthetic_floor
from train.errors import NonFiniteLoss, Stopped, UserError
from train import finetune
from train.fsutil import atomic_write_bytes
from train.models import build_model
from train.optim import build_loss, build_optimizer, build_scheduler, lr_values
from train.optional_logs import OptionalLogs
from train.runtime import Runtime, memory_format, place_model, resolve_config, start_runtime
from train.state import (
    Progress, RunPlan, check_state_fits, open_run_dir, plan_run, restore_state, save_full_state,
)
from train.stopping import StopControl, all_finite
from train.records import write_predictions
from train.tracking import PngImage, Tracking, log_model_artifact, log_rich, wandb_run_id


def train(cfg: Config, resume: str | None = None, restart: bool = False) -> dict:
    """Train, evaluate and track one run described by ``cfg``; return the results dict.

    ``resume``: ``"auto"`` or a path (``train.state.locate_resume``); ``restart``: move an existing
    run directory aside first. Raises ``UserError`` for anything the user can fix, always before any
    file is written, except a disk that fills up later; ``Stopped`` after a signal or
    ``training.max_time`` (a full state is saved); ``NonFiniteLoss`` for NaN/inf.
    """
    rt = start_runtime(cfg)
    with plan_run(cfg, rt.processes, resume, restart, rt.say) as plan:  # holds the run directory's lock
        if plan.finished_results is not None:
            return plan.finished_results  # a finished run, resumed: nothing to do, nothing rewritten
        cfg = resolve_config(cfg, plan.name, rt)
        finetune.check_backbone(cfg)  # an uncached/misspelled backbone stops before the image cache is built
        data = build_data(cfg, is_local_main=rt.is_local_main, is_main=rt.is_main)
        if note := finetune.use_backbone_normalization(cfg, data):
            rt.say(note)
        loaders = make_loaders(cfg, data)
        head = build_head(cfg, data.target_mean, data.target_std, data.train.years, build_loss(cfg),
                          build_loss(cfg, reduction="none"))
        model = build_run_model(cfg, rt, plan, head.out_dim)
        optimizer = build_optimizer(cfg, model)
        check_state_fits(plan, model, optimizer)  # the last refusal: nothing has been written yet
        open_run_dir(plan, cfg, rt.processes)
        with Tracking(cfg, rt, plan) as tracking, BestCheckpoint(plan.run_dir) as best:
            accelerator = tracking.accelerator
            if data.skipped_rows and plan.progress is None:
                accelerator.log({"data/skipped_rows": data.skipped_rows}, step=0)
            model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
            run = start_run(cfg, accelerator, model, optimizer, loaders, data, plan, best, head)
            if plan.resume_dir is not None:
                restore_state(accelerator, run.scheduler, plan)
            with run.stop:  # signals become a flag, read at the agreement points
                run_epochs(run)
            results = test_and_report(run)
            tracking.summary = tracker_summary(results, run.progress)
            return results


def build_run_model(cfg: Config, rt: Runtime, plan: RunPlan, out_dim: int) -> nn.Module:
    """The configured model (``out_dim``: the head's outputs), seeded, warm-started when asked, placed
    for this runtime."""
    set_seed(cfg.experiment.seed)  # before the model exists: its initialization is part of the run
    model = build_model(cfg.model, out_dim=out_dim)
    if cfg.model.init_from and plan.progress is None:
        load_weights_strict(model, cfg.model.init_from, what="model.init_from")
        rt.say(f"Initialized the model from {cfg.model.init_from}")
    return place_model(model, cfg, rt)


@dataclass
class Run:
    """What the stages share: built once by ``start_run``; ``progress`` is what a full state saves."""

    cfg: Config
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step_per_batch: bool  # the scheduler steps per optimizer step (cosine), else per epoch
    train_loader: Any
    val_loader: Any
    test_loader: Any
    data: Data
    progress: Progress
    run_dir: Path
    best: BestCheckpoint
    stop: StopControl
    logs: OptionalLogs
    head: Head  # what the outputs mean: the loss, the point estimate, the predicted quantiles
    memory_format: torch.memory_format | None
    clip_norm: float | None  # max_grad_norm, inf to only read the norm (skip_step), None: neither
    skipped_steps: int = 0
    lr_used: list[float] = field(default_factory=list)  # the last optimizer step's lr per group
    # Per epoch: train + validation + logging, checkpoint and state writes excluded (benchmarks/).
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_cpu_seconds: list[float] = field(default_factory=list)
    clock: "EpochClock | None" = None
    val_samples: int = 0
    ema: Any = None  # train.finetune's EMA of the weights (inactive when training.ema.decay is null)
    frozen: bool = False  # the backbone is frozen this epoch (training.freeze_backbone_epochs)

    def first_epoch(self) -> int:
        p = self.progress
        return p.epoch + 1 if p.epoch_done else p.epoch

    def say(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)


def start_run(cfg: Config, accelerator: Accelerator, model, optimizer, loaders, data: Data, plan: RunPlan,
              best: BestCheckpoint, head: Head) -> Run:
    """Everything the epochs need that depends on the prepared objects."""
    train_loader, val_loader, test_loader = loaders
    steps_per_epoch = math.ceil(len(train_loader) / cfg.training.gradient_accumulation_steps)
    scheduler, step_per_batch = build_scheduler(cfg, optimizer, steps_per_epoch)
    t = cfg.training
    progress = plan.progress or Progress(run_name=plan.name, model_config=cfg.model.model_dump(mode="json"))
    progress.num_processes = accelerator.num_processes
    progress.wandb_run_id = wandb_run_id(accelerator) or progress.wandb_run_id
    stop = StopControl(accelerator, t.max_time, parse_duration(t.max_time) if t.max_time else None,
                       plan.run_dir, plan.name)
    clip_norm = t.max_grad_norm or (math.inf if t.on_nonfinite == "skip_step" else None)
    run = Run(
        cfg, accelerator, model, optimizer, scheduler, step_per_batch, train_loader, val_loader, test_loader, data,
        progress, plan.run_dir, best, stop, OptionalLogs(accelerator, model, cfg, data), head, memory_format(cfg),
        clip_norm,
        lr_used=[g["lr"] for g in optimizer.param_groups], val_samples=progress.val_samples,
    )
    run.ema = finetune.make_ema(cfg, accelerator.unwrap_model(model))
    if run.ema is not None:
        accelerator.register_for_checkpointing(run.ema)  # part of every full state, restored on resume
    run.say(startup_summary(startup_facts(run, steps_per_epoch, resumed=plan.progress is not None)))
    return run


def startup_facts(run: Run, steps_per_epoch: int, resumed: bool) -> dict:
    """What ``console.startup_summary`` prints: model size, data, processes, schedule, trackers."""
    cfg, acc, d, p = run.cfg, run.accelerator, run.data, run.progress
    params = list(acc.unwrap_model(run.model).parameters())
    data_kind = cfg.data.kind + (" (cached)" if cfg.data.kind == "manifest" and cfg.data.cache else "")
    return {
        "name": p.run_name, "run_dir": run.run_dir, "model": cfg.model.name,
        "trainable": sum(t.numel() for t in params if t.requires_grad), "total": sum(t.numel() for t in params),
        "bytes": sum(t.numel() * t.element_size() for t in params), "data": data_kind,
        "image_size": cfg.data.image_size, "n_train": len(d.train), "n_val": len(d.val), "n_test": len(d.test),
        "cache": f"; {d.cache_note}" if d.cache_note else "",
        "processes": acc.num_processes, "device": acc.device.type, "precision": acc.mixed_precision,
        "threads": torch.get_num_threads(), "epochs": cfg.training.epochs, "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * cfg.training.epochs, "batch": cfg.data.batch_size,
        "accumulation": cfg.training.gradient_accumulation_steps,
        "resume": f"; resuming at epoch {p.epoch}, step {p.global_step}" if resumed else "",
        "trackers": [t.name for t in acc.trackers],
    }


# --------------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------------

_NO_ACCUMULATION = nullcontext()


def run_epochs(run: Run) -> None:
    """From the first epoch not done to the last, or until early stopping (or a stop) ends training."""
    cfg = run.cfg
    try:
        for epoch in range(run.first_epoch(), cfg.training.epochs + 1):
            if run.progress.finished:
                break
            totals, train_seconds = train_epoch(run, epoch)
            with finetune.ema_weights(run.ema, run.model):
                val = evaluate(run.accelerator, run.model, run.val_loader, run.head, run.memory_format)
            close_epoch(run, epoch, totals, train_seconds, val)
    except Stopped:
        publish_report(run)  # a run stopped to be resumed still gets its curves so far
        raise


def train_epoch(run: Run, epoch: int) -> tuple[torch.Tensor, float]:
    """One pass over the train loader (the rest of it after a mid-epoch resume).

    Returns the epoch's ``[loss x n, squared error, n]`` summed over processes and the seconds spent
    training (mid-epoch state writes included: ``epoch_time_s``). May raise ``Stopped`` (a state was
    saved) or ``NonFiniteLoss``.
    """
    acc, model, progress, cfg = run.accelerator, run.model, run.progress, run.cfg
    model.train()
    run.frozen = finetune.backbone_frozen(cfg, epoch)
    finetune.set_backbone_frozen(acc.unwrap_model(model), run.frozen)
    skip = progress.batches_done if (not progress.epoch_done and epoch == progress.epoch) else 0
    loader = acc.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    loader.set_epoch(epoch)  # on the prepared loader: it passes the epoch to our sampler on every iteration
    mse = cfg.model.head == "regression" and cfg.training.loss == "mse"
    sums = EpochSums(acc.device, mse=mse, start=progress.train_sums if skip else None)
    progress.epoch, progress.epoch_done, progress.batches_done = epoch, False, skip
    t0, run.clock = time.perf_counter(), EpochClock()
    show = acc.is_local_main_process and cfg.logging.progress_bar
    bar = progress_bar(len(run.train_loader), skip, f"Epoch {epoch}/{cfg.training.epochs}", show)
    # accumulate() matters only with several micro-batches per optimizer step; its context
    # manager alone costs ~7 us a step, which is measurable on small models (benchmarks/).
    accumulating = cfg.training.gradient_accumulation_steps > 1
    for batch in loader:
        x, y = run.data.train_batch(batch, epoch)
        if run.memory_format is not None:
            x = x.contiguous(memory_format=run.memory_format)
        with acc.accumulate(model) if accumulating else _NO_ACCUMULATION:
            out = model(x).float()
            loss = run.head.loss(out, y)
            pred = run.head.point(out)
            acc.backward(loss)
            step_ok = optimizer_step(run)
        if step_ok:
            sums.add(loss, pred, y)
        else:
            run.skipped_steps += 1
        progress.batches_done += 1
        bar.update(1)
        if acc.sync_gradients:
            after_optimizer_step(run, loss, sums, bar)
    bar.close()
    return acc.reduce(sums.tensor(), "sum"), time.perf_counter() - t0


def optimizer_step(run: Run) -> bool:
    """Gradient logs, clipping and the optimizer step; False when ``skip_step`` skipped it."""
    acc = run.accelerator
    step_ok = True
    if acc.sync_gradients:
        finetune.drop_frozen_grads(acc.unwrap_model(run.model), run.frozen)
        if run.logs.grad_layers is not None:
            run.logs.after_backward(run.progress.global_step + 1)
        if run.clip_norm is not None:
            # Gradients are already all-reduced here, so every process sees the same norm and
            # skips the same steps. skip_step reads it every step (like fp16's GradScaler).
            norm = acc.clip_grad_norm_(run.model.parameters(), run.clip_norm)
            step_ok = run.cfg.training.on_nonfinite != "skip_step" or bool(torch.isfinite(norm))
    if step_ok:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_ok


def after_optimizer_step(run: Run, loss: torch.Tensor, sums: "EpochSums", bar) -> None:
    """Count the step, move the schedule, log (every ``log_every_n_steps``), stop or save if due."""
    progress, acc = run.progress, run.accelerator
    progress.global_step += 1
    if run.ema is not None:
        run.ema.update(acc.unwrap_model(run.model), progress.epoch)
    run.lr_used = [g["lr"] for g in run.optimizer.param_groups]  # this step's, before the schedule moves on
    if run.step_per_batch and not acc.optimizer_step_was_skipped:
        run.scheduler.step()
    reason = None
    if progress.global_step % run.cfg.logging.log_every_n_steps == 0:
        reason = log_step(run, loss, sums, bar)
    elif acc.num_processes == 1:
        reason = run.stop.each_step()
    if reason:
        state_dir = save_resumable_state(run, epoch_done=False, totals=sums.tensor())
        raise run.stop.stopped(reason, progress.epoch, progress.global_step, state_dir)
    every = run.cfg.checkpoint.every_n_steps
    if every and progress.global_step % every == 0 and progress.batches_done < len(run.train_loader):
        with run.clock.paused():
            save_resumable_state(run, epoch_done=False, totals=sums.tensor())


def log_step(run: Run, loss: torch.Tensor, sums: "EpochSums", bar) -> str | None:
    """``train/loss_step`` and the lr (and gradient norms); return the agreed stop reason."""
    acc, progress = run.accelerator, run.progress
    loss_sum, reason, nonfinite = run.stop.at_log_step(loss.detach(), ~torch.isfinite(sums.tensor()).all())
    loss_mean = loss_sum / acc.num_processes
    values = {"train/loss_step": loss_mean, **lr_values(run.optimizer, run.lr_used), **run.logs.step_values()}
    acc.log(values, step=progress.global_step)
    bar.set_postfix(loss=f"{loss_mean:.4f}")
    if nonfinite and run.cfg.training.on_nonfinite == "stop":
        raise NonFiniteLoss(f"non-finite training loss in epoch {progress.epoch} by step {progress.global_step}; "
                            "stopping (best.safetensors untouched)")
    return reason


def save_resumable_state(run: Run, epoch_done: bool, totals: torch.Tensor) -> Path:
    """A full state; refuses (``on_nonfinite: stop``) to write non-finite weights."""
    progress = run.progress
    if not all_finite(run.accelerator, run.model, totals) and run.cfg.training.on_nonfinite == "stop":
        raise NonFiniteLoss(f"non-finite loss or weights in epoch {progress.epoch} by step {progress.global_step}; "
                            "no state saved, best.safetensors untouched")
    progress.epoch_done, progress.train_sums = epoch_done, [] if epoch_done else totals.tolist()
    progress.scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
    progress.val_samples = run.val_samples
    t0 = time.perf_counter()
    state_dir = save_full_state(run.accelerator, run.run_dir, progress, run.cfg.checkpoint.keep_last)
    run.stop.record_save(time.perf_counter() - t0)
    return state_dir


def close_epoch(run: Run, epoch: int, totals: torch.Tensor, train_seconds: float, val: dict) -> None:
    """Metrics, best checkpoint, early stopping, logs and the console block; then the epoch-end
    agreement: a full state when due, and the stop when one was asked for."""
    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    metrics = epoch_metrics(run, epoch, totals, train_seconds, val)
    improved = update_best(run, epoch, metrics)
    progress.finished = progress.stopped_early or epoch == cfg.training.epochs
    acc.log(metrics, step=progress.global_step)
    run.logs.after_validation(val, epoch, progress.finished, progress.global_step)
    es = cfg.training.early_stopping
    run.epoch_seconds.append(run.clock.wall())
    run.epoch_cpu_seconds.append(run.clock.cpu())
    left = 0.0 if progress.finished else (cfg.training.epochs - epoch) * sum(run.epoch_seconds) / len(run.epoch_seconds)
    run.say(epoch_block(epoch, cfg.training.epochs, metrics, improved, es.patience if es.enabled else None,
                        progress.bad_epochs, progress.best_value, progress.best_epoch, seconds_left=left))
    if run.scheduler is not None and not run.step_per_batch:
        # Every process computed the same gathered value, so every process steps alike.
        value = metrics[es.monitor]
        run.scheduler.step(value) if cfg.training.scheduler.name == "plateau" else run.scheduler.step()
    if progress.stopped_early:
        reason = early_stop_reason(es.monitor, es.min_delta, es.patience, progress.best_value, progress.best_epoch)
        run.say(f"Early stopping at epoch {epoch}: {reason}")
        acc.log({"early_stopping/stopped_epoch": epoch, "early_stopping/reason": reason}, step=progress.global_step)
    progress.batches_done = 0
    reason = run.stop.at_epoch_end(progress.finished)
    every = cfg.checkpoint.every_n_epochs
    state_dir = None
    if reason or progress.finished or (every and epoch % every == 0):
        state_dir = save_resumable_state(run, epoch_done=True, totals=torch.zeros(3, device=acc.device))
    if reason:
        raise run.stop.stopped(reason, progress.epoch, progress.global_step, state_dir)


def epoch_metrics(run: Run, epoch: int, totals: torch.Tensor, train_seconds: float, val: dict) -> dict:
    """What ``accelerator.log`` records at the end of an epoch (keys as in docs/CONFIG.md)."""
    n_train = max(totals[2].item(), 1.0)
    run.val_samples = int(val["n"])
    metrics = {
        "train/loss": totals[0].item() / n_train,
        "train/rmse": math.sqrt(totals[1].item() / n_train) * run.data.target_std,
        **{f"val/{k}": v for k, v in val.items() if k in _SPLIT_METRICS},
        **lr_values(run.optimizer, run.lr_used),
        "epoch": epoch,
        "epoch_time_s": train_seconds,  # training only (mid-epoch saves included); see results' epoch_times_s
        "samples_per_s": n_train / train_seconds,
    }
    if run.skipped_steps:
        metrics["train/skipped_steps"] = run.skipped_steps
    return metrics


def update_best(run: Run, epoch: int, metrics: dict) -> bool:
    """Compare the monitored value with the best so far; save ``best.safetensors`` when it improved.
    Adds ``best/<metric>`` and the early-stopping counters to ``metrics``."""
    cfg, acc, progress, data = run.cfg, run.accelerator, run.progress, run.data
    es = cfg.training.early_stopping
    value = metrics[es.monitor]
    sign = 1.0 if es.direction == "min" else -1.0
    first = progress.best_epoch == 0
    improved = math.isfinite(value) and (first or sign * (progress.best_value - value) > es.min_delta)
    if improved:
        progress.best_value, progress.best_epoch, progress.bad_epochs = value, epoch, 0
        meta = checkpoint_metadata(
            model_cfg=cfg.model, epoch=epoch, global_step=progress.global_step, monitor=es.monitor, value=value,
            target_mean=data.target_mean, target_std=data.target_std, pixel_mean=data.pixel_mean,
            pixel_std=data.pixel_std, image_size=cfg.data.image_size,
            year_bins=run.head.bins.as_meta() if run.head.kind == "distribution" else None,
            **finetune.checkpoint_extras(cfg, acc.unwrap_model(run.model)),
        )
        with run.clock.paused(), finetune.ema_weights(run.ema, run.model):
            run.best.save(acc, run.model, meta)
            # Only with W&B: reading best.path waits for the background write (W&B copies the file).
            if cfg.logging.wandb.log_model and cfg.logging.wandb.enabled:
                log_model_artifact(acc, run.best.path, meta)
    else:
        progress.bad_epochs += 1
    if progress.best_epoch:
        metrics["best/" + es.monitor.split("/")[1]] = progress.best_value
    if es.enabled:
        progress.stopped_early = progress.bad_epochs >= es.patience
        metrics["early_stopping/bad_epochs"] = progress.bad_epochs
        metrics["early_stopping/patience_left"] = es.patience - progress.bad_epochs
    return improved


# --------------------------------------------------------------------------------------------------
# The end: test and results
# --------------------------------------------------------------------------------------------------


def test_and_report(run: Run) -> dict:
    """Test with the best weights, log the test metrics, write ``results.json`` and print them."""
    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    train_seconds = run.stop.elapsed()
    acc.wait_for_everyone()
    if progress.best_epoch:
        run.best.load_into(acc, run.model)
    else:
        run.say(f"warning: {cfg.training.early_stopping.monitor} was never finite; testing the last weights")
    calibration = calibrate_intervals(run) if progress.best_epoch else None
    taus = quantile_levels(calibration["levels"]) if calibration and run.head.kind == "distribution" else None
    test = evaluate(acc, run.model, run.test_loader, run.head, run.memory_format, taus=taus)
    test_metrics = {f"test/{k}": test[k] for k in _SPLIT_METRICS}
    test_metrics.update(test_extras(run, test, calibration))
    acc.log(test_metrics, step=progress.global_step)
    run.logs.after_test(test, progress.global_step)
    base = baselines(run.data, num_workers=cfg.data.num_workers) if acc.is_main_process else {}
    if cfg.data.kind == "synthetic" and acc.is_main_process:
        base.update(synthetic_floor(cfg, run.data.test.years.numpy()))
    monitored = cfg.training.early_stopping.monitor.split("/")[1]
    results = {
        **test_metrics,
        **base,
        "test/rmse_over_mean_baseline": test["rmse"] / base["baseline/mean_rmse"] if base else None,
        "test/rmse_over_colour_linear_baseline": test["rmse"] / base["baseline/colour_linear_rmse"] if base else None,
        "best_epoch": progress.best_epoch,
        f"best/{monitored}": progress.best_value if progress.best_epoch else None,
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "global_step": progress.global_step,
        "num_processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "val_samples": run.val_samples or None,
        "test_samples": int(test["n"]),
        "skipped_rows": run.data.skipped_rows,
        "train_time_s": train_seconds,
        "epoch_times_s": run.epoch_seconds,  # train + validation + logs per epoch, state writes excluded
        "epoch_cpu_times_s": run.epoch_cpu_seconds,
        "run_dir": str(run.run_dir),
        "calibration": calibration,
        # String keys ("1930s"): JSON and the W&B summary take no integer keys.
        "test/by_decade": {f"{d}s": v for d, v in by_decade(*years_of(run.head, test)).items()},
    }
    if acc.is_main_process:
        write_results(run.run_dir / "results.json", results)
        write_test_predictions(run, test, calibration)
        print_results(results)
    publish_report(run)
    return results


def years_of(head: Head, split: dict) -> tuple:
    """``(true, predicted)`` years of an ``evaluate`` result."""
    return (split["y"].double().numpy() * head.target_std + head.target_mean,
            split["pred"].double().numpy() * head.target_std + head.target_mean)


def calibrate_intervals(run: Run) -> dict | None:
    """Split-conformal date intervals fitted on the val split with the best weights, stored in
    ``best.safetensors`` (and its W&B artifact, which then carries the ``best`` alias)."""
    levels = run.cfg.calibration.levels
    if not levels:
        return None
    taus = quantile_levels(levels) if run.head.kind == "distribution" else None
    val = evaluate(run.accelerator, run.model, run.val_loader, run.head, run.memory_format, taus=taus)
    true, point = years_of(run.head, val)
    q = val["q"].double().numpy() if taus else None
    calibration, skipped = calibrate(levels, true, point, q)
    if skipped:
        run.say(f"warning: {len(true)} val images are too few to calibrate the "
                f"{', '.join(level_label(v) for v in skipped)}% intervals (a level L needs at least "
                f"1/(1-L) - 1 images); no interval for them")
    if calibration is None:
        return None
    acc = run.accelerator
    if acc.is_main_process:
        run.best.update_metadata({"calibration": json.dumps(calibration)})
        if run.cfg.logging.wandb.log_model and run.cfg.logging.wandb.enabled:
            log_model_artifact(acc, run.best.path, read_safetensors(run.best.path)[1])
    acc.wait_for_everyone()
    return calibration


def test_extras(run: Run, test: dict, calibration: dict | None) -> dict:
    """Interval coverage and width per level, MAE by decade, and the grayscale check."""
    out: dict[str, float] = {}
    true, point = years_of(run.head, test)
    if calibration is not None:
        q = test["q"].double().numpy() if "q" in test else None
        out.update(coverage_report(calibration, true, point, q, prefix="test/"))
    for d, m in by_decade(true, point).items():
        out[f"test/mae_by_decade/{d}s"] = m["mae"]
    if run.cfg.logging.eval_grayscale:
        gray = evaluate(run.accelerator, run.model, run.test_loader, run.head, run.memory_format,
                        transform=GrayScale(run.data, run.accelerator.device))
        out.update({f"test_gray/{k}": gray[k] for k in _SPLIT_METRICS})
    return out


class GrayScale:
    """Normalized input batch -> the same images in grayscale (ITU-R 601 luma in every channel),
    normalized again: what the model sees of an image when colour carries no date."""

    def __init__(self, data: Data, device: torch.device):
        self.mean = torch.tensor(data.pixel_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(data.pixel_std, device=device).view(1, 3, 1, 1)
        self.luma = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raw = x.float() * self.std + self.mean
        gray = (raw * self.luma).sum(1, keepdim=True)
        return ((gray - self.mean) / self.std).to(x.dtype)


def write_test_predictions(run: Run, test: dict, calibration: dict | None) -> None:
    """``predictions_test.csv`` from the gathered test predictions (dataset order), with the
    calibrated interval of each image when there is a calibration."""
    d = run.data
    true, predicted = years_of(run.head, test)
    names = [str(p) for p in d.test.paths] if d.test.paths is not None else [f"test #{i}" for i in range(len(true))]
    bounds = {}
    if calibration is not None:
        q = test["q"].double().numpy() if "q" in test else None
        bounds = labelled_intervals(calibration, predicted, q)
    try:
        write_predictions(run.run_dir / "predictions_test.csv", names, true, predicted, bounds)
    except OSError as e:
        raise UserError(f"could not write {run.run_dir / 'predictions_test.csv'} ({e.strerror or e}); results.json "
                        "is written: free disk space, then run the same command with --resume auto") from None


def publish_report(run: Run) -> None:
    """``report.html`` and its figures in the trackers (main process). Drawing is never worth failing
    a run for: any problem is a warning line and the run goes on to its normal end."""
    if not (run.cfg.logging.report and run.accelerator.is_main_process):
        return
    try:
        from train.report import run_figures, write_report

        figures = {f"report/{name}": PngImage(png) for name, png in run_figures(run.run_dir).items()}
        log_rich(run.accelerator, figures, step=run.progress.global_step)
        path = write_report([run.run_dir], run.run_dir / "report.html")
        run.say(f"  Report:  {path}")
    except Exception as e:  # matplotlib missing, a font, a full disk: the results stand
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        run.say(f"warning: could not write the run report ({why}); the results are complete. Draw it later with: "
                f"python -m train.report {run.run_dir}")


def write_results(path: Path, results: dict) -> None:
    try:
        atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the best checkpoint and the states are "
                        "intact: free disk space, then run the same command with --resume auto to test again") from None


def tracker_summary(results: dict, progress: Progress) -> dict:
    """W&B's run summary: the results without paths and per-epoch lists."""
    summary = {k: v for k, v in results.items() if v is not None and k not in ("run_dir", "epoch_times_s",
                                                                                "epoch_cpu_times_s")}
    if progress.stopped_early:
        summary["early_stopping/stopped_epoch"] = progress.epoch
    return summary


class EpochClock:
    """Wall and process-CPU seconds since it was made, without the spans inside ``paused()``.

    CPU time is what ``benchmarks/overhead.py`` compares when it runs its arms in lockstep (each
    process is stopped while the others run, which wall time would count)."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @contextmanager
    def paused(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall0 += time.perf_counter() - wall
            self.cpu0 += time.process_time() - cpu

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0


class EpochSums:
    """The epoch's training loss x n, squared error and sample count so far, kept on the device so
    that steps which do not log never wait for it. With the MSE loss the squared error *is* loss x n,
    and a step costs one in-place add (a stacked update was ~30 us a step on small models)."""

    def __init__(self, device: torch.device, mse: bool, start: list[float] | None = None):
        loss, sq, n = start or [0.0, 0.0, 0.0]
        self.loss = torch.tensor(loss, device=device)
        self.sq = None if mse else torch.tensor(sq, device=device)
        self.n = n

    def add(self, loss: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> None:
        self.loss.add_(loss.detach(), alpha=len(y))
        if self.sq is not None:
            self.sq.add_((pred.detach() - y).pow(2).sum())
        self.n += len(y)

    def tensor(self) -> torch.Tensor:
        """``[loss x n, squared error, n]``."""
        n = torch.tensor(float(self.n), device=self.loss.device)
        return torch.stack([self.loss, self.loss if self.sq is None else self.sq, n])


_SPLIT_METRICS = ("loss", "rmse", "mae", "acc_5y", "acc_decade")


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, head: Head,
             memory_format: torch.memory_format | None = None, taus: list[float] | None = None,
             transform=None) -> dict:
    """The split's loss (the head's, per sample) and the field's metrics in years, all processes together.

    Every metric comes from per-sample values gathered from all processes (``gather_for_metrics``
    also drops the samples the distributed sampler repeats to even out the last batch), never from an
    average of per-process values. Also returns the gathered standardized predictions and targets
    (``pred``, ``y``, on the CPU, dataset order: the loader is not shuffled and each gather
    concatenates the processes' consecutive batches) and, with ``taus``, the predicted quantiles in
    years (``q``, ``[n, len(taus)]``; distribution head only). ``transform``: applied to each input
    batch first (the grayscale check).
    """
    model.eval()
    kept: list[tuple[torch.Tensor, ...]] = []
    for x, y in loader:
        if transform is not None:
            x = transform(x)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        out = model(x).float()
        parts = [head.point(out), y.float(), head.per_sample(out, y).float()]
        q = head.quantiles(out, taus) if taus else None
        parts += [q] if q is not None else []
        kept.append(tuple(t.cpu() for t in accelerator.gather_for_metrics(tuple(parts))))
    model.train()
    columns = [torch.cat(c) for c in zip(*kept)] if kept else [torch.zeros(0)] * 3
    pred, y, loss = columns[:3]
    true_years = y.double().numpy() * head.target_std + head.target_mean
    pred_years = pred.double().numpy() * head.target_std + head.target_mean
    result = {"loss": loss.double().mean().item() if len(loss) else math.nan, **date_metrics(true_years, pred_years),
              "n": float(len(y)), "pred": pred, "y": y}
    if len(columns) > 3:
        result["q"] = columns[3]
    return result
