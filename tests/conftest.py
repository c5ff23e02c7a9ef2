"""Shared helpers: run the trainer as a user would (a subprocess), on tiny data, W&B offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "train" / "main.py")
DEFAULT_CONFIG = str(ROOT / "configs" / "model_config.yml")


def tiny(output_dir: Path, **extra) -> list[str]:
    """Overrides for a run of a few seconds: small synthetic splits, small model, no progress bar."""
    values = {
        "experiment.output_dir": str(output_dir),
        "data.synthetic.num_train": 192,
        "data.synthetic.num_val": 70,
        "data.synthetic.num_test": 64,
        "data.batch_size": 32,
        "data.eval_batch_size": 16,
        "model.channels": "[8,16]",
        "model.hidden": 16,
        "training.epochs": 2,
        "logging.progress_bar": "false",
        "logging.log_every_n_steps": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def env(**extra) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    e.pop("WANDB_API_KEY", None)
    e.update(extra)
    return e


def run_main(
    args: list[str], launcher: list[str] | None = None, timeout: int = 240, **env_extra
) -> subprocess.CompletedProcess:
    """``python train/main.py ARGS`` (or ``LAUNCHER train/main.py ARGS``) from the repo root."""
    cmd = (launcher or [sys.executable]) + [MAIN] + args
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def accelerate_launch(*flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dir_of(output_dir: Path) -> Path:
    dirs = [d for d in output_dir.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's offline W&B file(s), read with W&B's own reader."""
    records = []
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run(["wandb", "leet", "inspect", "--json", str(offline)],
                             capture_output=True, text=True, check=True)
        records += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return records


def wandb_summary(offline_dir: Path) -> dict:
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(offline_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def tb_scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def popen_main(args: list[str], launcher: list[str], **env_extra) -> subprocess.Popen:
    """Like ``run_main`` but in the background (for launches that must run at the same time, e.g. the
    machines of a simulated multi-node job); read the result with ``.communicate(timeout=...)``."""
    return subprocess.Popen(launcher + [MAIN] + args, cwd=ROOT, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_sweep_cli(args: list[str], timeout: int = 240, **env_extra) -> subprocess.CompletedProcess:
    """``python -m train.sweep ARGS`` from the repo root, W&B offline."""
    return subprocess.run([sys.executable, "-m", "train.sweep", *args], cwd=ROOT, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)
