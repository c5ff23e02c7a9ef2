"""Training throughput (samples/s) by precision, memory format and torch.compile, in one table.

    bash benchmarks/gpu.sh                                          # on a GPU machine: the whole table in < 5 min
    python benchmarks/throughput.py --workloads cnn --precisions fp32,bf16 --compile off
    python benchmarks/throughput.py --quick --precisions fp32       # CPU check that it runs (the tests)

Each setting is one run of the trainer (``train.loop.train(cfg)``) in a fresh subprocess of this
script, trackers off, checkpoints at epoch ends off, no progress bar, with:

    training.mixed_precision   fp32 (= no) | bf16 | fp16 (fp16 needs CUDA: skipped on a CPU)
    training.channels_last     off | on
    training.compile           off | on (training.compile_backend, default inductor)

Workloads: ``cnn`` the default model at 32x32, batch 64 (what the default config trains); ``cnn64``
the default model at 64x64, batch 128 (more arithmetic per step, where precision can show); ``tiny``
one 8-channel block at 8x8, batch 32 (pure per-step overhead); ``resnet64`` a larger model, the small
ResNet with stages of 64-512 channels (5.0 M parameters) at 64x64, batch 128, where bf16 and
channels_last have arithmetic to speed up (issue 15's bf16 goal). Compiled runs use channels_last off
only (each compile costs tens of seconds) unless channels_last on is the only layout asked for.

samples/s = training images per epoch / median epoch time without epoch 1 (warm-up, where compile
happens). The trainer's epoch time (``results["epoch_times_s"]``) also holds one validation pass over
``num_val`` images (256, forward only), so this slightly understates the pure training rate. "warm-up
s" is epoch 1 minus a steady epoch: mostly compilation. "vs fp32" compares with the same workload in
fp32, channels_last off, compile off.

With a total time budget, settings run in order of interest (the main workloads eager, then compiled,
then the larger input) and the ones that no longer fit are listed as skipped. A setting that fails
prints its error line and the others go on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.config import load_config  # noqa: E402  (light: pydantic + yaml, no torch)

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# Split sizes are multiples of the batch sizes: no smaller last batch, which a compiled model would
# compile once more for.
WORKLOADS = {
    "cnn": ["data.synthetic.num_train=8192"],
    "cnn64": ["data.image_size=64", "data.batch_size=128", "data.synthetic.num_train=4096"],
    "tiny": ["data.image_size=8", "model.channels=[8]", "model.hidden=8", "data.batch_size=32",
             "data.synthetic.num_train=16384"],
    "resnet64": ["model.name=resnet", "model.channels=[64,128,256,512]", "model.hidden=256", "data.image_size=64",
                 "data.batch_size=128", "data.synthetic.num_train=4096"],
}
SMALL_SPLITS = ["data.synthetic.num_val=256", "data.synthetic.num_test=256", "data.eval_batch_size=256"]
QUICK_DATA = ["data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.num_test=64"]


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


@dataclass(frozen=True)
class Setting:
    workload: str
    precision: str
    channels_last: bool
    compile: bool

    def label(self) -> str:
        return (f"{self.workload} {self.precision} channels_last={on_off(self.channels_last)} "
                f"compile={on_off(self.compile)}")

    def overrides(self, epochs: int, quick: bool, backend: str) -> list[str]:
        return WORKLOADS[self.workload] + SMALL_SPLITS + (QUICK_DATA if quick else []) + [
            f"training.mixed_precision={PRECISIONS[self.precision]}",
            f"training.channels_last={str(self.channels_last).lower()}",
            f"training.compile={str(self.compile).lower()}", f"training.compile_backend={backend}",
            f"training.epochs={epochs}",
            "logging.tensorboard=false", "logging.wandb.enabled=false", "logging.progress_bar=false",
            "checkpoint.every_n_epochs=0",
        ]


def plan(workloads: list[str], precisions: list[str], layouts: list[bool], compiles: list[bool]) -> list[Setting]:
    """Every combination (compiled ones with channels_last off only, unless only 'on' is asked for),
    ordered so that a time budget cuts the least interesting ones: eager before compiled, cnn64 last."""
    settings = []
    for w, c, p, cl in itertools.product(workloads, compiles, precisions, layouts):
        if c and cl and False in layouts:
            continue
        settings.append(Setting(w, p, cl, c))
    return sorted(settings, key=lambda s: (s.workload == "cnn64", s.compile))  # stable: keeps the order within


# --------------------------------------------------------------------------------------------------
# Worker: one setting, in a fresh process; prints "RESULT {json}" last.
# --------------------------------------------------------------------------------------------------


def worker(overrides: list[str]) -> dict:
    import torch

    from train.loop import train

    cfg = load_config(None, overrides)
    results = train(cfg)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"epoch_times": results["epoch_times_s"], "num_train": cfg.data.synthetic.num_train,
            "mixed_precision": results["mixed_precision"], "device": device}


# --------------------------------------------------------------------------------------------------
# Parent: run the plan within the budget, print (and write) the table.
# --------------------------------------------------------------------------------------------------


def run_setting(setting: Setting, args, tmp: Path, timeout: float) -> tuple[dict | None, str]:
    out_dir = tmp / setting.label().replace(" ", "_").replace("=", "-")
    overrides = setting.overrides(args.epochs, args.quick, args.backend) + [
        f"experiment.output_dir={out_dir}", "experiment.name=run"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *overrides]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    # The last line of a traceback names the exception and its message.
    lines = [ln for ln in (proc.stderr.strip() or proc.stdout.strip()).splitlines() if ln.strip()]
    return None, f"exit code {proc.returncode}: {(lines[-1].strip() if lines else 'no output')[:300]}"


def machine_line() -> str:
    import importlib.metadata

    def v(p):
        try:
            return importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    gpu = "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        gpu = out.stdout.strip().replace("\n", "; ") or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {platform.node()}, {cores} CPU cores, GPU: {gpu}; python {platform.python_version()}, "
            f"torch {v('torch')}, accelerate {v('accelerate')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads",
                    help="comma-separated, of: " + ", ".join(WORKLOADS)
                    + " (default: cnn,resnet64,tiny,cnn64; --quick: cnn,tiny)")
    ap.add_argument("--precisions", default="fp32,bf16,fp16",
                    help="comma-separated, of: fp32, bf16, fp16 (default: %(default)s)")
    ap.add_argument("--channels-last", help="off, on or off,on (default: off,on; --quick: off)")
    ap.add_argument("--compile", help="off, on or off,on (default: off,on; --quick: off)")
    ap.add_argument("--backend", default="inductor", help="training.compile_backend (default: %(default)s)")
    ap.add_argument("--epochs", type=int, help="epochs per setting, the first is warm-up (default: 3; --quick: 2)")
    ap.add_argument("--setting-timeout", type=float, default=120,
                    help="seconds one setting may take (default: %(default)s)")
    ap.add_argument("--total-budget", type=float, default=0,
                    help="seconds for all settings; 0 = no limit (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny data, 2 epochs: checks that it runs (CPU tests)")
    ap.add_argument("--out", metavar="PATH", help="also write the table to this file")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(worker(args.worker)), flush=True)
        return 0

    args.epochs = args.epochs or (2 if args.quick else 3)
    workloads = (args.workloads or ("cnn,tiny" if args.quick else "cnn,resnet64,tiny,cnn64")).split(",")
    precisions = args.precisions.split(",")
    layouts = [x == "on" for x in (args.channels_last or ("off" if args.quick else "off,on")).split(",")]
    compiles = [x == "on" for x in (args.compile or ("off" if args.quick else "off,on")).split(",")]
    bad = [w for w in workloads if w not in WORKLOADS] + [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"unknown workload or precision: {', '.join(bad)}")

    import torch  # only to know whether fp16 can run here

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say(machine_line())
    say(f"torch sees CUDA: {torch.cuda.is_available()}; {args.epochs} epochs per setting (epoch 1 = warm-up)"
        + (" [--quick: times mean nothing]" if args.quick else ""))
    if "fp16" in precisions and not torch.cuda.is_available():
        precisions.remove("fp16")
        say("note: fp16 skipped: no CUDA device (the trainer refuses fp16 on a CPU)")

    settings = plan(workloads, precisions, layouts, compiles)
    rows, failed, skipped = [], [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for s in settings:
            left = args.total_budget - (time.perf_counter() - t_start) if args.total_budget else float("inf")
            if left < 15:  # not even an eager setting fits: say so instead of starting it
                skipped.append(s)
                continue
            t0 = time.perf_counter()
            result, error = run_setting(s, args, Path(tmp), timeout=min(args.setting_timeout, left))
            wall = time.perf_counter() - t0
            if result is None:
                failed.append(s)
                say(f"ERROR {s.label()}: {error}")
                continue
            times = result["epoch_times"]
            steady = statistics.median(times[1:] or times)
            rows.append((s, result["num_train"] / steady, steady, times[0] - steady, wall))
            say(f"  {s.label()}: {result['num_train'] / steady:,.0f} samples/s, epochs "
                + " ".join(f"{t:.3f}" for t in times) + f" s, process {wall:.1f} s, {result['device']}")

    base = {s.workload: rate for s, rate, *_ in rows if s.precision == "fp32" and not s.channels_last and not s.compile}
    say("")
    say(f"{'workload':8s} {'precision':9s} {'ch_last':7s} {'compile':7s} {'samples/s':>11s} {'s/epoch':>8s} "
        f"{'warm-up s':>9s} {'vs fp32':>8s} {'process s':>9s}")
    for s, rate, steady, warm, wall in rows:
        rel = f"{rate / base[s.workload]:8.2f}" if s.workload in base else f"{'-':>8s}"
        say(f"{s.workload:8s} {s.precision:9s} {on_off(s.channels_last):7s} {on_off(s.compile):7s} "
            f"{rate:11,.0f} {steady:8.3f} {warm:9.2f} {rel} {wall:9.1f}")
    for s in failed:
        say(f"{s.workload:8s} {s.precision:9s} {on_off(s.channels_last):7s} {on_off(s.compile):7s} {'failed':>11s}")
    if skipped:
        say(f"skipped (total budget of {args.total_budget:.0f} s spent): " + "; ".join(s.label() for s in skipped))
    say(f"wall time {time.perf_counter() - t_start:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"table written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
