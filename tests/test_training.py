"""Training behaviour: precision, schedules across process counts, failure states, refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import DEFAULT_CONFIG, ROOT, accelerate_launch, free_port, env, run_main, tb_scalars, tiny, wandb_summary
from train.config import load_config
from train.optim import build_scheduler
from train.models import build_model


def _lrs(cfg, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.training.optimizer.lr)
    sched, per_batch = build_scheduler(cfg, opt, steps_per_epoch)
    assert per_batch
    lrs = []
    for _ in range(cfg.training.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_lr_depends_on_the_fraction_of_training_not_the_process_count():
    cfg = load_config(DEFAULT_CONFIG, ["training.epochs=4", "training.scheduler.warmup_epochs=0.5"])
    one, two = _lrs(cfg, 30), _lrs(cfg, 15)  # 2 processes: half the steps per epoch each
    assert one[::2] == two
    assert max(one) == pytest.approx(cfg.training.optimizer.lr, rel=1e-2)
    assert one[-1] < 0.01 * cfg.training.optimizer.lr


def test_bf16_on_cpu_really_computes_in_bf16():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another test may have made one
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = accelerator.prepare(build_model(load_config(DEFAULT_CONFIG).model))
        seen = []
        first_conv = next(m for m in accelerator.unwrap_model(model).modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        model(torch.randn(2, 3, 32, 32))
        assert seen == [torch.bfloat16]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_run_end_to_end(out):
    r = run_main(["--config", DEFAULT_CONFIG,
                  *tiny(out, **{"training.epochs": 1, "training.mixed_precision": "bf16", "experiment.name": "bf"})])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "bf" / "results.json").read_text())["mixed_precision"] == "bf16"


@pytest.mark.parametrize("how", ["config", "launcher"])
def test_fp16_on_cpu_is_refused(out, how):
    extra = {"training.mixed_precision": "fp16"} if how == "config" else {}
    env_extra = {"ACCELERATE_MIXED_PRECISION": "fp16"} if how == "launcher" else {}
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)], **env_extra)
    assert r.returncode == 2
    assert r.stderr.startswith("error: mixed precision fp16 needs a CUDA GPU")
    assert "Traceback" not in r.stderr and list(out.iterdir()) == []


def test_existing_run_directory_is_never_overwritten(out):
    existing = out / "taken"
    existing.mkdir()
    (existing / "results.json").write_text("precious")
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **{"experiment.name": "taken"})])
    assert r.returncode == 2
    assert f"error: run directory '{existing}' already exists" in r.stderr
    assert [p.name for p in existing.iterdir()] == ["results.json"]
    assert (existing / "results.json").read_text() == "precious"


def test_wandb_online_without_credentials_fails_before_training(out, tmp_path):
    r = run_main(
        ["--config", DEFAULT_CONFIG, *tiny(out, **{"logging.wandb.enabled": "true", "logging.wandb.mode": "online"})],
        HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"),
    )
    assert r.returncode == 2
    assert "`wandb login`" in r.stderr and "logging.wandb.mode=offline" in r.stderr
    assert list(out.iterdir()) == []


def test_a_failing_run_ends_failed_in_wandb_and_closes_tensorboard(out):
    # Break evaluation after the trackers have started: the W&B run must end `failed`, not `finished`.
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "import train.loop as loop\n"
        "def boom(*a, **k): raise RuntimeError('simulated failure')\n"
        "loop.evaluate = boom\n"
        "from train.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n" % str(ROOT)
    )
    import subprocess

    args = ["--config", DEFAULT_CONFIG, *tiny(out, **{"logging.wandb.enabled": "true", "experiment.name": "fail"})]
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode != 0 and "simulated failure" in r.stderr
    offline = list((out / "fail" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    summary = wandb_summary(offline[0])
    assert summary["state"] == "failed" and summary["exit_code"] != 0
    assert "train/loss_step" in tb_scalars(out / "fail" / "tensorboard")


@pytest.mark.slow
def test_plateau_scheduler_steps_once_per_epoch_with_two_processes(out):
    # mode=max on an RMSE that falls: every epoch after the first is "no improvement", so with
    # patience 0 the lr halves once per epoch. A scheduler stepped once per process would quarter it.
    extra = {
        "training.epochs": 4, "training.scheduler.name": "plateau", "training.scheduler.plateau_patience": 0,
        "training.early_stopping.mode": "max", "training.early_stopping.enabled": "false", "experiment.name": "plateau",
    }
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)],
                 launcher=accelerate_launch("--multi_gpu", "--num_processes", "2",
                                            "--main_process_port", str(free_port())))
    assert r.returncode == 0, r.stderr[-3000:]
    epoch_steps = {e.step for e in tb_scalars(out / "plateau" / "tensorboard")["epoch"]}
    lrs = [e.value for e in tb_scalars(out / "plateau" / "tensorboard")["lr"] if e.step in epoch_steps]
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r_ == pytest.approx(1.0) or r_ == pytest.approx(0.5) for r_ in ratios), lrs
    assert any(r_ == pytest.approx(0.5) for r_ in ratios), lrs
