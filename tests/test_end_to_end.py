"""End to end through `accelerate launch`, as a user runs it: TensorBoard events, the offline W&B
run read back with W&B's own reader, the best checkpoint as a W&B model artifact, and 2 processes."""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    DEFAULT_CONFIG,
    accelerate_launch,
    free_port,
    run_main,
    tb_scalars,
    tiny,
    wandb_records,
    wandb_summary,
)
from train.config import ModelConfig
from train.data import build_data
from train.config import load_config
from train.models import build_model

pytestmark = pytest.mark.slow


def _history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_single_process_with_wandb_offline(out):
    r = run_main(
        ["--config", DEFAULT_CONFIG,
         *tiny(out, **{"training.epochs": 3, "logging.wandb.enabled": "true", "experiment.name": "e2e"})],
        launcher=accelerate_launch("--num_processes", "1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = out / "e2e"
    # The console shows what the original design promised.
    assert "Weights & Biases logging initialized" in r.stdout and "Project: MoK_date_predict" in r.stdout
    assert "wandb sync " in r.stdout
    for line in ("Epoch [1/3] Results:", "  Train Loss: ", "  |  Train RMSE: ", "  Val Loss:   ", "  Learning Rate: "):
        assert line in r.stdout
    assert "Baseline RMSE, predict the train mean" in r.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert {"test/loss", "test/rmse", "test/mae", "baseline/mean_rmse", "baseline/colour_linear_rmse"} <= set(results)
    assert results["val_samples"] == 70 and results["test_samples"] == 64

    # TensorBoard: one stream in <run_dir>/tensorboard, one val/rmse point per epoch, hparams in it.
    tb_dirs = [p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    assert tb_dirs == [run_dir / "tensorboard"], "hparams must not create timestamped sub-runs"
    scalars = tb_scalars(run_dir / "tensorboard")
    assert [e.step for e in scalars["val/rmse"]] == sorted({e.step for e in scalars["val/rmse"]})
    assert len(scalars["val/rmse"]) == 3
    assert len(scalars["test/rmse"]) == 1
    assert "train/loss_step" in scalars and "lr" in scalars and "samples_per_s" in scalars

    # W&B: exactly one offline run, finished, with config, history, summary and the model artifact.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    summary = wandb_summary(offline[0])
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["config"]["training.epochs"] == 3
    assert summary["config"]["model.channels"] == "[8, 16]"
    assert summary["config"]["meta.torch"] == torch.__version__
    assert summary["summary"]["test/rmse"] == pytest.approx(results["test/rmse"])
    assert summary["summary"]["test/mae"] == pytest.approx(results["test/mae"])

    records = wandb_records(run_dir)
    rows = _history(records)
    epochs = [row["epoch"] for row in rows if "val/rmse" in row]
    assert epochs == [1, 2, 3]
    steps = [row["_step"] for row in rows]
    assert steps == sorted(steps), "W&B drops steps that go back"
    best = run_dir / "checkpoints" / "best.safetensors"
    artifacts = [rec["artifact"] for rec in records if rec.get("type") == "artifact"]
    assert artifacts and all(a["type"] == "model" for a in artifacts)
    assert len({a["name"] for a in artifacts}) == 1, "one artifact name per run, versions for each new best"
    last = artifacts[-1]
    assert "best" in last["aliases"]
    entry = last["manifest"]["contents"][0]
    assert entry["path"] == "best.safetensors"
    assert entry["digest"] == base64.b64encode(hashlib.md5(best.read_bytes()).digest()).decode()
    # Staged inside the run directory, so copying the run directory is enough for `wandb sync`.
    assert entry["local_path"].startswith(str(run_dir))
    assert json.loads(last["metadata"])["monitor"] == "val/rmse"

    # best.safetensors alone rebuilds the model and reproduces the recorded val RMSE.
    with safe_open(str(best), "pt") as f:
        meta = f.metadata()
    model = build_model(ModelConfig.model_validate(json.loads(meta["model_config"])))
    model.load_state_dict(load_file(str(best)))
    model.eval()
    cfg = load_config(run_dir / "config.yaml")
    data = build_data(cfg)
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        pred = model(x).double() * float(meta["target_std"]) + float(meta["target_mean"])
    rmse = math.sqrt(((pred - data.val.years) ** 2).mean().item())
    assert rmse == pytest.approx(float(meta["monitor_value"]), rel=1e-4)
    assert float(meta["target_mean"]) == pytest.approx(data.target_mean)


def test_two_processes_on_cpu_make_one_run(out):
    # 70 val images over 2 processes x eval batch 16: the sampler pads with repeated samples,
    # which must not be counted.
    r = run_main(
        ["--config", DEFAULT_CONFIG, *tiny(out, **{"logging.wandb.enabled": "true", "experiment.name": "ddp"})],
        launcher=accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = out / "ddp"
    assert [d.name for d in out.iterdir()] == ["ddp"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["val_samples"] == 70 and results["test_samples"] == 64
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert r.stdout.count("Epoch [1/2] Results:") == 1, "console block from the main process only"
    # The val RMSE logged for the best epoch equals the best checkpoint's RMSE over the whole val set.
    with safe_open(str(run_dir / "checkpoints" / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    model = build_model(ModelConfig.model_validate(json.loads(meta["model_config"])))
    model.load_state_dict(load_file(str(run_dir / "checkpoints" / "best.safetensors")))
    model.eval()
    data = build_data(load_config(run_dir / "config.yaml"))
    x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        pred = model(x).double() * data.target_std + data.target_mean
    rmse = math.sqrt(((pred - data.val.years) ** 2).mean().item())
    assert rmse == pytest.approx(float(meta["monitor_value"]), rel=1e-4)
