"""Scale-out on one CPU machine: two simulated machines, sync-BN conversion and its CPU message, and
1-process vs 2-process equivalence with GroupNorm. Everything goes through `accelerate launch`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import DEFAULT_CONFIG, accelerate_launch, free_port, popen_main, run_main, tb_scalars, tiny, wandb_summary
from train.config import ModelConfig
from train.models import build_model, maybe_sync_batchnorm


# --------------------------------------------------------------------------------------------------
# model.sync_batchnorm
# --------------------------------------------------------------------------------------------------


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("name", ["mok_cnn", "resnet"])
def test_sync_batchnorm_converts_every_batchnorm_for_multi_process_gpu_runs(name):
    cfg = ModelConfig(name=name, channels=[8, 16], hidden=8, sync_batchnorm=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    n_bn = _count(model, nn.BatchNorm2d)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The conversion itself is device-independent; only SyncBatchNorm's forward needs a GPU.
    converted, message = maybe_sync_batchnorm(model, cfg, num_processes=2, use_cpu=False)
    assert n_bn > 0 and _count(converted, nn.SyncBatchNorm) == n_bn and _count(converted, nn.BatchNorm2d) == 0
    assert f"converted {n_bn} BatchNorm layers to SyncBatchNorm" in message
    after = converted.state_dict()
    assert after.keys() == before.keys(), "checkpoints keep the same keys"
    assert all(torch.equal(before[k], after[k]) for k in before), "weights and running statistics are kept"


def test_sync_batchnorm_on_cpu_keeps_batchnorm_and_says_so():
    cfg = ModelConfig(channels=[8, 16], hidden=8, sync_batchnorm=True)
    model = build_model(cfg)
    kept, message = maybe_sync_batchnorm(model, cfg, num_processes=2, use_cpu=True)
    assert kept is model and _count(kept, nn.SyncBatchNorm) == 0
    assert message.startswith("warning: model.sync_batchnorm=true is ignored on the CPU")
    assert "works only on GPUs" in message and "model.norm=group" in message
    # A CPU forward/backward still works (a converted model would raise here).
    kept(torch.randn(4, 3, 16, 16)).sum().backward()


def test_sync_batchnorm_no_ops_are_explained():
    group = ModelConfig(channels=[8], hidden=8, norm="group", sync_batchnorm=True)
    _, msg = maybe_sync_batchnorm(build_model(group), group, num_processes=2, use_cpu=False)
    assert "no BatchNorm layers" in msg
    batch = ModelConfig(channels=[8], hidden=8, sync_batchnorm=True)
    model, msg = maybe_sync_batchnorm(build_model(batch), batch, num_processes=1, use_cpu=False)
    assert "one process" in msg and _count(model, nn.SyncBatchNorm) == 0
    off = ModelConfig(channels=[8], hidden=8)
    assert maybe_sync_batchnorm(build_model(off), off, num_processes=2, use_cpu=False)[1] is None


@pytest.mark.slow
def test_sync_batchnorm_two_cpu_processes_print_the_message_once(out):
    r = run_main(
        ["--config", DEFAULT_CONFIG,
         *tiny(out, **{"experiment.name": "sbn", "model.sync_batchnorm": "true", "training.epochs": 1})],
        launcher=accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("model.sync_batchnorm=true is ignored on the CPU") == 1


# --------------------------------------------------------------------------------------------------
# Two machines simulated on this one
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_simulated_machines_make_one_run(out):
    # One process per "machine"; both launches must run at the same time to form the gloo group.
    port = str(free_port())
    extra = {"experiment.name": "two-nodes", "logging.wandb.enabled": "true", "training.num_threads": 1}
    args = ["--config", DEFAULT_CONFIG, *tiny(out, **extra)]
    procs = [
        popen_main(args, accelerate_launch(
            "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", port,
        ))
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    assert [d.name for d in out.iterdir()] == ["two-nodes"]
    run_dir = out / "two-nodes"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["val_samples"] == 70 and results["test_samples"] == 64, "metrics over the whole val/test sets"
    assert list(run_dir.rglob("best*.safetensors")) == [run_dir / "checkpoints" / "best.safetensors"]
    assert len(list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "exactly one W&B run for the whole job"
    summary = wandb_summary(offline[0])
    assert summary["state"] == "finished" and summary["summary"]["test/rmse"] == pytest.approx(results["test/rmse"])
    # Only the global main process (machine 0) prints the epoch block.
    assert outputs[0].count("Epoch [1/2] Results:") == 1 and "Epoch [1/2] Results:" not in outputs[1]


# --------------------------------------------------------------------------------------------------
# 1 process x batch B == 2 processes x batch B/2 (GroupNorm)
# --------------------------------------------------------------------------------------------------

# Why not bit-exact: the two runs add the same numbers in a different order. One process reduces the
# loss and the weight gradients over 32 samples in one kernel; two processes each reduce 16, then
# gloo's all-reduce adds the two halves and divides by 2. Float addition is not associative, so the
# weights differ in the last bits after the first step, and the difference grows over the steps
# (Adam divides by the root of tiny second moments early on, which amplifies last-bit differences).
# Measured here (CPU, 3 epochs, 18 optimizer steps): up to 3e-5 relative (1e-7 with an earlier loop).
# A real difference is far larger: the same comparison with BatchNorm differs by 2e-2 (train/loss)
# and 2e-3 (val/loss). 2e-4 sits between the two.
RTOL = 2e-4


@pytest.mark.slow
def test_group_norm_one_vs_two_processes_follow_the_same_curve(tmp_path):
    # Equivalence needs: GroupNorm (BatchNorm statistics depend on the per-process batch), no
    # dropout (its random mask depends on the process's RNG stream), the same thread count (the
    # summation order inside a kernel depends on it), and the same samples per optimizer step.
    # The last holds by construction: the train loader's sampler draws one permutation per epoch
    # from seed + epoch on every process, and Accelerate hands batches of the per-process size out in
    # turn (process 0 gets batches 0, 2, 4..., process 1 gets 1, 3, 5...), so at step k the two
    # halves of 16 are exactly the 1-process batch k of 32. 192 training images divide evenly, so no
    # process pads its last batch with repeated samples.
    common = {"model.norm": "group", "model.dropout": 0, "training.num_threads": 1, "training.epochs": 3,
              "training.early_stopping.enabled": "false", "data.synthetic.num_train": 192}
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_main(["--config", DEFAULT_CONFIG,
                   *tiny(one, **common, **{"experiment.name": "p1", "data.batch_size": 32})],
                  launcher=accelerate_launch("--num_processes", "1"), timeout=120)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    r2 = run_main(["--config", DEFAULT_CONFIG,
                   *tiny(two, **common, **{"experiment.name": "p2", "data.batch_size": 16})],
                  launcher=accelerate_launch("--multi_gpu", "--num_processes", "2",
                                             "--main_process_port", str(free_port())),
                  timeout=120)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    s1, s2 = tb_scalars(one / "p1" / "tensorboard"), tb_scalars(two / "p2" / "tensorboard")
    for tag in ("train/loss", "val/loss", "val/rmse", "train/loss_step", "lr"):
        a, b = [e.value for e in s1[tag]], [e.value for e in s2[tag]]
        assert len(a) == len(b) and len(a) >= 3, tag
        assert b == pytest.approx(a, rel=RTOL), tag
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        print(f"{tag}: largest relative difference 1 vs 2 processes {worst:.1e}")
    # Same optimizer steps per epoch: the curves are on the same x axis.
    assert [e.step for e in s1["val/rmse"]] == [e.step for e in s2["val/rmse"]]
    # The loss must actually move, or equal curves would prove nothing.
    losses = [e.value for e in s1["train/loss"]]
    assert abs(losses[-1] - losses[0]) > 100 * RTOL * abs(losses[0])


# --------------------------------------------------------------------------------------------------
# FSDP config (the FSDP run itself needs GPUs: see docs/DISTRIBUTED.md)
# --------------------------------------------------------------------------------------------------


def test_fsdp_config_is_read_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from conftest import ROOT

    path = ROOT / "accelerate_configs" / "fsdp.yaml"
    assert path.read_text().startswith("# ") and (
        "accelerate launch --config_file accelerate_configs/fsdp.yaml" in path.read_text()
    )
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.FSDP
    assert cfg.fsdp_config["fsdp_version"] == 2
    # Resumable states are sharded (Accelerate's FSDP format); best.safetensors is gathered separately.
    assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
