"""Where a run came from: a unique default name, the git commit and library versions."""

from __future__ import annotations

import platform
import secrets
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path


def new_run_name(model_name: str) -> str:
    """``<model>-<YYYYmmdd-HHMMSS>-<4 hex>``: sortable by start time and unique across parallel starts."""
    return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@lru_cache(maxsize=1)
def run_info() -> dict[str, str]:
    """Git commit (with ``-dirty`` for uncommitted changes) and versions of the libraries that matter."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        commit = (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    info = {"git_commit": commit, "python": platform.python_version()}
    for package in ("torch", "accelerate", "wandb", "tensorboard", "safetensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info
