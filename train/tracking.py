"""Experiment tracking through Accelerate's tracker API: TensorBoard (on by default) and W&B (opt-in).

Trackers live on the main process only. ``Tracking`` opens the Accelerator with its trackers and
closes them on every exit path with the run's real outcome: ``accelerator.end_training()`` alone
marks a crashed run as ``finished`` with exit code 0. ``check_wandb`` runs before anything is
written (installed? credentials for online mode?).

Rich values (histograms, tables, text) do not fit ``accelerator.log``'s one-dict-for-every-tracker
model, so ``log_rich`` hands each tracker what it understands, on the main process only.
"""

from __future__ import annotations

import netrc
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import ProjectConfiguration

from train.config import Config, flatten, to_yaml
from train.errors import EXIT_FAILED, EXIT_STOPPED, UserError
from train.optim import lr_tags
from train.records import JsonlTracker
from train.redaction import redact, redact_text
from train.runinfo import run_info


@dataclass
class Histogram:
    """Counts over ``edges`` (len(counts) + 1) plus the moments TensorBoard stores with them."""

    counts: np.ndarray
    edges: np.ndarray
    min: float
    max: float
    num: int
    sum: float
    sum_squares: float

    @classmethod
    def of(cls, values: torch.Tensor, bins: int = 64) -> "Histogram":
        v = values.detach().flatten().float().cpu()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            v = torch.zeros(1)
        lo, hi = v.min().item(), v.max().item()
        if lo == hi:  # a constant tensor still gets a (narrow) bin
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = torch.histogram(v, bins=bins, range=(lo, hi))
        d = v.double()
        return cls(counts.numpy(), edges.numpy(), lo, hi, v.numel(), d.sum().item(), d.pow(2).sum().item())


@dataclass
class WandbTable:
    """A W&B table; image columns hold HxWx3 uint8 arrays (turned into ``wandb.Image``)."""

    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Markdown:
    """Text for TensorBoard's TEXT tab; trackers without a text view skip it."""

    text: str


@dataclass
class PngImage:
    """A picture (a figure of the run report) as PNG bytes: TensorBoard's IMAGES tab, a W&B image."""

    data: bytes

    def array(self) -> np.ndarray:
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# TensorBoard as a person sees it: the charts that answer "is it learning?", a unit on every scalar,
# and a HPARAMS table with the columns runs are compared by.
# --------------------------------------------------------------------------------------------------

# The HPARAMS columns, in this order (the full config is the TEXT entry "config" and config.yaml);
# any model.head* key a future model adds goes right after the model's.
HPARAM_MODEL_KEYS = ("model.name", "model.channels", "model.hidden", "model.norm", "model.dropout")
HPARAM_KEYS = (
    "training.optimizer.name", "training.optimizer.lr", "training.optimizer.weight_decay", "data.batch_size",
    "training.scheduler.name", "training.epochs", "training.loss", "data.augment.hflip",
    "data.augment.crop_scale_min", "data.augment.brightness", "experiment.seed", "training.mixed_precision",
)
# Declared for the HPARAMS tab, which shows them next to the hyperparameters.
HPARAM_METRICS = ("val/rmse", "val/loss", "test/rmse", "test/mae")

_LOSS_NAMES = {"mse": "mean squared error", "huber": "Huber loss", "l1": "mean absolute error",
               "distribution": "cross-entropy against Gaussian soft labels over the year bins"}
_SPLITS = {"train": "the training batches of the epoch (train mode: dropout and augmentation on)",
           "val": "the validation split", "test": "the test split, with the best weights",
           "test_gray": "grayscale copies of the test images, with the best weights"}
_FIELD_METRICS = {"acc_5y": "share of images dated within 5 years of the true date on {s}, a fraction (0-1)",
                  "acc_decade": "share of images whose predicted decade is the true decade on {s}, a fraction (0-1)"}
