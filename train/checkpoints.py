"""The best-model checkpoint: one safetensors file that is enough to rebuild the model and predict years.

``best.safetensors`` holds the unwrapped model's tensors plus string metadata: the model config,
the target statistics (to turn outputs into years), the pixel normalization, and where it came from
(epoch, optimizer step, monitored metric and value). Writes are atomic (temp file, fsync, rename),
so a crash mid-write leaves the previous best file intact.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from train.config import ModelConfig
from train.errors import UserError
from train.models import build_model

FORMAT = "mok-date-checkpoint/1"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # The rename itself must reach the disk too, or a power loss can bring back the old name.
    fsync_dir(path.parent)


def checkpoint_metadata(
    *, model_cfg: ModelConfig, epoch: int, global_step: int, monitor: str, value: float,
    target_mean: float, target_std: float, pixel_mean: list[float], pixel_std: list[float], image_size: int,
) -> dict[str, str]:
    """The metadata every best checkpoint carries (safetensors metadata is ``str -> str``)."""
    return {
        "format": FORMAT,
        "model_config": json.dumps(model_cfg.model_dump(mode="json")),
        "epoch": str(epoch),
        "global_step": str(global_step),
        "monitor": monitor,
        "monitor_value": repr(float(value)),
        "target_mean": repr(float(target_mean)),
        "target_std": repr(float(target_std)),
        "pixel_mean": json.dumps([float(v) for v in pixel_mean]),
        "pixel_std": json.dumps([float(v) for v in pixel_std]),
        "image_size": str(image_size),
    }


# One long-lived thread for directory fsyncs: starting a thread per save would cost ~0.1 ms itself.
_syncer: ThreadPoolExecutor | None = None
_pending: list[Future] = []


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_durable() -> None:
    """Wait until every rename ``save_best`` made is on disk (the loop calls it before it ends)."""
    while _pending:
        _pending.pop(0).result()


def save_best(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Atomically write ``state_dict`` (already unwrapped/gathered) with ``metadata`` to ``path``.

    Temp file, fsync, rename: a reader or a crash sees the old file or the whole new one. The
    directory fsync that makes the rename itself survive a power loss (a second journal commit,
    15-20% of the write here) runs on a background thread while training goes on; the next save and
    the end of the run wait for it. benchmarks/overhead.py measures both.
    """
    global _syncer
    path = Path(path)
    # state_dict() tensors are already detached; copy only what is not a contiguous CPU tensor.
    tensors = {k: v if v.device.type == "cpu" and v.is_contiguous() else v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    wait_durable()  # renames reach the disk in the order they were made
    try:
        save_file(tensors, str(tmp), metadata=metadata)  # written by safetensors itself, no bytes copy
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if _syncer is None:
        _syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-dir-fsync")
    _pending.append(_syncer.submit(fsync_dir, path.parent))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata; a missing, corrupt or foreign file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found")
    payload = path.read_bytes()
    try:
        tensors = load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint '{path}' is not a readable safetensors file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"checkpoint '{path}' has no model metadata (not written by this trainer)")
    return tensors, metadata


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, str]]:
    """Rebuild the model described in the checkpoint's metadata and load its weights (eval mode)."""
    tensors, metadata = read_checkpoint(path)
    model = build_model(ModelConfig.model_validate(json.loads(metadata["model_config"])))
    model.load_state_dict(tensors)
    return model.eval(), metadata


def predict_years(model: torch.nn.Module, metadata: dict[str, str], images_uint8: torch.Tensor) -> torch.Tensor:
    """Dates in decimal years for a batch of uint8 ``[B, 3, H, W]`` images (already resized)."""
    mean = torch.tensor(json.loads(metadata["pixel_mean"]), device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(metadata["pixel_std"]), device=images_uint8.device).view(1, 3, 1, 1)
    x = (images_uint8.float() / 255.0 - mean) / std
    with torch.no_grad():
        out = model(x).double()
    return out.cpu() * float(metadata["target_std"]) + float(metadata["target_mean"])
