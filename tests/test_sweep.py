"""Sweeps: configs/sweep.yml against the schema, its translation to Optuna, agent-style text values, and
the Optuna sweep runner with real storage and real trial processes: several workers, two sweep processes
on one study (journal file and PostgreSQL), Hyperband pruning, interruption and continuation, a failing
trial, and a trial under a W&B agent."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import DEFAULT_CONFIG, ROOT, env, free_port, run_main, run_sweep_cli, tb_scalars, wandb_summary
from train.config import load_config, read_yaml_file
from train.sweep_spec import (TrialSeededSampler, agent_text, check_sweep, config_keys, make_pruner, make_sampler,
                              to_distribution, translate)
from train.sweep_study import JOURNAL_NAME, enqueue_retry, recover_left_behind, with_installed_driver

SWEEP_FILE = ROOT / "configs" / "sweep.yml"

# Tiny trials (a few seconds each through `accelerate launch`), one CPU thread each.
TINY = [
    "training.epochs=2", "data.synthetic.num_train=128", "data.synthetic.num_val=64", "data.synthetic.num_test=32",
    "model.channels=[8]", "model.hidden=8", "data.batch_size=32", "logging.progress_bar=false",
    "logging.report=false", "training.num_threads=1",
]
# Epochs long enough (~1 s each) for the sweep's once-a-second look at metrics.jsonl to see a trial
# between epochs.
SLOWER = [o for o in TINY if not o.startswith(("training.epochs", "data.synthetic.num_train"))] + [
    "training.epochs=3", "data.synthetic.num_train=4096"]
LR = "  training.optimizer.lr: {values: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}\n"


def _sweep_file(tmp_path: Path, parameters: str, method: str = "grid", extra: str = "") -> Path:
    p = tmp_path / "sweep.yml"
    p.write_text(
        f"name: s\nmethod: {method}\nmetric: {{name: val/rmse, goal: minimize}}\nparameters:\n{parameters}{extra}"
        "program: train/main.py\n"
        'command: [accelerate, launch, "${program}", --config, configs/model_config.yml, "${args_no_hyphens}"]\n'
    )
    return p


def _study(sweep_dir: Path, name: str = "s") -> optuna.Study:
    """The sweep's study, read back with Optuna's own API."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / JOURNAL_NAME)))
    return optuna.load_study(study_name=name, storage=storage)


def _rows(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader((sweep_dir / "leaderboard.csv").open()))


def _ok(r: subprocess.CompletedProcess, code: int = 0) -> None:
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]  # the trials' own output goes to their logs


# --------------------------------------------------------------------------------------------------
# The sweep file and its translation
# --------------------------------------------------------------------------------------------------


def test_sweep_file_validates_against_the_config_schema():
    spec = read_yaml_file(SWEEP_FILE)
    assert check_sweep(spec) == []
    assert set(spec["parameters"]) <= config_keys(), "every parameter is a real dotted config key"
    assert spec["method"] == "bayes", "the offline runner samples it with TPE"
    assert spec["metric"] == {"name": "val/rmse", "goal": "minimize"}
    assert spec["program"] == "train/main.py"
    assert spec["command"] == [
        "accelerate", "launch", "${program}", "--config", "configs/model_config.yml", "${args_no_hyphens}"
    ]
    r = run_sweep_cli([str(SWEEP_FILE), "--check", "--max-runs", "6"], timeout=60)
    _ok(r)
    assert "valid" in r.stdout and "TPESampler (2 random trials first" in r.stdout


def test_bad_sweep_files_list_every_problem(tmp_path):
    f = _sweep_file(tmp_path, (
        "  training.optimizer.lrr: {values: [1.0e-3]}\n"        # not a key
        "  model.dropout: {values: [0.1, 1.5]}\n"               # 1.5 out of range
        "  data.kind: {values: [synthetic, csv]}\n"            # csv is not a data kind
        "  experiment.name: {value: x}\n"                       # set by the sweep itself
        "  training.optimizer.lr: {min: 1.0e-4, max: 1.0e-2}\n"  # a range in a grid
    ))
    problems = check_sweep(read_yaml_file(f))
    text = "\n".join(problems)
    assert "'training.optimizer.lrr' is not a config key" in text
    assert "'model.dropout' value 1.5" in text and "model.dropout=0.1" not in text
    assert "'data.kind' value 'csv'" in text
    assert "'experiment.name' is set by the sweep" in text
    assert "'training.optimizer.lr': a grid needs value or values" in text
    r = run_sweep_cli([str(f), "--check"])
    assert r.returncode == 2 and r.stderr.count("error: ") == len(problems) == 5


