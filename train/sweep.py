"""Offline hyperparameter sweeps with Optuna: the W&B sweep file, run without a W&B server.

    python -m train.sweep configs/sweep.yml --max-runs 12
    python -m train.sweep configs/sweep.yml --max-runs 12 --workers 2          # 2 trials at once
    python -m train.sweep configs/sweep.yml --max-runs 40 --storage postgresql://user@db/sweeps  # several machines
    python -m train.sweep configs/sweep.yml --max-runs 12 training.epochs=3    # fixed overrides for every trial
    python -m train.sweep configs/sweep.yml --check                            # validate the file, run nothing

Reads the same ``configs/sweep.yml`` that ``wandb sweep`` reads (docs/SWEEPS.md) and translates it to
an Optuna study (``train.sweep_spec``): ``grid``, ``random`` or ``bayes`` (TPE) sampling, the metric
as the objective, ``early_terminate: hyperband`` as Optuna's HyperbandPruner. Trials are asked and
told (ask-and-tell): each is its own ``accelerate launch train/main.py --config <base> <overrides>``
subprocess in its own process group, so a trial can use several processes or GPUs and a trial that
crashes cannot take the sweep down. While a trial runs, its ``metrics.jsonl`` is read every second
and each epoch's metric reported to the study; a trial the pruner stops gets SIGTERM, saves a full
state (continue it by hand with ``--resume auto``) and is told PRUNED.

Everything of one sweep lives in ``<output_dir>/<sweep name>``: ``optuna.journal`` (the study, unless
``--storage``), one ordinary run directory per trial, ``logs/<run>.log``, ``_incomplete/`` (run
directories of interrupted attempts, moved aside, never deleted) and ``leaderboard.csv/.md``.

Run the same command again to continue. Exit code: 0 every trial of this process finished or was
pruned, 1 some failed, 2 bad input (nothing started), 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from train.config import load_config  # noqa: E402
from train.errors import CleanExit, UserError, run_cli  # noqa: E402
from train.records import read_metrics  # noqa: E402
from train.sweep_spec import (ROOT, SearchSpace, agent_text, base_config_path, describe, make_pruner,  # noqa: E402
                              make_sampler, read_sweep, translate)
from train.sweep_study import (HEARTBEAT_S, ask_next, definition, enqueue_retry, open_storage,  # noqa: E402
                               open_study, recover_left_behind, write_leaderboard)

POLL_S = 1.0  # how often a running trial's metrics.jsonl is read
GRACE_S = 60.0  # how long a stopped trial may take to save its state before SIGKILL


@dataclass
class Slot:
    """What one worker gives its trials: GPUs (environment), CPU threads (overrides), launch flags."""

    env: dict[str, str]
    overrides: list[str]
    launch_args: list[str]


@dataclass
class Sweep:
    """Everything the workers of this process share."""

    spec: dict
    space: SearchSpace
    study: optuna.Study
    fixed: list[str]
    sweep_dir: Path
    group: str  # the sweep name: W&B group of every trial
    max_runs: int
    epochs: int | None
    stop: threading.Event = field(default_factory=threading.Event)
    force: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the study's pruner and sampler are shared
    outcomes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    signal_name: str | None = None


# --------------------------------------------------------------------------------------------------
# One trial's process
# --------------------------------------------------------------------------------------------------


def trial_command(spec: dict, params: dict, fixed: list[str], sweep_dir: Path, sweep_name: str, trial: str,
                  launch_args: list[str]) -> list[str]:
    """The trial's command line, built from the sweep file's ``command`` as the W&B agent would,
    with ``accelerate`` run from this interpreter and the sweep's own overrides appended last."""
    overrides = [*fixed, *(f"{k}={agent_text(v)}" for k, v in params.items()),
                 f"experiment.output_dir={sweep_dir}", f"experiment.name={trial}", f"logging.wandb.group={sweep_name}"]
    cmd: list[str] = []
    for part in [str(c) for c in spec["command"]]:
        if part == "${args_no_hyphens}":
            cmd += overrides
        elif part == "${args}":
            cmd += [f"--{o}" for o in overrides]
        elif part == "${program}":
            cmd.append(str(ROOT / spec["program"]))
        elif part == "${interpreter}":
            cmd.append(sys.executable)
        elif part == "${env}":
            continue
        else:
            cmd.append(part)
    if cmd[:2] == ["accelerate", "launch"]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *cmd[2:]]
    return cmd


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def trainer_gone(run_dir: Path) -> bool:
    """No trainer holds the run directory's lock (the kernel drops it when the trainer exits, even
    one whose launcher died first)."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def end_process(sw: Sweep, pgid: int, proc: subprocess.Popen | None, run_dir: Path, stop: bool) -> int | None:
    """Wait for a trial's launcher and trainer to end; ``stop``: SIGTERM the process group first (the
    trainer saves a full state). SIGKILL after ``GRACE_S`` or a second Ctrl-C."""
    if stop:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.time() + GRACE_S
    while not ((proc is None or proc.poll() is not None) and trainer_gone(run_dir)):
        if time.time() > deadline or sw.force.is_set():
            signal_group(pgid, signal.SIGKILL)
            break
        time.sleep(0.2)
    return proc.wait() if proc is not None else None


def move_aside(sweep_dir: Path, run_dir: Path) -> Path:
    """Move a run directory to ``_incomplete/<name>-<k>``: the trial can run under its own name and
    nothing an earlier attempt wrote is lost."""
    target_parent = sweep_dir / "_incomplete"
    target_parent.mkdir(exist_ok=True)
    k = 1
    while (target_parent / f"{run_dir.name}-{k}").exists():
        k += 1
    target = target_parent / f"{run_dir.name}-{k}"
    os.replace(run_dir, target)
    return target


def prepare_run_dir(sw: Sweep, trial: optuna.Trial, run: str) -> Path:
    """The trial's run directory, free: an earlier attempt's directory is moved aside, after
    stopping a trainer of it that outlived its sweep (same machine)."""
    run_dir = sw.sweep_dir / run
    if run_dir.exists():
        if not trainer_gone(run_dir):
            earlier = [t for t in sw.study.get_trials(deepcopy=False) if t.number == trial.user_attrs.get("retry_of")]
            pgid = earlier[0].user_attrs.get("pgid") if earlier else None
            print(f"[{run}] a trainer of the earlier attempt still runs in {run_dir}: stopping it", flush=True)
            if pgid:
                end_process(sw, int(pgid), None, run_dir, stop=True)
        moved = move_aside(sw.sweep_dir, run_dir)
        trial.set_user_attr("previous_run_dir", str(moved))
        print(f"[{run}] moved the earlier run directory to {moved}", flush=True)
    trial.set_user_attr("run", run)
    trial.set_user_attr("run_dir", str(run_dir))
    return run_dir


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def report_epochs(sw: Sweep, trial: optuna.Trial, run_dir: Path, reported: dict[int, float]) -> bool:
    """Report each new epoch's metric of ``metrics.jsonl`` to the study, asking the pruner after each
    (not after the last epoch, which is about to end anyway); True: prune the trial now."""
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        epoch, value = rec.get("epoch"), rec.get(sw.space.metric)
        if not (_number(epoch) and _number(value)) or int(epoch) in reported:
            continue
        reported[int(epoch)] = float(value)
        with sw.lock:
            trial.report(float(value), int(epoch))
            if (sw.epochs is None or int(epoch) < sw.epochs) and trial.should_prune():
                return True
    return False


def watch(sw: Sweep, trial: optuna.Trial, proc: subprocess.Popen, run_dir: Path, reported: dict[int, float]) -> str:
    """Follow a running trial to its end: ``done``, ``pruned`` (the pruner says so) or ``interrupted``
    (the sweep is stopping)."""
    beat = time.time()
    while True:
        try:
            proc.wait(timeout=POLL_S)
            exited = True
        except subprocess.TimeoutExpired:
            exited = False
        prune = report_epochs(sw, trial, run_dir, reported)
        if exited:
            return "done"
        if sw.stop.is_set():
            return "interrupted"
        if prune:
            return "pruned"
        if time.time() - beat > HEARTBEAT_S:
            beat = time.time()
            with sw.lock:
                trial.set_user_attr("heartbeat", beat)


def metric_value(results: dict, metric: str) -> float | None:
    """The trial's value of the sweep metric: for ``val/X`` the best epoch's value (``best/X``, the
    value behind best.safetensors, present when the run monitored val/X), else the key itself."""
    section, _, name = metric.partition("/")
    for key in ((f"best/{name}",) if section == "val" else ()) + (metric,):
        if _number(results.get(key)):
            return float(results[key])
    return None


def _read_results(run_dir: Path) -> dict:
    try:
        results = json.loads((run_dir / "results.json").read_text())
        return results if isinstance(results, dict) else {}
    except (OSError, ValueError):
        return {}


def _error_tail(log: Path, offset: int) -> str:
    """The trainer's own ``error:`` lines of this attempt (they say what to fix), else its last lines."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return "\n  ".join([line for line in lines if line.startswith("error:")] or lines[-5:])


