"""The one typed config schema, YAML loading, ``key=value`` overrides and validation.

Every default lives in the classes below; ``configs/model_config.yml`` spells them out with comments
and ``docs/CONFIG.md`` documents them. Loading collects every problem (unknown key with the closest
valid one, wrong type, out-of-range value, unknown name) and raises one ``ConfigError`` whose lines
name the full dotted path, so a misspelled key fails instead of silently falling back to a default.

Any bytes give error lines, never a traceback: a file that is not UTF-8 text, binary data, nesting
deeper than ``MAX_DEPTH``, alias bombs (``MAX_VALUES``), duplicate keys (named with both lines). Lines
that quote a value redact secrets and quote at most ``QUOTE_MAX`` characters. After the schema,
``machine_problems`` refuses what this machine or launch cannot run: more memory than its RAM, or a
batch of one image where a norm layer needs more than one value.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from train.errors import ConfigError
from train.redaction import redact, redact_text

# Ranges that are not a matter of taste (see each field's use):
SEED_MAX = 2**32 - 1  # np.random.seed (called by accelerate's set_seed) accepts 0 .. 2**32 - 1
COUNT_MAX = 2**31 - 1  # counts above a 32-bit integer are typos, and some reach C code that overflows
THREADS_MAX = 1024  # threads or worker processes per training process: more is a typo, and a crash
YEAR_RANGE = (1000.0, 3000.0)  # plausible dates of photographs (decimal years)
MAX_TIME_DAYS = 100_000  # ~270 years: more is a typo (and enough digits overflow float seconds)
NAME_MAX_BYTES = 255  # longest file name on common file systems (the run directory is named after it)
QUOTE_MAX = 80  # an error line quotes at most this many characters of any value


def _clip(text: Any, limit: int = QUOTE_MAX) -> str:
    """``text`` for an error line: secrets redacted, control characters escaped (one line, nothing that
    moves a terminal's cursor), cut to ``limit`` characters (``...`` marks a cut)."""
    text = redact_text(str(text))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(value: Any, key: str = "") -> str:
    """``repr(value)`` for an error line: redacted (a key named like key/token/secret hides it all), capped."""
    if key:
        value = redact({key: value})[key]
    try:
        text = repr(value)
    except Exception:  # a recursive structure or an exotic object: name its type only
        text = f"<{type(value).__name__}>"
    return _clip(text)


def _path_text(v: Optional[str]) -> Optional[str]:
    """A string used as (part of) a file path must be one the operating system can take."""
    if v is None:
        return v
    if "\0" in v:
        raise ValueError("must not contain a NUL character")
    try:
        os.fsencode(v)
    except UnicodeError:
        raise ValueError("contains characters that cannot be part of a file name") from None
    return v


class _Section(BaseModel):
    # Unknown keys are errors: a typo must fail, not silently fall back to a default.
    # coerce_numbers_to_str: `experiment.name=2024` or `tags=[2024]` are names, not errors.
    # allow_inf_nan=False: no float setting means anything as nan, inf or -inf.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


class ExperimentConfig(_Section):
    name: Optional[str] = Field(
        None, description="Run name; the run directory is <output_dir>/<name>. null: generated, unique."
    )
    output_dir: str = Field("runs", description="Parent directory of all run directories.")
    seed: int = Field(
        42, ge=0, le=SEED_MAX,
        description="Seed for data generation, splits, shuffling, init and dropout (0 to 2**32 - 1, NumPy's range)."
    )

    @field_validator("name")
    @classmethod
    def _plain_directory_name(cls, v):
        if v is not None and (not v.strip() or "/" in v or v in (".", "..")):
            raise ValueError("must be a plain directory name (no '/')")
        if v is not None and redact_text(v) != v:
            # The name becomes a directory, the W&B run name and part of console lines: no secrets in it.
            raise ValueError("contains a secret (the value of WANDB_API_KEY or HF_TOKEN, or a token); "
                             "choose another name")
        _path_text(v)
        if v is not None and len(v.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
            raise ValueError(f"must be at most {NAME_MAX_BYTES} bytes long (the file-system limit for a name)")
        return v

    @field_validator("output_dir")
    @classmethod
    def _os_path(cls, v):
        return _path_text(v)


class SyntheticConfig(_Section):
    num_train: int = Field(8000, ge=1, le=COUNT_MAX, description="Training images generated in memory.")
    num_val: int = Field(1000, ge=1, le=COUNT_MAX, description="Validation images.")
    num_test: int = Field(2000, ge=1, le=COUNT_MAX, description="Test images.")
    year_min: float = Field(1850.0, description="Earliest date (decimal year, 1000 to 3000).")
    year_max: float = Field(2020.0, description="Latest date (decimal year, 1000 to 3000).")

    @field_validator("year_min", "year_max")
    @classmethod
    def _plausible_year(cls, v):
        lo, hi = YEAR_RANGE
        if not lo <= v <= hi:
            raise ValueError(f"must be a decimal year between {lo:.0f} and {hi:.0f} (a plausible date of a photograph)")
        return v

    @model_validator(mode="after")
    def _range(self):
        if self.year_min >= self.year_max:
            raise ValueError(f"year_min ({self.year_min}) must be below year_max ({self.year_max})")
        return self


class ManifestConfig(_Section):
    path: Optional[str] = Field(None, description="CSV file with one row per image.")
    image_root: Optional[str] = Field(
        None, description="Directory that relative image paths start from. null: the CSV's directory."
    )
    path_column: str = Field("path", description="CSV column with the image path.")
    date_column: str = Field(
        "date", description="CSV column with the date: YYYY, YYYY-MM, YYYY-MM-DD or a decimal year."
    )
    split_column: Optional[str] = Field(
        None, description="CSV column with train/val/test per row. null: a seeded random split."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows for validation when there is no split column."
    )
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows for test when there is no split column.")
    group_column: Optional[str] = Field(
        None,
        description="CSV column naming the item/collection of each image: a random split keeps each group in one split."
    )

    @field_validator("path", "image_root")
    @classmethod
    def _os_path(cls, v):
        return _path_text(v)

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave rows for training (sum < 1)")
        return self


class AugmentConfig(_Section):
    hflip: bool = Field(False, description="Random horizontal flip (train only).")
    crop_scale_min: float = Field(
        1.0, gt=0, le=1, description="Random resized crop keeping at least this share of the area; 1.0 = off."
    )
    brightness: float = Field(0.0, ge=0, lt=1, description="Random brightness factor in [1-b, 1+b]; 0 = off.")


class DataConfig(_Section):
    kind: Literal["synthetic", "manifest"] = Field(
        "synthetic", description="synthetic: generated in memory; manifest: a CSV of image files."
    )
    image_size: int = Field(32, ge=8, le=1024, description="Images are square, image_size x image_size pixels.")
    batch_size: int = Field(64, ge=1, le=COUNT_MAX, description="Training batch size per process.")
    eval_batch_size: int = Field(256, ge=1, le=COUNT_MAX, description="Validation/test batch size per process.")
    num_workers: int = Field(0, ge=0, le=THREADS_MAX, description="DataLoader worker processes per training process.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description=(
            "Manifest rows with a bad date, a missing or undecodable image: error (list them, stop) or skip "
            "(count them)."
        ),
    )
    cache: bool = Field(
        False, description="Decode and resize manifest images once into a memory-mapped uint8 array on disk."
    )
    cache_dir: Optional[str] = Field(
        None, description="Where the cache lives (node-local disk on clusters). null: <output_dir>/.cache."
    )
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    manifest: ManifestConfig = ManifestConfig()

    @field_validator("cache_dir")
    @classmethod
    def _os_path(cls, v):
        return _path_text(v)

    @model_validator(mode="after")
    def _manifest_has_path(self):
        if self.kind == "manifest" and not self.manifest.path:
            raise ValueError("kind is 'manifest' but manifest.path is not set")
        return self


class HFConfig(_Section):
    name_or_path: Optional[str] = Field(
        None,
        description=(
            "A Hugging Face Hub id (e.g. facebook/convnext-tiny-224; must be in the local cache when offline) "
            "or a local directory written by save_pretrained."
        ),
    )
    pretrained: bool = Field(
        True, description="true: load the pretrained weights; false: build from the config only (random init)."
    )
    config: Optional[dict[str, Any]] = Field(
        None,
        description=(
            "Config fields for a backbone built without any download, e.g. {model_type: convnext, "
            "hidden_sizes: [16, 32], depths: [1, 1]}; with name_or_path they override that config's fields."
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute the backbone's activations in the backward pass (less memory, ~30% slower)."
    )

    @field_validator("name_or_path")
    @classmethod
    def _os_path(cls, v):
        return _path_text(v)


class ModelConfig(_Section):
    name: Literal["mok_cnn", "resnet", "hf"] = Field(
        "mok_cnn",
        description="mok_cnn (conv-BN-ReLU blocks), resnet (small ResNet) or hf (a transformers vision backbone)."
    )
    head: Literal["regression", "distribution"] = Field(
        "regression",
        description=(
            "regression: one standardized number; distribution: logits over year bins (soft-label cross-entropy), "
            "the date is the distribution's mean."
        ),
    )
    bin_years: float = Field(
        1.0, gt=0, le=100, description="distribution head: width of one year bin, in years."
    )
    channels: list[int] = Field(
        [16, 32, 64], min_length=1,
        description="Width of each block/stage; each one after the first halves the resolution."
    )
    hidden: int = Field(64, ge=1, le=COUNT_MAX, description="Width of the regression head's hidden layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the last linear layer.")
    norm: Literal["batch", "group"] = Field(
        "batch", description="batch: BatchNorm; group: GroupNorm (independent of the batch size)."
    )
    sync_batchnorm: bool = Field(
        False,
        description="Convert BatchNorm to SyncBatchNorm in multi-process GPU runs (PyTorch supports it on GPUs only)."
    )
    init_from: Optional[str] = Field(
        None, description="Start from the weights of this .safetensors checkpoint (no optimizer state)."
    )
    hf: HFConfig = HFConfig()

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, v):
        if any(c < 1 for c in v):
            raise ValueError("every entry must be >= 1")
        if any(c > COUNT_MAX for c in v):
            raise ValueError(f"every entry must be <= {COUNT_MAX}")
        return v

    @field_validator("init_from")
    @classmethod
    def _os_path(cls, v):
        return _path_text(v)

    @model_validator(mode="after")
    def _groups_divide_channels(self):
        # GroupNorm uses min(8, channels) groups (train/models.py), which must divide the channels.
        bad = [c for c in self.channels if c > 8 and c % 8]
        if self.norm == "group" and bad:
            raise ValueError(
                f"model.norm=group needs every entry of model.channels of 8 or more to be a multiple of 8 "
                f"(GroupNorm splits the channels into 8 groups); {', '.join(map(str, bad[:5]))} "
                f"{'is' if len(bad) == 1 else 'are'} not"
            )
        if self.name == "hf" and self.hf.name_or_path is None and (self.hf.pretrained or not self.hf.config):
            raise ValueError(
                "model.name=hf needs model.hf.name_or_path (a Hub id or a local directory), or "
                "model.hf.pretrained=false with model.hf.config (a backbone built from config fields alone)"
            )
        return self


class OptimizerConfig(_Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Decoupled (AdamW) or L2 (SGD) weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (ignored by SGD).")
    backbone_lr_ratio: float = Field(
        1.0, gt=0, le=100, description="The backbone's lr = lr x this (the head keeps lr); e.g. 0.1 when fine-tuning."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class SchedulerConfig(_Section):
    name: Literal["none", "cosine", "step", "plateau"] = Field(
        "cosine", description="none | cosine (with warmup) | step | plateau."
    )
    warmup_epochs: float = Field(0.5, ge=0, description="cosine: linear warmup length in epochs (fractions allowed).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr as a fraction of the peak.")
    step_epochs: int = Field(
        5, ge=1, le=COUNT_MAX, description="step: multiply the lr by gamma every step_epochs epochs."
    )
    gamma: float = Field(0.1, gt=0, le=1, description="step: the factor.")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="plateau: lr factor when the monitored metric stalls.")
    plateau_patience: int = Field(
        2, ge=0, le=COUNT_MAX, description="plateau: epochs without improvement before reducing."
    )


_HIGHER_IS_BETTER = ("val/acc_5y",)


class EarlyStoppingConfig(_Section):
    enabled: bool = Field(True, description="Stop when the monitored metric stops improving.")
    monitor: Literal["val/loss", "val/rmse", "val/mae", "val/acc_5y"] = Field(
        "val/rmse", description="Metric for early stopping, the plateau scheduler and the best checkpoint."
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="min: lower is better; max: higher is better; null: max for val/acc_5y, else min."
    )
    patience: int = Field(5, ge=1, le=COUNT_MAX, description="Epochs without improvement before stopping.")
    min_delta: float = Field(
        0.0, ge=0, description="Smallest change that counts as an improvement (in the metric's unit)."
    )

    @property
    def direction(self) -> str:
        """``min`` or ``max``: what the monitored metric should do (``mode``, or what the monitor implies)."""
        return self.mode or ("max" if self.monitor in _HIGHER_IS_BETTER else "min")


class EMAConfig(_Section):
    decay: Optional[float] = Field(
        None, gt=0, lt=1,
        description="Exponential moving average of the weights, e.g. 0.999; null = off. Validation, the best "
                    "checkpoint, test and predict use the averaged weights.",
    )
    start_epoch: int = Field(1, ge=1, le=COUNT_MAX, description="First epoch whose steps update the average.")


def parse_duration(text: str) -> float:
    """``[DD:]HH:MM:SS`` (Slurm's --time format) -> seconds."""
    parts = text.strip().split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"must be HH:MM:SS or DD:HH:MM:SS, got {_quote(text)}")
    values = [int(p) for p in parts]
    days = values.pop(0) if len(values) == 4 else 0
    hours, minutes, seconds = values
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"minutes and seconds must be below 60, got {_quote(text)}")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class TrainingConfig(_Section):
    epochs: int = Field(12, ge=1, le=COUNT_MAX, description="Maximum number of epochs.")
    loss: Literal["mse", "huber", "l1"] = Field(
        "mse", description="regression head: loss on standardized targets (the distribution head uses cross-entropy)."
    )
    label_sigma_years: float = Field(
        2.0, gt=0, le=1000,
        description="distribution head: std (years) of the Gaussian soft label centred on the true date."
    )
    freeze_backbone_epochs: int = Field(
        0, ge=0, le=COUNT_MAX,
        description="Train only the head for this many first epochs (the backbone's weights stay bit-unchanged)."
    )
    huber_delta: float = Field(1.0, gt=0, description="huber: delta, in standardized units.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=COUNT_MAX, description="Micro-batches per optimizer step.")
    max_grad_norm: Optional[float] = Field(
        None, gt=0, description="Clip the global gradient norm to this value. null: no clipping."
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = Field(
        None, description="null follows the launcher; no | fp16 (CUDA only) | bf16."
    )
    max_time: Optional[str] = Field(
        None, description="Wall-clock limit [DD:]HH:MM:SS: save a full state and stop cleanly before it."
    )
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop", description="Non-finite loss/gradients: stop the run, or skip that optimizer step on every process."
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` as false

    num_threads: Optional[int] = Field(
        None, ge=1, le=THREADS_MAX,
        description="CPU threads per process. null: on CPU, the cores divided among this machine's processes."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (in place: checkpoints keep their keys). Pays off on GPUs for long runs."
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend: inductor (needs a C++ compiler on CPU), aot_eager, eager, ..."
    )
    channels_last: bool = Field(
        False,
        description=(
            "Model and inputs in channels-last memory format (faster convolutions on recent GPUs, often with "
            "mixed precision)."
        ),
    )
    tf32: bool = Field(
        False,
        description=(
            "CUDA: allow TF32 tensor cores (Ampere or newer) for fp32 matmuls; PyTorch already allows them "
            "for convolutions. Ignored on CPU."
        ),
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    ema: EMAConfig = EMAConfig()

    @field_validator("max_time")
    @classmethod
    def _duration(cls, v):
        if v is not None and parse_duration(v) > MAX_TIME_DAYS * 86400:
            raise ValueError(f"must be at most {MAX_TIME_DAYS} days")
        return v


class CheckpointConfig(_Section):
    every_n_epochs: int = Field(
        1, ge=0, le=COUNT_MAX, description="Save a full resumable state every N epochs; 0 = never at epoch ends."
    )
    every_n_steps: Optional[int] = Field(
        None, ge=1, le=COUNT_MAX, description="Also save a full state every N optimizer steps. null: off."
    )
    keep_last: int = Field(
        2, ge=1, le=COUNT_MAX, description="Full states kept (newest); best.safetensors is never pruned."
    )


class WandbConfig(_Section):
    enabled: bool = Field(False, description="Log to Weights & Biases (opt-in).")
    project: str = Field("MoK_date_predict", description="W&B project (also the tracker project name).")
    entity: Optional[str] = Field(None, description="W&B team or user. null: your default entity.")
    run_name: Optional[str] = Field(None, description="W&B run name. null: the experiment name.")
    tags: list[str] = Field([], description="W&B tags.")
    group: Optional[str] = Field(None, description="W&B group (sweeps set it to the sweep name).")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="null follows WANDB_MODE (online when unset)."
    )
    log_model: bool = Field(True, description="Log the best checkpoint as a W&B model artifact.")
    watch_model: bool = Field(
        False,
        description=(
            "wandb.watch on the model (main process): parameter histograms, and gradient histograms unless "
            "logging.log_gradients already makes them."
        ),
    )
    watch_log_freq: Optional[int] = Field(
        None, ge=1, le=COUNT_MAX,
        description="wandb.watch logs every this many optimizer steps. null: logging.histograms_every_n_steps."
    )

    @field_validator("project")
    @classmethod
    def _wandb_project_name(cls, v):
        # What wandb.init accepts (wandb_settings.validate_project); checked here, before anything starts.
        bad = sorted(set("/\\#?%:") & set(v))
        if not v or len(v) > 128 or bad:
            raise ValueError("must be 1 to 128 characters without any of / \\ # ? % : (W&B's rule for project names)")
        return v

    @field_validator("tags")
    @classmethod
    def _wandb_tags(cls, v):
        if any(not 1 <= len(t) <= 64 for t in v):
            raise ValueError("every tag must be 1 to 64 characters long (W&B's rule)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, values):
        # The original design had these under wandb; they now feed TensorBoard too.
        moved = [k for k in ("log_predictions", "log_gradients") if isinstance(values, dict) and k in values]
        if moved:
            raise ValueError(
                "; ".join(f"logging.wandb.{k} moved to logging.{k}" for k in moved)
                + " (they log to TensorBoard as well as W&B)"
            )
        return values


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard events under <run_dir>/tensorboard.")
    jsonl: bool = Field(
        True, description="Write <run_dir>/metrics.jsonl: every logged scalar, one JSON line per log call."
    )
    report: bool = Field(
        True, description="Write <run_dir>/report.html (plots of the run) at the end; a drawing failure only warns."
    )
    log_every_n_steps: int = Field(
        50, ge=1, le=COUNT_MAX, description="Log train/loss_step every this many optimizer steps."
    )
    progress_bar: bool = Field(True, description="Show a tqdm bar on the main process.")
    log_predictions: bool = Field(
        False,
        description=(
            "Val predictions every predictions_every_n_epochs (and test at the end): W&B table of a fixed "
            "sample, residual histogram, RMSE by decade, worst predictions."
        ),
    )
    predictions_every_n_epochs: int = Field(
        1, ge=1, le=COUNT_MAX, description="log_predictions: every this many epochs (and the last)."
    )
    num_predictions: int = Field(
        32, ge=1, le=1000, description="log_predictions: images in the W&B table (the same ones every time)."
    )
    log_gradients: bool = Field(
        False,
        description=(
            "Per-layer gradient norms every log_every_n_steps, gradient histograms every "
            "histograms_every_n_steps, to both trackers."
        ),
    )
    histograms_every_n_steps: int = Field(
        500, ge=1, le=COUNT_MAX,
        description="Gradient (log_gradients) and wandb.watch histograms every this many optimizer steps."
    )
    system_metrics: bool = Field(
        False,
        description=(
            "TensorBoard gets process RSS, CPU % and CUDA memory each epoch (W&B records its own system "
            "metrics)."
        ),
    )
    eval_grayscale: bool = Field(
        True,
        description="At test: also evaluate on grayscale copies of the test images (test_gray/...): does the model "
                    "date by colour alone?",
    )
    wandb: WandbConfig = WandbConfig()


class CalibrationConfig(_Section):
    levels: list[float] = Field(
        [0.8, 0.9], max_length=5,
        description="Coverage levels of the date intervals, calibrated on the val split (split conformal); [] = off.",
    )

    @field_validator("levels")
    @classmethod
    def _levels(cls, v):
        if any(not 0.5 <= x < 1 for x in v):
            raise ValueError("every level must be in [0.5, 1), e.g. [0.8, 0.9]")
        if len(set(v)) != len(v) or any(abs(x * 100 - round(x * 100)) > 1e-9 for x in v):
            raise ValueError("levels must be distinct whole percentages, e.g. [0.8, 0.9, 0.95]")
        return sorted(v)


class Config(_Section):
    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @model_validator(mode="after")
    def _image_fits_the_model(self):
        # mok_cnn max-pools (rounding down) between blocks: 0x0 feature maps cannot be built.
        # resnet's stride-2 convolutions round up and never go below 1x1.
        halvings = len(self.model.channels) - 1
        if self.model.head == "distribution" and self.training.loss != "mse":
            raise ValueError(f"training.loss={self.training.loss} applies to model.head=regression; the distribution "
                             "head trains with soft-label cross-entropy: leave training.loss at mse")
        if self.model.name == "mok_cnn" and self.data.image_size >> halvings < 1:
            raise ValueError(
                f"data.image_size={self.data.image_size} is too small for {len(self.model.channels)} blocks "
                f"(each block after the first halves it); use fewer model.channels or larger images"
            )
        return self


# --------------------------------------------------------------------------------------------------
# What the configured run needs (train/models.py, train/data.py): checked before anything starts
# --------------------------------------------------------------------------------------------------


def feature_sizes(model: ModelConfig, image_size: int) -> list[int]:
    """Side length of the feature maps that each block's norm layers see (one entry per channel entry).

    mok_cnn: 2x2 max-pooling between blocks rounds down; resnet: 3x3 stride-2 convolutions with
    padding 1 round up. The resnet stem works at ``image_size`` (>= 8).
    """
    sizes, s = [], image_size
    for i in range(len(model.channels)):
        if i:
            s = s // 2 if model.name == "mok_cnn" else (s + 1) // 2
        sizes.append(s)
    return sizes


def parameter_count(model: ModelConfig) -> int:
    """Trainable parameters of ``build_model(model)`` (3x3 convolutions without bias, 2 per norm channel)."""
    ch, n = list(model.channels), 0
    if model.name == "mok_cnn":
        c_in = 3
        for c in ch:
            n += c_in * c * 9 + c * c * 9 + 4 * c
            c_in = c
    else:
        n, c_in = 3 * ch[0] * 9 + 2 * ch[0], ch[0]
        for i, c in enumerate(ch):
            n += c_in * c * 9 + c * c * 9 + 4 * c + ((c_in * c + 2 * c) if i or c_in != c else 0)
            c_in = c
    return n + ch[-1] * model.hidden + 2 * model.hidden + 1


def _machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _launched_processes() -> int:
    """Processes of this run as the launcher (accelerate launch, torchrun) tells them; 1 under plain python."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.1f} MiB"


def _memory_problems(cfg: Config, memory: int) -> list[str]:
    """Lower bounds of what the run must hold at once, refused only when above ``memory`` (all of this
    machine's RAM: a generous bound; GPU memory is not checked)."""
    d, m = cfg.data, cfg.model
    have = f"more than this machine's {_gib(memory)} of memory"
    px = d.image_size**2
    problems = []
    if d.kind == "synthetic":
        s = d.synthetic
        n = s.num_train + s.num_val + s.num_test
        need = n * 3 * px + 256 * 3 * px * 4  # the uint8 images, plus one float32 chunk while generating
        if need > memory:
            problems.append(
                f"data.synthetic: {n:,} images of {d.image_size}x{d.image_size} pixels need at least {_gib(need)} "
                f"to generate and hold, {have}; use fewer images (num_train, num_val, num_test) "
                f"or a smaller data.image_size"
            )
    if m.name == "hf":
        return problems  # the backbone's size is known only once transformers builds it
    params = parameter_count(m)
    state = params * 4 * (4 if cfg.training.optimizer.name == "adamw" else 3)  # weights, gradients, optimizer state
    if state > memory:
        problems.append(
            f"model.channels: the model has {params:,} parameters; weights, gradients and optimizer state need at "
            f"least {_gib(state)}, {have}; use narrower model.channels or a smaller model.hidden"
        )
        return problems
    act = 4 if cfg.training.mixed_precision == "no" else 2  # bytes per activation value (2: bf16/fp16 may be on)
    sizes = feature_sizes(m, d.image_size)
    kept = [c * s * s for c, s in zip(m.channels, sizes)]  # values per image of one feature map of each block
    # Kept for the backward pass, per image: mok_cnn 4 maps per block (2 conv outputs, 2 norm/ReLU outputs);
    # resnet 5 per block (plus shortcut) and 2 in the stem.
    per_image = 4 * sum(kept) if m.name == "mok_cnn" else 5 * sum(kept) + 2 * m.channels[0] * px
    batches = (("data.batch_size", d.batch_size, True), ("data.eval_batch_size", d.eval_batch_size, False))
    for key, batch, train in batches:
        inputs = batch * 3 * px * 4
        acts = batch * (per_image if train else 2 * max(kept)) * act
        weights = state if train else params * 4
        if inputs + acts + weights > memory:
            what = "one training step" if train else "one validation batch"
            problems.append(
                f"{key}: {what} with {key}={batch:,} at data.image_size={d.image_size} needs at least "
                f"{_gib(inputs + acts + weights)} (input batch {_gib(inputs)}, activations {_gib(acts)}, model "
                f"{_gib(weights)}), {have}; use a smaller {key} (or data.image_size, model.channels)"
            )
    return problems


def _one_image_batches(cfg: Config, processes: int) -> dict[str, tuple[str, str, set[str]]]:
    """``key -> (why, fix, splits)`` for the settings that give some batch exactly one image.

    With one process the last batch of a split holds ``len % batch_size`` images (the train loader
    keeps it: ``drop_last=False``); with several, Accelerate fills every process's last batch up to the
    batch size (``even_batches``), so only a batch size of 1 does. Manifest split sizes depend on the
    CSV and are not known here.
    """
    d, s = cfg.data, cfg.data.synthetic
    found: dict[str, tuple[str, str, set[str]]] = {}
    for split, size, bkey, n, nkey in (
        ("training", d.batch_size, "data.batch_size", s.num_train, "data.synthetic.num_train"),
        ("validation", d.eval_batch_size, "data.eval_batch_size", s.num_val, "data.synthetic.num_val"),
        ("test", d.eval_batch_size, "data.eval_batch_size", s.num_test, "data.synthetic.num_test"),
    ):
        if size == 1:
            why = f"{bkey}=1 makes every {'training' if split == 'training' else 'evaluation'} batch one image"
            found.setdefault(bkey, (why, f"use {bkey} >= 2", set()))[2].add(split)
        elif processes == 1 and d.kind == "synthetic" and n % size == 1:
            why = f"{n:,} images in batches of {size:,} ({bkey}) leave a last {split} batch of one image"
            found[nkey] = (why, f"change {nkey} or {bkey} by one", {split})
    return found


def _single_value_problems(cfg: Config, processes: int) -> list[str]:
    """Norm layers that would see one value per channel (BatchNorm, training) or per group (GroupNorm,
    any mode): PyTorch stops with 'Expected more than 1 value per channel when training'."""
    m, size = cfg.model, cfg.data.image_size
    if m.name == "hf":
        return []  # the backbone's own layers; transformers checks its inputs
    sizes = feature_sizes(m, size)
    if m.norm == "batch":
        if m.sync_batchnorm and processes > 1:
            return []  # SyncBatchNorm counts the values of all processes (on GPUs; the CPU keeps BatchNorm)
        tiny = [i for i, s in enumerate(sizes) if s == 1]
        splits, layer = {"training"}, "BatchNorm would get one value per channel"
    else:
        tiny = [i for i, (c, s) in enumerate(zip(m.channels, sizes)) if s == 1 and c <= 8]
        splits, layer = {"training", "validation", "test"}, "GroupNorm (one channel per group) one value per group"
    if not tiny:
        return []
    where = f"block {tiny[0] + 1} of model.channels works on 1x1 maps at data.image_size={size}, so its {layer}"
    other = "fewer model.channels entries or larger images" + ("" if m.norm == "group" else " or model.norm=group")
    return [
        f"{key}: {why}, and {where}: PyTorch would stop the run; {fix}, or use {other}"
        for key, (why, fix, hit) in _one_image_batches(cfg, processes).items()
        if hit & splits
    ]


def machine_problems(cfg: Config, memory: int | None = None, processes: int | None = None) -> list[str]:
    """What a valid config cannot do here: more memory than this machine has (``memory`` bytes,
    default: its RAM), or a batch of one image where a norm layer needs more (``processes``: default
    the launcher's WORLD_SIZE). Kept out of the schema: a config saved on one machine stays loadable
    with ``Config.model_validate`` on another."""
    memory = _machine_memory() if memory is None else memory
    processes = _launched_processes() if processes is None else processes
    return (_memory_problems(cfg, memory) if memory else []) + _single_value_problems(cfg, processes)


# --------------------------------------------------------------------------------------------------
# YAML: numbers as people write them; any bytes give an error line, never a traceback
# --------------------------------------------------------------------------------------------------

MAX_FILE_BYTES = 1 << 20  # a config is a few kB
MAX_DEPTH = 64  # levels of nesting; a config needs 4 or 5
MAX_VALUES = 10_000  # values in one file or override, each alias counted as the values it stands for


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but is refused: too deep, too many values (alias bombs), a duplicate key, a
    value Python cannot hold."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem=problem, problem_mark=mark)


class _DuplicateKeys(yaml.YAMLError):
    def __init__(self, errors: list[_Refused]):
        self.errors = errors
        super().__init__("; ".join(e.problem for e in errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and ``None`` as null, and refuses what no config needs.

    YAML 1.1 (PyYAML) only reads exponents with a dot (``1.0e-3``) as floats, and W&B sweep agents
    pass Python reprs (``None``, ``True``, ``1e-05``) on the command line.

    Refused while composing, before anything is built: nesting deeper than ``MAX_DEPTH`` (PyYAML
    recurses per level) and more than ``MAX_VALUES`` values with aliases expanded ("billion laughs":
    a few lines of anchors that stand for billions of values), both counted without expanding
    anything. Refused while constructing: a key that appears twice in one mapping (PyYAML keeps the
    later one silently), naming the dotted key and both lines; merge keys (``<<: *base``) may still
    be overridden.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._parts: list[str] = []  # keys from the root to the node being composed
        self._values = 0  # nodes composed so far, aliases expanded
        self._sizes: dict[yaml.Node, int] = {}  # complete node -> its values, aliases expanded
        self._heights: dict[yaml.Node, int] = {}  # complete node -> levels it holds, aliases expanded
        self._paths: dict[yaml.Node, str] = {}  # mapping node -> dotted key where it first appears
        self._checked: set[yaml.Node] = set()
        self._duplicates: list[_Refused] = []

    def _count(self, n: int, mark) -> None:
        self._values += n
        if self._values > MAX_VALUES:
            raise _Refused(f"more than {MAX_VALUES:,} values, counting each alias as the values it stands for "
                           f"(an alias bomb?); a config has a few hundred", mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # (an undefined alias is PyYAML's error)
                if target not in self._sizes:
                    raise _Refused(f"alias *{_clip(event.anchor)} is used inside its own anchor (a recursive value)",
                                   event.start_mark)
                self._count(self._sizes[target], event.start_mark)
                if len(self._parts) + self._heights[target] > MAX_DEPTH:
                    raise _Refused(f"values are nested more than {MAX_DEPTH} levels deep (aliases expanded)",
                                   event.start_mark)
            return super().compose_node(parent, index)
        if len(self._parts) >= MAX_DEPTH:
            raise _Refused(f"values are nested more than {MAX_DEPTH} levels deep; a config needs a handful",
                           event.start_mark)
        self._parts.append(index.value if isinstance(index, yaml.ScalarNode) else "" if index is None else str(index))
        before = self._values
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.MappingNode):
            self._paths.setdefault(node, ".".join(p for p in self._parts if p))
        self._parts.pop()
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        self._heights[node] = 1 + max((self._heights.get(c, 0) for c in children), default=0)
        self._sizes[node] = self._values - before
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # e.g. an integer of more than 4300 digits, a bad !!timestamp
            raise _Refused(f"cannot read this value ({type(e).__name__}: {_clip(e)})", node.start_mark) from None

    def flatten_mapping(self, node):
        # Before merge keys are folded in (SafeConstructor changes node.value in place).
        if node not in self._checked:
            self._checked.add(node)
            self._find_duplicates(node)
        super().flatten_mapping(node)

    def _find_duplicates(self, node) -> None:
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if key_node.tag == "tag:yaml.org,2002:value" else self.construct_object(key_node)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # unhashable: PyYAML reports it
                continue
            if earlier is not key_node:
                a, b = earlier.start_mark, key_node.start_mark
                at = (f"line {a.line + 1}, again at line {b.line + 1}" if a.line != b.line
                      else f"line {a.line + 1} column {a.column + 1}, again at column {b.column + 1}")
                path = self._paths.get(node, "")
                name = f"{path}.{key}" if path else str(key)
                self._duplicates.append(_Refused(f"duplicate key '{_clip(name)}' (first at {at}); keep only one", b))

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        data = self.construct_document(node)
        if self._duplicates:
            raise _DuplicateKeys(self._duplicates)
        return data


# YAML 1.1 also reads 23:50:00 as the base-60 integer 85800 and 2024-01-01 as a date; a time
# limit or a run name must stay a string.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith((":int", ":float", ":timestamp"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*[eE][-+]?\d+$"),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def parse_yaml(text: str) -> Any:
    """``text`` read with ``_Loader``; every failure is a ``yaml.YAMLError`` (see ``_yaml_problems``)."""
    try:
        loader = _Loader(text)  # (checks for characters YAML does not allow: binary data)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise _Refused("values are nested too deeply") from None
    except Exception as e:
        raise _Refused(f"cannot be read ({type(e).__name__}: {_clip(e)})") from None


def _yaml_problems(e: yaml.YAMLError, text: str) -> list[tuple[str, str, bool]]:
    """``(where, problem, is_syntax_error)`` for each problem; ``where`` is ``:line:column`` or empty."""
    if isinstance(e, _DuplicateKeys):
        return [p for err in e.errors for p in _yaml_problems(err, text)]
    if isinstance(e, yaml.reader.ReaderError):
        pos = min(max(e.position, 0), len(text))
        where = f":{text.count(chr(10), 0, pos) + 1}:{pos - text.rfind(chr(10), 0, pos)}"
        code = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
        control = code < 0x20 or 0x7F <= code < 0xA0
        hint = " (a control character: is this a binary file?)" if control else ""
        return [(where, f"character #x{code:04x} is not allowed in YAML{hint}", False)]
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        return [(where, _clip(e.problem or e.context or "not valid YAML", 200), not isinstance(e, _Refused))]
    return [("", _clip(e, 200), True)]


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _error(lines: list[str] | str) -> ConfigError:
    """A ``ConfigError`` whose lines never show a secret (``main.py`` prints them as they are)."""
    return ConfigError([redact_text(line) for line in ([lines] if isinstance(lines, str) else lines)])


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the key at ``loc`` (for suggesting the closest valid key)."""
    cls: Any = Config
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _format_error(err: dict) -> str:
    loc = tuple(_clip(p) for p in err["loc"])
    path = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        section = _section_at(loc)
        valid = list(section.model_fields) if section else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else ""
        where = ".".join(loc[:-1])
        known = f" Valid keys{' in ' + where if where else ''}: {', '.join(valid)}." if valid else ""
        return f"unknown config key '{path}'{hint}{known}"
    msg = _clip(err["msg"].removeprefix("Value error, "), 400)
    if err["type"] in ("value_error", "assertion_error") and not loc:
        return msg
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_quote(got, str(err['loc'][-1]) if err['loc'] else '')})"
    return f"{path}: {msg}{shown}"


def validate(raw: Any, source: str = "config") -> Config:
    """Validate a plain dict against the schema and this machine; raise ``ConfigError`` with every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _error(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise _error([_format_error(err) for err in e.errors()]) from None
    problems = machine_problems(cfg)
    if problems:
        raise _error(problems)
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to ``raw`` in place; return problems."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            problems.append(f"override '{_clip(item)}' is not of the form section.key=value (e.g. training.epochs=3)")
            continue
        try:
            parsed = parse_yaml(value) if value.strip() else None
        except yaml.YAMLError as e:
            for _, problem, syntax in _yaml_problems(e, value):
                what = f"value is not valid YAML ({problem})" if syntax else problem
                problems.append(f"override '{_clip(item)}': {what}")
            continue
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                above = _clip(".".join(parts[: i + 1]))
                problems.append(f"override '{_clip(item)}': '{above}' is a value, not a section")
                break
            node = nxt
        else:
            node[parts[-1]] = parsed
    return problems


def read_yaml_file(path: str | Path) -> dict:
    """The mapping in YAML file ``path``; any other content is a ``ConfigError`` (one line per problem)."""
    p = Path(path)
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise _error(
            f"config file '{path}' not found (pass an existing YAML file, e.g. --config configs/model_config.yml)"
        ) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise _error(f"cannot read config file '{_clip(path, 200)}': {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _error(f"config file '{path}' is a directory; pass a YAML file, e.g. --config configs/model_config.yml")
    if not stat.S_ISREG(st.st_mode):
        raise _error(f"config file '{path}' is not a regular file (a device, pipe or socket); pass a YAML file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _error(f"cannot read config file '{path}': {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _error(
            f"config file '{path}' is larger than {MAX_FILE_BYTES >> 20} MiB, and a config is a few kB: "
            f"is it the right file?"
        )
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = data.count(b"\n", 0, at) + 1
        raise _error(
            f"{path}: not UTF-8 text: byte 0x{data[at]:02x} at offset {at} (line {line}) "
            f"cannot be decoded; save the file as UTF-8"
        ) from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise _error([f"{path}{where}: {'YAML syntax error: ' if syntax else ''}{problem}"
                      for where, problem, syntax in _yaml_problems(e, text)]) from None
    if raw is not None and not isinstance(raw, dict):
        raise _error(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw or {}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (or start from the defaults), apply ``overrides``, validate everything together."""
    raw = read_yaml_file(path) if path is not None else {}
    problems = apply_overrides(raw, list(overrides))
    try:
        cfg = validate(raw, source=str(path or "overrides"))
    except ConfigError as e:
        problems += e.lines
    if problems:
        raise _error(problems)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted (it is printed and saved with the run)."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": scalar}``; lists and tuples become their string form.

    Trackers want flat scalars: TensorBoard's hparams crash on nested or list values, and W&B shows
    dotted keys under the same names the overrides use.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = str(list(v))
        else:
            out[key] = v
    return out
