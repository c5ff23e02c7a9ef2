"""Offline hyperparameter sweeps: the W&B sweep file, run without a W&B server.

    python -m train.sweep configs/sweep.yml --max-runs 8
    python -m train.sweep configs/sweep.yml --max-runs 8 --launch-args "--multi_gpu --num_processes 4"
    python -m train.sweep configs/sweep.yml --max-runs 8 training.epochs=3   # fixed overrides for every trial
    python -m train.sweep configs/sweep.yml --check                          # validate the file, run nothing

Reads the same ``configs/sweep.yml`` that ``wandb sweep`` reads (docs/SWEEPS.md). Trials come from the
file's ``method``: ``grid`` (every combination, in file order) or ``random`` (trial i is drawn with a
generator seeded by ``(--seed, i)``, so trial i is the same however often the sweep is continued);
``bayes`` needs the W&B server and is sampled like ``random`` here. Each trial is its own
``accelerate launch train/main.py --config <base> <overrides>`` subprocess, so a trial can use several
processes or GPUs, and a trial that crashes cannot take the sweep down.

Everything lives in the sweep directory ``<output_dir>/<sweep name>``:

    sweep_state.json        the trials (parameters, status, exit code): what makes continuation work
    <sweep>-000/ ...        one ordinary run directory per trial (config.yaml, results.json,
                            checkpoints/best.safetensors, tensorboard/, wandb/)
    logs/<trial>.log        each trial's console output
    _incomplete/            run directories of interrupted/crashed attempts, moved aside (never deleted)
    leaderboard.csv/.md     trials sorted by the sweep's metric

Run the same command again to continue: finished trials are kept, an interrupted trial is run again,
failed trials are skipped unless ``--retry-failed``. Exit code: 0 when every trial finished, 1 when
some failed, 2 for a bad sweep file, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel  # noqa: E402

from train.config import Config, load_config, read_yaml_file  # noqa: E402
from train.errors import ConfigError, UserError, run_cli  # noqa: E402
from train.fsutil import atomic_file, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Keys the sweep itself sets for every trial; a sweep parameter must not fight over them.
MANAGED_KEYS = ("experiment.name", "experiment.output_dir", "logging.wandb.group")
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values", "q_uniform",
                 "q_log_uniform_values")


# --------------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------------


def config_keys(cls: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every dotted leaf key of the config schema, e.g. ``training.optimizer.lr``."""
    keys: set[str] = set()
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= config_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def agent_text(value: Any) -> str:
    """A value as W&B's agent writes it on the command line (``str()`` of the JSON value:
    ``1e-05``, ``None``, ``True``, ``[16, 32]``); the trainer's overrides must read it back typed."""
    return str(value)


def base_config_path(spec: dict) -> str:
    """The ``--config`` file named in the sweep's ``command`` (default: configs/model_config.yml)."""
    command = [str(c) for c in spec.get("command") or []]
    if "--config" in command and command.index("--config") + 1 < len(command):
        return command[command.index("--config") + 1]
    return "configs/model_config.yml"