def test_every_supported_distribution_translates_to_its_optuna_distribution():
    cases = {
        "{value: 0.1}": None,
        "{values: [0.0, 0.1]}": CategoricalDistribution([0.0, 0.1]),
        "{values: [[16, 32], [32, 64]]}": CategoricalDistribution(["[16, 32]", "[32, 64]"]),
        "{min: 0.0, max: 0.5}": FloatDistribution(0.0, 0.5),
        "{distribution: uniform, min: 0, max: 1}": FloatDistribution(0.0, 1.0),
        "{min: 16, max: 64}": IntDistribution(16, 64),
        "{distribution: int_uniform, min: 1, max: 4}": IntDistribution(1, 4),
        "{distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}": FloatDistribution(1e-4, 1e-2, log=True),
        "{distribution: q_uniform, min: 0.0, max: 0.5, q: 0.1}": FloatDistribution(0.0, 0.5, step=0.1),
        "{distribution: q_uniform, min: 16, max: 128, q: 16}": IntDistribution(16, 128, step=16),
        "{distribution: q_log_uniform_values, min: 8, max: 256}": IntDistribution(8, 256, log=True),
        "{distribution: constant, value: 3}": None,
    }
    for text, expected in cases.items():
        p = read_yaml_text(text)
        assert to_distribution(p) == expected, text
    # method -> sampler, metric -> direction, early_terminate -> HyperbandPruner over epochs, value -> fixed.
    spec = read_yaml_file(SWEEP_FILE)
    for method, sampler in (("grid", optuna.samplers.GridSampler), ("random", optuna.samplers.RandomSampler),
                            ("bayes", optuna.samplers.TPESampler)):
        params = {"model.dropout": {"values": [0.0, 0.1]}, "data.batch_size": {"value": 32}}
        space = translate({**spec, "method": method, "parameters": params,
                           "metric": {"name": "val/mae", "goal": "maximize"},
                           "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 4}})
        assert space.fixed_params == {"data.batch_size": 32} and list(space.distributions) == ["model.dropout"]
        assert space.metric == "val/mae" and space.direction == "maximize"
        made = make_sampler(space, 0, 6)
        assert isinstance(made._make(1) if isinstance(made, TrialSeededSampler) else made, sampler)
        pruner = make_pruner(space, epochs=12)
        assert isinstance(pruner, optuna.pruners.HyperbandPruner)
        assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (2, 12, 4)
    assert make_sampler(translate(spec), 0, 6)._make(1)._n_startup_trials == 2


def read_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


UNTRANSLATABLE = {
    "probabilities": ("  model.dropout: {values: [0.0, 0.1], probabilities: [0.5, 0.5]}\n", "", "'probabilities'"),
    "normal": ("  model.dropout: {distribution: normal, mu: 0.1, sigma: 0.05}\n", "", "distribution 'normal'"),
    "log-uniform-exponents": ("  training.optimizer.lr: {distribution: log_uniform, min: -9, max: -4}\n", "",
                              "distribution 'log_uniform'"),
    "q-log-uniform-step": ("  data.batch_size: {distribution: q_log_uniform_values, min: 16, max: 256, q: 16}\n",
                           "", "q_log_uniform_values with q other than 1"),
    "hyperband-s": (LR, "early_terminate: {type: hyperband, min_iter: 1, s: 2}\n", "early_terminate.s"),
    "envelope": (LR, "early_terminate: {type: envelope}\n", "early_terminate must be"),
    "metric-target": (LR, "", "metric.target"),
    "unknown-key": (LR, "controller: {type: local}\n", "'controller'"),
}


@pytest.mark.parametrize("case", list(UNTRANSLATABLE))
def test_untranslatable_keys_are_refused_with_one_line_naming_the_key(tmp_path, case):
    params, extra, named = UNTRANSLATABLE[case]
    f = _sweep_file(tmp_path, params, method="random", extra=extra)
    if case == "metric-target":
        f.write_text(f.read_text().replace("goal: minimize}", "goal: minimize, target: 30}"))
    problems = check_sweep(read_yaml_file(f))
    assert len(problems) == 1 and named in problems[0], problems
    if case in ("probabilities", "hyperband-s"):  # the command line refuses it before any trial starts
        r = run_sweep_cli([str(f), "--max-runs", "2", "--output-dir", str(tmp_path / "runs"), *TINY], timeout=60)
        assert r.returncode == 2 and r.stderr.count("error: ") == 1 and named in r.stderr, r.stderr
        assert not (tmp_path / "runs").exists(), "nothing written, no trial started"


def test_agent_text_values_parse_as_the_schema_types():
    # W&B's agent writes str() of each value: these are the exact strings it puts on the command line.
    values = {"training.optimizer.lr": 1e-05, "training.max_grad_norm": None, "logging.tensorboard": True,
              "model.channels": [16, 32], "training.optimizer.betas": [0.9, 0.99], "data.batch_size": 64,
              "training.optimizer.name": "sgd", "training.scheduler.warmup_epochs": 1.0, "model.dropout": 0}
    texts = [f"{k}={agent_text(v)}" for k, v in values.items()]
    assert texts[:3] == ["training.optimizer.lr=1e-05", "training.max_grad_norm=None", "logging.tensorboard=True"]
    cfg = load_config(DEFAULT_CONFIG, texts)
    assert cfg.training.optimizer.lr == 1e-05 and isinstance(cfg.training.optimizer.lr, float)
    assert cfg.training.max_grad_norm is None
    assert cfg.logging.tensorboard is True
    assert cfg.model.channels == [16, 32] and cfg.training.optimizer.betas == (0.9, 0.99)
    assert cfg.data.batch_size == 64 and cfg.training.optimizer.name == "sgd" and cfg.model.dropout == 0.0
    # Every value Optuna draws for the example sweep loads, text of lists included.
    space = translate(read_yaml_file(SWEEP_FILE))
    study = optuna.create_study(sampler=make_sampler(space, 0, 20))
    for _ in range(20):
        trial = study.ask(space.distributions)
        load_config(DEFAULT_CONFIG, [f"{k}={agent_text(v)}" for k, v in trial.params.items()])
        study.tell(trial, 1.0)


def test_trial_k_is_the_same_trial_whichever_process_asks():
    space = translate(read_yaml_file(SWEEP_FILE))
    space.method = "random"

    def draws(seed: int, n: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(space, seed, n))
        return [study.ask(space.distributions).params for _ in range(n)]

    five, eight = draws(3, 5), draws(3, 8)
    assert eight[:5] == five, "continuing with a larger --max-runs keeps the earlier trials"
    assert draws(4, 5) != five and len({json.dumps(p, sort_keys=True) for p in eight}) == 8
    grid = translate({**read_yaml_file(SWEEP_FILE), "method": "grid",
                      "parameters": {"model.dropout": {"values": [0.0, 0.1]}, "data.batch_size": {"values": [32, 64]}}})
    study = optuna.create_study(sampler=make_sampler(grid, 0, 4))
    combos = {tuple(study.ask(grid.distributions).params.values()) for _ in range(4)}
    assert combos == {(0.0, 32), (0.0, 64), (0.1, 32), (0.1, 64)} and grid.grid_size == 4
    # A retry (queued with the parameters of the trial it retries) takes a trial number, not a grid point.
    study = optuna.create_study(sampler=make_sampler(grid, 0, 4))
    first = study.ask(grid.distributions)
    enqueue_retry(study, first, first.number)
    study.tell(first, state=TrialState.FAIL)
    trials = [study.ask(grid.distributions) for _ in range(4)]
    assert trials[0].user_attrs["retry_of"] == 0 and trials[0].params == first.params
    assert {tuple(t.params.values()) for t in [first, *trials[1:]]} == combos


def test_each_worker_gets_its_own_gpus_or_its_share_of_the_cores(monkeypatch):
    import train.sweep as sweep

    space = translate(read_yaml_file(SWEEP_FILE))
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1", "2", "3"])
    one = sweep.worker_slots(2, None, [], space, [])
    assert [s.env for s in one] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    two = sweep.worker_slots(2, 2, [], space, [])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in two] == ["0,1", "2,3"]
    assert two[0].launch_args == ["--multi_gpu", "--num_processes", "2"] and two[0].overrides == []
    with pytest.raises(sweep.UserError, match="needs 6 GPUs; 4 visible"):
        sweep.worker_slots(3, 2, [], space, [])
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    cores = len(os.sched_getaffinity(0))
    cpu = sweep.worker_slots(2, None, [], space, [])
    assert [s.env for s in cpu] == [{}, {}] and cpu[0].overrides == [f"training.num_threads={max(1, cores // 2)}"]
    assert sweep.worker_slots(2, None, ["training.num_threads=1"], space, [])[0].overrides == [], "yours wins"
    assert sweep.worker_slots(1, None, [], space, [])[0].overrides == [], "one worker: the trainer's default"
    with pytest.raises(sweep.UserError, match="needs 1 GPUs; 0 visible"):
        sweep.worker_slots(1, 1, [], space, [])


def test_a_trial_left_running_by_a_killed_sweep_is_failed_and_queued_once(tmp_path):
    path = str(tmp_path / JOURNAL_NAME)
    study = optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from train.sweep_study import owner

    gone = {**owner(), "pid": int(dead.stdout)}
    alive = owner()
    for who in (gone, alive):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        trial.set_user_attr("owner", who)
        trial.set_user_attr("run", f"s-{trial.number:03d}")
    # Two sweeps find it at once (two storage objects on one journal): one claim wins.
    other = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path)))
    messages = recover_left_behind(study) + recover_left_behind(other) + recover_left_behind(study)
    assert len(messages) == 1 and "trial 0 (s-000) was left running" in messages[0], messages
    states = [t.state for t in _reload(path).trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING], "the live sweep's trial is left alone"
    queued = _reload(path).trials[2]
    assert queued.user_attrs == {"retry_of": 0, "run": "s-000"}
    assert queued.system_attrs["fixed_params"] == _reload(path).trials[0].params, "the same parameters"


