"""What the trainer and its logging cost per epoch, next to a plain loop and Lightning, on one CPU process.

    python benchmarks/overhead.py                           # both workloads, every arm, 5 repetitions,
                                                            # 1 thread, lockstep (~15 min)
    python benchmarks/overhead.py --workloads tiny --arms a_acc,b,b2 --reps 9
    python benchmarks/overhead.py --quick                   # tiny workload and data, 2 epochs, 1 repetition,
                                                            # arms side by side: checks that it runs
    python benchmarks/overhead.py --json overhead.json      # also write every raw number
    python benchmarks/overhead.py --checkpoint-only         # only the best-checkpoint writes (seconds)

Arms, all on the same model, data, batch size, epochs, seed and thread count:

    a      a plain hand-written PyTorch loop
    a_acc  the same loop with model, optimizer and loaders passed through Accelerate's prepare (cpu=True)
    b      this trainer (train.loop.train), trackers off
    b2     b again, as a separate arm: the noise arm (b2/b is what this machine cannot tell apart)
    c      the trainer's defaults: TensorBoard + W&B (offline), logging every 50 steps
    d      c plus every logging option: log_predictions, log_gradients, system_metrics, wandb.watch_model
    e      Lightning with its TensorBoardLogger, log_every_n_steps=50 (skipped with a note if not installed)

Arms a, a_acc and e build everything with the trainer's own builders (build_data + make_loaders with its
EpochSampler, build_model, build_optimizer, build_scheduler stepped per optimizer step, build_loss) and
validate every epoch, like the trainer; progress bars and checkpointing are off everywhere.

Workloads: ``cnn``, the default model on 32x32 synthetic images (smaller splits than the default config
so that an epoch takes a few seconds), and ``tiny``, one 8-channel block on 8x8 images, batch 32,
where the per-step overhead of the loop is most of the step.

Epoch time = training over the train loader + the validation pass + logging, checkpoint writes
excluded. The trainer reports it itself (``results["epoch_times_s"]``); the hand-written loops time
the same span; Lightning is timed by a callback from one ``on_train_epoch_start`` to the next (the
last to ``on_train_end``), which holds its validation and its epoch-end logging. Each (arm,
repetition) runs in a fresh subprocess of this script (``--worker``), so no arm inherits another's
warm caches; start-up is not measured. Epoch 1 (warm-up) is dropped, each run gives the median of its
other epochs, and the table shows the median over repetitions.

Schedule (``--schedule``). The default, ``lockstep``, starts all arms of a repetition at once and lets
exactly one run at a time, round-robin, ``--slice`` seconds each (SIGSTOP/SIGCONT), so every arm sees
the same machine within a second; arms are then compared on process CPU seconds per epoch (a stopped
process's wall clock runs on; its CPU clock does not). On a VM whose speed drifts (this one: 1.25x
within a minute) that is what resolves a few percent. CPU time leaves out what other processes do
for an arm: W&B's service process (0.08 s of CPU in a 17 s run, measured). ``sequential`` runs the
arms one after the other in a rotated order and compares wall seconds; ``parallel`` (``--quick``)
runs them side by side only to check that everything works.

How to read it: a ratio X/Y is median(X) / median(Y); 1.03 means X takes 3% longer per epoch; PASS/MISS
compare it with the goal. "paired" is the median over repetitions of X/Y within one repetition (runs
minutes apart, so a drift of the machine's speed cancels). The noise arm b2/b, and the spread of each
arm's repetitions, show how small a difference this machine resolves: a verdict whose ratio lies
closer to its bound than b2/b lies to 1 is marked "within the noise" - rerun it with more --reps, or
measure the suspected per-step cost directly. "per step" divides the difference by the optimizer
steps per epoch, which is what to hunt for in the loop on the tiny workload.

Also measured: what training waits for when the trainer saves its best checkpoint (a copy of the
weights to host memory; the atomic write runs on a background thread) and how long that write takes
until durable, against a plain safetensors save + fsync, on the default CNN's state dict and on a
~100 MB one (``--checkpoint-only``: just these, in seconds); and the start-up + shutdown time
of the trackers (imports included, as a run pays them).
No numbers are checked against thresholds except in the PASS/MISS column; rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: the script's own folder)
from train.config import Config, load_config  # noqa: E402  (light: pydantic + yaml, no torch)

ARMS = {
    "a": "plain PyTorch loop",
    "a_acc": "plain loop, Accelerate prepare(cpu=True)",
    "b": "trainer, trackers off",
    "b2": "trainer, trackers off (again: noise arm)",
    "c": "trainer defaults: TensorBoard + W&B offline",
    "d": "trainer, every logging option on",
    "e": "Lightning + TensorBoardLogger",
}

# What each trainer arm changes; everything else is the trainer's default.
TRACKERS_OFF = ["logging.tensorboard=false", "logging.wandb.enabled=false"]
DEFAULT_TRACKERS = ["logging.tensorboard=true", "logging.wandb.enabled=true", "logging.wandb.mode=offline"]
TRAINER_ARMS = {
    "b": TRACKERS_OFF,
    "b2": TRACKERS_OFF,
    "c": DEFAULT_TRACKERS,
    "d": DEFAULT_TRACKERS + ["logging.log_predictions=true", "logging.log_gradients=true",
                             "logging.system_metrics=true", "logging.wandb.watch_model=true"],
}

# Sized for an epoch of ~2.5 s (cnn, 32 steps) and ~1.5 s (tiny, 800 steps) on one thread of a 2-core EPYC.
NO_AUGMENT = ["data.augment.hflip=false", "data.augment.crop_scale_min=1.0", "data.augment.brightness=0"]
WORKLOADS = {
    "cnn": ["data.synthetic.num_train=2000", "data.synthetic.num_val=500", "data.synthetic.num_test=256"],
    "tiny": ["data.image_size=8", "model.channels=[8]", "model.hidden=8", "data.batch_size=32", *NO_AUGMENT,
             "data.synthetic.num_train=25600", "data.synthetic.num_val=2000", "data.synthetic.num_test=256"],
}
QUICK_DATA = {
    "cnn": ["data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.num_test=64"],
    "tiny": ["data.synthetic.num_train=320", "data.synthetic.num_val=64", "data.synthetic.num_test=64"],
}
WORKLOAD_TEXT = {"cnn": "default CNN", "tiny": "tiny model (channels [8], hidden 8, 8x8 images, batch 32)"}

# (numerator, denominator, {workload: (comparison, bound)}, what it answers). No goal: shown for reading.
RATIOS = [
    ("b", "a", {"cnn": ("<=", 1.03)}, "trainer vs plain loop"),
    ("b", "a_acc", {"tiny": ("<=", 1.03)}, "trainer vs plain Accelerate loop"),
    ("c", "b", {"cnn": ("<=", 1.02), "tiny": ("<=", 1.02)}, "default trackers (TensorBoard + W&B offline)"),
    ("d", "b", {"cnn": ("<=", 1.10), "tiny": ("<=", 1.10)}, "every logging option"),
    ("e", "b", {"cnn": (">", 1.0), "tiny": (">", 1.0)}, "Lightning vs trainer (goal: trainer faster)"),
    ("b2", "b", {}, "noise: the trainer against itself"),
    ("a", "a_acc", {}, "plain loop vs Accelerate-prepared loop"),
    ("e", "c", {}, "Lightning + TensorBoard vs trainer defaults"),
]

TRACKER_KINDS = {
    "none": "no tracker",
    "tensorboard": "TensorBoard",
    "wandb": "W&B offline",
    "both": "TensorBoard + W&B offline",
}
CHECKPOINT_GOAL = 1.10  # default CNN: what training waits for, vs a bare save_file + fsync (no worse than before)
BIG_CHECKPOINT_GOAL = 0.25  # ~100 MB: training waits for the host copy only (issue 15)


def overrides_for(arm: str, workload: str, args, out_dir: Path, name: str) -> list[str]:
    """The config overrides of one run: workload, shared settings, then what the arm changes."""
    shared = [
        f"training.epochs={args.epochs}", f"training.num_threads={args.threads}", f"experiment.output_dir={out_dir}",
        f"experiment.name={name}", "logging.progress_bar=false", "checkpoint.every_n_epochs=0",
    ]
    data = WORKLOADS[workload] + (QUICK_DATA[workload] if args.quick else [])
    return data + shared + TRAINER_ARMS.get(arm, TRACKERS_OFF)


# --------------------------------------------------------------------------------------------------
# Worker side: one arm, one run, in a fresh process; prints "RESULT {json}" last.
# --------------------------------------------------------------------------------------------------


def run_trainer(cfg: Config) -> dict:
    import torch

    from train.loop import train

    results = train(cfg)
    # What a user reads: results.json in the run directory (the returned dict is the same).
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    return {"epoch_times": saved["epoch_times_s"], "epoch_cpu_times": saved["epoch_cpu_times_s"],
            "threads": torch.get_num_threads(), "best_val_rmse": saved.get("best/rmse")}


def build_everything(cfg: Config):
    """Data, loaders, model and loss exactly as ``train()`` builds them, with its seeding order."""
    import torch
    from accelerate.utils import set_seed

    from train.data import build_data, make_loaders
    from train.optim import build_loss
    from train.models import build_model

    torch.set_num_threads(cfg.training.num_threads)
    data = build_data(cfg)
    # As in train(): the loader has its own generator, which keeps the global stream (dropout) untouched.
    train_loader, val_loader, _ = make_loaders(cfg, data)
    sampler = train_loader.sampler
    set_seed(cfg.experiment.seed)  # before the model: its initialization is part of the run
    model = build_model(cfg.model)
    return data, train_loader, val_loader, sampler, model, build_loss(cfg), build_loss(cfg, reduction="none")


def run_hand_written(cfg: Config, use_accelerate: bool) -> dict:
    """The loop a user would write: forward, loss, backward, step, zero_grad, scheduler; validate."""
    import torch
    from accelerate import Accelerator

    from train.heads import Head
    from train.loop import evaluate
    from train.optim import build_optimizer, build_scheduler

    data, train_loader, val_loader, sampler, model, loss_fn, per_sample = build_everything(cfg)
    optimizer = build_optimizer(cfg, model)
    accelerator = None
    if use_accelerate:
        accelerator = Accelerator(cpu=True)
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    scheduler, _ = build_scheduler(cfg, optimizer, len(train_loader))  # cosine: stepped per optimizer step

    epoch_times, epoch_cpu, val_rmse = [], [], []
    for epoch in range(1, cfg.training.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        # The prepared loader passes the epoch on to the sampler, as in train().
        (train_loader if use_accelerate else sampler).set_epoch(epoch)
        loss_sum, n = torch.zeros(()), 0
        for batch in train_loader:
            x, y = data.train_batch(batch, epoch)  # as the trainer does (augmentation, when on, happens here)
            pred = model(x).float()
            loss = loss_fn(pred, y)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += loss.detach() * len(y)  # no host sync per step; read once per epoch
            n += len(y)
        val = evaluate(accelerator, model, val_loader, Head(loss_fn, per_sample, data.target_mean, data.target_std)
                       ) if accelerator else plain_evaluate(model, val_loader, per_sample, data.target_std)
        print(f"epoch {epoch}: train loss {loss_sum.item() / n:.6f}, val rmse {val['rmse']:.4f}")
        val_rmse.append(val["rmse"])
        epoch_times.append(time.perf_counter() - t0)
        epoch_cpu.append(time.process_time() - c0)
    return {"epoch_times": epoch_times, "epoch_cpu_times": epoch_cpu, "threads": torch.get_num_threads(),
            "best_val_rmse": min(val_rmse)}


def plain_evaluate(model, loader, per_sample, target_std: float) -> dict[str, float]:
    """The trainer's validation sums (loss, squared and absolute error, count) without Accelerate."""
    import torch

    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).float()
            err = pred - y
            sums += torch.stack([per_sample(pred, y).sum(), err.pow(2).sum(), err.abs().sum(),
                                 torch.tensor(float(len(y)))]).double()
    model.train()
    loss_sum, sq, ab, n = sums.tolist()
    return {"loss": loss_sum / n, "rmse": math.sqrt(sq / n) * target_std, "mae": ab / n * target_std}