def candidate_values(spec: dict) -> list[Any]:
    """Values of one parameter spec that must each validate (all of a list, the ends of a range)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec[k] for k in ("min", "max") if k in spec]


def check_sweep(spec: Any, fixed: list[str] = (), root: Path = ROOT) -> list[str]:
    """Every problem of a parsed sweep file (empty list: valid).

    Checks the W&B format (method, metric, program, command) and that each parameter is a real
    dotted config key whose values the schema accepts when passed as agent text, on top of the base
    config and the ``fixed`` overrides.
    """
    if not isinstance(spec, dict):
        return ["the sweep file must be a mapping (method, metric, parameters, program, command)"]
    problems = []
    if spec.get("method") not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)} (got {spec.get('method')!r})")
    metric = spec.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name"):
        problems.append("metric must be a mapping with a name (e.g. val/rmse) and a goal (minimize | maximize)")
    elif metric.get("goal", "minimize") not in ("minimize", "maximize"):
        problems.append(f"metric.goal must be minimize or maximize (got {metric.get('goal')!r})")
    if spec.get("program") != "train/main.py":
        problems.append(f"program must be train/main.py (got {spec.get('program')!r})")
    command = [str(c) for c in spec.get("command") or []]
    if "${args_no_hyphens}" not in command:
        problems.append("command must pass ${args_no_hyphens} (the trainer reads key=value overrides, not --key=value)")
    if "${program}" not in command:
        problems.append("command must contain ${program}")
    config_path = root / base_config_path(spec)
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        return problems + ["parameters must be a non-empty mapping of dotted config keys to value specs"]
    # The base config with the fixed overrides alone first: if it is wrong, every swept value would
    # repeat the same problem, so it is told once and the values are not tried.
    try:
        load_config(config_path, list(fixed))
        base_ok = True
    except ConfigError as e:
        problems += [f"base config {base_config_path(spec)} with the fixed overrides: {line}" for line in e.lines]
        base_ok = False
    keys = config_keys()
    for key, p in params.items():
        if key not in keys:
            problems.append(f"parameter '{key}' is not a config key (see docs/CONFIG.md for the dotted names)")
            continue
        if key in MANAGED_KEYS:
            problems.append(f"parameter '{key}' is set by the sweep for every trial and cannot be swept")
            continue
        if not isinstance(p, dict) or not ({"value", "values", "min", "max"} & set(p)):
            problems.append(f"parameter '{key}': needs value, values or min/max "
                            "(W&B sweep format; nested 'parameters' are not used here)")
            continue
        dist = p.get("distribution")
        if dist is not None and dist not in DISTRIBUTIONS:
            problems.append(f"parameter '{key}': distribution {dist!r} is not supported offline "
                            f"(use one of {', '.join(DISTRIBUTIONS)})")
        if spec.get("method") == "grid" and not ({"value", "values"} & set(p)):
            problems.append(f"parameter '{key}': a grid needs value or values, not a range")
        for v in candidate_values(p) if base_ok else ():
            try:
                load_config(config_path, [*fixed, f"{key}={agent_text(v)}"])
            except ConfigError as e:
                problems += [f"parameter '{key}' value {v!r}: {line}" for line in e.lines]
    return problems


def read_sweep(path: str | Path, fixed: list[str] = ()) -> dict:
    """Read and check a sweep file; raise ``ConfigError`` listing every problem."""
    spec = read_yaml_file(path)
    problems = check_sweep(spec, fixed)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return spec


# --------------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------------


def _sample(p: dict, rng: random.Random) -> Any:
    if "value" in p:
        return p["value"]
    if "values" in p:
        values, probs = list(p["values"]), p.get("probabilities")
        return rng.choices(values, weights=probs)[0] if probs else rng.choice(values)
    lo, hi = p["min"], p["max"]
    dist = p.get("distribution") or ("int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist in ("log_uniform_values", "q_log_uniform_values"):
        v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        v = rng.uniform(lo, hi)
    if dist.startswith("q_"):
        q = p.get("q", 1)
        v = round(v / q) * q
    return v


def make_trials(spec: dict, max_runs: int | None, seed: int) -> list[dict[str, Any]]:
    """Parameter sets, in order: the grid in file order, or random draws (trial i from seed (seed, i)).

    A random sweep needs ``max_runs``; a grid is cut to ``max_runs`` when given.
    """
    params: dict = spec["parameters"]
    if spec["method"] == "grid":
        keys = list(params)
        grids = [candidate_values(params[k]) for k in keys]
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*grids)]
        return combos[:max_runs] if max_runs else combos
    if not max_runs:
        raise UserError(f"method {spec['method']} samples without end: pass --max-runs N")
    # A string seed is hashed deterministically (not by PYTHONHASHSEED): trial i never changes.
    return [{k: _sample(p, random.Random(f"{seed}:{i}:{k}")) for k, p in params.items()} for i in range(max_runs)]


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


# --------------------------------------------------------------------------------------------------
# State, leaderboard
# --------------------------------------------------------------------------------------------------


def write_sweep_state(sweep_dir: Path, state: dict) -> None:
    atomic_write_text(sweep_dir / "sweep_state.json", json.dumps(state, indent=2) + "\n")


TRIAL_STATUSES = ("pending", "running", "done", "failed", "interrupted")


def sweep_state_problem(state: Any) -> str | None:
    """Why a parsed ``sweep_state.json`` is not one this module wrote (None: it has the right shape).
    Checked before anything reads it, so an edited file cannot crash the sweep halfway or start a trial."""
    if not isinstance(state, dict):
        return f"a JSON object was expected, got {type(state).__name__}"
    for key, kind in (("name", str), ("fingerprint", str), ("metric", str), ("goal", str), ("parameters", list),
                      ("trials", list)):
        if not isinstance(state.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}: not a sweep state"
    for i, t in enumerate(state["trials"]):
        if not isinstance(t, dict):
            return f"trials[{i}] is not an object"
        name, params = t.get("name"), t.get("params")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            return f"trials[{i}].name is not a trial directory name (got {name!r})"
        if not isinstance(params, dict) or any(k not in params for k in state["parameters"]):
            return f"trials[{i}] ({name}): params is not a mapping of every sweep parameter"
        if t.get("status") not in TRIAL_STATUSES:
            return f"trials[{i}] ({name}): status {t.get('status')!r} is not one of {', '.join(TRIAL_STATUSES)}"
        if type(t.get("attempts")) is not int:
            return f"trials[{i}] ({name}): attempts {t.get('attempts')!r} is not an integer"
    return None


def read_sweep_state(state_file: Path) -> dict:
    """The sweep's own record of its trials; a truncated or edited file is one line saying what to do."""
    try:
        state = json.loads(state_file.read_text())
        problem = sweep_state_problem(state)
        if problem:
            raise ValueError(problem)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{state_file} is unreadable ({e}); the trials' run directories next to it are intact. "
                        "Move the file aside and run the same command to start the sweep's record anew (finished "
                        "trials are found again by their results.json), or pass --name for a new sweep") from None
    return state


