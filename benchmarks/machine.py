"""What the benchmarks print about the machine they ran on (shared by data.py and overhead.py)."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """The CPU model as `lscpu` names it, else what Python knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