_GB = "in GiB (2^30 bytes)"
# Tags with a fixed name -> what the value is, with its unit ({loss}: the configured loss's name).
SCALAR_DESCRIPTIONS = {
    "train/loss_step": "training loss of one optimizer step's batch (mean over the processes): the {loss} of the "
                       "predicted date in standardized units ((year - train mean) / train std), without a unit",
    "lr": "learning rate of the optimizer step (the first parameter group's, the one the console prints); "
          "a factor on the update, without a unit",
    "epoch": "epoch number (1 = the first), a count of epochs",
    "epoch_time_s": "time spent training in the epoch (mid-epoch state saves included, validation not), in seconds",
    "samples_per_s": "training samples per second over the epoch, all processes together, in samples/s",
    "train/skipped_steps": "optimizer steps skipped so far for non-finite gradients (training.on_nonfinite="
                           "skip_step), a count of steps",
    "data/skipped_rows": "manifest rows skipped as unreadable (data.on_bad_row=skip), a count of rows",
    "early_stopping/bad_epochs": "epochs in a row without an improvement of the monitored metric, in epochs",
    "early_stopping/patience_left": "epochs without improvement left before early stopping ends the run, in epochs",
    "early_stopping/stopped_epoch": "the epoch after which early stopping ended the run, an epoch number",
    "grad_norm/total": "L2 norm of all gradients together (what training.max_grad_norm clips), unscaled, "
                       "without a unit",
    "system/rss_gb": "resident memory of the main process, " + _GB,
    "system/cpu_percent": "CPU use of the main process since the previous epoch end, in percent of one core "
                          "(100 = one core busy)",
    "system/cuda_allocated_gb": "GPU memory held by tensors of the main process, " + _GB,
    "system/cuda_reserved_gb": "GPU memory reserved by PyTorch's caching allocator of the main process, " + _GB,
    "system/cuda_peak_allocated_gb": "peak GPU memory held by tensors of the main process since the start, " + _GB,
}


def scalar_description(tag: str, loss: str = "mse") -> str | None:
    """What a scalar tag's value is, with its unit ("val/rmse: root mean squared error of the predicted
    date on the validation split, in years"); None for a tag this list does not know."""
    loss_name = _LOSS_NAMES.get(loss, loss)
    split, _, metric = tag.partition("/")
    if split in _SPLITS and metric in ("rmse", "mae", "loss"):
        what = {"rmse": "root mean squared error of the predicted date on {s}, in years",
                "mae": "mean absolute error of the predicted date on {s}, in years",
                "loss": "loss on {s}: the {loss} of the predicted date in standardized units "
                        "((year - train mean) / train std), without a unit"}[metric]
        return f"{tag}: " + what.format(s=_SPLITS[split], loss=loss_name)
    if split in _SPLITS and metric in _FIELD_METRICS:
        return f"{tag}: " + _FIELD_METRICS[metric].format(s=_SPLITS[split])
    if split == "test" and re.fullmatch(r"(coverage|width)_\d+", metric):
        kind, level = metric.split("_")
        return f"{tag}: " + (f"share of test images whose true date lies in its calibrated {level}% date interval, "
                             "a fraction (0-1)" if kind == "coverage" else
                             f"mean width of the calibrated {level}% date intervals on the test split, in years")
    if split == "test" and metric.startswith("mae_by_decade/"):
        decade = metric.rsplit("/", 1)[1]
        return f"{tag}: MAE of the predicted date on {_SPLITS[split]}, images dated in the {decade} only, in years"
    if split in ("val", "test") and metric.startswith("rmse_by_decade/"):
        decade = metric.rsplit("/", 1)[1]
        return f"{tag}: RMSE of the predicted date on {_SPLITS[split]}, images dated in the {decade} only, in years"
    if split == "best" and metric in ("rmse", "mae", "loss", "acc_5y"):
        unit = {"loss": "standardized, without a unit", "acc_5y": "a fraction (0-1)"}.get(metric, "in years")
        return f"{tag}: best validation {metric} so far (the early-stopping monitor; best.safetensors holds it), {unit}"
    if split == "lr" and metric:
        return f"{tag}: learning rate of the parameter group '{metric}' at the optimizer step, without a unit"
    if split == "grad_norm" and metric and tag not in SCALAR_DESCRIPTIONS:
        return f"{tag}: L2 norm of the gradients of layer {metric} (weights and bias), unscaled, without a unit"
    text = SCALAR_DESCRIPTIONS.get(tag)
    return f"{tag}: " + text.format(loss=loss_name) if text else None


