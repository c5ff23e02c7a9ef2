"""Where a run came from: a unique default name, the git commit and library versions."""

from __future__ import annotations

import os
import platform
import re
import secrets
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from train.config import Config


def new_run_name(cfg: Config) -> str:
    """``<model>-<YYYYmmdd-HHMMSS>-<4 hex>``: sortable by start time and unique across parallel starts."""
    return f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@lru_cache(maxsize=1)
def run_info() -> dict[str, str]:
    """Git commit (with ``-dirty`` for uncommitted changes) and versions of the libraries that matter."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip()
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


_SECRET_KEY = re.compile(r"(key|token|secret|password|passwd|credential)", re.IGNORECASE)


def redact(values: dict) -> dict:
    """Copy of a (nested or flat) config dict with secrets hidden: values of keys named like
    key/token/secret/password, and the W&B API key wherever it appears in a string."""
    api_key = os.environ.get("WANDB_API_KEY")

    def clean(key: str, v):
        if isinstance(v, dict):
            return {k: clean(k, x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(key, x) for x in v]
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and v not in (None, ""):
            return "***"
        if api_key and isinstance(v, str) and api_key in v:
            return v.replace(api_key, "***")
        return v

    return {k: clean(k, v) for k, v in values.items()}
