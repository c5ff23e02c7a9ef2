"""The best-model checkpoint: one safetensors file that is enough to rebuild the model and predict years.

``best.safetensors`` holds the unwrapped model's tensors plus string metadata: the model config,
the target statistics (to turn outputs into years), the pixel normalization, and where it came from
(epoch, optimizer step, monitored metric and value). ``CheckpointMeta`` is the one schema of that
metadata: every reader (predict, the test at the end of a run) goes through ``read_checkpoint``.
Writes are atomic (``train.fsutil``), so a crash mid-write leaves the previous best file intact, and
they happen on a background thread (``BestCheckpoint``): training waits only for a copy of the weights.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import nn

from train.config import ModelConfig
from train.errors import UserError
from train.fsutil import atomic_file
from train.models import build_model

FORMAT = "mok-date-checkpoint/1"


class YearBinsMeta(BaseModel):
    """Bin ``k`` covers ``[start + k * width, start + (k + 1) * width)`` years."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    start: float
    width: float = Field(gt=0)
    count: int = Field(ge=2, le=100_000)


class CalibrationMeta(BaseModel):
    """Split-conformal corrections (years) per coverage level, fitted on ``n`` val images.

    ``method``: ``abs_residual`` (regression: point +- q) or ``cqr`` (distribution: the predicted
    quantiles widened, or narrowed when q < 0, by q)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: Literal["abs_residual", "cqr"]
    levels: list[float] = Field(min_length=1)
    q: list[float] = Field(min_length=1)
    n: int = Field(ge=1)

    @model_validator(mode="after")
    def _one_q_per_level(self):
        if len(self.q) != len(self.levels):
            raise ValueError("calibration needs one q per level")
        return self


class CheckpointMeta(BaseModel):
    """What ``best.safetensors`` carries besides its tensors (safetensors metadata is ``str -> str``;
    the lists and the model config are JSON inside those strings)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())

    format: str
    model: ModelConfig = Field(alias="model_config")
    epoch: int = Field(ge=0)
    global_step: int = Field(ge=0)
    monitor: str
    monitor_value: float = Field(allow_inf_nan=True)
    target_mean: float
    target_std: float = Field(gt=0)
    pixel_mean: list[float] = Field(min_length=3, max_length=3)
    pixel_std: list[float] = Field(min_length=3, max_length=3)
    image_size: int = Field(ge=8, le=1024)
    # Written since the dating heads (absent in older files, which then predict without intervals):
    year_bins: Optional[YearBinsMeta] = None  # distribution head: the bin layout its logits refer to
    calibration: Optional[CalibrationMeta] = None  # conformal date intervals, added at the end of a run
    # model.name=hf: the backbone's transformers config (to_dict) so predict rebuilds it with no network
    hf_config: Optional[dict[str, Any]] = None
    pixel_source: str = "data"  # data: train-split statistics; processor: the pretrained backbone's

    @property
    def out_dim(self) -> int:
        return self.year_bins.count if self.year_bins is not None else 1

    @field_validator("model", "pixel_mean", "pixel_std", "year_bins", "calibration", "hf_config", mode="before")
    @classmethod
    def _json(cls, v):
        if not isinstance(v, str):
            return v
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None

    @field_validator("pixel_std")
    @classmethod
    def _positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("every entry must be > 0")
        return v


def checkpoint_metadata(
    *, model_cfg: ModelConfig, epoch: int, global_step: int, monitor: str, value: float,
    target_mean: float, target_std: float, pixel_mean: list[float], pixel_std: list[float], image_size: int,
    year_bins: dict | None = None, hf_config: dict | None = None, pixel_source: str = "data",
) -> dict[str, str]:
    """The metadata every best checkpoint carries, as safetensors stores it (``str -> str``)."""
    optional = {"year_bins": year_bins, "hf_config": hf_config}
    return {
        **{k: json.dumps(v) for k, v in optional.items() if v is not None},
        "pixel_source": pixel_source,
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


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw metadata of any safetensors file; a missing or unreadable file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found")
    payload = path.read_bytes()
    try:
        tensors = load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"'{path}' is not a readable safetensors file ({e})") from None
    return tensors, metadata


# What to do about a best checkpoint that is damaged or was edited: its metadata and tensors were written
# together by the trainer, so nothing in the file itself can be trusted to repair it.
_DAMAGED = "the file was altered or damaged: use an intact copy of the run's checkpoints/best.safetensors"


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file's tensors, read from its header only (no tensor data)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"'{path}' is not a readable safetensors file ({e})") from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Tensors and validated metadata of a best checkpoint; anything wrong is one ``UserError`` line."""
    tensors, raw = read_safetensors(path)
    if raw.get("format") != FORMAT:
        raise UserError(f"checkpoint '{path}' has no model metadata (not written by this trainer); pass the "
                        "checkpoints/best.safetensors of a run of train/main.py")
    try:
        meta = CheckpointMeta.model_validate(raw)
    except (ValidationError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint '{path}' has incomplete or inconsistent metadata: {_first_problem(e)}; "
                        f"{_DAMAGED}") from None
    return tensors, meta


def _first_problem(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, (str, int, float)) and len(repr(got)) <= 60 else ""
        more = f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        return f"{where}: {err['msg'].removeprefix('Value error, ')}{shown}{more}"
    return f"a JSON field does not parse ({e})"