def tell(sw: Sweep, trial: optuna.Trial, outcome: str, rc: int | None, run_dir: Path,
         reported: dict[int, float]) -> str:
    """Tell the study how the trial ended; returns the line to print."""
    results = _read_results(run_dir)
    value = metric_value(results, sw.space.metric) if rc == 0 else None
    with sw.lock:
        trial.set_user_attr("exit_code", rc)
        if outcome == "pruned":
            trial.set_user_attr("epochs", max(reported))
            trial.set_user_attr("note", f"pruned after epoch {max(reported)}; state saved (--resume auto)")
            sw.study.tell(trial, state=TrialState.PRUNED)
            return (f"pruned after epoch {max(reported)} ({sw.space.metric} {reported[max(reported)]:.6g}); "
                    f"continue it with: python train/main.py --config {run_dir / 'config.yaml'} --resume auto")
        if outcome == "interrupted":
            trial.set_user_attr("note", f"interrupted ({sw.signal_name} to the sweep); state saved")
            enqueue_retry(sw.study, trial, trial.number)  # first: a kill right after the tell loses no retry
            sw.study.tell(trial, state=TrialState.FAIL)
            return "interrupted: queued again (the next sweep on this study runs it from scratch)"
        if value is not None:
            for key in ("best_epoch", "test/rmse"):
                trial.set_user_attr(key, results.get(key))
            trial.set_user_attr("epochs", results.get("epochs_run", max(reported, default=None)))
            sw.study.tell(trial, value)
            return f"done: {sw.space.metric} = {value:.6g}"
        note = f"exit {rc}" if rc != 0 else f"no {sw.space.metric} in results.json"
        trial.set_user_attr("note", note)
        sw.study.tell(trial, state=TrialState.FAIL)
        return f"FAILED ({note}); the sweep goes on"