def _lines(*tags: str) -> list:
    """A multiline chart of exactly these tags (the layout takes regular expressions, matched at the start)."""
    return ["Multiline", [re.escape(t) + "$" for t in tags]]


def scalar_layout(lr_chart: list[str]) -> dict:
    """The CUSTOM SCALARS tab: one screen that says whether the run learns, every tag one the run logs."""
    return {
        "Training at a glance": {
            "Loss: train vs val": _lines("train/loss", "val/loss"),
            "RMSE (years): train vs val": _lines("train/rmse", "val/rmse"),
            "MAE (years)": _lines("val/mae", "test/mae"),
            "Within 5 years / right decade (share)": _lines("val/acc_5y", "val/acc_decade"),
            "Learning rate": _lines(*lr_chart),
            # Two charts: on one axis, 0.1 s epochs lie flat under thousands of samples/s.
            "Throughput (samples/s)": _lines("samples_per_s"),
            "Epoch time (s)": _lines("epoch_time_s"),
        }
    }


def hparams_of(values: dict[str, Any], mixed_precision: str | None = None) -> dict[str, Any]:
    """The HPARAMS columns from the flattened config: what runs are compared by. A config that leaves
    ``training.mixed_precision`` to the launcher (null) shows the precision the run used."""
    heads = sorted(k for k in values if k == "model.head" or k.startswith("model.head."))
    picked = {k: values[k] for k in (*HPARAM_MODEL_KEYS, *heads, *HPARAM_KEYS) if k in values}
    if picked.get("training.mixed_precision") is None and mixed_precision:
        picked["training.mixed_precision"] = mixed_precision
    return {k: ("null" if v is None else v) for k, v in picked.items()}


@dataclass
class BoardView:
    """What the TensorBoard tracker takes from the config for its first screens."""

    lr_chart: list[str] = field(default_factory=lambda: ["lr"])  # the "Learning rate" chart's tags
    loss: str = "mse"  # named in the loss descriptions
    mixed_precision: str | None = None  # the run's effective precision (HPARAMS)
    config_file: Path | None = None  # config.yaml: the TEXT entry "config"
    config_text: str = ""  # the resolved config (redacted), when config_file cannot be read

    @classmethod
    def of(cls, cfg: Config, run_dir: Path, mixed_precision: str | None = None) -> "BoardView":
        loss = cfg.training.loss if cfg.model.head == "regression" else "distribution"
        return cls(lr_tags(cfg), loss, mixed_precision, run_dir / "config.yaml", to_yaml(cfg))

    def config_markdown(self) -> str:
        """The config as a markdown code block (the TEXT tab renders markdown)."""
        text = self.config_text
        if self.config_file is not None:
            try:
                text = self.config_file.read_text()
            except OSError:
                pass
        return "\n".join("    " + line for line in redact_text(text).splitlines())


