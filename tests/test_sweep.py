"""Sweeps: configs/sweep.yml against the schema, agent-style text values, the offline sweep runner
(a failing trial, the leaderboard, interruption and continuation) and a trial under a W&B agent."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, ROOT, env, run_main, run_sweep_cli, tb_scalars, wandb_summary
from train.config import load_config, read_yaml_file
from train.sweep import agent_text, check_sweep, config_keys, make_trials

SWEEP_FILE = ROOT / "configs" / "sweep.yml"

# Small trials: a few seconds each through `accelerate launch`.
TINY = [
    "data.synthetic.num_train=96", "data.synthetic.num_val=40", "data.synthetic.num_test=32", "data.batch_size=32",
    "data.eval_batch_size=32", "model.channels=[8]", "model.hidden=8", "training.epochs=1",
    "logging.progress_bar=false",
]


def _sweep_file(tmp_path: Path, parameters: str, method: str = "grid") -> Path:
    p = tmp_path / "sweep.yml"
    p.write_text(
        f"name: s\nmethod: {method}\nmetric: {{name: val/rmse, goal: minimize}}\nparameters:\n{parameters}"
        "program: train/main.py\n"
        'command: [accelerate, launch, "${program}", --config, configs/model_config.yml, "${args_no_hyphens}"]\n'
    )
    return p


# --------------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------------


def test_sweep_file_validates_against_the_config_schema():
    spec = read_yaml_file(SWEEP_FILE)
    assert check_sweep(spec) == []
    assert set(spec["parameters"]) <= config_keys(), "every parameter is a real dotted config key"
    assert spec["metric"] == {"name": "val/rmse", "goal": "minimize"}
    assert spec["program"] == "train/main.py"
    assert spec["command"] == [
        "accelerate", "launch", "${program}", "--config", "configs/model_config.yml", "${args_no_hyphens}"
    ]


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
    # Every value the example sweep can produce loads.
    spec = read_yaml_file(SWEEP_FILE)
    for params in make_trials(spec, max_runs=20, seed=0):
        load_config(DEFAULT_CONFIG, [f"{k}={agent_text(v)}" for k, v in params.items()])


def test_trials_are_reproducible_and_grow_without_changing():
    spec = read_yaml_file(SWEEP_FILE)
    five, eight = make_trials(spec, 5, seed=3), make_trials(spec, 8, seed=3)
    assert eight[:5] == five, "continuing with a larger --max-runs keeps the earlier trials"
    assert make_trials(spec, 5, seed=4) != five
    lr = spec["parameters"]["training.optimizer.lr"]
    assert all(lr["min"] <= t["training.optimizer.lr"] <= lr["max"] for t in eight)
    grid = {**spec, "method": "grid",
            "parameters": {"model.dropout": {"values": [0.0, 0.1]}, "data.batch_size": {"values": [32, 64]}}}
    assert make_trials(grid, None, 0) == [
        {"model.dropout": 0.0, "data.batch_size": 32}, {"model.dropout": 0.0, "data.batch_size": 64},
        {"model.dropout": 0.1, "data.batch_size": 32}, {"model.dropout": 0.1, "data.batch_size": 64},
    ]


# --------------------------------------------------------------------------------------------------
# The offline sweep
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_sweep_survives_a_failing_trial_and_writes_a_leaderboard(tmp_path):
    # fp16 passes the schema but the trainer refuses it on a CPU at run time: trial s-002 fails.
    f = _sweep_file(tmp_path, "  training.mixed_precision: {values: [null, fp16]}\n"
                              "  training.optimizer.lr: {values: [1.0e-3, 3.0e-3]}\n")
    out = tmp_path / "runs"
    r = run_sweep_cli([str(f), "--max-runs", "3", "--output-dir", str(out), *TINY, "logging.wandb.enabled=true"])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # 1: some trial failed
    sweep_dir = out / "s"
    assert "[s-002] FAILED" in r.stdout and "the sweep goes on" in r.stdout
    assert "error: mixed precision fp16 needs a CUDA GPU" in r.stdout, "the trainer's own reason is shown"
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done", "failed"]
    assert state["trials"][2]["returncode"] != 0

    rows = list(csv.DictReader((sweep_dir / "leaderboard.csv").open()))
    assert [row["status"] for row in rows] == ["done", "done", "failed"]
    values = [float(row["val/rmse"]) for row in rows[:2]]
    assert values == sorted(values), "sorted by the metric, best first"
    assert [row["rank"] for row in rows] == ["1", "2", ""]
    for row in rows[:2]:
        results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert float(row["val/rmse"]) == pytest.approx(results["best/rmse"])
        assert Path(row["best_checkpoint"]).is_file()
        assert row["training.optimizer.lr"] in ("0.001", "0.003")
    md = (sweep_dir / "leaderboard.md").read_text()
    assert md.index(rows[0]["trial"]) < md.index(rows[1]["trial"]) < md.index("s-002")

    # One TensorBoard parent: each trial's stream lives under the sweep directory.
    streams = sorted(p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.rglob("events.out.tfevents.*"))
    assert streams == ["s-000/tensorboard", "s-001/tensorboard"]
    assert "val/rmse" in tb_scalars(sweep_dir / "s-000" / "tensorboard")
    # W&B: each trial one offline run, grouped under the sweep name, swept keys under their config names.
    for trial, lr in (("s-000", 1e-3), ("s-001", 3e-3)):
        offline = list((sweep_dir / trial / "wandb").glob("offline-run-*"))
        assert len(offline) == 1
        config = wandb_summary(offline[0])["config"]
        assert config["logging.wandb.group"] == "s" and config["experiment.name"] == trial
        assert config["training.optimizer.lr"] == lr and config["training.mixed_precision"] is None


@pytest.mark.slow
def test_offline_sweep_can_be_interrupted_and_continued(tmp_path):
    f = _sweep_file(tmp_path, "  training.optimizer.lr: {values: [1.0e-3, 2.0e-3, 3.0e-3]}\n")
    out = tmp_path / "runs"
    sweep_dir = out / "s"
    args = [str(f), "--max-runs", "3", "--output-dir", str(out), *TINY]
    # Interrupt (Ctrl-C) while the second trial is writing its run directory.
    proc = subprocess.Popen([sys.executable, "-m", "train.sweep", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (sweep_dir / "s-001" / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (sweep_dir / "s-001" / "config.yaml").exists()
        proc.send_signal(signal.SIGINT)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text[-3000:]
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "interrupted", "pending"]
    assert not (sweep_dir / "s-001" / "results.json").exists()
    first_results = (sweep_dir / "s-000" / "results.json").read_bytes()

    r = run_sweep_cli(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Continuing sweep s: 1 of 3 trials done" in r.stdout
    assert "[s-000]" not in r.stdout, "a finished trial is not run again"
    assert (sweep_dir / "s-000" / "results.json").read_bytes() == first_results
    # The interrupted attempt is kept, moved aside; the trial ran again under its own name.
    assert (sweep_dir / "_incomplete" / "s-001-1" / "config.yaml").is_file()
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done", "done"]
    assert [t["attempts"] for t in state["trials"]] == [1, 2, 1]
    rows = list(csv.DictReader((sweep_dir / "leaderboard.csv").open()))
    assert sorted(row["trial"] for row in rows) == ["s-000", "s-001", "s-002"] and all(row["rank"] for row in rows)

    # A different sweep in the same directory is refused rather than mixed into this leaderboard.
    r = run_sweep_cli([*args, "--seed", "1"])
    assert r.returncode == 2 and "holds a different sweep" in r.stderr


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
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    offline = list((out / "agent-trial" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    config = wandb_summary(offline[0])["config"]
    assert config["training.optimizer.lr"] == 1e-05 and config["training.max_grad_norm"] is None
    assert config["logging.tensorboard"] is True


@pytest.mark.slow
def test_sweep_trials_are_grouped_in_wandb(tmp_path):
    from conftest import wandb_records

    f = _sweep_file(tmp_path, "  training.optimizer.lr: {values: [1.0e-3]}\n")
    out = tmp_path / "runs"
    r = run_sweep_cli([str(f), "--output-dir", str(out), *TINY, "logging.wandb.enabled=true"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [rec["run"] for rec in wandb_records(out / "s" / "s-000") if rec.get("type") == "run"]
    assert runs and all(run.get("run_group") == "s" for run in runs)
