"""Fine-tuning controls for every model family: a frozen backbone (weights and BatchNorm statistics
bit-unchanged, resumable across the boundary, 1 and 2 processes), the backbone's lr ratio and the four
named parameter groups, and the EMA of the weights (exact resume; the best checkpoint holds it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEFAULT_CONFIG, accelerate_launch, free_port, run_main, tiny
from train.config import Config, ModelConfig, load_config
from train.ema import WeightEMA
from train.errors import UserError
from train.finetune import drop_frozen_grads, ema_weights, make_ema, set_backbone_frozen
from train.models import build_model, is_head_parameter
from train.optim import GROUPS, build_optimizer, group_lrs, lr_tags
from train.state import check_state_fits

SMALL = ModelConfig(channels=[8, 16], hidden=16)


def _cfg(**training) -> Config:
    return Config(model=SMALL, training=training)


# --------------------------------------------------------------------------------------------------
# Parameter groups and the backbone's lr
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mok_cnn", "resnet"])
def test_four_named_groups_split_head_from_backbone_and_decay_from_no_decay(name):
    cfg = Config(model=ModelConfig(name=name, channels=[8, 16], hidden=16),
                 training={"optimizer": {"lr": 1.0e-3, "backbone_lr_ratio": 0.1, "weight_decay": 0.05}})
    model = build_model(cfg.model)
    opt = build_optimizer(cfg, model)
    assert [g["name"] for g in opt.param_groups] == list(GROUPS)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head/decay"]["lr"] == 1.0e-3 and by_name["backbone/decay"]["lr"] == pytest.approx(1.0e-4)
    assert by_name["head/decay"]["weight_decay"] == 0.05 and by_name["backbone/no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        part = g["name"].split("/")[0]
        assert all(is_head_parameter(names[id(p)]) == (part == "head") for p in g["params"])
        assert all((p.ndim >= 2) == g["name"].endswith("/decay") for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert lr_tags(cfg) == [f"lr/{g}" for g in GROUPS]
    assert lr_tags(Config(model=cfg.model)) == ["lr"]  # ratio 1: one curve


def test_schedulers_keep_the_ratio():
    from train.optim import build_scheduler

    for scheduler in ("cosine", "step", "plateau"):
        cfg = _cfg(optimizer={"backbone_lr_ratio": 0.25}, scheduler={"name": scheduler, "step_epochs": 1})
        opt = build_optimizer(cfg, build_model(cfg.model))
        sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=4)
        for _ in range(3):
            opt.step()
            sched.step(1.0) if scheduler == "plateau" else sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["backbone/decay"] == pytest.approx(0.25 * lrs["head/decay"]), scheduler
    assert group_lrs(cfg)["backbone/no_decay"] == pytest.approx(0.25 * cfg.training.optimizer.lr)


def test_a_state_from_before_the_backbone_groups_is_refused_in_one_line(tmp_path):
    """States written when the optimizer had two groups (decay, no_decay) cannot be continued with four."""
    model = build_model(SMALL)
    old = torch.optim.AdamW([{"name": "decay", "params": [p for p in model.parameters() if p.ndim >= 2]},
                             {"name": "no_decay", "params": [p for p in model.parameters() if p.ndim < 2]}])
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    old.step()
    torch.save(old.state_dict(), tmp_path / "optimizer.bin")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"parameter groups of \[\d+, \d+\] vs \[\d+, \d+, \d+, \d+\].*model.init_from"):
        check_state_fits(SimpleNamespace(resume_dir=tmp_path), model, build_optimizer(_cfg(), model))


# --------------------------------------------------------------------------------------------------
# Freezing, in this process
# --------------------------------------------------------------------------------------------------


def _train_steps(model, opt, frozen: bool, steps: int = 3) -> None:
    model.train()
    set_backbone_frozen(model, frozen)
    for _ in range(steps):
        model(torch.randn(8, 3, 16, 16)).pow(2).mean().backward()
        drop_frozen_grads(model, frozen)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_backbone_weights_and_batchnorm_statistics_do_not_move(optimizer):
    cfg = _cfg(optimizer={"name": optimizer, "weight_decay": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(cfg, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, frozen=True)
    after = model.state_dict()
    backbone = [k for k in before if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after[k]) for k in backbone), "backbone (weights, BN buffers) bit-unchanged"
    assert not torch.equal(before["head.2.weight"], after["head.2.weight"]), "the head trains"
    assert model.features.training is False and model.head.training is True
    # The optimizer built no state for the frozen parameters (nothing stale to resume from).
    heads = {id(p) for n, p in model.named_parameters() if n.startswith("head.")}
    assert {id(p) for p in opt.state} <= heads
    _train_steps(model, opt, frozen=False)
    after = model.state_dict()
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])
    assert model.features.training is True
    assert all(p.requires_grad for p in model.parameters())


def test_unfreezing_leaves_parameters_that_were_never_trained_off():
    model = build_model(SMALL)
    never = model.features[0].weight
    never.requires_grad_(False)
    model.train()
    set_backbone_frozen(model, True)
    set_backbone_frozen(model, True)  # every frozen epoch calls it again
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    set_backbone_frozen(model, False)
    assert never.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not never)


# --------------------------------------------------------------------------------------------------
# The EMA, in this process
# --------------------------------------------------------------------------------------------------


def test_ema_follows_the_warmed_up_decay_and_swaps_back_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9, start_epoch=2)
    ema.update(model, 1)
    assert not ema.active, "start_epoch: no update before it"
    w = model[0].weight
    values = []
    for step in range(4):
        with torch.no_grad():
            w.add_(1.0)
        values.append(w.detach().clone())
        ema.update(model, 2)
    # First update: a copy; then d = min(0.9, (1 + n) / (10 + n)) after n updates.
    expected = values[0]
    for n, v in enumerate(values[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * v
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema_weights(ema, model):
        assert torch.allclose(model[0].weight, expected, atol=1e-6)
        assert torch.equal(model[1].num_batches_tracked, live["1.num_batches_tracked"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in live.items()), "live weights restored bit for bit"
    with pytest.raises(RuntimeError), ema_weights(ema, model):
        raise RuntimeError("validation failed")
    assert torch.equal(model[0].weight, live["0.weight"]), "restored after an exception too"


def test_ema_state_round_trip_and_switching_on_or_off_at_resume():
    model = build_model(SMALL)
    ema = WeightEMA(model, 0.99)
    for _ in range(3):
        ema.update(model, 1)
    state = ema.state_dict()
    again = WeightEMA(model, 0.99)
    again.load_state_dict(state)
    assert again.updates == 3 and all(torch.equal(a, b) for a, b in zip(again._shadow, ema._shadow))
    off = make_ema(_cfg(), model)  # ema.decay null: inactive, but loadable and saveable
    off.load_state_dict(state)
    assert not off.active and off.state_dict()["shadow"] == {}
    turned_on = WeightEMA(model, 0.99)
    turned_on.load_state_dict(off.state_dict())
    assert turned_on.updates == 0  # the average starts at the resume
    other = WeightEMA(build_model(ModelConfig(channels=[8], hidden=16)), 0.99)
    with pytest.raises(UserError, match="the saved EMA of the weights does not fit this model"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# Runs: freeze + EMA, resumed across the freeze boundary; 2 processes
# --------------------------------------------------------------------------------------------------

# 192 images / batch 32 = 6 steps per epoch; states every 2 steps; dropout on, one thread.
RUN = {"training.epochs": 2, "training.freeze_backbone_epochs": 1, "training.ema.decay": 0.9,
       "training.optimizer.backbone_lr_ratio": 0.5, "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 20,
       "training.early_stopping.enabled": "false", "training.num_threads": 1, "model.dropout": 0.3}


def _init_file(tmp_path: Path) -> Path:
    """Known starting weights (model.init_from), so "unchanged" is checked against exact values."""
    torch.manual_seed(7)
    path = tmp_path / "init.safetensors"
    save_file(build_model(load_config(DEFAULT_CONFIG, tiny(tmp_path)).model).state_dict(), str(path))
    return path


def _state(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / "state" / f"step_{step:07d}"


def _backbone(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ema_shadow(state_dir: Path) -> dict:
    return torch.load(state_dir / "custom_checkpoint_0.pkl", weights_only=False)["shadow"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("freeze")
    init = _init_file(tmp)
    out = tmp / "runs"
    args = ["--config", DEFAULT_CONFIG, *tiny(out, **{**RUN, "experiment.name": "f", "model.init_from": str(init)})]
    r = run_main(args)
    assert r.returncode == 0, r.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, init=load_file(str(init)), run_dir=out / "f", args=args)


@pytest.mark.slow
def test_the_backbone_is_bit_unchanged_during_the_frozen_epoch_then_trains(straight):
    epoch1 = load_file(str(_state(straight.run_dir, 6) / "model.safetensors"))
    epoch2 = load_file(str(_state(straight.run_dir, 12) / "model.safetensors"))
    assert _same(_backbone(epoch1), _backbone(straight.init)), "weights and BatchNorm statistics unchanged"
    assert not torch.equal(epoch1["head.2.weight"], straight.init["head.2.weight"])
    changed = [k for k in _backbone(epoch2) if not torch.equal(epoch2[k], straight.init[k])]
    assert "features.0.weight" in changed and "features.1.running_mean" in changed


@pytest.mark.slow
def test_resume_across_the_freeze_boundary_with_ema_is_bit_identical(straight):
    # A copy of the run resumed from its mid-epoch state at step 4 (frozen, EMA running) is the same
    # as a run killed there: it crosses into the unfrozen epoch and must end where the straight run did.
    copy_out = straight.tmp / "copy"
    shutil.copytree(straight.run_dir, copy_out / "f")
    args = [a.replace(str(straight.run_dir.parent), str(copy_out)) for a in straight.args]
    r = run_main(args + ["--resume", str(_state(copy_out / "f", 4))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming run 'f'" in r.stdout
    ends = [_state(straight.run_dir, 12), _state(copy_out / "f", 12)]
    assert _same(*(load_file(str(d / "model.safetensors")) for d in ends))
    assert torch.load(ends[0] / "optimizer.bin", weights_only=True)["state"].keys() == torch.load(
        ends[1] / "optimizer.bin", weights_only=True)["state"].keys()
    assert _same(*(_ema_shadow(d) for d in ends))
    assert _same(load_file(str(straight.run_dir / "checkpoints/best.safetensors")),
                 load_file(str(copy_out / "f/checkpoints/best.safetensors")))
    results = [json.loads((d / "results.json").read_text()) for d in (straight.run_dir, copy_out / "f")]
    assert results[0]["test/mae"] == results[1]["test/mae"]


@pytest.mark.slow
def test_the_best_checkpoint_holds_the_ema_weights(straight):
    results = json.loads((straight.run_dir / "results.json").read_text())
    state = _state(straight.run_dir, 6 * results["best_epoch"])  # the epoch-end state of the best epoch
    best = load_file(str(straight.run_dir / "checkpoints/best.safetensors"))
    shadow, live = _ema_shadow(state), load_file(str(state / "model.safetensors"))
    assert _same({k: best[k] for k in shadow}, shadow), "best.safetensors = the EMA at the best epoch"
    assert not _same(best, live), "not the live weights"
    assert all(torch.equal(best[k], live[k]) for k in best if k not in shadow)  # num_batches_tracked


@pytest.mark.slow
def test_two_processes_freeze_without_breaking_ddp(tmp_path):
    init = _init_file(tmp_path)
    out = tmp_path / "runs"
    extra = {**RUN, "experiment.name": "f2", "model.init_from": str(init), "data.batch_size": 16,
             "checkpoint.every_n_steps": "null"}
    launcher = accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()))
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)], launcher=launcher, timeout=240,
                 ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    epoch1 = load_file(str(_state(out / "f2", 6) / "model.safetensors"))
    assert _same(_backbone(epoch1), _backbone(load_file(str(init))))
    epoch2 = load_file(str(_state(out / "f2", 12) / "model.safetensors"))
    assert not torch.equal(epoch2["features.0.weight"], epoch1["features.0.weight"])