class RunTensorBoard(GeneralTracker):
    """TensorBoard writer at ``<run_dir>/tensorboard``: one event stream per training run.

    Accelerate's own TensorBoard tracker writes under ``<logging_dir>/<project_name>``, calls
    ``add_hparams`` (which opens a new timestamped sub-run and crashes on list values) and drops
    ``np.float32`` values; this one writes the hparams into the same stream and logs any real number.

    At the start it writes the CUSTOM SCALARS layout (``scalar_layout``), the curated HPARAMS
    (``hparams_of``) and the full config as the TEXT entry ``config``; the first value of every scalar
    tag carries its description with the unit (``scalar_description``), which TensorBoard shows with
    the chart.
    """

    name = "tensorboard"
    requires_logging_directory = False

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, view: BoardView | None = None):
        super().__init__()
        self.log_dir = str(log_dir)
        self.purge_step = purge_step
        self.view = view or BoardView()
        self.writer = None
        self.exit_code = 0
        self.described: set[str] = set()  # tags whose description is written (once per event file)
        self.summary_type = None

    @on_main_process
    def start(self):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter

        self.summary_type = Summary  # looked up once: log() builds one per call
        self.writer = SummaryWriter(self.log_dir, purge_step=self.purge_step)
        self.writer.add_custom_scalars(scalar_layout(self.view.lr_chart))

    @property
    def tracker(self):
        return self.writer

    @on_main_process
    def store_init_configuration(self, values: dict):
        from torch.utils.tensorboard.summary import hparams

        experiment, session_start, _ = hparams(hparams_of(values, self.view.mixed_precision),
                                               dict.fromkeys(HPARAM_METRICS, 0.0))
        # The session-end record (success or failure) is written by finish(), once the outcome is known.
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        # A resumed run writes it again at the step it resumes from (its TEXT tab then shows both).
        self.writer.add_text("config", self.view.config_markdown(), global_step=self.purge_step or 0)
        self.writer.flush()

    def _scalar(self, key: str, value: float):
        """One value of a scalar summary; the first of its tag carries the description (TensorBoard
        keeps a tag's first metadata, as TensorFlow's own writer strips it from the later values).

        The metadata names its data class: TensorBoard's fast loader (the Rust data server, the default
        where it is installed) replaces a ``simple_value``'s metadata unless it does, and the
        description would be lost there."""
        if key in self.described:
            return self.summary_type.Value(tag=key, simple_value=value)
        from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR
        from tensorboard.plugins.scalar.metadata import create_summary_metadata

        self.described.add(key)
        text = scalar_description(key, self.view.loss)
        if not text:
            return self.summary_type.Value(tag=key, simple_value=value)
        metadata = create_summary_metadata(display_name="", description=text)  # empty: the tag is the name
        metadata.data_class = DATA_CLASS_SCALAR
        return self.summary_type.Value(tag=key, simple_value=value, metadata=metadata)

    def _write_scalars(self, scalars: list, step: int | None) -> None:
        if scalars:
            self.writer.file_writer.add_summary(self.summary_type(value=scalars), step)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        # All scalars of one call in one event: SummaryWriter.add_scalar builds an event per value
        # (~85 us each here, ~4x the cost of one shared event), which shows on small models.
        scalars = []
        for key, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(key, value, global_step=step)
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                scalars.append(self._scalar(key, value.item()))
            elif hasattr(value, "__float__"):  # int, float, bool, numpy scalars of any width
                scalars.append(self._scalar(key, float(value)))
        self._write_scalars(scalars, step)
        self.writer.flush()

    @on_main_process
    def log_rich(self, values: dict[str, Any], step: int) -> None:
        """Histograms, markdown and plain numbers; other values (W&B tables) are not for TensorBoard."""
        scalars = []
        for key, v in values.items():
            if isinstance(v, Histogram):
                self.writer.add_histogram_raw(key, v.min, v.max, v.num, v.sum, v.sum_squares, v.edges[1:].tolist(),
                                              v.counts.tolist(), global_step=step)
            elif isinstance(v, Markdown):
                self.writer.add_text(key, v.text, global_step=step)
            elif isinstance(v, PngImage):
                self.writer.add_image(key, v.array(), global_step=step, dataformats="HWC")
            elif isinstance(v, (int, float)):
                scalars.append(self._scalar(key, float(v)))
        self._write_scalars(scalars, step)
        self.writer.flush()

    @on_main_process
    def finish(self):
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

        status = Status.Value("STATUS_SUCCESS" if self.exit_code == 0 else "STATUS_FAILURE")
        content = HParamsPluginData(session_end_info=SessionEndInfo(status=status), version=PLUGIN_DATA_VERSION)
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                          content=content.SerializeToString()))
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)]))
        self.writer.close()


