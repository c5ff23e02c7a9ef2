"""Full resumable states: what is saved, how it is verified, and which one a resume picks.

A state directory ``<run_dir>/checkpoints/state/step_0000123/`` holds

- what ``accelerator.save_state`` writes: ``model.safetensors`` (weights), ``optimizer.bin``,
  ``random_states_<rank>.pkl`` (Python/NumPy/torch RNGs per process). The ``.bin``/``.pkl`` files are
  pickles that Accelerate loads with ``weights_only=True`` and a small allow-list: a state directory
  is trusted input, like any checkpoint you did not write yourself.
- ``progress.json``: the trainer's own progress (epoch, optimizer step, batches done in the epoch,
  best metric, early-stopping counter, scheduler state, W&B run id). Plain JSON on purpose: objects
  given to ``register_for_checkpointing`` are loaded by Accelerate with ``weights_only=False``,
  i.e. as arbitrary pickles.
- ``manifest.json``, written last: every file's size and sha256. A directory without a manifest that
  matches its files is incomplete (a crash mid-save) or corrupt and is never loaded.

The directory is written under a temporary name and renamed when complete, so a reader never sees a
half-written state under a ``step_*`` name.

``plan_run`` decides, before anything is written, which run this is: a new one, or which verified
state of which run directory it continues. Every refusal about the run directory happens there:
a directory that exists, a resume path that is not a run, a run locked by another trainer, a run
whose results would be overwritten, a finished run (a no-op), a mid-epoch state saved with another
process count. ``check_state_fits`` refuses a state that does not fit the built model and optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from safetensors import SafetensorError
from torch import nn

from train.checkpoints import check_tensors_match, tensor_shapes
from train.config import Config, to_yaml
from train.errors import UserError
from train.fsutil import RunLock, atomic_write_bytes, fsync_dir
from train.models import build_model
from train.runinfo import new_run_name, run_info

STATE_FORMAT = "mok-date-state/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# Strict: a progress.json whose fields have other JSON types (an edited or foreign file) is refused
# when read, not half-way through a resume. pydantic's dataclass keeps asdict() and keyword construction.
@pydantic_dataclass(config=ConfigDict(strict=True, extra="forbid"))
class Progress:
    """Everything about the run's position that is not a tensor; saved as ``progress.json``."""

    run_name: str
    epoch: int = 0  # epoch in progress (1-based); 0 before the first
    epoch_done: bool = True  # False: saved mid-epoch, ``batches_done`` batches of ``epoch`` consumed
    batches_done: int = 0
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False  # training over (last epoch or early stop); a resume only tests
    stopped_early: bool = False
    wandb_run_id: str | None = None
    scheduler: dict[str, Any] | None = None
    train_sums: list[float] = field(default_factory=list)  # partial epoch sums, for mid-epoch saves
    model_config: dict[str, Any] = field(default_factory=dict)
    num_processes: int = 1
    val_samples: int = 0  # images in the last validation pass (results.json reports it after a resume)
    format: str = STATE_FORMAT


def state_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "state"


