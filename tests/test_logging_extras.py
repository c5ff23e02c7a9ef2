"""Optional logging (prediction tables, gradients, wandb.watch, system metrics), the learning
rate, early-stopping events and the speed options, each read back from the TensorBoard events
and from the offline W&B run (``wandb leet inspect --json``)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea

from conftest import DEFAULT_CONFIG, accelerate_launch, free_port, popen_main, run_main, tiny, wandb_records
from train.config import ModelConfig, load_config
from train.data import build_data
from train.optional_logs import (
    gradient_histograms,
    gradient_layers,
    gradient_norms,
    prediction_sample,
    prediction_values,
)
from train.tracking import Histogram
from train.models import build_model

ALL_ON = {
    "logging.wandb.enabled": "true",
    "logging.log_predictions": "true",
    "logging.log_gradients": "true",
    "logging.system_metrics": "true",
    "logging.wandb.watch_model": "true",
    "logging.histograms_every_n_steps": 4,
}


def tensorboard(run_dir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def wandb_history(run_dir: Path) -> list[dict]:
    return [r["history"]["item"] for r in wandb_records(run_dir) if r["type"] == "history"]


def wandb_table(run_dir: Path, row: dict, key: str) -> dict:
    offline = next((run_dir / "wandb").glob("offline-run-*"))
    return json.loads((offline / "files" / row[f"{key}.path"]).read_text())


def tb_text(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


# --------------------------------------------------------------------------------------------------
# Units: what is computed
# --------------------------------------------------------------------------------------------------


def test_gradient_norms_are_per_layer_unscaled_and_add_up_to_the_clipping_norm():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[8, 16], hidden=8))
    model(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
    layers = gradient_layers(model)
    assert len(layers["features.1"]) == 2, "a layer's weight and bias (here BatchNorm's) are one entry"
    norms = gradient_norms(layers)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
    assert norms["grad_norm/total"] == pytest.approx(total, rel=1e-5)
    assert sum(v**2 for k, v in norms.items() if k != "grad_norm/total") == pytest.approx(total**2, rel=1e-5)
    # fp16: gradients carry the loss scale until the optimizer step; the logged values must not.
    hist = gradient_histograms(layers)
    for p in model.parameters():
        p.grad *= 1024.0
    assert gradient_norms(layers, scale=1024.0) == pytest.approx(norms, rel=1e-5)
    scaled = gradient_histograms(layers, scale=1024.0)
    assert all(np.allclose(scaled[k].edges, hist[k].edges, rtol=1e-5) and (scaled[k].counts == hist[k].counts).all()
               for k in hist)


def test_histogram_keeps_every_value_and_survives_constant_and_nonfinite_input():
    h = Histogram.of(torch.tensor([1.0, 2.0, 2.0, 3.0, float("nan")]), bins=4)
    assert (h.num == 4 and h.counts.sum() == 4 and h.min == 1.0 and h.max == 3.0
            and h.sum == 8.0 and h.sum_squares == 18.0)
    c = Histogram.of(torch.full((5,), 7.0))
    assert c.counts.sum() == 5 and c.edges[0] < 7.0 < c.edges[-1]


def test_prediction_values_decades_worst_rows_and_the_fixed_sample():
    class Split:
        paths = None

        def raw(self, i):
            return torch.full((3, 4, 4), i, dtype=torch.uint8)

    true = torch.tensor([1901.0, 1905.0, 1912.0, 1999.0])
    guess = torch.tensor([1903.0, 1905.0, 1900.0, 1999.5])
    mean, std = 1950.0, 40.0
    v = prediction_values("val", Split(), (guess - mean) / std, (true - mean) / std, mean, std, np.array([0, 3]),
                          worst_k=2)
    assert v["val/rmse_by_decade/1900s"] == pytest.approx(math.sqrt(2.0), rel=1e-5)  # errors 2 and 0
    assert v["val/rmse_by_decade/1910s"] == pytest.approx(12.0, rel=1e-5)
    assert v["val/rmse_by_decade/1990s"] == pytest.approx(0.5, rel=1e-5)
    rows = v["val/predictions"].rows
    assert [r[0] for r in rows] == ["val #0", "val #3"] and rows[1][1].shape == (4, 4, 3) and rows[1][1][0, 0, 0] == 3
    assert rows[0][2:] == [1901.0, 1903.0, 2.0]
    worst = v["val/worst_predictions"].text.splitlines()
    assert "| val #2 | 1912.0 | 1900.0 | -12.0 |" == worst[4] and "| val #0 |" in worst[5] and len(worst) == 6
    assert v["val/residual_years"].num == 4
    # The same images every time, chosen from the seed alone.
    assert ((prediction_sample(1000, 32, 7) == prediction_sample(1000, 32, 7)).all()
            and len(set(prediction_sample(1000, 32, 7))) == 32)
    assert len(prediction_sample(5, 32, 7)) == 5


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[8, 16], hidden=8)).eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)
    assert torch.allclose(cl(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)


def test_an_unknown_compile_backend_is_a_config_error(out):
    r = run_main(["--config", DEFAULT_CONFIG,
                  *tiny(out, **{"training.compile": "true", "training.compile_backend": "inductr"})])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("error: training.compile_backend='inductr' is not a torch.compile backend here; choose one of: "
            in r.stderr and "inductor" in r.stderr)
    assert not any(out.iterdir()), "nothing written"


def test_the_old_wandb_keys_point_to_their_new_place():
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="logging.wandb.log_predictions moved to logging.log_predictions"):
        load_config(DEFAULT_CONFIG, ["logging.wandb.log_predictions=true"])


# --------------------------------------------------------------------------------------------------
# One run with every option on, read back from both trackers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_on(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("all_on")
    overrides = tiny(out, **ALL_ON, **{
        "experiment.name": "all",
        "training.epochs": 4,
        "training.tf32": "true",
        "logging.predictions_every_n_epochs": 2,
        # Epoch 1 sets the best; nothing can beat it by 1000 years, so patience 2 stops after epoch 3.
        "training.early_stopping.patience": 2,
        "training.early_stopping.min_delta": 1000,
    })
    r = run_main(["--config", DEFAULT_CONFIG, *overrides])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / "all", r.stdout + r.stderr


def test_gradients_reach_both_trackers_and_are_histogrammed_once(all_on):
    run_dir, _ = all_on
    steps = json.loads((run_dir / "results.json").read_text())["global_step"]  # 3 epochs x 6 steps
    acc = tensorboard(run_dir)
    scalars = acc.Tags()["scalars"]
    layers = sorted(t[len("grad_norm/"):] for t in scalars if t.startswith("grad_norm/") and t != "grad_norm/total")
    assert "features.0" in layers and "head.5" in layers
    # Norms every log_every_n_steps (2), histograms every histograms_every_n_steps (4).
    assert [e.step for e in acc.Scalars("grad_norm/total")] == list(range(2, steps + 1, 2))
    assert [e.step for e in acc.Histograms("grad_hist/features.0")] == list(range(4, steps + 1, 4))
    tb_total = {e.step: e.value for e in acc.Scalars("grad_norm/total")}

    history = wandb_history(run_dir)
    wb_total = {h["_step"]: h["grad_norm/total"] for h in history if "grad_norm/total" in h}
    assert wb_total.keys() == tb_total.keys() and all(
        wb_total[s] == pytest.approx(tb_total[s], rel=1e-6) for s in tb_total
    )
    wb_hist_steps = sorted(h["_step"] for h in history if "grad_hist/features.0.values" in h)
    assert wb_hist_steps == list(range(4, steps + 1, 4))
    # wandb.watch adds parameter histograms; with log_gradients on it must not histogram gradients again.
    keys = {k for h in history for k in h}
    assert any(k.startswith("parameters/") for k in keys)
    assert not any(k.startswith("gradients/") for k in keys)


def test_predictions_reach_both_trackers_for_val_and_test(all_on):
    run_dir, _ = all_on
    results = json.loads((run_dir / "results.json").read_text())
    acc = tensorboard(run_dir)
    # Every 2 epochs and at the last one (early stopping after epoch 3): steps 12 and 18; test at the end.
    val_steps = [e.step for e in acc.Histograms("val/residual_years")]
    assert val_steps == [12, 18]
    assert [e.step for e in acc.Histograms("test/residual_years")] == [18]
    assert acc.Histograms("val/residual_years")[-1].histogram_value.num == 70
    worst = tb_text(acc, "val/worst_predictions")
    assert [s for s, _ in worst] == [12, 18] and "| image | true | predicted | error |" in worst[-1][1]
    decade_tags = [t for t in acc.Tags()["scalars"] if t.startswith("test/rmse_by_decade/")]
    assert decade_tags and all(re.fullmatch(r"test/rmse_by_decade/\d{4}s", t) for t in decade_tags)

    history = wandb_history(run_dir)
    rows = [h for h in history if "val/predictions._type" in h]
    assert [h["_step"] for h in rows] == [12, 18] and all(h["val/predictions._type"] == "table-file" for h in rows)
    tables = [wandb_table(run_dir, h, "val/predictions") for h in rows]
    assert tables[0]["columns"] == ["image_id", "image", "true_year", "pred_year", "abs_error_years"]
    ids = [[r[0] for r in t["data"]] for t in tables]
    assert ids[0] == ids[1] and len(ids[0]) == 32, "the same images every time"
    # The thumbnails travel in a run_table artifact per logged table (W&B's way of storing table media).
    arts = [r["artifact"] for r in wandb_records(run_dir)
            if r["type"] == "artifact" and r["artifact"]["type"] == "run_table"]
    val_arts = [a["manifest"]["contents"] for a in arts
                if any(c["path"] == "val/predictions.table.json" for c in a["manifest"]["contents"])]
    assert len(val_arts) == 2 and sum(c["path"].startswith("media/images/") for c in val_arts[0]) == 32
    staged = next(c["local_path"] for c in val_arts[0] if c["path"] == "val/predictions.table.json")
    assert all(r[1]["_type"] == "image-file" for r in json.loads(Path(staged).read_text())["data"])
    assert any(r[3] != s[3] for r, s in zip(tables[0]["data"], tables[1]["data"])), "the predictions moved"
    # RMSE by decade adds back up to the test RMSE over the whole split.
    test_row = next(h for h in history if "test/rmse_by_decade._type" in h)
    decades = wandb_table(run_dir, test_row, "test/rmse_by_decade")["data"]
    n = sum(d[1] for d in decades)
    assert n == results["test_samples"]
    assert math.sqrt(sum(d[1] * d[2] ** 2 for d in decades) / n) == pytest.approx(results["test/rmse"], rel=1e-4)
    assert next(h for h in history if "test/predictions._type" in h)["_step"] == 18


def test_system_metrics_lr_groups_and_early_stopping_events(all_on):
    run_dir, console = all_on
    acc = tensorboard(run_dir)
    scalars = acc.Tags()["scalars"]
    assert ([e.step for e in acc.Scalars("system/rss_gb")] == [6, 12, 18]
            and acc.Scalars("system/rss_gb")[0].value > 0.05)
    assert "system/cpu_percent" in scalars
    history = wandb_history(run_dir)
    assert not any(k.startswith("system/") for h in history for k in h), "W&B records its own system metrics"
    # The learning rate, in both trackers: one curve, since both param groups share it (lr/<group>
    # would be copies; they are logged only when the groups' lrs differ, tests/test_tensorboard_view.py).
    assert len(acc.Scalars("lr")) > 3 and sum("lr" in h for h in history) > 3
    assert not any(t.startswith("lr/") for t in scalars)
    assert not any(k.startswith("lr/") for h in history for k in h)
    # Early stopping: the count each epoch, the event once, in both trackers and on the console.
    assert [e.value for e in acc.Scalars("early_stopping/patience_left")] == [2, 1, 0]
    assert [(e.step, e.value) for e in acc.Scalars("early_stopping/stopped_epoch")] == [(18, 3)]
    reason = tb_text(acc, "early_stopping/reason")
    assert len(reason) == 1 and "did not improve by more than 1000" in reason[0][1]
    assert any(h.get("early_stopping/stopped_epoch") == 3 for h in history)
    assert "Early stopping: no improvement for 1/2 epochs" in console
    assert "Early stopping at epoch 3: val/rmse did not improve" in console
    # Speed/threads lines: the thread count is stated, tf32 on the CPU is a no-op that says so.
    assert "CPU threads per process:" in console and "training.tf32 has no effect on the CPU" in console


@pytest.mark.slow
def test_watch_model_alone_histograms_gradients_and_parameters(out):
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **{
        "experiment.name": "watch", "training.epochs": 1, "logging.wandb.enabled": "true",
        "logging.wandb.watch_model": "true", "logging.wandb.watch_log_freq": 2,
    })])
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {k for h in wandb_history(out / "watch") for k in h}
    assert any(k.startswith("gradients/") for k in keys) and any(k.startswith("parameters/") for k in keys)
    assert not any(k.startswith(("grad_hist/", "grad_norm/")) for k in keys)


@pytest.mark.slow
def test_two_processes_log_predictions_in_dataset_order(out):
    """With 2 processes the gathered predictions must still line up with the images they belong to."""
    overrides = tiny(out, **{"experiment.name": "two", "training.epochs": 1, "logging.wandb.enabled": "true",
                             "logging.log_predictions": "true", "model.norm": "group"})
    r = run_main(["--config", DEFAULT_CONFIG, *overrides],
                 launcher=accelerate_launch("--multi_gpu", "--num_processes", "2",
                                            "--main_process_port", str(free_port())),
                 timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = out / "two"
    data = build_data(load_config(DEFAULT_CONFIG, overrides))
    row = next(h for h in wandb_history(run_dir) if "val/predictions._type" in h)
    table = wandb_table(run_dir, row, "val/predictions")["data"]
    for image_id, _, true_year, *_ in table:
        i = int(image_id.split("#")[1])
        assert true_year == pytest.approx(float(data.val.years[i]), abs=0.006)
    assert tensorboard(run_dir).Histograms("val/residual_years")[0].histogram_value.num == 70


# --------------------------------------------------------------------------------------------------
# Speed options
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_does_not_recompile_per_epoch_and_keeps_checkpoint_keys(out):
    """A smaller last batch and the switch to eval compile a few graphs in epoch 1; later epochs reuse them."""
    # aot_eager: dynamo's guards and recompilations without waiting for a C++ compiler.
    proc = popen_main(["--config", DEFAULT_CONFIG, *tiny(out, **{
        "experiment.name": "c", "training.epochs": 3, "training.compile": "true",
        "training.compile_backend": "aot_eager", "training.channels_last": "true", "data.synthetic.num_train": 200,
    })], launcher=[sys.executable], TORCH_LOGS="recompiles")
    text = proc.communicate(timeout=240)[0]  # stdout and stderr in one stream, in order
    assert proc.returncode == 0, text[-3000:]
    first_epoch_done = text.index("Epoch [1/3] Results")
    assert 1 <= text[:first_epoch_done].count("Recompiling function") <= 4, text[:first_epoch_done][-3000:]
    assert text[first_epoch_done:].count("Recompiling function") == 0, (
        "epochs 2 and 3 (and the test split) reuse the graphs"
    )
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir = out / "c"
    best = run_dir / "checkpoints" / "best.safetensors"
    weights = load_file(str(best))
    assert "features.0.weight" in weights and not any("_orig_mod" in k for k in weights)
    # The compiled, channels-last run's numbers are the plain model's: best.safetensors loaded into an
    # uncompiled, contiguous model reproduces the recorded test RMSE (a test metric computed or scaled
    # wrongly, or a file that holds other weights than the test pass used, would not) ...
    results = json.loads((run_dir / "results.json").read_text())
    with safe_open(str(best), "pt") as f:
        meta = f.metadata()
    model = build_model(ModelConfig.model_validate(json.loads(meta["model_config"])))
    model.load_state_dict(weights)
    model.eval()
    data = build_data(load_config(run_dir / "config.yaml"))
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        pred = model(x).double() * float(meta["target_std"]) + float(meta["target_mean"])
    rmse = math.sqrt(((pred - data.test.years) ** 2).mean().item())
    assert rmse == pytest.approx(results["test/rmse"], rel=1e-4)
    # ... and it learned: it beats always predicting the train mean date, computed here from the data
    # (47.6 years against the model's 44.0 when this was written; a model that learned nothing, e.g. one
    # whose optimizer steps are lost under compile, or stale epoch-1 weights, scores about 48).
    mean_rmse = math.sqrt(((data.test.years.double() - data.train.years.double().mean()) ** 2).mean().item())
    assert results["baseline/mean_rmse"] == pytest.approx(mean_rmse, rel=1e-6)
    assert results["test/rmse"] < mean_rmse, results