def wandb_mode(cfg: Config) -> str:
    """The effective W&B mode: the config's, else ``WANDB_MODE``, else online."""
    mode = cfg.logging.wandb.mode or os.environ.get("WANDB_MODE") or "online"
    return "offline" if mode == "dryrun" else mode


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_wandb(cfg: Config) -> None:
    """Fail before training if W&B is enabled but cannot work. No-op when W&B is off."""
    if not cfg.logging.wandb.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("logging.wandb.enabled is true but wandb is not installed: pip install wandb") from None
    if wandb_mode(cfg) == "online" and not _has_wandb_credentials():
        raise UserError(
            "logging.wandb.mode is online but no W&B credentials were found: run `wandb login`, "
            "or set logging.wandb.mode=offline (upload later with `wandb sync`)"
        )


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path, flat_config: dict[str, Any],
                   run_id: str | None) -> None:
    """Start TensorBoard/W&B on the main process with the resolved, flattened config."""
    w = cfg.logging.wandb
    if w.enabled and "WANDB_DATA_DIR" not in os.environ:
        # Offline artifacts are staged under WANDB_DATA_DIR; keeping it inside the run directory
        # means copying that one directory is enough for a later `wandb sync` (unless you set it).
        os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb" / "data")
    init_kwargs = {
        "wandb": {
            "entity": w.entity,
            # Names, tags and groups are shown to anyone who sees the project: no secrets in them.
            "name": redact_text(w.run_name or cfg.experiment.name),
            "tags": [redact_text(t) for t in w.tags],
            "group": redact_text(w.group) if w.group else None,
            "mode": wandb_mode(cfg),
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
        }
    }
    # Trackers only exist on the main process; the other processes get an empty list. W&B records the
    # command line (sys.argv) in the run's metadata, so it sees the overrides with secrets redacted.
    argv = sys.argv
    sys.argv = [redact_text(a) for a in argv]
    try:
        accelerator.init_trackers(w.project, config=flat_config, init_kwargs=init_kwargs)
    finally:
        sys.argv = argv
    if w.enabled and wandb_mode(cfg) != "disabled" and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        print("Weights & Biases logging initialized")
        print(f"  Project: {run.project}")
        print(f"  Run name: {run.name}")
        if wandb_mode(cfg) == "offline":
            print(f"  Run dir: {run.dir.removesuffix('/files')} (offline)")
            print(f"  Upload later: wandb sync {run.dir.removesuffix('/files')}")
        else:
            print(f"  Run URL: {run.url}")


def tracker_list(cfg: Config, run_dir: Path, purge_step: int | None = None, mixed_precision: str | None = None) -> list:
    """``log_with`` for the Accelerator, named explicitly (never ``"all"``). ``mixed_precision``: the
    run's effective precision, for TensorBoard's HPARAMS when the config leaves it to the launcher."""
    trackers: list = []
    if cfg.logging.tensorboard:
        view = BoardView.of(cfg, run_dir, mixed_precision)
        trackers.append(RunTensorBoard(run_dir / "tensorboard", purge_step=purge_step, view=view))
    if cfg.logging.wandb.enabled and wandb_mode(cfg) != "disabled":
        trackers.append("wandb")
    if cfg.logging.jsonl:
        trackers.append(JsonlTracker(run_dir / "metrics.jsonl", purge_step=purge_step))
    return trackers


def wandb_run(accelerator: Accelerator):
    """The live W&B run on the main process, else None (the one lookup of it)."""
    if not accelerator.is_main_process:
        return None
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return tracker.run
    return None


def wandb_run_id(accelerator: Accelerator) -> str | None:
    run = wandb_run(accelerator)
    return run.id if run is not None else None


def tensorboard(accelerator: Accelerator) -> RunTensorBoard | None:
    """The run's TensorBoard tracker on the main process, else None."""
    return next((t for t in accelerator.trackers if isinstance(t, RunTensorBoard)), None)