def state_name(global_step: int) -> str:
    return f"step_{global_step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_progress_and_manifest(tmp_dir: Path, progress: Progress) -> None:
    """Main process, after every process finished ``save_state(tmp_dir)``: seal the directory."""
    atomic_write_bytes(tmp_dir / "progress.json", json.dumps(asdict(progress), indent=1).encode())
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp_dir.iterdir()) if p.is_file()}
    manifest = {"format": STATE_FORMAT, "files": files}
    atomic_write_bytes(tmp_dir / "manifest.json", json.dumps(manifest, indent=1).encode())


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Rename the sealed temporary directory to its ``step_*`` name (atomic on one file system)."""
    if final_dir.exists():  # the same step saved twice (an epoch end that is also an every_n_steps step)
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def verify(state_dir: Path) -> str | None:
    """None if ``state_dir`` is complete and intact, else the reason (naming the file)."""
    manifest_path = state_dir / "manifest.json"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save did not complete)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    if not isinstance(manifest, dict):
        got = type(manifest).__name__
        return f"{manifest_path} is not a state of this trainer (a JSON object was expected, got {got})"
    if manifest.get("format") != STATE_FORMAT:
        return f"{manifest_path} is not a state of this trainer (format {manifest.get('format')!r})"
    files = manifest.get("files")
    well_formed = isinstance(files, dict) and all(
        isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str)
        for e in files.values()
    )
    if not well_formed:
        return f"{manifest_path} is malformed (no mapping of files to size and sha256)"
    for name, entry in files.items():
        p = state_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != entry["size"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(p) != entry["sha256"]:
            return f"{p} does not match its sha256 in the manifest (corrupt)"
    if "progress.json" not in files:
        return f"{state_dir} has no progress.json"
    try:
        read_progress(state_dir)
    except (OSError, ValueError, TypeError) as e:
        return f"{state_dir / 'progress.json'} does not describe a run position ({e})"
    return None


def read_progress(state_dir: Path) -> Progress:
    """The state's ``progress.json``; ``ValueError`` (one line) when it is not a ``Progress`` (a field
    missing, unknown or of another JSON type), so that ``verify`` refuses it before a resume."""
    data = json.loads((state_dir / "progress.json").read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a mapping was expected, got {type(data).__name__}")
    try:
        return Progress(**data)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {repr(err['input'])[:60]})"
                                   for err in e.errors()[:4])) from None


def list_states(run_dir: Path) -> list[Path]:
    """``step_*`` directories of a run, oldest first (temporary and other names are ignored)."""
    root = state_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_complete(run_dir: Path, warn=print) -> Path | None:
    """The newest state that verifies; every newer broken one is named in a warning."""
    for state_dir in reversed(list_states(run_dir)):
        problem = verify(state_dir)
        if problem is None:
            return state_dir
        warn(f"warning: skipping state {state_dir.name}: {problem}; trying the previous one")
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete states (incomplete ones are left for inspection)."""
    complete = [p for p in list_states(run_dir) if verify(p) is None]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def locate_resume(resume: str, output_dir: str, name: str | None) -> tuple[Path, Path | None]:
    """``(run directory, the state directory named by --resume or None)`` for ``auto`` or a path."""
    if resume == "auto":
        if not name:
            raise UserError("--resume auto needs experiment.name (the run to continue), e.g. experiment.name=my-run")
        return Path(output_dir) / name, None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume: '{path}' not found (a run directory or a checkpoints/state/step_* directory)")
    if _STEP_DIR.match(path.name) or (path / "manifest.json").exists():
        return path.resolve().parent.parent.parent, path
    if (path / "checkpoints").is_dir():
        return path, None
    raise UserError(f"--resume: '{path}' is neither a run directory nor a state directory of this trainer")


@dataclass
class RunPlan:
    """Which run this is, decided before anything is written (see the module docstring).

    ``resume_dir``/``progress``: the verified state to continue and its position (None: a new run).
    ``existing``: the run directory already exists (a resume, or a fresh start in a directory that
    holds no state and no results). ``finished_results``: a finished run was resumed; its results,
    and nothing to do. ``lock``: the run directory's lock, held by the main process only.
    """

    run_dir: Path
    name: str
    resume_dir: Path | None = None
    progress: Progress | None = None
    existing: bool = False
    finished_results: dict | None = None
    lock: RunLock | None = None

    def __enter__(self) -> "RunPlan":
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


def main_decides(processes, decide: Callable[[], Any]) -> Any:
    """Run ``decide`` on the main process only and give its result, or its ``UserError``, to every
    process: the others would otherwise wait forever at the next collective for a main process
    that has exited. The error lines are printed by the main process alone."""
    outcome: list[Any] = [None]
    if processes.is_main_process:
        try:
            outcome = [("ok", decide())]
        except UserError as e:
            outcome = [("error", e.lines)]
    if processes.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value, printed=not processes.is_main_process)
    return value