def _with_port(launch_args: list[str], workers: int) -> list[str]:
    """Several processes per trial and several workers: each trial its own rendezvous port."""
    multi = "--num_processes" in launch_args or "--multi_gpu" in launch_args
    if not multi or workers == 1 or any(a.startswith("--main_process_port") for a in launch_args):
        return launch_args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return [*launch_args, "--main_process_port", str(s.getsockname()[1])]


def run_trial(sw: Sweep, trial: optuna.Trial, slot: Slot, workers: int) -> None:
    """Run one trial as its own process group, report its epochs, tell the study how it ended."""
    run = trial.user_attrs.get("run") or f"{sw.study.study_name}-{trial.number:03d}"
    with sw.lock:
        run_dir = prepare_run_dir(sw, trial, run)
    params = {**sw.space.fixed_params, **trial.params}
    cmd = trial_command(sw.spec, params, [*sw.fixed, *slot.overrides], sw.sweep_dir, sw.group, run,
                        _with_port(slot.launch_args, workers))
    retry = f" (retry of trial {trial.user_attrs['retry_of']})" if "retry_of" in trial.user_attrs else ""
    print(f"[{run}] trial {trial.number}{retry}: " + " ".join(f"{k}={agent_text(v)}" for k, v in trial.params.items()),
          flush=True)
    log = sw.sweep_dir / "logs" / f"{run}.log"
    with open(log, "a") as f:
        offset = f.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **slot.env})
    reported: dict[int, float] = {}
    try:
        with sw.lock:
            trial.set_user_attr("pgid", proc.pid)
        outcome = watch(sw, trial, proc, run_dir, reported)
    except BaseException:
        end_process(sw, proc.pid, proc, run_dir, stop=True)
        raise
    rc = end_process(sw, proc.pid, proc, run_dir, stop=outcome != "done")
    line = tell(sw, trial, outcome, rc, run_dir, reported)
    failed = line.startswith("FAILED")
    sw.outcomes.append("failed" if failed else outcome)
    print(f"[{run}] {line}" + (f". Log: {log}\n  {_error_tail(log, offset)}" if failed else ""), flush=True)
    with sw.lock:
        write_leaderboard(sw.sweep_dir, sw.study, sw.space)


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------