def log_rich(accelerator: Accelerator, values: dict[str, Any], step: int, wandb: bool = True) -> None:
    """Log floats, ``Histogram``, ``WandbTable`` and ``Markdown`` values to every tracker that can show
    them (main process; elsewhere there are no trackers). ``wandb=False``: TensorBoard only."""
    tb = tensorboard(accelerator)
    if tb is not None:
        tb.log_rich(values, step)
    scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    for tracker in accelerator.trackers:
        if isinstance(tracker, JsonlTracker) and scalars:  # the plain record holds what TensorBoard plots
            tracker.log(scalars, step)
    run = wandb_run(accelerator) if wandb else None
    if run is None:
        return
    import wandb as wb

    out = {}
    for key, v in values.items():
        if isinstance(v, Histogram):
            out[key] = wb.Histogram(np_histogram=(v.counts.tolist(), v.edges.tolist()))
        elif isinstance(v, PngImage):
            out[key] = wb.Image(v.array())
        elif isinstance(v, WandbTable):
            rows = [[wb.Image(c) if isinstance(c, np.ndarray) else c for c in row] for row in v.rows]
            out[key] = wb.Table(columns=v.columns, data=rows)
        elif isinstance(v, (int, float)):
            out[key] = v
    run.log(out, step=step)


def log_model_artifact(accelerator: Accelerator, path: Path, metadata: dict[str, str]) -> None:
    """Log ``path`` as this run's ``model`` artifact (one name per run, aliases best + latest)."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=["best", "latest"])


def finish_trackers(accelerator: Accelerator, exit_code: int, summary: dict[str, Any] | None = None,
                    preempted: bool = False, together: bool = False) -> None:
    """Close every tracker; the W&B run ends ``finished`` (0) or ``failed`` (non-zero), marked
    preempting first when the run stopped to be resumed.

    ``together``: every process is known to be here (a normal end or an agreed stop). They then wait
    for each other before the process group is destroyed: a worker that tore down gloo while the main
    process was still closing the trackers occasionally aborted at exit ("terminate called without an
    active exception", SIGABRT) and failed the launch. Not done after an error, where another process
    may be inside a different collective and a barrier could pair with it and hang.

    A tracker that cannot write any more (a full disk is often why the run is ending) gets a warning
    line; it must not hide the run's own error behind a traceback.
    """
    tb = tensorboard(accelerator)
    if tb is not None:
        tb.exit_code = exit_code
    run = wandb_run(accelerator)
    if run is not None:
        if summary:
            run.summary.update(summary)
        if preempted:
            run.mark_preempting()
        # end_training() would call finish() with exit code 0 whatever happened.
        run.finish(exit_code=exit_code)
    if together and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    try:
        accelerator.end_training()
    except OSError as e:
        print(f"warning: a tracker could not write its last records ({e.strerror or e})", file=sys.stderr)


class Tracking:
    """The Accelerator and its trackers, opened together and closed together on every exit path.

    ``with Tracking(cfg, rt, plan) as tracking:`` gives ``tracking.accelerator``; the body sets
    ``tracking.summary`` (W&B's run summary) once the results exist. On the way out the trackers
    learn the outcome from the exception, if any: 0 finished, 3 preempted (a deliberate stop),
    any other ``CleanExit`` its code, anything else 1.
    """

    def __init__(self, cfg: Config, rt, plan):
        self.cfg, self.rt, self.plan = cfg, rt, plan
        self.summary: dict[str, Any] = {}
        self.accelerator: Accelerator | None = None

    def __enter__(self) -> "Tracking":
        cfg, plan = self.cfg, self.plan
        # purge_step: TensorBoard hides events at or after the resumed step, so no step repeats.
        purge_step = plan.progress.global_step + 1 if plan.progress else (0 if plan.existing else None)
        self.accelerator = Accelerator(
            cpu=self.rt.use_cpu,
            mixed_precision=self.rt.mixed_precision,
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            log_with=tracker_list(cfg, plan.run_dir, purge_step=purge_step, mixed_precision=self.rt.mixed_precision),
            project_config=ProjectConfiguration(project_dir=str(plan.run_dir), logging_dir=str(plan.run_dir)),
        )
        flat_config = redact({**flatten(cfg.model_dump(mode="json")), **flatten(run_info(), "meta.")})
        run_id = plan.progress.wandb_run_id if plan.progress else None
        start_trackers(self.accelerator, cfg, plan.run_dir, flat_config, run_id=run_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        exit_code = 0 if exc is None else getattr(exc, "exit_code", EXIT_FAILED)
        finish_trackers(self.accelerator, exit_code, self.summary, preempted=exit_code == EXIT_STOPPED,
                        together=exit_code in (0, EXIT_STOPPED))
