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
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch import nn
from tqdm.auto import tqdm

from train.checkpoints import atomic_write_bytes, checkpoint_metadata, read_checkpoint, save_best
from train.config import Config, UserError, flatten, to_yaml
from train.data import baselines, build_data, make_loaders
from train.models import build_model
from train.runinfo import new_run_name, run_info
from train.tracking import check_wandb, finish_trackers, log_model_artifact, start_trackers, tracker_list


def train(cfg: Config) -> dict:
    """Train, evaluate and track one run described by ``cfg``; return the results dict.

    Raises ``UserError`` for anything the user can fix (before any file is written where possible).
    """
    # --- Processes and precision ------------------------------------------------------------------
    use_cpu = not torch.cuda.is_available()
    mixed_precision, note = resolve_mixed_precision(cfg, use_cpu)
    # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU starts N unrelated
    # single-process runs that all think they are the main process (N W&B runs); with it, gloo/MULTI_CPU.
    state = PartialState(cpu=use_cpu)
    if note and state.is_main_process:
        print(note)
    set_num_threads(cfg, use_cpu)
    name = cfg.experiment.name or broadcast_object_list([new_run_name(cfg)])[0]
    cfg = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"name": name})})
    run_dir = Path(cfg.experiment.output_dir) / name
    if run_dir.exists():
        raise UserError(f"run directory '{run_dir}' already exists; choose another experiment.name (or remove it)")
    check_wandb(cfg)

    # --- Data (before anything is written: a bad manifest must leave no empty run directory) -------
    data = build_data(cfg)
    train_loader, val_loader, test_loader, sampler = make_loaders(cfg, data)

    # --- Run directory, Accelerator, trackers ----------------------------------------------------
    if state.is_main_process:
        make_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
    state.wait_for_everyone()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        log_with=tracker_list(cfg, run_dir),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
    )
    set_seed(cfg.experiment.seed)
    flat_config = {**flatten(cfg.model_dump(mode="json")), **flatten(run_info(), "meta.")}
    start_trackers(accelerator, cfg, run_dir, flat_config, run_id=None)

    exit_code = 1
    summary: dict = {}
    try:
        # --- Model, optimizer, schedule, prepare -------------------------------------------------
        model = build_model(cfg.model)
        optimizer = build_optimizer(cfg, model)
        model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader, test_loader
        )
        steps_per_epoch = math.ceil(len(train_loader) / cfg.training.gradient_accumulation_steps)
        # Not passed through prepare(): a prepared scheduler steps num_processes times per call.
        # Counting our own optimizer steps keeps the lr at a given fraction of training the same
        # with 1 and N processes, and lets ReduceLROnPlateau step exactly once per epoch.
        scheduler, step_per_batch = build_scheduler(cfg, optimizer, steps_per_epoch)
        loss_fn = build_loss(cfg)
        es = cfg.training.early_stopping
        best_path = run_dir / "checkpoints" / "best.safetensors"
        log_every = cfg.logging.log_every_n_steps
        show_bar = accelerator.is_local_main_process and cfg.logging.progress_bar

        global_step, best_value, best_epoch, bad_epochs, stopped_early = 0, math.inf, 0, 0, False
        lr_used = current_lr(optimizer)
        sign = 1.0 if es.mode == "min" else -1.0
        t_start = time.perf_counter()
        for epoch in range(1, cfg.training.epochs + 1):
            # --- Train one epoch -----------------------------------------------------------------
            model.train()
            sampler.set_epoch(epoch)
            sums = torch.zeros(3, device=accelerator.device)  # loss*n, squared error, n
            t0 = time.perf_counter()
            bar = tqdm(total=len(train_loader), desc=f"Epoch {epoch}/{cfg.training.epochs}", leave=False, disable=not show_bar)
            for x, y in train_loader:
                with accelerator.accumulate(model):
                    pred = model(x).float()
                    loss = loss_fn(pred, y)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.training.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # Accumulated on the device: no host sync on steps that do not log.
                sums += torch.stack([loss.detach() * len(y), (pred.detach() - y).pow(2).sum(), torch.tensor(float(len(y)), device=y.device)])
                bar.update(1)
                if accelerator.sync_gradients:
                    global_step += 1
                    lr_used = current_lr(optimizer)  # the lr this step used, before the schedule moves on
                    if step_per_batch and not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    if global_step % log_every == 0:
                        loss_step = accelerator.reduce(loss.detach(), "mean").item()  # sync point, log steps only
                        accelerator.log({"train/loss_step": loss_step, "lr": lr_used}, step=global_step)
                        bar.set_postfix(loss=f"{loss_step:.4f}")
            bar.close()
            sums = accelerator.reduce(sums, "sum")
            epoch_time = time.perf_counter() - t0

            # --- Validate over the whole val set, exactly once ------------------------------------
            val = evaluate(accelerator, model, val_loader, loss_fn, data.target_std)
            n_train = sums[2].item()
            metrics = {
                "train/loss": sums[0].item() / n_train,
                "train/rmse": math.sqrt(sums[1].item() / n_train) * data.target_std,
                **{f"val/{k}": v for k, v in val.items() if k != "n"},
                "lr": lr_used,
                "epoch": epoch,
                "epoch_time_s": epoch_time,
                "samples_per_s": n_train / epoch_time,
            }
            value = metrics[es.monitor]
            improved = math.isfinite(value) and (best_epoch == 0 or sign * (best_value - value) > es.min_delta)
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch, 0
                meta = checkpoint_metadata(
                    model_cfg=cfg.model, epoch=epoch, global_step=global_step, monitor=es.monitor, value=value,
                    target_mean=data.target_mean, target_std=data.target_std, pixel_mean=data.pixel_mean,
                    pixel_std=data.pixel_std, image_size=cfg.data.image_size,
                )
                save_best_checkpoint(accelerator, model, best_path, meta, log_artifact=cfg.logging.wandb.log_model)
            else:
                bad_epochs += 1
            if best_epoch:
                metrics["best/" + es.monitor.split("/")[1]] = best_value
            accelerator.log(metrics, step=global_step)
            if accelerator.is_main_process:
                print_epoch(epoch, cfg.training.epochs, metrics, improved)
            if scheduler is not None and not step_per_batch:
                # Every process computed the same gathered value, so every process steps alike.
                scheduler.step(value) if cfg.training.scheduler.name == "plateau" else scheduler.step()
            if es.enabled and bad_epochs >= es.patience:
                stopped_early = True
                accelerator.print(f"Early stopping: {es.monitor} did not improve for {es.patience} epochs (best {best_value:.6f} at epoch {best_epoch})")
                break
        train_time = time.perf_counter() - t_start

        # --- Test with the best weights -------------------------------------------------------------
        accelerator.wait_for_everyone()
        if best_epoch:
            load_best_weights(accelerator, model, best_path)
        else:
            accelerator.print(f"warning: {es.monitor} was never finite; testing the last weights")
        test = evaluate(accelerator, model, test_loader, loss_fn, data.target_std)
        test_metrics = {f"test/{k}": v for k, v in test.items() if k != "n"}
        accelerator.log(test_metrics, step=global_step)
        base = baselines(data, num_workers=cfg.data.num_workers) if accelerator.is_main_process else {}
        results = {
            **test_metrics,
            **base,
            "test/rmse_over_mean_baseline": test["rmse"] / base["baseline/mean_rmse"] if base else None,
            "test/rmse_over_colour_linear_baseline": test["rmse"] / base["baseline/colour_linear_rmse"] if base else None,
            "best_epoch": best_epoch,
            f"best/{es.monitor.split('/')[1]}": best_value,
            "epochs_run": epoch,
            "stopped_early": stopped_early,
            "global_step": global_step,
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "val_samples": int(val["n"]),
            "test_samples": int(test["n"]),
            "train_time_s": train_time,
            "run_dir": str(run_dir),
        }
        if accelerator.is_main_process:
            atomic_write_bytes(run_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
            print_results(results)
        summary = {k: v for k, v in results.items() if v is not None and k != "run_dir"}
        exit_code = 0
        return results
    except UserError:
        exit_code = 2
        raise
    finally:
        finish_trackers(accelerator, exit_code, summary)


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


def set_num_threads(cfg: Config, use_cpu: bool) -> None:
    """Intra-op CPU threads. `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which
    would leave all but one core idle; by default each process gets its share of the cores."""
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    elif use_cpu:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, cores // local_processes))


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "checkpoints").mkdir()
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
    o = cfg.training.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


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


