"""Models that map an RGB image to the date: one standardized number, or logits over year bins.

Three families, chosen by ``model.name``:

- ``mok_cnn``: the original design's "MoK_CNN": conv-BN-ReLU blocks (each block halves the
  resolution), global average pooling and a small regression head.
- ``resnet``: a small ResNet (basic blocks, one stage per entry of ``channels``).
- ``hf``: a transformers vision backbone with the same kind of head (``train.hf_backbone``; transformers
  is imported only then).

Each is built from a ``ModelConfig`` and the head's output width alone (``build_model``; for ``hf`` also
the backbone config a checkpoint stores), so a checkpoint that stores them in its metadata can rebuild
the exact architecture without the YAML it came from. Every parameter whose name starts with ``head.``
is the head; everything else is the backbone (``is_head_parameter``: what freezing and the per-group
learning rates split on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from train.config import ModelConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # GroupNorm does not depend on the per-process batch, which makes 1-process and N-process runs
    # follow the same curve; 8 groups (or fewer for narrow layers) is the usual choice.
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class MoKCNN(nn.Module):
    """conv-norm-ReLU x2 per block, max-pool between blocks, global pooling, MLP head."""

    def __init__(self, channels: list[int], hidden: int, dropout: float, norm: str, in_channels: int = 3,
                 out_dim: int = 1):
        super().__init__()
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(channels):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                _norm(norm, c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                _norm(norm, c_out),
                nn.ReLU(inplace=True),
            ]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_in, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.head(self.features(x)), self.out_dim)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet with one basic block per stage; every stage after the first halves the resolution."""

    def __init__(self, channels: list[int], hidden: int, dropout: float, norm: str, in_channels: int = 3,
                 out_dim: int = 1):
        super().__init__()
        self.out_dim = out_dim
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            _norm(norm, channels[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        c_in = channels[0]
        for i, c_out in enumerate(channels):
            stages.append(BasicBlock(c_in, c_out, stride=1 if i == 0 else 2, norm=norm))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_in, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.head(self.stages(self.stem(x))), self.out_dim)


def _squeeze(out: torch.Tensor, out_dim: int) -> torch.Tensor:
    # The regression head's one output becomes shape [batch] (what the losses and targets use).
    return out.squeeze(-1) if out_dim == 1 else out


MODELS = {"mok_cnn": MoKCNN, "resnet": SmallResNet}


def build_model(cfg: "ModelConfig", out_dim: int = 1, hf_config: dict | None = None) -> nn.Module:
    """Build the network named by ``cfg.name`` with the sizes in ``cfg``.

    ``out_dim``: 1 for the regression head (outputs shape ``[batch]``), the number of year bins for
    the distribution head (outputs ``[batch, out_dim]`` logits). ``hf_config``: model.name=hf only,
    the backbone's saved transformers config (a checkpoint's), so no download is needed."""
    if cfg.name == "hf":
        from train.hf_backbone import build_hf_model

        return build_hf_model(cfg, out_dim=out_dim, saved=hf_config)
    return MODELS[cfg.name](channels=list(cfg.channels), hidden=cfg.hidden, dropout=cfg.dropout, norm=cfg.norm,
                            out_dim=out_dim)


def is_head_parameter(name: str) -> bool:
    """Whether the parameter (a ``named_parameters`` name of the unwrapped model) belongs to the head."""
    return name.startswith("head.")


def maybe_sync_batchnorm(model: nn.Module, cfg: "ModelConfig", num_processes: int,
                         use_cpu: bool) -> tuple[nn.Module, str | None]:
    """Apply ``model.sync_batchnorm``: return ``(model, message or None)``.

    Call it right after ``build_model`` and before ``accelerator.prepare`` (DDP must wrap the converted
    layers). ``num_processes`` is the size of the whole job (all machines). BatchNorm layers become
    ``nn.SyncBatchNorm`` (statistics over the global batch; weights and running statistics are kept)
    only where PyTorch supports it: several processes on GPUs. Elsewhere the model is returned
    unchanged, and the message says why, so a user who asked for sync-BN is never left guessing:

    - on the CPU (gloo): PyTorch's SyncBatchNorm raises "SyncBatchNorm layers only work with GPU
      modules" at the first forward pass; each process keeps plain BatchNorm over its own batch;
    - one process: the local batch already is the global batch;
    - ``norm: group`` (or no BatchNorm layer): nothing to convert.
    """
    if not cfg.sync_batchnorm:
        return model, None
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn == 0:
        return model, ("note: model.sync_batchnorm=true has no effect: the model has no BatchNorm layers "
                       f"(model.norm={cfg.norm})")
    if num_processes <= 1:
        return model, "note: model.sync_batchnorm=true has no effect with one process (its batch is the whole batch)"
    if use_cpu:
        return model, (
            f"warning: model.sync_batchnorm=true is ignored on the CPU: PyTorch's SyncBatchNorm works only on GPUs. "
            f"Keeping plain BatchNorm: each of the {num_processes} processes normalizes over its own batch of "
            f"data.batch_size images. For statistics that do not depend on the process count use model.norm=group."
        )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, (f"model.sync_batchnorm: converted {n_bn} BatchNorm layers to SyncBatchNorm "
                   f"(statistics over all {num_processes} processes)")