def worker(sw: Sweep, slot: Slot, workers: int) -> None:
    """Ask, run, tell, until the study has its trials or the sweep stops."""
    try:
        while not sw.stop.is_set():
            with sw.lock:
                trial = ask_next(sw.study, sw.space.distributions, sw.max_runs, sw.sweep_dir / ".sweep.lock")
            if trial is None:
                return
            run_trial(sw, trial, slot, workers)
    except Exception as e:  # the sweep's own failure (e.g. the database went away): stop the others cleanly
        sw.errors.append(f"{e.strerror} '{e.filename}'" if isinstance(e, OSError) and e.filename
                         else f"{type(e).__name__}: {e}")
        if not isinstance(e, OSError):  # a full disk needs no traceback; anything else is a bug to report
            traceback.print_exc()
        sw.stop.set()


def visible_gpus() -> list[str]:
    """The GPU ids trials may use (CUDA_VISIBLE_DEVICES' entries, else 0..n-1)."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in listed.split(",") if g.strip()] if listed is not None else [str(i) for i in range(n)]
    return ids[:n]


def worker_slots(workers: int, gpus_per_trial: int | None, fixed: list[str], space: SearchSpace,
                 launch_args: list[str]) -> list[Slot]:
    """One slot per worker: its own GPUs on a GPU machine, ``cores / workers`` threads per trial on CPU."""
    gpus = visible_gpus()
    g = (1 if gpus else 0) if gpus_per_trial is None else gpus_per_trial
    if g > 0:
        if workers * g > len(gpus):
            raise UserError(f"--workers {workers} x --gpus-per-trial {g} needs {workers * g} GPUs; {len(gpus)} "
                            f"visible ({', '.join(gpus) or 'none'}). Pass fewer workers, or --gpus-per-trial 0 for "
                            "CPU trials")
        extra = ["--multi_gpu", "--num_processes", str(g)] if g > 1 and "--num_processes" not in launch_args else []
        return [Slot({"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * g:(i + 1) * g])}, [], [*launch_args, *extra])
                for i in range(workers)]
    procs = int(launch_args[launch_args.index("--num_processes") + 1]) if "--num_processes" in launch_args[:-1] else 1
    keyed = {o.split("=", 1)[0] for o in fixed} | set(space.distributions) | set(space.fixed_params)
    threads = [] if workers == 1 or "training.num_threads" in keyed else [
        f"training.num_threads={max(1, len(os.sched_getaffinity(0)) // (workers * procs))}"]
    return [Slot({}, threads, list(launch_args)) for _ in range(workers)]


def _install_signals(sw: Sweep) -> dict:
    # SIGINT explicitly too: a process started in the background by a non-interactive shell inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt (Ctrl-C/kill -INT did nothing).
    def handle(signum, frame):
        if sw.stop.is_set():
            sw.force.set()  # a second signal: SIGKILL the trials now
            return
        sw.signal_name = signal.Signals(signum).name
        print(f"\n{sw.signal_name}: stopping the running trials (each saves a full state; again to kill them)",
              file=sys.stderr, flush=True)
        sw.stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def run_workers(sw: Sweep, slots: list[Slot]) -> None:
    old = _install_signals(sw)
    try:
        threads = [threading.Thread(target=worker, args=(sw, slot, len(slots)), name=f"worker-{i}", daemon=True)
                   for i, slot in enumerate(slots)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # staggered: the first asks of TPE see each other as running (constant liar)
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)  # short joins: the signal handler runs in this thread
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _max_runs(args: argparse.Namespace, space: SearchSpace) -> int:
    if space.grid_size is not None:
        if args.max_runs and args.max_runs > space.grid_size:
            print(f"note: the grid has {space.grid_size} combinations; running {space.grid_size}, not {args.max_runs}")
        return min(args.max_runs or space.run_cap or space.grid_size, space.grid_size)
    if not (args.max_runs or space.run_cap):
        raise UserError(f"method {space.method} samples without end: pass --max-runs N (or run_cap: N in the file)")
    return args.max_runs or space.run_cap


def _epochs(space: SearchSpace, base) -> int | None:
    """The trials' training.epochs (Hyperband's maximum resource); None when it is swept."""
    if "training.epochs" in space.distributions:
        return None
    return int(space.fixed_params.get("training.epochs", base.training.epochs))


def _status(study: optuna.Study, max_runs: int, workers: int) -> str:
    counts = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    head = "Continuing" if study.trials else "Starting"
    return (f"{head} study {study.study_name}: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
            + ("; " if study.trials else "") + f"{max_runs} trial(s) in all, {workers} at a time")


def open_sweep(args: argparse.Namespace) -> tuple[Sweep, list[Slot], str]:
    """Everything checked and opened, refusals first: the file, the slots, the storage, the study."""
    fixed = list(args.overrides)
    spec = read_sweep(args.sweep_file, fixed)
    space = translate(spec)
    base = load_config(ROOT / base_config_path(spec), fixed)
    max_runs, epochs = _max_runs(args, space), _epochs(space, base)
    slots = worker_slots(args.workers, args.gpus_per_trial, fixed, space, shlex.split(args.launch_args))
    sweep_name = args.name or spec.get("name") or Path(args.sweep_file).stem
    sweep_dir = Path(args.output_dir or base.experiment.output_dir) / sweep_name
    storage, where = open_storage(args.storage, sweep_dir)
    study = open_study(storage, where, args.study or sweep_name, definition(spec, fixed, args.seed), space,
                       make_sampler(space, args.seed, max_runs), make_pruner(space, epochs))
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    return Sweep(spec, space, study, fixed, sweep_dir, sweep_name, max_runs, epochs), slots, where


def run_sweep(args: argparse.Namespace) -> int:
    """Run (or continue) the sweep; return the exit code (see the module docstring)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # TPE's constant liar on Optuna 4
    sw, slots, where = open_sweep(args)
    for line in recover_left_behind(sw.study):
        print(line)
    print(_status(sw.study, sw.max_runs, len(slots)), flush=True)
    run_workers(sw, slots)
    if sw.errors:
        raise CleanExit(f"the sweep stopped on its own error ({sw.errors[0]}); its running trials were stopped and "
                        "the study is consistent: run the same command again to continue")
    rows = write_leaderboard(sw.sweep_dir, sw.study, sw.space)
    print(f"\n{(sw.sweep_dir / 'leaderboard.md').read_text()}")
    print(f"Study {sw.study.study_name} in {where}; browse it with: optuna-dashboard {where}")
    print(f"Compare the trials: tensorboard --logdir {sw.sweep_dir}")
    if sw.signal_name:
        print(f"Interrupted. Continue with the same command ({sum(r['state'] == 'waiting' for r in rows)} trial(s) "
              "queued to run again)", file=sys.stderr)
        return 130 if sw.signal_name == "SIGINT" else 143
    return 1 if "failed" in sw.outcomes else 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (got {value})")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.sweep",
                                description="Run a W&B-format sweep file offline with Optuna, one `accelerate "
                                            "launch` per trial.")
    p.add_argument("sweep_file", help="sweep YAML in W&B's format, e.g. configs/sweep.yml")
    p.add_argument("--max-runs", type=_positive, default=None,
                   help="trials in the study, over all workers and machines (required for random/bayes unless the "
                        "file has run_cap; cuts a grid)")
    p.add_argument("--workers", type=_positive, default=1, help="trials at once on this machine (default: 1)")
    p.add_argument("--gpus-per-trial", type=_count, default=None,
                   help="GPUs per trial, each worker its own (CUDA_VISIBLE_DEVICES); default: 1 on a GPU machine, "
                        "0 without GPUs")
    p.add_argument("--storage", default=None,
                   help="the study's storage: a database URL Optuna accepts (postgresql://user@host/db) or a journal "
                        "file path (default: <sweep dir>/optuna.journal)")
    p.add_argument("--study", default=None, help="study name in the storage (default: the sweep name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, per trial number (default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="sweep name = directory and W&B group (default: the file's name: key, else its stem)")
    p.add_argument("--output-dir", default=None,
                   help="parent of the sweep directory (default: the base config's experiment.output_dir)")
    p.add_argument("--launch-args", default="",
                   help='flags for accelerate launch, e.g. "--multi_gpu --num_processes 4"')
    p.add_argument("--check", action="store_true", help="validate the sweep file, show its Optuna translation; "
                                                        "run nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fixed overrides for every trial, e.g. training.epochs=3")
    return p.parse_intermixed_args(argv)


def check(args: argparse.Namespace) -> int:
    spec = read_sweep(args.sweep_file, args.overrides)
    space = translate(spec)
    base = load_config(ROOT / base_config_path(spec), list(args.overrides))
    print(f"{args.sweep_file}: valid")
    print("\n".join(describe(space, args.seed, args.max_runs or space.run_cap or space.grid_size,
                             _epochs(space, base))))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: check(args) if args.check else run_sweep(args))


if __name__ == "__main__":
    sys.exit(main())
