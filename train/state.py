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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from train.checkpoints import atomic_write_bytes
from train.errors import UserError

STATE_FORMAT = "mok-date-state/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
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
    fd = os.open(final_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(state_dir: Path) -> str | None:
    """None if ``state_dir`` is complete and intact, else the reason (naming the file)."""
    manifest_path = state_dir / "manifest.json"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save did not complete)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    if manifest.get("format") != STATE_FORMAT:
        return f"{manifest_path} is not a state of this trainer (format {manifest.get('format')!r})"
    for name, entry in manifest.get("files", {}).items():
        p = state_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != entry["size"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(p) != entry["sha256"]:
            return f"{p} does not match its sha256 in the manifest (corrupt)"
    if "progress.json" not in manifest.get("files", {}):
        return f"{state_dir} has no progress.json"
    return None


def read_progress(state_dir: Path) -> Progress:
    data = json.loads((state_dir / "progress.json").read_text())
    return Progress(**data)


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


def resolve_resume(resume: str, output_dir: str, name: str | None, warn=print) -> tuple[Path | None, Path]:
    """Return ``(state_dir or None, run_dir)`` for ``--resume auto`` or ``--resume PATH``.

    ``auto``: the newest complete state of ``<output_dir>/<name>``; none -> ``(None, run_dir)``, a
    fresh start in that directory. ``PATH``: a state directory, or a run directory (its newest
    complete state). Problems the user can fix raise ``UserError``.
    """
    if resume == "auto":
        if not name:
            raise UserError("--resume auto needs experiment.name (the run to continue), e.g. experiment.name=my-run")
        run_dir = Path(output_dir) / name
        return newest_complete(run_dir, warn), run_dir
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume: '{path}' not found (a run directory or a checkpoints/state/step_* directory)")
    if _STEP_DIR.match(path.name) or (path / "manifest.json").exists():
        problem = verify(path)
        if problem is not None:
            raise UserError(f"--resume: {problem}")
        return path, path.resolve().parent.parent.parent
    if (path / "checkpoints").is_dir():
        state = newest_complete(path, warn)
        if state is None:
            raise UserError(f"--resume: '{path}' has no complete state under checkpoints/state/")
        return state, path
    raise UserError(f"--resume: '{path}' is neither a run directory nor a state directory of this trainer")
