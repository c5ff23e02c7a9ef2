"""Experiment tracking through Accelerate's tracker API: TensorBoard (on by default) and W&B (opt-in).

Trackers live on the main process only. ``start_trackers`` builds the ``log_with`` list from the
config, checks W&B before any training step (installed? credentials for online mode?), and calls
``accelerator.init_trackers`` with the flattened config. ``finish_trackers`` closes them on every exit
path and gives W&B the real exit code: ``accelerator.end_training()`` alone marks a crashed run as
``finished`` with exit code 0.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, on_main_process

from train.config import Config
from train.errors import UserError


class RunTensorBoard(GeneralTracker):
    """TensorBoard writer at ``<run_dir>/tensorboard``: one event stream per training run.

    Accelerate's own TensorBoard tracker writes under ``<logging_dir>/<project_name>``, calls
    ``add_hparams`` (which opens a new timestamped sub-run and crashes on list values) and drops
    ``np.float32`` values; this one writes the hparams into the same stream and logs any real number.
    """

    name = "tensorboard"
    requires_logging_directory = False

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        super().__init__()
        self.log_dir = str(log_dir)
        self.purge_step = purge_step
        self.writer = None
        self.exit_code = 0

    @on_main_process
    def start(self):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.log_dir, purge_step=self.purge_step)

    @property
    def tracker(self):
        return self.writer

    @on_main_process
    def store_init_configuration(self, values: dict):
        from torch.utils.tensorboard.summary import hparams

        clean = {k: ("null" if v is None else v) for k, v in values.items()}
        # Declaring the metrics lets the HPARAMS tab show them next to the hyperparameters.
        metrics = {"val/rmse": 0.0, "val/loss": 0.0, "test/rmse": 0.0, "test/mae": 0.0}
        experiment, session_start, _ = hparams(clean, metrics)
        # The session-end record (success or failure) is written by finish(), once the outcome is known.
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        from tensorboard.compat.proto.summary_pb2 import Summary

        # All scalars of one call in one event: SummaryWriter.add_scalar builds an event per value
        # (~85 us each here, ~4x the cost of one shared event), which shows on small models.
        scalars = []
        for key, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(key, value, global_step=step)
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                scalars.append(Summary.Value(tag=key, simple_value=value.item()))
            elif hasattr(value, "__float__"):  # int, float, bool, numpy scalars of any width
                scalars.append(Summary.Value(tag=key, simple_value=float(value)))
        if scalars:
            self.writer.file_writer.add_summary(Summary(value=scalars), step)
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
        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content.SerializeToString()))
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


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path, flat_config: dict[str, Any], run_id: str | None) -> None:
    """Start TensorBoard/W&B on the main process with the resolved, flattened config."""
    w = cfg.logging.wandb
    if w.enabled and "WANDB_DATA_DIR" not in os.environ:
        # Offline artifacts are staged under WANDB_DATA_DIR; keeping it inside the run directory
        # means copying that one directory is enough for a later `wandb sync` (unless you set it).
        os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb" / "data")
    init_kwargs = {
        "wandb": {
            "entity": w.entity,
            "name": w.run_name or cfg.experiment.name,
            "tags": list(w.tags),
            "group": w.group,
            "mode": wandb_mode(cfg),
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
        }
    }
    # Trackers only exist on the main process; the other processes get an empty list.
    accelerator.init_trackers(w.project, config=flat_config, init_kwargs=init_kwargs)
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


def tracker_list(cfg: Config, run_dir: Path, purge_step: int | None = None) -> list:
    """``log_with`` for the Accelerator, named explicitly (never ``"all"``)."""
    trackers: list = []
    if cfg.logging.tensorboard:
        trackers.append(RunTensorBoard(run_dir / "tensorboard", purge_step=purge_step))
    if cfg.logging.wandb.enabled and wandb_mode(cfg) != "disabled":
        trackers.append("wandb")
    return trackers


def wandb_run_id(accelerator: Accelerator) -> str | None:
    run = wandb_run(accelerator)
    return run.id if run is not None else None


def wandb_run(accelerator: Accelerator):
    """The live W&B run on the main process, else None."""
    if not accelerator.is_main_process:
        return None
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return tracker.run
    return None


def log_model_artifact(accelerator: Accelerator, path: Path, metadata: dict[str, str]) -> None:
    """Log ``path`` as this run's ``model`` artifact (one name per run, aliases best + latest)."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=["best", "latest"])


def finish_trackers(accelerator: Accelerator, exit_code: int, summary: dict[str, Any] | None = None, preempted: bool = False,
                    together: bool = False) -> None:
    """Close every tracker; the W&B run ends ``finished`` (0) or ``failed`` (non-zero), marked
    preempting first when the run stopped to be resumed.

    ``together``: every process is known to be here (a normal end or an agreed stop). They then wait
    for each other before the process group is destroyed: a worker that tore down gloo while the main
    process was still closing the trackers occasionally aborted at exit ("terminate called without an
    active exception", SIGABRT) and failed the launch. Not done after an error, where another process
    may be inside a different collective and a barrier could pair with it and hang."""
    for tracker in accelerator.trackers:
        if isinstance(tracker, RunTensorBoard):
            tracker.exit_code = exit_code
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
    accelerator.end_training()