def _reload(path: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(path)))


# --------------------------------------------------------------------------------------------------
# Real sweeps
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_random_sweep_with_two_workers_writes_runs_a_leaderboard_and_a_readable_study(tmp_path):
    f = _sweep_file(tmp_path, "  training.optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}\n"
                              "  model.dropout: {values: [0.0, 0.1]}\n", method="random")
    out = tmp_path / "runs"
    fixed = [o for o in TINY if not o.startswith("training.num_threads")]  # the workers choose the threads
    r = run_sweep_cli([str(f), "--max-runs", "4", "--workers", "2", "--output-dir", str(out), *fixed])
    _ok(r)
    sweep_dir = out / "s"
    study = _study(sweep_dir)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.startswith("s-")) == [f"s-00{i}" for i in range(4)]
    rows = _rows(sweep_dir)
    values = [float(row["val/rmse"]) for row in rows]
    assert values == sorted(values) and [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    for row in rows:
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert float(row["val/rmse"]) == pytest.approx(results["best/rmse"])
        assert float(row["val/rmse"]) == pytest.approx(study.trials[int(row["trial"])].value)
        assert Path(row["best_checkpoint"]).is_file()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    config = (sweep_dir / "s-000" / "config.yaml").read_text()
    assert f"num_threads: {threads}\n" in config, "each of 2 workers gets half the cores"
    assert "| rank | trial | state | val/rmse |" in r.stdout, "the leaderboard is printed"
    assert f"optuna-dashboard {sweep_dir / JOURNAL_NAME}" in r.stdout
    # Both workers ran at the same time: their trials' wall times overlap.
    spans = [(t.datetime_start, t.datetime_complete) for t in study.trials]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])