def run_lightning(cfg: Config, log_dir: Path) -> dict:
    """The same model, optimizer, schedule, data and validation sums in a LightningModule."""
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from train.optim import build_optimizer, build_scheduler

    warnings.filterwarnings("ignore", module="lightning")  # "few workers" hints: the loaders are the trainer's
    data, train_loader, val_loader, sampler, net, loss_fn, per_sample = build_everything(cfg)
    steps_per_epoch = len(train_loader)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.val_sums = torch.zeros(4, dtype=torch.float64)
            self.val_rmse = []

        def training_step(self, batch, batch_idx):
            x, y = data.train_batch(batch, self.current_epoch + 1)
            loss = loss_fn(self.net(x).float(), y)
            # The idiomatic equivalent of the trainer's step loss + epoch mean.
            self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
            return loss

        def on_train_epoch_start(self):
            # Lightning numbers epochs from 0 (and sets that on the sampler first); the trainer and the
            # plain loops from 1. The iterator is created after this hook: same batch order as theirs.
            sampler.set_epoch(self.current_epoch + 1)

        def on_validation_epoch_start(self):
            self.val_sums = torch.zeros(4, dtype=torch.float64)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            pred = self.net(x).float()
            err = pred - y
            n = torch.tensor(float(len(y)))
            self.val_sums += torch.stack([per_sample(pred, y).sum(), err.pow(2).sum(), err.abs().sum(), n]).double()

        def on_validation_epoch_end(self):
            loss_sum, sq, ab, n = self.val_sums.tolist()
            self.val_rmse.append(math.sqrt(sq / n) * data.target_std)
            self.log_dict({"val/loss": loss_sum / n, "val/rmse": math.sqrt(sq / n) * data.target_std,
                           "val/mae": ab / n * data.target_std})

        def configure_optimizers(self):
            optimizer = build_optimizer(cfg, self.net)
            scheduler, _ = build_scheduler(cfg, optimizer, steps_per_epoch)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class EpochTimer(L.Callback):
        """Epoch k spans on_train_epoch_start(k) .. on_train_epoch_start(k+1) (the last: on_train_end).

        In Lightning 2.x validation runs before on_train_epoch_end, and the logger connector writes the
        epoch-level metrics right after it: both inside this window."""

        def __init__(self):
            self.marks, self.cpu_marks, self.val_ends = [], [], []

        def on_train_epoch_start(self, trainer, module):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

        def on_validation_epoch_end(self, trainer, module):
            self.val_ends.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=cfg.training.epochs, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(str(log_dir), name="lightning"), log_every_n_steps=cfg.logging.log_every_n_steps,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,  # the trainer has no sanity pass either
        use_distributed_sampler=False,  # keep the trainer's EpochSampler
        callbacks=[timer],
    )
    module = Module()
    trainer.fit(module, train_loader, val_loader)
    bounds = timer.marks
    if len(bounds) != cfg.training.epochs + 1 or len(timer.val_ends) != cfg.training.epochs:
        raise RuntimeError(f"Lightning ran {len(bounds) - 1} epochs and {len(timer.val_ends)} validations; "
                           f"expected {cfg.training.epochs}")
    for k, t in enumerate(timer.val_ends):
        if not bounds[k] < t < bounds[k + 1]:
            raise RuntimeError(f"Lightning's validation of epoch {k + 1} ran outside its timing window")
    epoch_times = [b - a for a, b in zip(bounds, bounds[1:])]
    epoch_cpu = [b - a for a, b in zip(timer.cpu_marks, timer.cpu_marks[1:])]
    return {"epoch_times": epoch_times, "epoch_cpu_times": epoch_cpu, "threads": torch.get_num_threads(),
            "best_val_rmse": min(module.val_rmse)}