def plan_run(cfg: Config, processes, resume: str | None, restart: bool, say: Callable[[str], None]) -> RunPlan:
    """Decide the run (main process), lock its directory when it exists, and share the plan."""
    if resume and restart:
        raise UserError("--restart starts a run again from scratch and --resume continues it: pass one of them")
    name = cfg.experiment.name or broadcast_object_list([new_run_name(cfg.model.name)])[0]
    held: list[RunLock] = []
    plan = main_decides(processes, lambda: _decide(cfg, name, resume, restart, processes.num_processes, say, held))
    plan.lock = held[0] if held else None
    return plan


def _decide(cfg: Config, name: str, resume: str | None, restart: bool, num_processes: int, say,
            held: list[RunLock]) -> RunPlan:
    if not resume:
        run_dir = Path(cfg.experiment.output_dir) / name
        if run_dir.exists() and not restart:
            raise UserError(f"run directory '{run_dir}' already exists; choose another experiment.name, continue it "
                            "with --resume auto, or pass --restart to move it aside and start again")
        if run_dir.exists():
            say(f"Moved the existing run directory to {set_aside_run_dir(run_dir)} (--restart)")
        return RunPlan(run_dir, name)
    run_dir, named_state = locate_resume(resume, cfg.experiment.output_dir, cfg.experiment.name)
    if not run_dir.exists():
        say(f"No complete state in '{run_dir}' (it does not exist yet): starting the run from scratch")
        return RunPlan(run_dir, run_dir.name)
    lock = RunLock(run_dir)
    lock.acquire()  # before reading the states: a running trainer may be writing one
    held.append(lock)
    state_dir = _verified(named_state) if named_state else newest_complete(run_dir, say)
    if state_dir is None:
        _refuse_to_retrain(run_dir, resume)
        say(f"No complete state in '{run_dir}': starting the run from scratch")
        return RunPlan(run_dir, run_dir.name, existing=True)
    progress = read_progress(state_dir)
    if not progress.epoch_done and progress.num_processes != num_processes:
        raise UserError(f"--resume: {state_dir} was saved mid-epoch with {progress.num_processes} processes; resume it "
                        f"with {progress.num_processes} (the batches already seen are counted per process), or from "
                        "an epoch-end state")
    finished = finished_results(run_dir, progress, cfg, state_dir)
    say(f"Resuming run '{progress.run_name}' from {state_dir} (epoch {progress.epoch}, step {progress.global_step})"
        if finished is None else f"Run '{progress.run_name}' is finished (epoch {progress.epoch}): nothing to do. "
        f"Results: {run_dir / 'results.json'}")
    return RunPlan(run_dir, run_dir.name, state_dir, progress, existing=True, finished_results=finished)


def _verified(state_dir: Path) -> Path:
    problem = verify(state_dir)
    if problem is not None:
        raise UserError(f"--resume: {problem}")
    return state_dir


def _refuse_to_retrain(run_dir: Path, resume: str) -> None:
    """No state verifies. A directory that holds a run's results is never trained again in place."""
    kept = [p for p in (run_dir / "results.json", run_dir / "checkpoints" / "best.safetensors") if p.exists()]
    if kept:
        raise UserError(
            f"--resume: no state of '{run_dir}' verifies, and it holds results ({', '.join(p.name for p in kept)}) "
            "that a fresh start would overwrite. Keep them: start a new run (another experiment.name, optionally "
            f"model.init_from={run_dir / 'checkpoints' / 'best.safetensors'}), or pass --restart instead of --resume "
            "to move this directory aside and start it again"
        )
    if resume != "auto":
        raise UserError(f"--resume: '{run_dir}' has no complete state under checkpoints/state/")