def build_loss(cfg: Config):
    if cfg.training.loss == "huber":
        return nn.HuberLoss(delta=cfg.training.huber_delta)
    return nn.L1Loss() if cfg.training.loss == "l1" else nn.MSELoss()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, loss_fn, target_std: float) -> dict[str, float]:
    """Loss (standardized units), RMSE and MAE (years) over the whole split, all processes together.

    ``gather_for_metrics`` drops the samples the distributed sampler repeats to even out the last
    batch, and RMSE comes from the summed squared errors, never from an average of per-process RMSEs.
    """
    model.eval()
    per_sample = type(loss_fn)(**({"delta": loss_fn.delta} if isinstance(loss_fn, nn.HuberLoss) else {}), reduction="none")
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for x, y in loader:
        pred = model(x).float()
        pred, y = accelerator.gather_for_metrics((pred, y))
        err = pred - y
        sums += torch.stack([per_sample(pred, y).sum(), err.pow(2).sum(), err.abs().sum(), torch.tensor(float(len(y)), device=y.device)]).double()
    model.train()
    loss_sum, sq, ab, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "rmse": math.sqrt(sq / n) * target_std, "mae": ab / n * target_std, "n": n}


def save_best_checkpoint(accelerator: Accelerator, model: nn.Module, path: Path, meta: dict[str, str], log_artifact: bool) -> None:
    # get_state_dict must run on every process (it gathers under FSDP/DeepSpeed); only main writes.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_best(state_dict, path, meta)
        if log_artifact:
            log_model_artifact(accelerator, path, meta)
    accelerator.wait_for_everyone()


