"""What turns gradients into updates: the optimizer with its parameter groups, the lr schedule, the loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.config import Config
from train.models import is_head_parameter


# The parameter groups, head first: the console's and the trackers' plain ``lr`` is the first group's,
# so it stays training.optimizer.lr (times the schedule) when the backbone gets a smaller one.
GROUPS = ("head/decay", "head/no_decay", "backbone/decay", "backbone/no_decay")


def group_of(name: str, p: torch.Tensor) -> str:
    """The group of a parameter (a ``named_parameters`` name of the unwrapped model): head or backbone
    (``train.models.is_head_parameter``), then weight decay on conv/linear weights, none on biases and
    norm parameters (decaying those only pulls them to zero; nanoGPT and HF Trainer split the same way)."""
    part = "head" if is_head_parameter(name) else "backbone"
    return f"{part}/{'decay' if p.ndim >= 2 else 'no_decay'}"


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Up to four named parameter groups (``GROUPS``; empty ones left out), each with its lr
    (``group_lrs``) and weight decay. Parameters that are never trained (``requires_grad=False`` when
    the model is built) are left out."""
    o = cfg.training.optimizer
    lrs = group_lrs(cfg)
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for name, p in getattr(model, "_orig_mod", model).named_parameters():
        if p.requires_grad:
            members[group_of(name, p)].append(p)
    groups = [
        {"name": name, "params": params, "weight_decay": o.weight_decay if name.endswith("/decay") else 0.0,
         "lr": lrs[name]}
        for name, params in members.items() if params
    ]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def group_lrs(cfg: Config) -> dict[str, float]:
    """The peak lr of each named parameter group: ``training.optimizer.lr`` for the head, that times
    ``backbone_lr_ratio`` for the backbone (e.g. 0.1 for a pretrained one). Every schedule scales each
    group's lr by the same factor, so the ratio holds throughout."""
    o = cfg.training.optimizer
    return {name: o.lr if name.startswith("head/") else o.lr * o.backbone_lr_ratio for name in GROUPS}


def lr_tags(cfg: Config) -> list[str]:
    """The lr curves worth drawing for a run of ``cfg`` (the tracker's chart layout): ``lr/<group>``
    when the groups' lrs differ (``lr_values`` logs them then), else ``lr`` alone."""
    lrs = group_lrs(cfg)
    return [f"lr/{name}" for name in lrs] if len(set(lrs.values())) > 1 else ["lr"]


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Return ``(scheduler or None, steps_per_batch)``: cosine steps per optimizer step, step/plateau per epoch.

    Not passed through ``accelerator.prepare``: a prepared scheduler steps ``num_processes`` times per
    call. Counting our own optimizer steps keeps the lr at a given fraction of training the same with
    1 and N processes, and lets ReduceLROnPlateau step exactly once per epoch.
    """
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
        mode = cfg.training.early_stopping.direction
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=s.plateau_factor, patience=s.plateau_patience
        )
        return plateau, False
    return None, False


def build_loss(cfg: Config, reduction: str = "mean") -> nn.Module:
    """The configured loss on standardized targets; ``reduction="none"`` gives per-sample values."""
    if cfg.training.loss == "huber":
        return nn.HuberLoss(delta=cfg.training.huber_delta, reduction=reduction)
    return nn.L1Loss(reduction=reduction) if cfg.training.loss == "l1" else nn.MSELoss(reduction=reduction)


def lr_values(optimizer: torch.optim.Optimizer, lrs: list[float]) -> dict[str, float]:
    """``lr`` (the first group's, shown on the console: the head's), and ``lr/<group name>`` for every
    group only when the groups' lrs differ: equal ones would log the same curve four times.

    "Differ" is decided on the groups' lrs before any schedule (``initial_lr``, set by the schedulers)
    as well as on ``lrs``, so a tag never drops out for the steps where a schedule happens to bring
    different lrs to the same value (a cosine warmup starts every group at 0)."""
    values = {"lr": lrs[0]}
    initial = {g.get("initial_lr", lr) for g, lr in zip(optimizer.param_groups, lrs)}
    if len(initial) > 1 or len(set(lrs)) > 1:
        values.update({f"lr/{g.get('name', i)}": lr for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs))})
    return values
