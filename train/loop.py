"""The training function: one plain loop in Accelerate order, read top to bottom.

    Accelerator -> data -> run directory -> trackers -> model/optimizer -> prepare
    -> epochs (train, gather_for_metrics eval, log, best checkpoint, early stopping)
    -> test with the best weights -> results.json -> trackers closed (on every exit path).

Building, evaluating and checkpointing live in small helpers beside it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from torch import nn
from tqdm.auto import tqdm

from train.checkpoints import atomic_write_bytes, checkpoint_metadata, read_checkpoint, save_best, wait_durable
from train.config import Config, flatten, parse_duration, to_yaml
from train.errors import CleanExit, UserError
from train.data import baselines, build_data, make_loaders
from train.extras import (
    SystemMetrics, gradient_histograms, gradient_layers, gradient_norms, gradient_scale, log_rich, log_system_metrics,
    prediction_sample, prediction_values, watch_model,
)
from train.models import build_model, maybe_sync_batchnorm
from train.redaction import redact
from train.runinfo import new_run_name, run_info
from train.state import (
    Progress, list_states, prune, publish, read_progress, resolve_resume, state_name, state_root, write_progress_and_manifest,
)
from train.stopping import NonFiniteLoss, StopSignals, Stopped, TimeLimit, agree
from train.tracking import check_wandb, finish_trackers, log_model_artifact, start_trackers, tracker_list, wandb_run_id


WORST_ROWS = 10  # rows of the worst-predictions table (log_predictions)


def train(cfg: Config, resume: str | None = None) -> dict:
    """Train, evaluate and track one run described by ``cfg``; return the results dict.

    ``resume``: ``"auto"`` or a path (see ``train.state.resolve_resume``). Raises ``UserError`` for
    anything the user can fix (before any file is written where possible), ``Stopped`` after a
    signal or ``training.max_time`` (a full state is saved), ``NonFiniteLoss`` for NaN/inf.
    """
    # --- Processes and precision ------------------------------------------------------------------
    use_cpu = not torch.cuda.is_available()
    mixed_precision, note = resolve_mixed_precision(cfg, use_cpu)
    # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU starts N unrelated
    # single-process runs that all think they are the main process (N W&B runs); with it, gloo/MULTI_CPU.
    state = PartialState(cpu=use_cpu)
    say = print if state.is_main_process else (lambda *a, **k: None)
    if note:
        say(note)
    check_compile_backend(cfg)
    say(set_num_threads(cfg, use_cpu))
    if cfg.training.tf32:
        say(enable_tf32(use_cpu))

    # --- Which run: a new one, or a resumed one ----------------------------------------------------
    resume_dir, progress = None, None
    if resume:
        resume_dir, run_dir = resolve_resume(resume, cfg.experiment.output_dir, cfg.experiment.name, warn=say)
        if resume_dir is not None:
            progress = read_progress(resume_dir)
            say(f"Resuming run '{progress.run_name}' from {resume_dir} (epoch {progress.epoch}, step {progress.global_step})")
        else:
            say(f"No complete state in '{run_dir}': starting the run from scratch")
        name = run_dir.name
    else:
        name = cfg.experiment.name or broadcast_object_list([new_run_name(cfg.model.name)])[0]
        run_dir = Path(cfg.experiment.output_dir) / name
        if run_dir.exists():
            raise UserError(f"run directory '{run_dir}' already exists; choose another experiment.name, or continue it with --resume auto")
    cfg = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"name": name})})
    if os.environ.get("WANDB_SWEEP_ID") and not cfg.logging.wandb.enabled:
        # Under `wandb agent` the trial reports to the sweep whatever the config file says.
        say("W&B sweep agent detected (WANDB_SWEEP_ID): logging.wandb.enabled=true for this trial")
        cfg.logging.wandb.enabled = True
    check_wandb(cfg)

    # --- Data (before anything is written: a bad manifest must leave no empty run directory) -------
    data = build_data(cfg)
    train_loader, val_loader, test_loader, sampler = make_loaders(cfg, data)
    # Its own generator: otherwise creating the iterator draws from the global RNG that dropout
    # uses, and a mid-epoch resume (which creates it at another point) would shift that stream.
    train_loader.generator = torch.Generator().manual_seed(cfg.experiment.seed)
    set_seed(cfg.experiment.seed)  # before the model exists: its initialization is part of the run
    model = build_model(cfg.model)
    if cfg.model.init_from and progress is None:
        load_weights_strict(model, cfg.model.init_from, what="model.init_from")
        say(f"Initialized the model from {cfg.model.init_from}")
    model, bn_note = maybe_sync_batchnorm(model, cfg.model, state.num_processes, use_cpu)
    if bn_note:
        say(bn_note)
    memory_format = torch.channels_last if cfg.training.channels_last else None
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    if cfg.training.compile:
        # In place (nn.Module.compile): the state dict keeps its keys, so checkpoints, resume and
        # predict work unchanged. A smaller last batch compiles once more, then shapes are dynamic.
        model.compile(backend=cfg.training.compile_backend)

    # --- Run directory, Accelerator, trackers ----------------------------------------------------
    if state.is_main_process:
        make_run_dir(run_dir, exist_ok=resume is not None)
        if not (run_dir / "config.yaml").exists():
            atomic_write_bytes(run_dir / "config.yaml", config_yaml(cfg).encode())
    state.wait_for_everyone()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        # purge_step: TensorBoard hides events at or after the resumed step, so no step repeats.
        log_with=tracker_list(cfg, run_dir, purge_step=progress.global_step + 1 if progress else (0 if resume else None)),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
    flat_config = redact({**flatten(cfg.model_dump(mode="json")), **flatten(run_info(), "meta.")})
    start_trackers(accelerator, cfg, run_dir, flat_config, run_id=progress.wandb_run_id if progress else None)
    if data.skipped_rows and progress is None:
        accelerator.log({"data/skipped_rows": data.skipped_rows}, step=0)

    exit_code = 1
    summary: dict = {}
    lg = cfg.logging
    try:
        # --- Optimizer, schedule, prepare, resume ------------------------------------------------
        optimizer = build_optimizer(cfg, model)
        model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader, test_loader
        )
        steps_per_epoch = math.ceil(len(train_loader) / cfg.training.gradient_accumulation_steps)
        # Not passed through prepare(): a prepared scheduler steps num_processes times per call.
        # Counting our own optimizer steps keeps the lr at a given fraction of training the same
        # with 1 and N processes, and lets ReduceLROnPlateau step exactly once per epoch.
        scheduler, step_per_batch = build_scheduler(cfg, optimizer, steps_per_epoch)
        loss_fn, eval_loss = build_loss(cfg), build_loss(cfg, reduction="none")
        # Optional logging (train/extras.py); all off by default.
        if accelerator.distributed_type == DistributedType.FSDP and (lg.log_gradients or cfg.logging.wandb.watch_model):
            # Sharded gradients: the main process alone would read its shard (or wait on a collective).
            say("warning: logging.log_gradients and logging.wandb.watch_model are ignored under FSDP (sharded gradients)")
            lg = lg.model_copy(update={"log_gradients": False, "wandb": lg.wandb.model_copy(update={"watch_model": False})})
            cfg = cfg.model_copy(update={"logging": lg})
        grad_layers = gradient_layers(accelerator.unwrap_model(model)) if lg.log_gradients and accelerator.is_main_process else None
        watch_model(accelerator, model, cfg)
        system = SystemMetrics(accelerator.device) if lg.system_metrics and accelerator.is_main_process else None
        val_sample = prediction_sample(len(data.val), lg.num_predictions, cfg.experiment.seed)
        test_sample = prediction_sample(len(data.test), lg.num_predictions, cfg.experiment.seed)
        es, ck = cfg.training.early_stopping, cfg.checkpoint
        best_path = run_dir / "checkpoints" / "best.safetensors"
        log_every = cfg.logging.log_every_n_steps
        show_bar = accelerator.is_local_main_process and cfg.logging.progress_bar
        sign = 1.0 if es.mode == "min" else -1.0
        p = progress or Progress(run_name=name, model_config=cfg.model.model_dump(mode="json"))
        p.num_processes = accelerator.num_processes
        p.wandb_run_id = wandb_run_id(accelerator) or p.wandb_run_id
        if progress is not None:
            if not progress.epoch_done and progress.num_processes != accelerator.num_processes:
                raise UserError(
                    f"--resume: {resume_dir} was saved mid-epoch with {progress.num_processes} processes; resume it with "
                    f"{progress.num_processes} (the batches already seen are counted per process), or from an epoch-end state"
                )
            restore_state(accelerator, model, scheduler, resume_dir, progress)
            if accelerator.is_main_process:
                set_aside_newer_states(run_dir, progress.global_step)
        start_epoch = p.epoch + 1 if p.epoch_done else p.epoch
        time_limit = TimeLimit(parse_duration(cfg.training.max_time) if cfg.training.max_time else None)
        skipped_steps, val, lr_used = 0, None, [g["lr"] for g in optimizer.param_groups]
        # Per epoch: train + validation + logging, checkpoint and state writes excluded (benchmarks/).
        epoch_times: list[float] = []
        epoch_cpu_times: list[float] = []
        grad_log: dict[str, float] = {}

        # accumulate() matters only with several micro-batches per optimizer step; its context
        # manager alone costs ~7 us a step, which is measurable on small models (benchmarks/).
        accumulating, no_accumulation = cfg.training.gradient_accumulation_steps > 1, nullcontext()

        def save_state(epoch_done: bool, sums: torch.Tensor) -> None:
            """Full resumable state; refuses (on_nonfinite=stop) to write non-finite weights."""
            finite = all_finite(accelerator, model, sums)
            if not finite and cfg.training.on_nonfinite == "stop":
                raise NonFiniteLoss(f"non-finite loss or weights in epoch {p.epoch} by step {p.global_step}; no state saved, best.safetensors untouched")
            p.epoch_done, p.train_sums = epoch_done, [] if epoch_done else sums.tolist()
            p.scheduler = scheduler.state_dict() if scheduler is not None else None
            t0 = time.perf_counter()
            save_full_state(accelerator, run_dir, p, ck.keep_last)
            time_limit.last_save = time.perf_counter() - t0

        with StopSignals() as signals:
            for epoch in range(start_epoch, cfg.training.epochs + 1):
                if p.finished:
                    break
                # --- Train one epoch ---------------------------------------------------------
                model.train()
                skip = p.batches_done if (not p.epoch_done and epoch == p.epoch) else 0
                loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
                # On the prepared loader: it passes the epoch to our sampler on every iteration.
                loader.set_epoch(epoch)
                sums = EpochSums(accelerator.device, mse=cfg.training.loss == "mse", start=p.train_sums if skip else None)
                p.epoch, p.epoch_done, p.batches_done = epoch, False, skip
                t0, clock = time.perf_counter(), EpochClock()
                bar = tqdm(total=len(train_loader), initial=skip, desc=f"Epoch {epoch}/{cfg.training.epochs}", leave=False, disable=not show_bar)
                for x, y in loader:
                    if memory_format is not None:
                        x = x.contiguous(memory_format=memory_format)
                    with accelerator.accumulate(model) if accumulating else no_accumulation:
                        pred = model(x).float()
                        loss = loss_fn(pred, y)
                        accelerator.backward(loss)
                        step_ok = True
                        if grad_layers is not None and accelerator.sync_gradients:
                            # Before clipping, on the all-reduced gradients, divided by fp16's loss scale.
                            next_step = p.global_step + 1
                            if next_step % log_every == 0:
                                grad_log = gradient_norms(grad_layers, gradient_scale(accelerator))
                            if next_step % lg.histograms_every_n_steps == 0:
                                log_rich(accelerator, gradient_histograms(grad_layers, gradient_scale(accelerator)), step=next_step)
                        if accelerator.sync_gradients and (cfg.training.max_grad_norm or cfg.training.on_nonfinite == "skip_step"):
                            # Gradients are already all-reduced here, so every process sees the same norm
                            # and skips the same steps. skip_step reads it every step (like fp16's GradScaler).
                            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm or math.inf)
                            step_ok = cfg.training.on_nonfinite != "skip_step" or bool(torch.isfinite(norm))
                        if step_ok:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if step_ok:
                        sums.add(loss, pred, y)
                    else:
                        skipped_steps += 1
                    p.batches_done += 1
                    bar.update(1)
                    if not accelerator.sync_gradients:
                        continue
                    p.global_step += 1
                    lr_used = [g["lr"] for g in optimizer.param_groups]  # this step's, before the schedule moves on
                    if step_per_batch and not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    stop_reason = None
                    if p.global_step % log_every == 0:
                        # One collective for the log line, the stop flags and the finiteness check.
                        loss_sum, stop, time_up, bad = agree(accelerator, [loss.detach(), signals.received is not None, time_limit.nearly_up(), ~torch.isfinite(sums.tensor()).all()])
                        step_log = {"train/loss_step": loss_sum / accelerator.num_processes, **lr_values(optimizer, lr_used)}
                        if grad_layers is not None:
                            step_log.update(grad_log)
                        accelerator.log(step_log, step=p.global_step)
                        bar.set_postfix(loss=f"{loss_sum / accelerator.num_processes:.4f}")
                        if bad and cfg.training.on_nonfinite == "stop":
                            raise NonFiniteLoss(f"non-finite training loss in epoch {epoch} by step {p.global_step}; stopping (best.safetensors untouched)")
                        stop_reason = "signal" if stop else "max_time" if time_up else None
                    elif accelerator.num_processes == 1:
                        stop_reason = "signal" if signals.received else "max_time" if time_limit.nearly_up() else None
                    if stop_reason:
                        save_state(epoch_done=False, sums=sums.tensor())
                        raise announce_stop(accelerator, stop_message(stop_reason, signals.received, cfg, run_dir, p))
                    if ck.every_n_steps and p.global_step % ck.every_n_steps == 0 and p.batches_done < len(train_loader):
                        with clock.paused():
                            save_state(epoch_done=False, sums=sums.tensor())
                bar.close()
                sums = accelerator.reduce(sums.tensor(), "sum")
                epoch_time = time.perf_counter() - t0

                # --- Validate over the whole val set, exactly once --------------------------------
                val = evaluate(accelerator, model, val_loader, eval_loss, data.target_std, memory_format, keep=lg.log_predictions)
                n_train = max(sums[2].item(), 1.0)
                metrics = {
                    "train/loss": sums[0].item() / n_train,
                    "train/rmse": math.sqrt(sums[1].item() / n_train) * data.target_std,
                    **{f"val/{k}": v for k, v in val.items() if k not in ("n", "pred", "y")},
                    **lr_values(optimizer, lr_used),
                    "epoch": epoch,
                    "epoch_time_s": epoch_time,
                    "samples_per_s": n_train / epoch_time,
                }
                if skipped_steps:
                    metrics["train/skipped_steps"] = skipped_steps
                value = metrics[es.monitor]
                improved = math.isfinite(value) and (p.best_epoch == 0 or sign * (p.best_value - value) > es.min_delta)
                if improved:
                    p.best_value, p.best_epoch, p.bad_epochs = value, epoch, 0
                    meta = checkpoint_metadata(
                        model_cfg=cfg.model, epoch=epoch, global_step=p.global_step, monitor=es.monitor, value=value,
                        target_mean=data.target_mean, target_std=data.target_std, pixel_mean=data.pixel_mean,
                        pixel_std=data.pixel_std, image_size=cfg.data.image_size,
                    )
                    with clock.paused():
                        save_best_checkpoint(accelerator, model, best_path, meta, log_artifact=cfg.logging.wandb.log_model)
                else:
                    p.bad_epochs += 1
                if p.best_epoch:
                    metrics["best/" + es.monitor.split("/")[1]] = p.best_value
                if es.enabled:
                    p.stopped_early = p.bad_epochs >= es.patience
                    metrics["early_stopping/bad_epochs"] = p.bad_epochs
                    metrics["early_stopping/patience_left"] = es.patience - p.bad_epochs
                p.finished = p.stopped_early or epoch == cfg.training.epochs
                accelerator.log(metrics, step=p.global_step)
                if lg.log_predictions and (epoch % lg.predictions_every_n_epochs == 0 or p.finished) and accelerator.is_main_process:
                    log_rich(accelerator, prediction_values("val", data.val, val["pred"], val["y"], data.target_mean, data.target_std, val_sample, WORST_ROWS), step=p.global_step)
                log_system_metrics(accelerator, system, step=p.global_step)
                say_epoch = tqdm.write if accelerator.is_main_process else (lambda *a: None)
                say_epoch(epoch_block(epoch, cfg.training.epochs, metrics, improved, es if es.enabled else None, p))
                if scheduler is not None and not step_per_batch:
                    # Every process computed the same gathered value, so every process steps alike.
                    scheduler.step(value) if cfg.training.scheduler.name == "plateau" else scheduler.step()
                if p.stopped_early:
                    reason = f"{es.monitor} did not improve by more than {es.min_delta} for {es.patience} epochs (best {p.best_value:.6f} at epoch {p.best_epoch})"
                    say(f"Early stopping at epoch {epoch}: {reason}")
                    accelerator.log({"early_stopping/stopped_epoch": epoch, "early_stopping/reason": reason}, step=p.global_step)
                p.batches_done = 0
                epoch_times.append(clock.wall())
                epoch_cpu_times.append(clock.cpu())
                # --- End of epoch: an agreement point for stopping, and a full state --------------
                stop, time_up = agree(accelerator, [signals.received is not None, time_limit.nearly_up()])
                stop_reason = "signal" if stop else "max_time" if (time_up and not p.finished) else None
                if stop_reason or p.finished or (ck.every_n_epochs and epoch % ck.every_n_epochs == 0):
                    save_state(epoch_done=True, sums=torch.zeros(3, device=accelerator.device))
                if stop_reason:
                    raise announce_stop(accelerator, stop_message(stop_reason, signals.received, cfg, run_dir, p))
        train_time = time.perf_counter() - time_limit.start

        # --- Test with the best weights -------------------------------------------------------------
        accelerator.wait_for_everyone()
        if p.best_epoch:
            load_best_weights(accelerator, model, best_path)
        else:
            say(f"warning: {es.monitor} was never finite; testing the last weights")
        test = evaluate(accelerator, model, test_loader, eval_loss, data.target_std, memory_format, keep=lg.log_predictions)
        test_metrics = {f"test/{k}": v for k, v in test.items() if k not in ("n", "pred", "y")}
        accelerator.log(test_metrics, step=p.global_step)
        if lg.log_predictions and accelerator.is_main_process:
            log_rich(accelerator, prediction_values("test", data.test, test["pred"], test["y"], data.target_mean, data.target_std, test_sample, WORST_ROWS), step=p.global_step)
        base = baselines(data, num_workers=cfg.data.num_workers) if accelerator.is_main_process else {}
        results = {
            **test_metrics,
            **base,
            "test/rmse_over_mean_baseline": test["rmse"] / base["baseline/mean_rmse"] if base else None,
            "test/rmse_over_colour_linear_baseline": test["rmse"] / base["baseline/colour_linear_rmse"] if base else None,
            "best_epoch": p.best_epoch,
            f"best/{es.monitor.split('/')[1]}": p.best_value if p.best_epoch else None,
            "epochs_run": p.epoch,
            "stopped_early": p.stopped_early,
            "global_step": p.global_step,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "val_samples": int(val["n"]) if val else None,
            "test_samples": int(test["n"]),
            "skipped_rows": data.skipped_rows,
            "train_time_s": train_time,
            "epoch_times_s": epoch_times,
            "epoch_cpu_times_s": epoch_cpu_times,
            "run_dir": str(run_dir),
        }
        if accelerator.is_main_process:
            atomic_write_bytes(run_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
            print_results(results)
        summary = {k: v for k, v in results.items() if v is not None and k not in ("run_dir", "epoch_times_s", "epoch_cpu_times_s")}
        if p.stopped_early:
            summary["early_stopping/stopped_epoch"] = p.epoch
        exit_code = 0
        return results
    except CleanExit as e:
        exit_code = e.exit_code
        raise
    finally:
        wait_durable()
        finish_trackers(accelerator, exit_code, summary, preempted=exit_code == Stopped.exit_code, together=exit_code in (0, Stopped.exit_code))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def resolve_mixed_precision(cfg: Config, use_cpu: bool) -> tuple[str, str | None]:
    """Return ``(precision, note)``: the config's value wins over the launcher's (with a note when
    they differ); fp16 on a CPU is refused (Accelerate would silently compute in fp32)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = cfg.training.mixed_precision or launcher
    note = None
    if cfg.training.mixed_precision and launcher != "no" and launcher != wanted:
        note = f"note: training.mixed_precision={wanted} overrides the launcher's mixed precision ({launcher})"
    if wanted == "fp16" and use_cpu:
        raise UserError(
            "mixed precision fp16 needs a CUDA GPU (on the CPU it would silently run in fp32); "
            "use training.mixed_precision=bf16 or no"
        )
    return wanted, note