def run_trackers(kind: str, out_dir: Path) -> dict:
    """Accelerator(log_with=...) + init_trackers, then the trainer's finish (end_training), timed.

    Goes through the trainer's own tracker_list / start_trackers / finish_trackers; imports of
    tensorboard and wandb fall inside, as they do when a run starts."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from train.config import flatten
    from train.tracking import finish_trackers, start_trackers, tracker_list

    cfg = load_config(None, [
        f"logging.tensorboard={kind in ('tensorboard', 'both')}", f"logging.wandb.enabled={kind in ('wandb', 'both')}",
        "logging.wandb.mode=offline", f"experiment.output_dir={out_dir}", "experiment.name=trackers",
    ])
    run_dir = out_dir / "trackers"
    run_dir.mkdir(parents=True)
    flat = flatten(cfg.model_dump(mode="json"))
    t0 = time.perf_counter()
    accelerator = Accelerator(cpu=True, log_with=tracker_list(cfg, run_dir),
                              project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))
    start_trackers(accelerator, cfg, run_dir, flat, run_id=None)
    t_started = time.perf_counter()
    finish_trackers(accelerator, 0, {})
    t_done = time.perf_counter()
    return {"start_s": t_started - t0, "finish_s": t_done - t_started}


def worker(args) -> dict:
    out_dir = Path(args.out_dir)
    if args.worker.startswith("trackers:"):
        return run_trackers(args.worker.split(":", 1)[1], out_dir)
    arm = args.worker
    cfg = load_config(None, overrides_for(arm, args.workload, args, out_dir, name=f"{args.workload}-{arm}"))
    if arm in TRAINER_ARMS:
        return run_trainer(cfg)
    if arm == "e":
        return run_lightning(cfg, out_dir)
    return run_hand_written(cfg, use_accelerate=arm == "a_acc")


# --------------------------------------------------------------------------------------------------
# Parent side: schedule the workers, measure checkpoints, print the tables.
# --------------------------------------------------------------------------------------------------


def worker_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WANDB_API_KEY", None)
    env.update({
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
        # Nothing of these runs lands in the home directory.
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
    })
    return env


def worker_cmd(task: str, workload: str, args, out_dir: Path) -> list[str]:
    return ([sys.executable, str(Path(__file__).resolve()), "--worker", task, "--workload", workload,
             "--out-dir", str(out_dir), "--epochs", str(args.epochs), "--threads", str(args.threads)]
            + (["--quick"] if args.quick else []))


def parse_worker(output: str, returncode: int) -> tuple[dict | None, str]:
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    tail = output.strip().splitlines()[-6:]
    return None, f"exit code {returncode}: " + " | ".join(tail)


def spawn(task: str, workload: str, args, out_dir: Path, env: dict) -> tuple[dict | None, str]:
    """Run one worker; return (its RESULT dict, "") or (None, the last lines of its output)."""
    try:
        proc = subprocess.run(worker_cmd(task, workload, args, out_dir), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout} s"
    return parse_worker(proc.stdout + proc.stderr, proc.returncode)


def run_lockstep(jobs: list[tuple[str, str, Path]], args, env: dict) -> list[tuple[dict | None, str, float]]:
    """Start every job at once and let exactly one run at a time, round-robin, ``args.slice`` seconds
    each (SIGSTOP / SIGCONT).

    Why: this VM's speed drifts by up to 25% within a minute (the host), far more than the few percent
    being measured, and arms run one after the other see different machines. In lockstep every arm
    sees the same machine within a second. A stopped process's wall clock keeps running, so the arms
    report process CPU time per epoch (``epoch_cpu_times``), which a stop does not advance.
    """
    import signal

    procs = []
    for task, workload, out_dir in jobs:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(out_dir.parent / f"{out_dir.name}.log", "w+")
        proc = subprocess.Popen(worker_cmd(task, workload, args, out_dir), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        os.kill(proc.pid, signal.SIGSTOP)
        procs.append({"proc": proc, "log": log, "t0": time.perf_counter(), "wall": None})
    deadline = time.perf_counter() + args.timeout
    running = list(procs)
    while running:
        for job in list(running):
            proc = job["proc"]
            os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=args.slice)
                job["wall"] = time.perf_counter() - job["t0"]
                running.remove(job)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGSTOP)
        if time.perf_counter() > deadline:
            for job in running:
                job["proc"].kill()
                job["proc"].wait()
            break
    out = []
    for job in procs:
        job["log"].seek(0)
        text = job["log"].read()
        job["log"].close()
        if job["wall"] is None:
            out.append((None, f"timed out after {args.timeout} s (lockstep)", 0.0))
        else:
            out.append((*parse_worker(text, job["proc"].returncode), job["wall"]))
    return out


def epoch_key(args) -> str:
    """Lockstep arms are stopped while the others run: their wall clock is meaningless, CPU time is not."""
    return "epoch_cpu_times" if args.schedule == "lockstep" else "epoch_times"


def steady(epoch_times: list[float]) -> float:
    """Median epoch time without the warm-up epoch (with one epoch only, that one)."""
    return statistics.median(epoch_times[1:] or epoch_times)


def run_jobs(
    jobs: list[tuple[str, str, Path]], args, env: dict, lockstep: bool = False
) -> list[tuple[dict | None, str, float]]:
    """``spawn`` every (task, workload, out_dir) in order; ``--quick`` runs them side by side on the
    machine's cores instead (it only checks that everything runs: its times mean nothing)."""

    def one(job):
        t0 = time.perf_counter()
        result, error = spawn(job[0], job[1], args, job[2], env)
        return result, error, time.perf_counter() - t0

    if lockstep and args.schedule == "lockstep":
        return run_lockstep(jobs, args, env)
    if args.schedule != "parallel":
        return [one(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=cores()) as pool:
        return list(pool.map(one, jobs))


def run_arms(args, workloads: list[str], arms: list[str], tmp: Path, env: dict) -> tuple[dict, list[str]]:
    """{workload: {arm: {repetition: steady median}}}, raw runs in ``args.raw``; failures listed."""
    medians: dict = {w: {a: {} for a in arms} for w in workloads}
    failures = []
    for rep in range(args.reps):
        for workload in workloads:
            k = rep % len(arms)
            order = arms[k:] + arms[:k]  # rotated each repetition
            jobs = [(arm, workload, tmp / f"{workload}-{arm}-{rep}") for arm in order]
            for arm, (result, error, wall) in zip(order, run_jobs(jobs, args, env, lockstep=True)):
                if result is None:
                    failures.append(f"{workload} {arm} rep {rep + 1}: {error}")
                    print(f"  rep {rep + 1}/{args.reps} {workload:5s} {arm:6s} FAILED: {error}", flush=True)
                    continue
                medians[workload][arm][rep] = steady(result[epoch_key(args)])
                args.raw["runs"].append({"workload": workload, "arm": arm, "rep": rep + 1, "wall_s": wall, **result})
                shown = " ".join(f"{t:.3f}" for t in result[epoch_key(args)])
                print(f"  rep {rep + 1}/{args.reps} {workload:5s} {arm:6s} epochs [{shown}] s, "
                      f"{result['threads']} threads, best val rmse {result['best_val_rmse']:.3f}, "
                      f"process {wall:.1f} s", flush=True)
    return medians, failures


def run_tracker_timing(args, tmp: Path, env: dict) -> tuple[dict, list[str]]:
    times: dict = {k: [] for k in TRACKER_KINDS}
    failures = []
    kinds = list(TRACKER_KINDS)
    for rep in range(args.tracker_reps):
        k = rep % len(kinds)
        order = kinds[k:] + kinds[:k]
        jobs = [(f"trackers:{kind}", "cnn", tmp / f"trackers-{kind}-{rep}") for kind in order]
        for kind, (result, error, wall) in zip(order, run_jobs(jobs, args, env)):
            if result is None:
                failures.append(f"trackers {kind} rep {rep + 1}: {error}")
                continue
            result["process_s"] = wall  # the whole worker: interpreter, imports, trackers, exit (W&B's teardown)
            times[kind].append(result)
            args.raw["trackers"].append({"kind": kind, "rep": rep + 1, **result})
    return times, failures


def checkpoint_state_dicts(big_mb: int) -> dict[str, dict]:
    """The state dicts the checkpoint write is timed on: the default CNN's, and ``big_mb`` MiB of float32
    tensors of 4 MiB each (the size where a synchronous write used to stall training for a second)."""
    import torch

    from train.models import build_model

    torch.manual_seed(0)
    n_big = max(1, round(big_mb * 2**20 / 2**22))
    return {"cnn": build_model(load_config(None, []).model).state_dict(),
            "big": {f"block{i}.weight": torch.randn(1024, 1024) for i in range(n_big)}}


def checkpoint_timing(reps: int, directory: Path, state_dict: dict) -> dict:
    """The trainer's best-checkpoint save (``BestCheckpoint.write``: a host copy, then temp file, fsync,
    rename and directory fsync on its background thread) vs a plain save_file + fsync of the same
    dict, in this process; interleaved, first call of each not counted."""
    from safetensors.torch import save_file

    from train.checkpoints import BestCheckpoint, checkpoint_metadata

    cfg = load_config(None, [])
    meta = checkpoint_metadata(model_cfg=cfg.model, epoch=3, global_step=375, monitor="val/rmse", value=21.5,
                               target_mean=1935.0, target_std=49.1, pixel_mean=[0.45, 0.42, 0.38],
                               pixel_std=[0.25, 0.24, 0.24], image_size=cfg.data.image_size)
    directory.mkdir(parents=True, exist_ok=True)
    plain_path = directory / "plain.safetensors"
    (directory / "checkpoints").mkdir(exist_ok=True)
    best = BestCheckpoint(directory)  # writes directory/checkpoints/best.safetensors

    def plain():
        save_file(state_dict, str(plain_path))
        with open(plain_path, "r+b") as f:
            os.fsync(f.fileno())

    times: dict[str, list[float]] = {"save_best": [], "save_best+durable": [], "save_file+fsync": []}
    for rep in range(reps + 1):
        # write() returns once the weights are copied to host memory; the file is written, fsynced,
        # renamed and its directory fsynced on the background thread, so wait() is timed right after it:
        # the first number is what the training loop waits for, the second what a crash-proof write takes.
        for name in ("save_best", "save_file+fsync") if rep % 2 == 0 else ("save_file+fsync", "save_best"):
            t0 = time.perf_counter()
            if name == "save_best":
                best.write(state_dict, meta)
                t1 = time.perf_counter()
                best.wait()
                if rep:
                    times["save_best"].append(t1 - t0)
                    times["save_best+durable"].append(time.perf_counter() - t0)
            else:
                plain()
                if rep:
                    times[name].append(time.perf_counter() - t0)
    n_params = sum(t.numel() for t in state_dict.values())
    best.close()
    return {"times": times, "bytes": best.path.stat().st_size, "tensors": len(state_dict), "numel": n_params}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (fsync costs differ a lot: tmpfs vs ext4 vs NFS)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown file system"
    resolved = str(path.resolve())
    holding = [m for m in mounts if resolved == m[0] or resolved.startswith(m[0].rstrip("/") + "/")]
    best = max(holding, key=lambda m: len(m[0]), default=None)  # the innermost mount point
    return f"{best[1]} ({best[0]})" if best else "unknown file system"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ratio_of_medians(num: dict, den: dict) -> float | None:
    return statistics.median(num.values()) / statistics.median(den.values()) if num and den else None


def paired_ratio(num: dict, den: dict) -> float | None:
    """Median over repetitions of num/den within the same repetition: the two ran minutes apart,
    so a slow drift of the machine's speed cancels out."""
    reps = [r for r in num if r in den]
    return statistics.median(num[r] / den[r] for r in reps) if reps else None


def verdict(value: float | None, goal: tuple[str, float] | None) -> str:
    if goal is None:
        return ""
    if value is None:
        return "n/a"
    op, bound = goal
    ok = value <= bound if op == "<=" else value > bound
    return "PASS" if ok else "MISS"


def print_workload(
    workload: str, arms: list[str], medians: dict, steps: int, describe: str, skipped_e: bool, cpu_clock: bool
) -> None:
    """Per-arm medians, then each ratio with its goal. A verdict closer to its bound than the noise arm
    is from 1 is marked: this machine cannot tell that one apart (rerun with more --reps)."""
    print(f"\n=== {workload}: {describe}; {steps} optimizer steps per epoch ===")
    clock = "CPU s/ep" if cpu_clock else "s/epoch"
    print(f"{'arm':6s} {'what':44s} {clock:>8s} {'ms/step':>8s} {'min..max of reps':>18s}  reps")
    for arm in ARMS:
        if arm == "e" and skipped_e:
            print(f"{arm:6s} {ARMS[arm]:44s} skipped: Lightning is not installed (pip install lightning)")
            continue
        if arm not in arms:
            continue
        xs = list(medians[arm].values())
        if not xs:
            print(f"{arm:6s} {ARMS[arm]:44s} {'failed':>8s}")
            continue
        med = statistics.median(xs)
        print(f"{arm:6s} {ARMS[arm]:44s} {med:8.3f} {med / steps * 1e3:8.3f} "
              f"{f'{min(xs):.3f}..{max(xs):.3f}':>18s}  {len(xs)}")
    noise_ratio = ratio_of_medians(medians["b2"], medians["b"]) if "b" in arms and "b2" in arms else None
    noise = abs(noise_ratio - 1) if noise_ratio is not None else None
    print(f"\n{'ratio':8s} {'value':>7s} {'per step':>10s} {'paired':>7s} {'goal':>8s} {'result':>6s}  what")
    for num, den, goals, what in RATIOS:
        if num not in arms or den not in arms:
            other = den if num == "e" else num
            if "e" in (num, den) and skipped_e and other in arms:
                print(f"{num + '/' + den:8s} {'n/a':>7s} {'':>10s} {'':>7s} {'':>8s} {'':>6s}  "
                      "skipped: Lightning is not installed")
            continue
        value = ratio_of_medians(medians[num], medians[den])
        goal = goals.get(workload)
        goal_text = f"{goal[0]} {goal[1]:g}" if goal else "-"
        if value is None:
            print(f"{num + '/' + den:8s} {'n/a':>7s} {'':>10s} {'':>7s} {goal_text:>8s} {verdict(value, goal):>6s}  "
                  f"{what} (an arm failed)")
            continue
        per_step_us = (statistics.median(medians[num].values())
                       - statistics.median(medians[den].values())) / steps * 1e6
        unsure = goal is not None and noise is not None and abs(value - goal[1]) < noise
        note = f"  [within the noise: |b2/b - 1| = {noise:.1%}]" if unsure else ""
        print(f"{num + '/' + den:8s} {value:7.3f} {per_step_us:+8.1f}us "
              f"{paired_ratio(medians[num], medians[den]):7.3f} {goal_text:>8s} {verdict(value, goal):>6s}  "
              f"{what}{note}")


def print_trackers(times: dict) -> None:
    print("\n=== Tracker start-up + shutdown (fresh process each; Accelerator + init_trackers, then end_training) ===")
    print(f"{'trackers':22s} {'start s':>8s} {'finish s':>8s} {'total s':>8s} {'process s':>10s}  reps")
    for kind, text in TRACKER_KINDS.items():
        runs = times.get(kind) or []
        if not runs:
            print(f"trackers {kind}: failed")
            continue
        med = {k: statistics.median(r[k] for r in runs) for k in ("start_s", "finish_s", "process_s")}
        total = statistics.median(r["start_s"] + r["finish_s"] for r in runs)
        print(f"{'trackers ' + kind:22s} {med['start_s']:8.3f} {med['finish_s']:8.3f} {total:8.3f} "
              f"{med['process_s']:10.3f}  {len(runs)}   {text}")
    print("start: Accelerator + init_trackers, including the import of tensorboard/wandb and the start of W&B's "
          "service process;\n"
          "finish: finish_trackers (run.finish + end_training); process: the whole worker from spawn to exit, so its "
          "difference\n"
          "to 'none' also holds what happens at interpreter exit")


def print_checkpoint(result: dict, directory: Path, what: str, prefix: str, goal: float) -> None:
    t = result["times"]
    best, durable, plain = (statistics.median(t[k]) for k in ("save_best", "save_best+durable", "save_file+fsync"))
    print(f"\n=== Checkpoint save: {what}, {result['tensors']} tensors, {result['numel']:,} values, "
          f"{result['bytes'] / 1e6:.2f} MB, on {filesystem(directory)} ===")
    print(f"{prefix} save: save_best, what training waits for   {best * 1e3:8.2f} ms  "
          f"(median of {len(t['save_best'])}: the copy to host memory)")
    print(f"{prefix} save: save_best until durable             {durable * 1e3:8.2f} ms  "
          "(+ the background write: temp file, fsync, rename, directory fsync)")
    print(f"{prefix} save: save_file + fsync                   {plain * 1e3:8.2f} ms")
    print(f"{prefix} ratio save_best/save_file {best / plain:.3f}  goal <= {goal:g}  "
          f"{verdict(best / plain, ('<=', goal))}  (atomic: the old file or the new one, never a part)")
    print(f"{prefix} ratio durable/save_file   {durable / plain:.3f}  "
          "(shown for reading: what the background thread takes, directory fsync included)")


def checkpoint_measurements(args, tmp: Path) -> tuple[dict, dict]:
    """Both checkpoint timings, with the arms' torch thread count (the host copy is a torch copy; with
    more threads than free cores, OpenMP's waiting made it several times slower on this VM)."""
    import torch

    torch.set_num_threads(args.threads)
    dicts = checkpoint_state_dicts(args.checkpoint_mb)
    return (checkpoint_timing(args.checkpoint_reps, tmp / "checkpoint", dicts["cnn"]),
            checkpoint_timing(args.big_checkpoint_reps, tmp / "big-checkpoint", dicts["big"]))


def print_checkpoints(args, tmp: Path, checkpoint: dict, big_checkpoint: dict) -> None:
    print_checkpoint(checkpoint, tmp, "default CNN state dict", "checkpoint", CHECKPOINT_GOAL)
    print_checkpoint(big_checkpoint, tmp, f"a {args.checkpoint_mb} MiB state dict", "large checkpoint",
                     BIG_CHECKPOINT_GOAL)


def checkpoint_only(args) -> int:
    """``--checkpoint-only``: the two checkpoint measurements of a full run, nothing else."""
    print(f"machine: {cpu_name()}, {cores()} cores, {args.threads} torch threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"python {platform.python_version()}, torch {version('torch')}, safetensors {version('safetensors')}")
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint, big_checkpoint = checkpoint_measurements(args, tmp)
        print_checkpoints(args, tmp, checkpoint, big_checkpoint)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": checkpoint, "big_checkpoint": big_checkpoint}, indent=2)
                                   + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Arms: " + "; ".join(f"{k}: {v}" for k, v in ARMS.items()))
    ap.add_argument("--reps", type=int, help="repetitions of every arm (default: 5; --quick: 1)")
    ap.add_argument("--epochs", type=int, help="epochs per run, the first is warm-up (default: 4; --quick: 2)")
    # One thread by default: with every core busy, any other process (W&B's service, the OS) stalls
    # the OpenMP team and two identical runs differed by 10-15% on a 2-core VM, hiding 2-3% effects.
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every arm (default: 1, which leaves the other cores to background work)")
    ap.add_argument("--workloads",
                    help="comma-separated, of: " + ", ".join(WORKLOADS) + " (default: cnn,tiny; --quick: tiny)")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="comma-separated, of: " + ", ".join(ARMS) + " (default: all)")
    ap.add_argument("--checkpoint-reps", type=int, default=30,
                    help="repetitions of each checkpoint write (default: %(default)s)")
    ap.add_argument("--checkpoint-mb", type=int, default=100,
                    help="MiB of the large state dict the checkpoint write is also timed on (default: %(default)s)")
    ap.add_argument("--big-checkpoint-reps", type=int, default=5,
                    help="repetitions of each write of the large state dict (default: %(default)s)")
    ap.add_argument("--checkpoint-only", action="store_true",
                    help="only the checkpoint writes (no arms, no trackers): a few seconds")
    ap.add_argument("--tracker-reps", type=int, default=3,
                    help="repetitions of each tracker start-up (default: %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny workload only, tiny data, 2 epochs, 1 repetition: checks that everything runs, "
                         "times mean nothing")
    ap.add_argument("--json", metavar="PATH", help="also write every raw number to this JSON file")
    ap.add_argument("--timeout", type=int, default=1800,
                    help="seconds one worker (sequential) or one lockstep group may take (default: %(default)s)")
    ap.add_argument("--schedule", choices=["lockstep", "sequential", "parallel"],
                    help="lockstep (the default): the arms of a repetition run at once, one at a time in turn, and "
                         "are compared on CPU seconds per epoch; sequential: one after the other, on wall seconds; "
                         "parallel (--quick's default): side by side on all cores, which only checks that "
                         "everything runs")
    ap.add_argument("--slice", type=float, default=0.25,
                    help="lockstep: seconds each arm runs before the next (default: %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="cnn", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    args.epochs = args.epochs or (2 if args.quick else 4)
    # --quick: one workload is enough to check that every arm runs (they differ only in sizes).
    args.workloads = args.workloads or ("tiny" if args.quick else "cnn,tiny")
    args.schedule = args.schedule or ("parallel" if args.quick else "lockstep")

    if args.worker:
        result = worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.quick:
        args.checkpoint_reps, args.tracker_reps = min(args.checkpoint_reps, 3), 1
        args.big_checkpoint_reps = min(args.big_checkpoint_reps, 2)
    if args.checkpoint_only:
        return checkpoint_only(args)
    workloads = [w for w in args.workloads.split(",") if w]
    arms = [a for a in args.arms.split(",") if a]
    unknown = [w for w in workloads if w not in WORKLOADS] + [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown workload or arm: {', '.join(unknown)}")
    skipped_e = "e" in arms and importlib.util.find_spec("lightning") is None
    if skipped_e:
        arms.remove("e")
    args.raw = {"runs": [], "trackers": []}

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    print(f"machine: {cpu_name()}, {cores()} cores, {args.threads} threads in every arm, load average {load_start:.2f}")
    print(f"python {platform.python_version()}, torch {version('torch')}, accelerate {version('accelerate')}, "
          f"wandb {version('wandb')}, tensorboard {version('tensorboard')}, lightning {version('lightning')}")
    if skipped_e:
        print("note: arm e skipped: Lightning is not installed (pip install lightning)")
    print(f"{args.reps} repetitions x {args.epochs} epochs (epoch 1 is warm-up), arms {','.join(arms)}, "
          f"workloads {','.join(workloads)}" + (" [--quick: times mean nothing]" if args.quick else ""))
    print("each run: its epoch times, and its best val rmse, which is the same in every arm of a workload when they "
          "do the same math")

    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp_name:
        tmp = Path(tmp_name)
        env = worker_env(tmp)
        medians, failures = run_arms(args, workloads, arms, tmp, env)
        tracker_times, tracker_failures = run_tracker_timing(args, tmp, env)
        checkpoint, big_checkpoint = checkpoint_measurements(args, tmp)
        for workload in workloads:
            cfg = load_config(None, overrides_for("b", workload, args, tmp, "x"))
            steps = math.ceil(cfg.data.synthetic.num_train / cfg.data.batch_size)
            describe = (f"{WORKLOAD_TEXT[workload]}, {cfg.data.image_size}px, batch {cfg.data.batch_size}, "
                        f"{cfg.data.synthetic.num_train} train / {cfg.data.synthetic.num_val} val images")
            print_workload(workload, arms, medians[workload], steps, describe, skipped_e,
                           cpu_clock=epoch_key(args) == "epoch_cpu_times")
        print_trackers(tracker_times)
        print_checkpoints(args, tmp, checkpoint, big_checkpoint)

    failures += tracker_failures
    wall = time.perf_counter() - t_start
    print(f"\nload average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; wall time {wall:.0f} s")
    for line in failures:
        print(f"FAILED: {line}")
    if args.json:
        raw = {"machine": {"cpu": cpu_name(), "cores": cores(), "threads": args.threads},
               "settings": {"reps": args.reps, "epochs": args.epochs, "quick": args.quick, "workloads": workloads,
                            "arms": arms, "schedule": args.schedule, "clock": epoch_key(args)},
               **args.raw, "checkpoint": checkpoint, "big_checkpoint": big_checkpoint, "failures": failures}
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