def check_tensors_match(model: nn.Module, tensors: dict[str, torch.Tensor] | dict[str, tuple], what: str,
                        model_desc: str = "the configured model", advice: str = "check the model section") -> None:
    """UserError naming every tensor that is missing, unexpected or of another shape.

    ``model_desc``/``advice``: what the model was built from and what to do (a warm start or resume
    fits the config's model section; a best checkpoint its own metadata)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(getattr(v, "shape", v)) for k, v in tensors.items()}  # tensors, or their shapes
    problems = [f"{k}: missing" for k in expected if k not in got]
    problems += [f"{k}: not in {model_desc}" for k in got if k not in expected]
    problems += [f"{k}: shape {got[k]} vs {expected[k]} in {model_desc}"
                 for k in expected if k in got and got[k] != expected[k]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"{what}: the checkpoint does not fit {model_desc} "
                        f"({len(problems)} tensors differ: {shown}); {advice}")


def load_weights_strict(model: nn.Module, path: str, what: str) -> None:
    """Warm start: weights only, from a best.safetensors or any state's model.safetensors."""
    if not Path(path).is_file():
        raise UserError(f"{what}: '{path}' not found")
    tensors, _ = read_safetensors(path)
    check_tensors_match(model, tensors, f"{what} '{path}'")
    model.load_state_dict(tensors)


def build_from_checkpoint(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model described in the checkpoint's metadata and load its weights (eval mode)."""
    tensors, meta = read_checkpoint(path)
    model = build_model(meta.model, out_dim=meta.out_dim, hf_config=meta.hf_config)
    check_tensors_match(model, tensors, f"checkpoint '{path}'", "the model its own metadata describes", _DAMAGED)
    model.load_state_dict(tensors)
    return model.eval(), meta


class BestCheckpoint:
    """``<run_dir>/checkpoints/best.safetensors`` of one run: saved, waited for, loaded back.

    A save copies the weights to host memory, and that copy is all training waits for: one background
    thread writes it to a temporary file, fsyncs it, renames it over the old one and fsyncs the
    directory (``train.fsutil.atomic_file``), so a reader or a crash (kill -9 included) sees the old
    file or the whole new one. The next save, ``update_metadata``, ``load_into``, ``close`` and every
    read of ``path`` wait for the write in flight; a write that failed raises its ``UserError`` there.
    Host memory holds one extra copy of the weights from the first save to ``close``: the next save
    waits for the write in flight and then copies into the same buffers, so it pays for no fresh pages
    (on this VM, faulting in 100 MB took longer than copying it). From a GPU they are pinned.
    benchmarks/overhead.py measures what training waits for against a plain ``save_file``.
    """

    def __init__(self, run_dir: Path):
        self._path = Path(run_dir) / "checkpoints" / "best.safetensors"
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._host: dict[str, torch.Tensor] = {}  # the copy being written, or the last one written

    @property
    def path(self) -> Path:
        """The file, once the last save is on it (waits for a write in flight): whoever opens it, W&B's
        model artifact for one, gets the best weights saved so far, never the previous ones."""
        self.wait()
        return self._path

    def __enter__(self) -> "BestCheckpoint":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the run is already failing: report a failed write too, but do not replace the run's own error
            self.close()
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)

    def save(self, accelerator: Accelerator, model: nn.Module, metadata: dict[str, str]) -> None:
        """Every process takes part (``get_state_dict`` gathers under FSDP/DeepSpeed); main writes."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            self.write(state_dict, metadata)
        accelerator.wait_for_everyone()

    def write(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Copy ``state_dict`` (already unwrapped/gathered) to host memory and write it with ``metadata``
        in the background; returns once the copy is made. Raises the previous write's ``UserError``."""
        self.wait()  # one write at a time: renames reach the disk in order, and the buffers are free again
        self._host = _host_copy(state_dict, self._host)
        if self._writer is None:
            # One long-lived thread: starting a thread per save would cost ~0.1 ms itself.
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="best-checkpoint-writer")
        self._pending = self._writer.submit(self._write_file, self._host, dict(metadata))

    def _write_file(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        try:
            with atomic_file(self._path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)  # written by safetensors itself, no bytes copy
        except (OSError, SafetensorError) as e:
            raise UserError(f"could not write {self._path} ({getattr(e, 'strerror', None) or e}); the previous "
                            "best checkpoint is intact. Free disk space or check permissions, then resume "
                            "with --resume auto") from None

    def wait(self) -> None:
        """Until the last save is on disk, renamed and durable; raises its ``UserError`` if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def update_metadata(self, extra: dict[str, str]) -> None:
        """Rewrite ``best.safetensors`` (atomically, after any write in flight) with the same tensors and
        its metadata updated with ``extra`` (e.g. the calibration fitted at the end of a run). Main
        process only; a missing or unreadable file is a ``UserError``."""
        self.wait()
        tensors, metadata = read_safetensors(self._path)
        self._write_file(tensors, {**metadata, **extra})

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._host = {}
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None

    def load_into(self, accelerator: Accelerator, model: nn.Module) -> None:
        """Load the best weights into the model on every process (read on main, then broadcast)."""
        self.wait()
        if getattr(accelerator, "is_fsdp2", False):
            # Sharded parameters: let torch scatter the full state dict from rank 0 (not run on a GPU
            # here yet; see docs/DISTRIBUTED.md).
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = read_checkpoint(self._path)[0] if accelerator.is_main_process else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, full, options=options)
            return
        payload = [read_checkpoint(self._path)[0] if accelerator.is_main_process else None]
        state_dict = broadcast_object_list(payload)[0] if accelerator.num_processes > 1 else payload[0]
        accelerator.unwrap_model(model).load_state_dict(state_dict)


def _host_copy(state_dict: dict[str, torch.Tensor], reuse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every tensor, into ``reuse``'s buffers where name, shape and dtype match.

    Always a copy: on the CPU ``state_dict()`` tensors are the live parameters, which the next
    optimizer step changes while the background write is still reading them."""
    out = {}
    for k, v in state_dict.items():
        buf = reuse.get(k)
        if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
            buf = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=v.is_cuda)
        out[k] = buf.copy_(v.detach())
    return out
