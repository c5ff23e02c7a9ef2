"""Where and how the run computes: processes, precision, CPU threads, TF32, compile, model placement.

``start_runtime`` runs first, before any file is read or written: everything it refuses (fp16 on a
CPU, an unknown compile backend) is a start-up error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import PartialState
from torch import nn

from train.config import Config
from train.errors import UserError
from train.models import maybe_sync_batchnorm
from train.tracking import check_wandb


def _quiet(*args, **kwargs) -> None:
    pass


@dataclass
class Runtime:
    """The processes of this run and the decisions made about them before the Accelerator exists."""

    processes: PartialState
    use_cpu: bool
    mixed_precision: str
    fsdp: bool
    say: Callable[..., None]  # print on the main process, nothing elsewhere

    @property
    def is_main(self) -> bool:
        return self.processes.is_main_process

    @property
    def is_local_main(self) -> bool:
        return self.processes.is_local_main_process

    @property
    def num_processes(self) -> int:
        return self.processes.num_processes


def start_runtime(cfg: Config) -> Runtime:
    """Join the process group and settle precision and threads; prints what it decided (main process)."""
    use_cpu = not torch.cuda.is_available()
    mixed_precision, note = resolve_mixed_precision(cfg, use_cpu)
    # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU starts N unrelated
    # single-process runs that all think they are the main process (N W&B runs); with it, gloo/MULTI_CPU.
    processes = PartialState(cpu=use_cpu)
    say = print if processes.is_main_process else _quiet
    if note:
        say(note)
    check_compile_backend(cfg)
    say(set_num_threads(cfg, use_cpu))
    if cfg.training.tf32:
        say(enable_tf32(use_cpu))
    # The same signal Accelerate reads when it builds the Accelerator (the FSDP launch config sets it).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return Runtime(processes, use_cpu, mixed_precision, fsdp, say)


def resolve_config(cfg: Config, name: str, rt: Runtime) -> Config:
    """The config as this run uses it, settled once: the run's name, W&B under a sweep agent, the
    options FSDP cannot serve; then W&B is checked (installed, credentials) before anything is written."""
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.name = name
    lg = cfg.logging
    if os.environ.get("WANDB_SWEEP_ID") and not lg.wandb.enabled:
        # Under `wandb agent` the trial reports to the sweep whatever the config file says.
        rt.say("W&B sweep agent detected (WANDB_SWEEP_ID): logging.wandb.enabled=true for this trial")
        lg.wandb.enabled = True
    if rt.fsdp and (lg.log_gradients or lg.wandb.watch_model):
        # Sharded gradients: the main process alone would read its shard (or wait on a collective).
        rt.say("warning: logging.log_gradients and logging.wandb.watch_model are ignored under FSDP "
               "(sharded gradients)")
        lg.log_gradients, lg.wandb.watch_model = False, False
    check_wandb(cfg)
    return cfg


def place_model(model: nn.Module, cfg: Config, rt: Runtime) -> nn.Module:
    """Sync-BN, channels-last and compile, in that order, before ``accelerator.prepare``."""
    model, bn_note = maybe_sync_batchnorm(model, cfg.model, rt.num_processes, rt.use_cpu)
    if bn_note:
        rt.say(bn_note)
    if cfg.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.training.compile:
        # In place (nn.Module.compile): the state dict keeps its keys, so checkpoints, resume and
        # predict work unchanged. A smaller last batch compiles once more, then shapes are dynamic.
        model.compile(backend=cfg.training.compile_backend)
    return model


def memory_format(cfg: Config) -> torch.memory_format | None:
    """The inputs' memory format: channels-last when the model is, else None (leave them as they come)."""
    return torch.channels_last if cfg.training.channels_last else None


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
    return (f"CPU threads per process: {torch.get_num_threads()} ({cores} cores / {local_processes} process(es) "
            "on this machine; set training.num_threads to change)")


def check_compile_backend(cfg: Config) -> None:
    if not cfg.training.compile:
        return
    import torch._dynamo

    if cfg.training.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        common = ", ".join([*torch._dynamo.list_backends(), "aot_eager", "eager"])  # not the testing-only ones
        raise UserError(f"training.compile_backend={cfg.training.compile_backend!r} is not a torch.compile "
                        f"backend here; choose one of: {common}")


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