def set_num_threads(cfg: Config, use_cpu: bool) -> str:
    """Intra-op CPU threads; returns the line that says how many and why.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which would leave all but one
    core idle; by default each process gets its share of this machine's cores instead.
    """
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
        return f"CPU threads per process: {cfg.training.num_threads} (training.num_threads)"
    if not use_cpu:
        return f"CPU threads per process: {torch.get_num_threads()} (GPU run: the default)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cores // local_processes))
    return f"CPU threads per process: {torch.get_num_threads()} ({cores} cores / {local_processes} process(es) on this machine; set training.num_threads to change)"


def check_compile_backend(cfg: Config) -> None:
    if not cfg.training.compile:
        return
    import torch._dynamo

    if cfg.training.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        common = ", ".join([*torch._dynamo.list_backends(), "aot_eager", "eager"])  # not the testing-only ones
        raise UserError(f"training.compile_backend={cfg.training.compile_backend!r} is not a torch.compile backend here; choose one of: {common}")


def enable_tf32(use_cpu: bool) -> str:
    """TF32 tensor cores for fp32 matmuls and convolutions (CUDA, Ampere or newer)."""
    if use_cpu:
        return "note: training.tf32 has no effect on the CPU"
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return "TF32 allowed for fp32 matmuls and convolutions (used on Ampere or newer GPUs)"