def load_best_weights(accelerator: Accelerator, model: nn.Module, path: Path) -> None:
    """Load ``best.safetensors`` into the model on every process (read on main, then broadcast)."""
    payload = [read_checkpoint(path)[0] if accelerator.is_main_process else None]
    state_dict = broadcast_object_list(payload)[0] if accelerator.num_processes > 1 else payload[0]
    accelerator.unwrap_model(model).load_state_dict(state_dict)


def print_epoch(epoch: int, epochs: int, m: dict, improved: bool) -> None:
    star = "  (best so far, saved)" if improved else ""
    tqdm.write(
        f"\nEpoch [{epoch}/{epochs}] Results:{star}\n"
        f"  Train Loss: {m['train/loss']:.6f}  |  Train RMSE: {m['train/rmse']:.6f}\n"
        f"  Val Loss:   {m['val/loss']:.6f}  |  Val RMSE:   {m['val/rmse']:.6f}\n"
        f"  Learning Rate: {m['lr']:.2e}"
    )


def print_results(r: dict) -> None:
    print(
        f"\nTest results (best weights from epoch {r['best_epoch']}, {r['test_samples']} images):\n"
        f"  Test Loss: {r['test/loss']:.6f}  |  Test RMSE: {r['test/rmse']:.3f} years  |  Test MAE: {r['test/mae']:.3f} years\n"
        f"  Baseline RMSE, predict the train mean:       {r['baseline/mean_rmse']:.3f} years (CNN/baseline = {r['test/rmse_over_mean_baseline']:.2f})\n"
        f"  Baseline RMSE, linear on colour mean/std:    {r['baseline/colour_linear_rmse']:.3f} years (CNN/baseline = {r['test/rmse_over_colour_linear_baseline']:.2f})\n"
        f"  Results: {Path(r['run_dir']) / 'results.json'}"
    )