def metric_value(results: dict, metric: str) -> float | None:
    """The trial's value of the sweep metric: for ``val/X`` the best epoch's value (``best/X``, the
    value behind best.safetensors, present when the run monitored val/X), else the key itself."""
    section, _, name = metric.partition("/")
    for key in ((f"best/{name}",) if section == "val" else ()) + (metric,):
        if isinstance(results.get(key), (int, float)):
            return float(results[key])
    return None


def write_leaderboard(sweep_dir: Path, state: dict) -> list[dict]:
    """Rewrite ``leaderboard.csv`` and ``leaderboard.md``: finished trials sorted by the metric
    (best first), then the others; each row has the trial's run dir and best checkpoint."""
    metric, goal = state["metric"], state["goal"]
    keys = list(state["parameters"])
    rows = []
    for t in state["trials"]:
        run_dir = sweep_dir / t["name"]
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        best = run_dir / "checkpoints" / "best.safetensors"
        rows.append({
            "trial": t["name"], "status": t["status"], metric: metric_value(results, metric),
            "test/rmse": results.get("test/rmse"), "best_epoch": results.get("best_epoch"),
            **{k: agent_text(t["params"][k]) for k in keys},
            "run_dir": str(run_dir) if run_dir.is_dir() else "", "best_checkpoint": str(best) if best.is_file() else "",
        })
    sign = 1.0 if goal == "minimize" else -1.0
    rows.sort(key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r[metric] is not None else ""
    columns = ["rank", "trial", "status", metric, "test/rmse", "best_epoch", *keys, "run_dir", "best_checkpoint"]
    with atomic_file(sweep_dir / "leaderboard.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in rows)

    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    md = [f"# Sweep {state['name']}: {metric} ({goal})", "", "| " + " | ".join(columns) + " |",
          "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(sweep_dir / "leaderboard.md", "\n".join(md) + "\n")
    return rows


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


def move_aside(sweep_dir: Path, run_dir: Path) -> Path:
    """Move an incomplete run directory to ``_incomplete/<name>-<k>``: the trial can run again under
    its own name and nothing a crashed attempt wrote is lost."""
    target_parent = sweep_dir / "_incomplete"
    target_parent.mkdir(exist_ok=True)
    k = 1
    while (target_parent / f"{run_dir.name}-{k}").exists():
        k += 1
    target = target_parent / f"{run_dir.name}-{k}"
    os.replace(run_dir, target)
    return target


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the trial's whole process group (a one-process `accelerate launch` does not forward
    signals to the trainer), then SIGKILL what is still alive after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def open_sweep(spec: dict, sweep_file: str, sweep_dir: Path, sweep_name: str, trials: list[dict], seed: int,
               fixed: list[str]) -> dict:
    """The sweep's state: read back when continuing (refused if it describes another sweep), else new;
    every trial of this invocation is in it, pending unless already known. Written before returning."""
    # What defines the trials: continuing with a different file, seed or fixed overrides would mix
    # two different sweeps in one leaderboard.
    defining = {"method": spec["method"], "parameters": spec["parameters"], "command": spec["command"],
                "seed": seed, "fixed": fixed}
    fingerprint = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]
    state_file = sweep_dir / "sweep_state.json"
    if state_file.is_file():
        state = read_sweep_state(state_file)
        if state["fingerprint"] != fingerprint:
            raise UserError(f"{sweep_dir} holds a different sweep (other parameters, seed or fixed overrides); "
                            "continue it with the same command, or pass --name to start a new sweep")
        done = sum(t["status"] == "done" for t in state["trials"])
        print(f"Continuing sweep {sweep_name}: {done} of {len(state['trials'])} trials done")
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = {"name": sweep_name, "sweep_file": str(sweep_file), "fingerprint": fingerprint, "seed": seed,
                 "method": spec["method"], "metric": spec["metric"]["name"],
                 "goal": spec["metric"].get("goal", "minimize"), "parameters": list(spec["parameters"]),
                 "base_config": base_config_path(spec), "fixed": fixed, "trials": []}
    known = {t["name"] for t in state["trials"]}
    for i, params in enumerate(trials):
        trial = f"{sweep_name}-{i:03d}"
        if trial not in known:
            state["trials"].append({"name": trial, "params": params, "status": "pending", "returncode": None,
                                    "attempts": 0})
    write_sweep_state(sweep_dir, state)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    return state


def run_trial(t: dict, cmd: list[str], state: dict, sweep_dir: Path) -> None:
    """Run one trial to its end and record it; an interruption stops its process group and re-raises."""
    t.update(status="running", attempts=t["attempts"] + 1, command=shlex.join(cmd), started=time.time())
    write_sweep_state(sweep_dir, state)
    print(f"[{t['name']}] " + " ".join(f"{k}={agent_text(v)}" for k, v in t["params"].items()), flush=True)
    log = sweep_dir / "logs" / f"{t['name']}.log"
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            stop_process_group(proc)
            t.update(status="interrupted", returncode=proc.returncode)
            raise
    ok = rc == 0 and (sweep_dir / t["name"] / "results.json").is_file()
    t.update(status="done" if ok else "failed", returncode=rc, finished=time.time())
    write_sweep_state(sweep_dir, state)
    rows = write_leaderboard(sweep_dir, state)
    if ok:
        value = next(r[state["metric"]] for r in rows if r["trial"] == t["name"])
        print(f"[{t['name']}] done: {state['metric']} = {value}")
        return
    lines = log.read_text().strip().splitlines()
    # The trainer's own "error:" lines say what to fix; the launcher's traceback does not.
    tail = [line for line in lines if line.startswith("error:")] or lines[-5:]
    print(f"[{t['name']}] FAILED (exit {rc}); the sweep goes on. Log: {log}\n  " + "\n  ".join(tail))


def run_sweep(sweep_file: str, max_runs: int | None, seed: int, name: str | None, output_dir: str | None,
              fixed: list[str], launch_args: list[str], retry_failed: bool) -> int:
    """Run (or continue) the offline sweep; return the exit code (see the module docstring)."""
    spec = read_sweep(sweep_file, fixed)
    base = load_config(ROOT / base_config_path(spec), fixed)
    sweep_name = name or spec.get("name") or Path(sweep_file).stem
    sweep_dir = Path(output_dir or base.experiment.output_dir) / sweep_name
    trials = make_trials(spec, max_runs, seed)
    state = open_sweep(spec, sweep_file, sweep_dir, sweep_name, trials, seed, fixed)
    if spec["method"] == "bayes":
        print("note: method bayes needs the W&B sweep server; offline, its parameters are sampled at random")
    # SIGINT explicitly too: a process started in the background by a non-interactive shell inherits
    # SIGINT as ignored, and Python then never raises KeyboardInterrupt (Ctrl-C/kill -INT did nothing).
    old_handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for t in state["trials"][: len(trials)]:
            run_dir = sweep_dir / t["name"]
            if (run_dir / "results.json").is_file():
                t["status"] = "done"
                continue
            if t["status"] == "failed" and not retry_failed:
                continue
            if run_dir.exists():
                print(f"{t['name']}: moved the incomplete run directory to {move_aside(sweep_dir, run_dir)}")
            run_trial(t, trial_command(spec, t["params"], fixed, sweep_dir, sweep_name, t["name"], launch_args),
                      state, sweep_dir)
    except (KeyboardInterrupt, _Interrupted):
        write_sweep_state(sweep_dir, state)
        write_leaderboard(sweep_dir, state)
        print(f"\nInterrupted. Continue with the same command; state in {sweep_dir / 'sweep_state.json'}",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    write_sweep_state(sweep_dir, state)
    write_leaderboard(sweep_dir, state)
    done = [t for t in state["trials"][: len(trials)] if t["status"] == "done"]
    print(f"\nSweep {sweep_name}: {len(done)} of {len(trials)} trials finished. "
          f"Leaderboard: {sweep_dir / 'leaderboard.md'}")
    print((sweep_dir / "leaderboard.md").read_text())
    print(f"Compare the trials: tensorboard --logdir {sweep_dir}")
    return 0 if len(done) == len(trials) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.sweep",
                                description="Run a W&B-format sweep file offline, one `accelerate launch` per trial.")
    p.add_argument("sweep_file", help="sweep YAML in W&B's format, e.g. configs/sweep.yml")
    p.add_argument("--max-runs", type=int, default=None,
                   help="trials in the sweep (required for random/bayes; cuts a grid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random trial draws (default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="sweep name = directory and W&B group (default: the file's name: key, else its stem)")
    p.add_argument("--output-dir", default=None,
                   help="parent of the sweep directory (default: the base config's experiment.output_dir)")
    p.add_argument("--launch-args", default="",
                   help='flags for accelerate launch, e.g. "--multi_gpu --num_processes 4"')
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again when continuing")
    p.add_argument("--check", action="store_true", help="validate the sweep file and print the trials; run nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fixed overrides for every trial, e.g. training.epochs=3")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    if args.check:
        spec = read_sweep(args.sweep_file, args.overrides)
        print(f"{args.sweep_file}: valid")
        if args.max_runs or spec["method"] == "grid":
            for i, params in enumerate(make_trials(spec, args.max_runs, args.seed)):
                print(i, " ".join(f"{k}={agent_text(v)}" for k, v in params.items()))
        return 0
    return run_sweep(args.sweep_file, args.max_runs, args.seed, args.name, args.output_dir,
                     args.overrides, shlex.split(args.launch_args), args.retry_failed)


if __name__ == "__main__":
    sys.exit(main())