def make_run_dir(run_dir: Path, exist_ok: bool = False) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=exist_ok)
        (run_dir / "checkpoints").mkdir(exist_ok=exist_ok)
    except FileExistsError:
        raise UserError(f"run directory '{run_dir}' already exists; choose another experiment.name") from None
    except OSError as e:
        raise UserError(f"cannot create run directory '{run_dir}': {e.strerror}; check experiment.output_dir") from None


def config_yaml(cfg: Config) -> str:
    """The resolved config; the header records where it came from and stays valid YAML for --config."""
    info = run_info()
    header = "".join(f"# {k}: {v}\n" for k, v in info.items())
    return f"# Resolved config of run '{cfg.experiment.name}'. Re-run with: python train/main.py --config <this file> experiment.name=<new name>\n{header}{to_yaml(cfg)}"


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Two named parameter groups: weight decay on conv/linear weights, none on biases and norm
    parameters (decaying those only pulls them to zero; nanoGPT and HF Trainer split the same way)."""
    o = cfg.training.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "decay", "params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Return ``(scheduler or None, steps_per_batch)``: cosine steps per optimizer step, step/plateau per epoch."""
    s = cfg.training.scheduler
    if s.name == "cosine":
        # A function of the fraction of training done, so 1 and N processes (N times fewer steps
        # per epoch each) see the same lr at the same point of training.
        total = max(1, cfg.training.epochs * steps_per_epoch)
        warmup = min(s.warmup_epochs / cfg.training.epochs, 1.0)

        def factor(step: int) -> float:
            done = step / total
            if done < warmup:
                return done / warmup
            progress = min(1.0, (done - warmup) / (1.0 - warmup)) if warmup < 1.0 else 1.0
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs, gamma=s.gamma), False
    if s.name == "plateau":
        mode = cfg.training.early_stopping.mode
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=s.plateau_factor, patience=s.plateau_patience), False
    return None, False