def _check_same_model(progress: Progress, cfg: Config, state_dir: Path) -> None:
    """A finished run is the run its model section describes: another model is refused, naming the
    tensors that differ, or the keys when the tensors happen to fit."""
    saved = {k: v for k, v in progress.model_config.items() if k != "init_from"}
    wanted = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k != "init_from"}
    if saved == wanted:
        return
    check_tensors_match(build_model(cfg.model), tensor_shapes(state_dir / "model.safetensors"), f"--resume {state_dir}")
    keys = ", ".join(f"model.{k}" for k in sorted(wanted) if saved.get(k) != wanted[k])
    raise UserError(f"--resume: run '{progress.run_name}' is finished, with another model section ({keys} differ); "
                    "a finished run is not tested again with another model: start a new run (another "
                    "experiment.name)")


def finished_results(run_dir: Path, progress: Progress, cfg: Config, state_dir: Path) -> dict | None:
    """The results of a finished run (resuming it is a no-op), else None (there is work to do).

    A run that used up its epochs is not extended by a larger ``training.epochs``: its learning-rate
    schedule was fitted to the old count, and continuing it would not be the run the config describes.
    """
    results_file = run_dir / "results.json"
    if not (progress.finished and results_file.is_file()):
        return None  # finished training but not the test (a crash or stop after the last epoch): test now
    _check_same_model(progress, cfg, state_dir)
    if cfg.training.epochs > progress.epoch and not progress.stopped_early:
        raise UserError(
            f"--resume: run '{progress.run_name}' finished its {progress.epoch} epochs; training.epochs="
            f"{cfg.training.epochs} would continue a schedule fitted to {progress.epoch}. Train longer in a new run "
            "warm-started from it: experiment.name=<new name> "
            f"model.init_from={run_dir / 'checkpoints' / 'best.safetensors'}"
        )
    try:
        return json.loads(results_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{results_file} is unreadable ({e}); the run's states and best checkpoint are "
                        "intact") from None


def set_aside_run_dir(run_dir: Path) -> Path:
    """``--restart``: rename the run directory to ``<name>.set-aside-<time>`` (never delete it),
    after making sure no trainer is using it."""
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, k = run_dir.with_name(f"{run_dir.name}.set-aside-{stamp}"), 1
        while target.exists():
            k += 1
            target = run_dir.with_name(f"{run_dir.name}.set-aside-{stamp}-{k}")
        os.replace(run_dir, target)
    except OSError as e:
        raise UserError(f"--restart: cannot move '{run_dir}' aside ({e.strerror}); nothing was changed") from None
    finally:
        lock.release()
    return target