def _two_sweeps(args_a: list[str], args_b: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "train.sweep", *a], cwd=ROOT, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in (args_a, args_b)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _ran(r: subprocess.CompletedProcess) -> list[str]:
    """The run names a sweep process started (its '[run] trial N: ...' lines)."""
    return [line.split("]")[0][1:] for line in r.stdout.splitlines() if "] trial " in line]


@pytest.mark.slow
def test_two_sweep_processes_on_one_study_run_n_trials_in_all_and_none_twice(tmp_path):
    f = _sweep_file(tmp_path, LR, method="random")
    args = [str(f), "--max-runs", "3", "--output-dir", str(tmp_path / "runs"), *TINY]
    a, b = _two_sweeps(args, args)
    _ok(a)
    _ok(b)
    assert sorted(_ran(a) + _ran(b)) == ["s-000", "s-001", "s-002"], (a.stdout, b.stdout)
    assert _ran(a) and _ran(b), "both sweeps ran trials"
    study = _study(tmp_path / "runs" / "s")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3, "no surplus trial: the ask is locked"


@pytest.fixture
def postgres():
    """A real PostgreSQL server on 127.0.0.1 (a fresh cluster in a temporary directory), stopped after.

    The test fails, not skips, when it cannot start: the package comes from .ci/system-deps.sh."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        pytest.fail("PostgreSQL is not installed (no initdb): run .ci/system-deps.sh (Debian package postgresql)")
    bindir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses to run as root
    if as_user:
        shutil.chown(base, "postgres")
    port = free_port()

    def pg(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = (base / "log").read_text() if (base / "log").exists() else ""
            pytest.fail(f"{' '.join(cmd)} failed: {r.stdout}{r.stderr}{log}")

    pg(str(bindir / "initdb"), "-D", str(base / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
    pg(str(bindir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"), "-w", "-t", "60",
       "-o", f"-k {base} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE sweeps")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(base / "data"), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_machines_share_one_study_through_postgresql(tmp_path, postgres):
    # Two sweep processes with their own output directories, as on two machines: only the database is shared.
    f = _sweep_file(tmp_path, LR, method="random")
    common = [str(f), "--max-runs", "3", "--storage", postgres, "--study", "lr", *TINY]
    a, b = _two_sweeps([*common, "--output-dir", str(tmp_path / "a")], [*common, "--output-dir", str(tmp_path / "b")])
    _ok(a)
    _ok(b)
    study = optuna.load_study(study_name="lr", storage=with_installed_driver(postgres))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3, [(t.number, t.state, t.user_attrs) for t in study.trials]
    runs = sorted(p.name for side in "ab" for p in (tmp_path / side / "s").glob("lr-*"))
    assert runs == sorted(t.user_attrs["run"] for t in complete) and len(set(runs)) == 3, "each trial run once"
    assert sorted(_ran(a) + _ran(b)) == runs
    assert _ran(a) and _ran(b), "both machines ran trials"
    assert len(_rows(tmp_path / "a" / "s")) == 3 and len(_rows(tmp_path / "b" / "s")) == 3, "the whole study"


@pytest.mark.slow
def test_hyperband_prunes_a_bad_trial_whose_state_can_be_resumed(tmp_path):
    # Trial 0 learns (lr 2e-3), trial 1 barely moves (lr 1e-6): after epoch 1 it is behind the best
    # trial's epoch 1, and one bracket (max_iter 2, eta 3) makes Hyperband compare the two.
    f = _sweep_file(tmp_path, "  training.optimizer.lr: {values: [1.0e-6, 2.0e-3]}\n", method="random",
                    extra="early_terminate: {type: hyperband, min_iter: 1, eta: 3, max_iter: 2}\n")
    out = tmp_path / "runs"
    r = run_sweep_cli([str(f), "--max-runs", "2", "--seed", "4", "--output-dir", str(out), *SLOWER])
    _ok(r)
    study = _study(out / "s")
    assert [t.params["training.optimizer.lr"] for t in study.trials] == [2e-3, 1e-6], "seed 4 draws good, then bad"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED], r.stdout
    assert study.trials[0].intermediate_values.keys() == {1, 2, 3}
    pruned = study.trials[1]
    assert pruned.last_step == 1 and pruned.intermediate_values[1] > study.trials[0].intermediate_values[1]
    row = next(row for row in _rows(out / "s") if row["trial"] == "1")
    assert row["state"] == "pruned" and row["epochs"] == "1" and row["rank"] == ""
    run_dir = out / "s" / "s-001"
    assert list((run_dir / "checkpoints" / "state").glob("step_*")), "the pruned trial saved a full state"
    assert not (run_dir / "results.json").exists()
    resumed = run_main(["--config", str(run_dir / "config.yaml"), "--resume", "auto"], timeout=180)
    _ok(resumed)
    assert "Resuming run 's-001'" in resumed.stdout and (run_dir / "results.json").is_file()


@pytest.mark.slow
def test_an_interrupted_sweep_continues_where_it_stopped(tmp_path):
    f = _sweep_file(tmp_path, LR)  # a grid of 4, cut to 3
    out = tmp_path / "runs"
    sweep_dir = out / "s"
    args = [str(f), "--max-runs", "3", "--output-dir", str(out), *SLOWER[:-2], "training.epochs=2",
            "data.synthetic.num_train=2048"]  # ~1 s epochs: the signal finds the second trial training
    # Ctrl-C (SIGINT) while the second trial is training.
    proc = subprocess.Popen([sys.executable, "-m", "train.sweep", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (sweep_dir / "s-001" / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (sweep_dir / "s-001" / "metrics.jsonl").exists()
        proc.send_signal(signal.SIGINT)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text[-3000:]
    assert "[s-001] interrupted: queued again" in text
    study = _study(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert list((sweep_dir / "s-001" / "checkpoints" / "state").glob("step_*")), "the trial saved its state"
    first_results = (sweep_dir / "s-000" / "results.json").read_bytes()

    r = run_sweep_cli(args)
    _ok(r)
    assert "Continuing study s: 1 complete, 1 fail, 1 waiting" in r.stdout
    assert _ran(r) == ["s-001", "s-003"], "the interrupted trial once more, then the third; trial 0 not again"
    assert (sweep_dir / "s-000" / "results.json").read_bytes() == first_results
    assert (sweep_dir / "_incomplete" / "s-001-1" / "config.yaml").is_file(), "the interrupted attempt is kept"
    study = _study(sweep_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert study.trials[2].user_attrs["retry_of"] == 1 and study.trials[2].params == study.trials[1].params
    assert len({t.params["training.optimizer.lr"] for t in study.trials}) == 3, "3 grid points, none left out"
    rows = _rows(sweep_dir)
    assert [row["state"] for row in rows] == ["complete"] * 3 + ["fail"]
    assert "retried as trial 2" in rows[3]["note"] and rows[3]["run_dir"].endswith("_incomplete/s-001-1")
    # A different sweep on the same study is refused rather than mixed into this leaderboard.
    r = run_sweep_cli([*args, "--seed", "1"], timeout=60)
    assert r.returncode == 2 and "holds a different sweep" in r.stderr


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_trials_are_grouped_in_wandb(tmp_path):
    # fp16 passes the schema but the trainer refuses it on a CPU at run time: that trial fails.
    f = _sweep_file(tmp_path, "  training.mixed_precision: {values: [null, fp16]}\n")
    out = tmp_path / "runs"
    r = run_sweep_cli([str(f), "--output-dir", str(out), *TINY, "logging.wandb.enabled=true"])
    _ok(r, 1)  # 1: some trial failed
    sweep_dir = out / "s"
    assert "FAILED (exit 1); the sweep goes on" in r.stdout
    assert "error: mixed precision fp16 needs a CUDA GPU" in r.stdout, "the trainer's own reason is shown"
    rows = _rows(sweep_dir)
    assert [row["state"] for row in rows] == ["complete", "fail"] and rows[0]["training.mixed_precision"] == "None"
    assert rows[1]["note"] == "exit 1" and rows[0]["rank"] == "1" and rows[1]["rank"] == ""
    good = Path(rows[0]["run_dir"])
    assert "val/rmse" in tb_scalars(good / "tensorboard")
    (offline,) = list((good / "wandb").glob("offline-run-*"))
    config = wandb_summary(offline)["config"]
    assert config["logging.wandb.group"] == "s" and config["experiment.name"] == good.name
    assert config["training.mixed_precision"] is None


# --------------------------------------------------------------------------------------------------
# A trial started by `wandb agent`
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trial_under_a_wandb_agent_logs_to_wandb_with_typed_swept_keys(tmp_path):
    # What `wandb agent` runs: the sweep's command with every value as text, WANDB_SWEEP_ID set,
    # and W&B off in the config. The trial must still log to W&B with the swept keys typed.
    out = tmp_path / "runs"
    overrides = [f"experiment.output_dir={out}", "experiment.name=agent-trial", *TINY,
                 "training.optimizer.lr=1e-05", "training.max_grad_norm=None", "logging.tensorboard=True"]
    r = run_main(["--config", DEFAULT_CONFIG, *overrides], timeout=120,
                 WANDB_SWEEP_ID="abc123", WANDB_PROJECT="MoK_date_predict")
    _ok(r)
    offline = list((out / "agent-trial" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    config = wandb_summary(offline[0])["config"]
    assert config["training.optimizer.lr"] == 1e-05 and config["training.max_grad_norm"] is None
    assert config["logging.tensorboard"] is True