def build_loss(cfg: Config, reduction: str = "mean") -> nn.Module:
    """The configured loss on standardized targets; ``reduction="none"`` gives per-sample values."""
    if cfg.training.loss == "huber":
        return nn.HuberLoss(delta=cfg.training.huber_delta, reduction=reduction)
    return nn.L1Loss(reduction=reduction) if cfg.training.loss == "l1" else nn.MSELoss(reduction=reduction)


def lr_values(optimizer: torch.optim.Optimizer, lrs: list[float]) -> dict[str, float]:
    """``lr`` (the first group's, shown on the console) and ``lr/<group name>`` for every group."""
    return {"lr": lrs[0], **{f"lr/{g.get('name', i)}": lr for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs))}}


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


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, per_sample, target_std: float,
             memory_format: torch.memory_format | None = None, keep: bool = False) -> dict:
    """Loss (standardized units), RMSE and MAE (years) over the whole split, all processes together.

    ``gather_for_metrics`` drops the samples the distributed sampler repeats to even out the last
    batch, and RMSE comes from the summed squared errors, never from an average of per-process RMSEs.
    ``keep``: also return the gathered standardized predictions and targets (``pred``, ``y``, on the
    CPU) in dataset order: the loader is not shuffled and each gather concatenates the processes'
    consecutive batches.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, y in loader:
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        pred = model(x).float()
        pred, y = accelerator.gather_for_metrics((pred, y))
        err = pred - y
        sums += torch.stack([per_sample(pred, y).sum(), err.pow(2).sum(), err.abs().sum(), torch.tensor(float(len(y)), device=y.device)]).double()
        if keep:
            kept.append((pred.cpu(), y.cpu()))
    model.train()
    loss_sum, sq, ab, n = sums.tolist()
    n = max(n, 1.0)
    out = {"loss": loss_sum / n, "rmse": math.sqrt(sq / n) * target_std, "mae": ab / n * target_std, "n": n}
    if keep:
        out["pred"], out["y"] = (torch.cat(t) for t in zip(*kept)) if kept else (torch.zeros(0), torch.zeros(0))
    return out


def save_best_checkpoint(accelerator: Accelerator, model: nn.Module, path: Path, meta: dict[str, str], log_artifact: bool) -> None:
    # get_state_dict must run on every process (it gathers under FSDP/DeepSpeed); only main writes.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_best(state_dict, path, meta)
        if log_artifact:
            log_model_artifact(accelerator, path, meta)
    accelerator.wait_for_everyone()


def save_full_state(accelerator: Accelerator, run_dir: Path, progress: Progress, keep_last: int) -> None:
    """``save_state`` into a temporary directory, seal it with progress + manifest, rename, prune.

    Every process takes part (each writes its own RNG state); only the main process seals it.
    """
    final = state_root(run_dir) / state_name(progress.global_step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_progress_and_manifest(tmp, progress)
            publish(tmp, final)
            prune(run_dir, keep_last)
    except OSError as e:
        # The previous states are untouched: only the temporary directory was being written.
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the state {final} ({e.strerror or e}); the previous states are intact. Free disk space or check permissions, then resume with --resume auto") from None
    accelerator.wait_for_everyone()


def set_aside_newer_states(run_dir: Path, step: int) -> None:
    """Resuming from an older state abandons the newer ones: rename them (never delete) so that a
    later ``--resume auto`` does not jump back onto the abandoned branch."""
    for newer in list_states(run_dir):
        if int(newer.name.split("_")[1]) > step:
            newer.rename(newer.with_name(f"abandoned-{newer.name}"))


def restore_state(accelerator: Accelerator, model: nn.Module, scheduler, state_dir: Path, progress: Progress) -> None:
    """Load a verified state: weights (checked against the configured model first), optimizer, RNGs."""
    check_tensors_match(accelerator.unwrap_model(model), read_checkpoint_tensors(state_dir / "model.safetensors"), f"--resume {state_dir}")
    try:
        accelerator.load_state(str(state_dir))
    except ValueError as e:  # e.g. a state from a version whose optimizer had other parameter groups
        raise UserError(f"--resume {state_dir}: the saved optimizer state does not fit this optimizer ({e}); start a new run, warm-started with model.init_from={state_dir / 'model.safetensors'}") from None
    if scheduler is not None and progress.scheduler:
        scheduler.load_state_dict(progress.scheduler)


def read_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise UserError(f"'{path}' is not a readable safetensors file ({e})") from None


def check_tensors_match(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """UserError naming every tensor that is missing, unexpected or of another shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"{k}: missing" for k in expected if k not in got]
    problems += [f"{k}: not in the configured model" for k in got if k not in expected]
    problems += [f"{k}: shape {got[k]} vs {expected[k]} in the configured model" for k in expected if k in got and got[k] != expected[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"{what}: the checkpoint does not fit the configured model ({len(problems)} tensors differ: {shown}); check the model section")


def load_weights_strict(model: nn.Module, path: str, what: str) -> None:
    """Warm start: weights only, from a best.safetensors or any state's model.safetensors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: '{p}' not found")
    tensors = read_checkpoint_tensors(p)
    check_tensors_match(model, tensors, f"{what} '{p}'")
    model.load_state_dict(tensors)


def all_finite(accelerator: Accelerator, model: nn.Module, sums: torch.Tensor) -> bool:
    """True when the epoch's loss sums and every weight are finite on every process."""
    local = torch.isfinite(sums).all() & torch.stack([torch.isfinite(t).all() for t in model.parameters()]).all()
    return agree(accelerator, [~local])[0] == 0


def announce_stop(accelerator: Accelerator, lines: list[str]) -> Stopped:
    """Print the stop lines once (main process) before any process exits: torchrun ends the other
    workers as soon as one exits non-zero, which could otherwise swallow them."""
    if accelerator.is_main_process:
        print("\n".join(lines), file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    stop = Stopped(lines)
    stop.printed = True
    return stop


def stop_message(reason: str, signal_name: str | None, cfg: Config, run_dir: Path, p: Progress) -> list[str]:
    why = f"{signal_name or 'a signal to another process'} received" if reason == "signal" else f"training.max_time ({cfg.training.max_time}) nearly reached"
    launcher = "accelerate launch [same launcher options]" if "LOCAL_RANK" in os.environ else "python"
    kept, skip_next = [], False
    for a in sys.argv[1:]:
        if skip_next:
            skip_next = False
        elif a == "--resume":
            skip_next = True
        elif not a.startswith(("--resume=", "experiment.name=")):
            kept.append(a)
    args = " ".join(shlex.quote(a) for a in kept)
    return [
        f"Stopped: {why}; full state saved at epoch {p.epoch}, step {p.global_step} in {state_root(run_dir) / state_name(p.global_step)}",
        f"Resume with: {launcher} train/main.py {args} experiment.name={cfg.experiment.name} --resume auto",
    ]


def load_best_weights(accelerator: Accelerator, model: nn.Module, path: Path) -> None:
    """Load ``best.safetensors`` into the model on every process (read on main, then broadcast)."""
    if getattr(accelerator, "is_fsdp2", False):
        # Sharded parameters: let torch scatter the full state dict from rank 0 (not run on a GPU
        # here yet; see docs/DISTRIBUTED.md).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = read_checkpoint(path)[0] if accelerator.is_main_process else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    payload = [read_checkpoint(path)[0] if accelerator.is_main_process else None]
    state_dict = broadcast_object_list(payload)[0] if accelerator.num_processes > 1 else payload[0]
    accelerator.unwrap_model(model).load_state_dict(state_dict)


def epoch_block(epoch: int, epochs: int, m: dict, improved: bool, es=None, p: Progress | None = None) -> str:
    """The original design's per-epoch console block, plus the early-stopping count when it moves."""
    star = "  (best so far, saved)" if improved else ""
    block = (
        f"\nEpoch [{epoch}/{epochs}] Results:{star}\n"
        f"  Train Loss: {m['train/loss']:.6f}  |  Train RMSE: {m['train/rmse']:.6f}\n"
        f"  Val Loss:   {m['val/loss']:.6f}  |  Val RMSE:   {m['val/rmse']:.6f}\n"
        f"  Learning Rate: {m['lr']:.2e}"
    )
    if es is not None and p is not None and p.bad_epochs:
        block += f"\n  Early stopping: no improvement for {p.bad_epochs}/{es.patience} epochs (best {p.best_value:.6f} at epoch {p.best_epoch})"
    return block


def print_results(r: dict) -> None:
    print(
        f"\nTest results (best weights from epoch {r['best_epoch']}, {r['test_samples']} images):\n"
        f"  Test Loss: {r['test/loss']:.6f}  |  Test RMSE: {r['test/rmse']:.3f} years  |  Test MAE: {r['test/mae']:.3f} years\n"
        f"  Baseline RMSE, predict the train mean:       {r['baseline/mean_rmse']:.3f} years (CNN/baseline = {r['test/rmse_over_mean_baseline']:.2f})\n"
        f"  Baseline RMSE, linear on colour mean/std:    {r['baseline/colour_linear_rmse']:.3f} years (CNN/baseline = {r['test/rmse_over_colour_linear_baseline']:.2f})\n"
        f"  Results: {Path(r['run_dir']) / 'results.json'}"
    )