def check_state_fits(plan: RunPlan, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything is written, a state whose tensors or optimizer groups differ from
    what this config builds (``accelerator.load_state`` would fail only after the trackers started)."""
    if plan.resume_dir is None:
        return
    # Headers only: load_state reads the data itself a moment later, and a large state should not be read twice.
    check_tensors_match(model, tensor_shapes(plan.resume_dir / "model.safetensors"), f"--resume {plan.resume_dir}")
    optimizer_file = plan.resume_dir / "optimizer.bin"
    if optimizer_file.is_file():  # sharded (FSDP) states keep the optimizer elsewhere
        _check_optimizer_groups(plan, optimizer_file, optimizer)
    if not (plan.resume_dir / "custom_checkpoint_0.pkl").is_file():
        raise UserError(f"--resume {plan.resume_dir}: the state has no EMA record (custom_checkpoint_0.pkl; written "
                        "before training.ema existed); start a new run, warm-started with "
                        f"model.init_from={plan.resume_dir / 'model.safetensors'}")


def _check_optimizer_groups(plan: RunPlan, optimizer_file: Path, optimizer: torch.optim.Optimizer) -> None:
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)
    saved_sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise UserError(
            f"--resume {plan.resume_dir}: the saved optimizer state does not fit this optimizer (parameter groups "
            f"of {saved_sizes} vs {sizes} tensors); start a new run, warm-started with "
            f"model.init_from={plan.resume_dir / 'model.safetensors'}"
        )


def open_run_dir(plan: RunPlan, cfg: Config, processes) -> None:
    """The first write of the run (main process): create and lock a new directory, write
    ``config.yaml``, set aside states newer than the one resumed."""

    def write() -> None:
        run_dir = plan.run_dir
        if not plan.existing:
            try:
                run_dir.mkdir(parents=True)
            except FileExistsError:
                raise UserError(f"run directory '{run_dir}' already exists; choose another experiment.name") from None
            except OSError as e:
                raise UserError(f"cannot create run directory '{run_dir}': {e.strerror}; check "
                                "experiment.output_dir") from None
            plan.lock = RunLock(run_dir)
            plan.lock.acquire()
        try:
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            if not (run_dir / "config.yaml").exists():
                atomic_write_bytes(run_dir / "config.yaml", config_yaml(cfg).encode())
            if plan.progress is not None:
                set_aside_newer_states(run_dir, plan.progress.global_step)
        except OSError as e:
            raise UserError(f"cannot write in the run directory '{run_dir}' ({e.strerror}); free disk space or "
                            "check permissions") from None

    main_decides(processes, write)


def config_yaml(cfg: Config) -> str:
    """The resolved config; the header records where it came from and stays valid YAML for --config."""
    header = "".join(f"# {k}: {v}\n" for k, v in run_info().items())
    return (f"# Resolved config of run '{cfg.experiment.name}'. Re-run with: python train/main.py --config <this file> "
            f"experiment.name=<new name>\n{header}{to_yaml(cfg)}")


def set_aside_newer_states(run_dir: Path, step: int) -> None:
    """Resuming from an older state abandons the newer ones: rename them (never delete) so that a
    later ``--resume auto`` does not jump back onto the abandoned branch."""
    for newer in list_states(run_dir):
        if int(newer.name.split("_")[1]) > step:
            newer.rename(newer.with_name(f"abandoned-{newer.name}"))


def _is_write_error(e: Exception) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer ("PytorchStreamWriter failed
    # writing file", "basic_ios::clear: iostream error", "[enforce fail at inline_container.cc] unexpected pos").
    text = str(e).lower()
    return isinstance(e, (OSError, SafetensorError)) or any(w in text for w in ("writ", "iostream", "inline_container"))


def _write_failure(e: Exception, directory: Path) -> str:
    """Why a write failed, in words: the OS's reason, or the free space when torch's message is cryptic."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"No space left on device: {free / 2**20:.1f} MiB free"
    return str(e).splitlines()[0]


def save_full_state(accelerator: Accelerator, run_dir: Path, progress: Progress, keep_last: int) -> Path:
    """``save_state`` into a temporary directory, seal it with progress + manifest, rename, prune.

    Every process takes part (each writes its own RNG state); only the main process seals it. A
    write that fails (a full or read-only disk) removes the temporary directory and raises a
    ``UserError``: the previous states are untouched. Returns the state directory.
    """
    final = state_root(run_dir) / state_name(progress.global_step)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        if accelerator.is_main_process:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_progress_and_manifest(tmp, progress)
            publish(tmp, final)
            prune(run_dir, keep_last)
    except (OSError, RuntimeError, SafetensorError) as e:
        if not _is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        why = _write_failure(e, final.parent)
        raise UserError(f"could not write the state {final} ({why}); "
                        "the previous states are intact. Free disk space or check permissions, then resume with "
                        "--resume auto") from None
    accelerator.wait_for_everyone()
    return final


def restore_state(accelerator: Accelerator, scheduler, plan: RunPlan) -> None:
    """Load the planned state (already checked by ``check_state_fits``): weights, optimizer, RNGs, schedule."""
    try:
        accelerator.load_state(str(plan.resume_dir))
    except ValueError as e:  # e.g. a state from a version whose optimizer had other parameter groups
        raise UserError(f"--resume {plan.resume_dir}: the saved optimizer state does not fit this optimizer ({e}); "
                        f"start a new run, warm-started with model.init_from={plan.resume_dir / 'model.safetensors'}"
                        ) from None
    if scheduler is not None and plan.progress.scheduler:
        scheduler.load_state_dict(plan.progress.scheduler)
