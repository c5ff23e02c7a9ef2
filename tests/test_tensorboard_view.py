"""TensorBoard as a person sees it: the CUSTOM SCALARS layout, a description with the unit on every
scalar, a HPARAMS table of the keys runs are compared by, the full config as text, and one lr curve
while the parameter groups share their lr. Read back from the event file itself, record by record."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import DEFAULT_CONFIG, run_main, tiny
from train.config import load_config
from train.optim import lr_tags, lr_values
from train.tracking import HPARAM_KEYS, HPARAM_MODEL_KEYS, hparams_of, scalar_description

CHARTS = {
    "Loss: train vs val": ["train/loss", "val/loss"],
    "RMSE (years): train vs val": ["train/rmse", "val/rmse"],
    "MAE (years)": ["val/mae", "test/mae"],
    "Within 5 years / right decade (share)": ["val/acc_5y", "val/acc_decade"],
    "Learning rate": ["lr"],  # both parameter groups share the lr in this config
    "Throughput (samples/s)": ["samples_per_s"],
    "Epoch time (s)": ["epoch_time_s"],
}
# The unit each scalar of the tiny run must state, by the first pattern its tag matches.
UNITS = {
    r"(rmse|mae)$|/mae_by_decade/|/width_\d+$": "in years",
    r"acc_5y$|acc_decade$|/coverage_\d+$": "a fraction (0-1)",
    r"loss": "standardized units",
    r"^lr$": "without a unit",
    r"^epoch_time_s$": "in seconds",
    r"^samples_per_s$": "in samples/s",
    r"^epoch$|^early_stopping/": "epochs",
}
CURATED = {
    "model.name", "model.head", "model.channels", "model.hidden", "model.norm", "model.dropout",
    "training.optimizer.name", "training.optimizer.lr", "training.optimizer.weight_decay", "data.batch_size",
    "training.scheduler.name", "training.epochs", "training.loss", "data.augment.hflip", "data.augment.crop_scale_min",
    "data.augment.brightness", "experiment.seed", "training.mixed_precision",
}


def _events(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    return list(LegacyEventFileLoader(str(files[0])).Load())  # as written, not migrated


def _values(events: list, tag: str | None = None) -> list:
    return [v for e in events if e.HasField("summary") for v in e.summary.value if tag is None or v.tag == tag]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("tb_view")
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **{"experiment.name": "tb"})])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out / "tb", _events(out / "tb")


def _scalar_tags(events: list) -> set[str]:
    return {v.tag for v in _values(events) if v.HasField("simple_value")}


def test_the_custom_scalars_layout_names_only_tags_the_run_logs(run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, events = run
    written = _values(events, "custom_scalars__config__")
    assert len(written) == 1, "written once, at the start"
    assert written[0].metadata.plugin_data.plugin_name == "custom_scalars"
    layout = layout_pb2.Layout.FromString(written[0].tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert list(charts) == list(CHARTS)
    tags = _scalar_tags(events)
    for title, regexes in charts.items():
        # Each entry is a regular expression (matched at the start of a tag, as TensorBoard does);
        # it must pick exactly the one tag it is for, and that tag must be in the run.
        matched = [[t for t in sorted(tags) if re.match(rx, t)] for rx in regexes]
        assert matched == [[t] for t in CHARTS[title]], (title, regexes, matched)


def test_hparams_are_the_curated_set_and_the_full_config_is_text(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, events = run
    start = _values(events, "_hparams_/session_start_info")
    assert len(start) == 1
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start[0].metadata.plugin_data.content)
    keys = set(hparams.session_start_info.hparams)
    assert keys == CURATED
    assert not any(k.startswith(("checkpoint.", "meta.", "logging.")) for k in keys)
    assert {k for k in keys if k.startswith("data.augment.")} == {
        "data.augment.hflip", "data.augment.crop_scale_min", "data.augment.brightness"}
    values = hparams.session_start_info.hparams
    assert values["model.channels"].string_value == "[8, 16]" and values["training.epochs"].number_value == 2
    assert values["training.mixed_precision"].string_value == "no", "the precision the run used, not null"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        _values(events, "_hparams_/experiment")[0].metadata.plugin_data.content).experiment
    assert {h.name for h in experiment.hparam_infos} == CURATED
    assert [m.name.tag for m in experiment.metric_infos] == ["val/rmse", "val/loss", "test/rmse", "test/mae"]
    # The whole config, once, as a code block in the TEXT tab: config.yaml as written.
    text = _values(events, "config/text_summary")
    assert len(text) == 1
    body = text[0].tensor.string_val[0].decode()
    assert body == "\n".join("    " + line for line in (run_dir / "config.yaml").read_text().splitlines())
    assert "keep_last: 2" in body and "git_commit" in body


def test_every_scalar_says_what_it_is_and_its_unit_once(run):
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR

    _, events = run
    tags = _scalar_tags(events)
    assert {"train/loss_step", "lr", "epoch", "best/rmse", "early_stopping/patience_left", "test/mae"} <= tags
    for tag in tags:
        with_metadata = [v for v in _values(events, tag) if v.HasField("metadata")]
        assert len(with_metadata) == 1, f"{tag}: the description rides on the first value only"
        md = with_metadata[0].metadata
        first = next(v for v in _values(events, tag))
        assert first.HasField("metadata"), tag
        assert md.summary_description.startswith(f"{tag}: "), (tag, md.summary_description)
        # A data class: TensorBoard's fast (Rust) loader otherwise replaces a simple_value's metadata.
        assert md.data_class == DATA_CLASS_SCALAR and md.plugin_data.plugin_name == "scalars"
        unit = next(u for pattern, u in UNITS.items() if re.search(pattern, tag))
        assert unit in md.summary_description, (tag, md.summary_description)
    val_rmse = next(v for v in _values(events, "val/rmse") if v.HasField("metadata")).metadata
    assert val_rmse.summary_description == ("val/rmse: root mean squared error of the predicted date on the "
                                            "validation split, in years")


def test_one_lr_curve_while_the_groups_share_it(run):
    _, events = run
    tags = _scalar_tags(events)
    assert "lr" in tags and not any(t.startswith("lr/") for t in tags), sorted(tags)
    assert lr_tags(load_config(DEFAULT_CONFIG)) == ["lr"]


def test_lr_per_group_when_the_groups_differ():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    same = torch.optim.AdamW([{"name": "decay", "params": [w]}, {"name": "no_decay", "params": [b]}], lr=1e-3)
    assert lr_values(same, [1e-3, 1e-3]) == {"lr": 1e-3}
    differ = torch.optim.AdamW([{"name": "decay", "params": [w], "lr": 1e-3},
                                {"name": "no_decay", "params": [b], "lr": 1e-4}])
    assert lr_values(differ, [1e-3, 1e-4]) == {"lr": 1e-3, "lr/decay": 1e-3, "lr/no_decay": 1e-4}
    # A warmup from 0 gives both groups lr 0 at first: they still differ, the curves must not drop out.
    torch.optim.lr_scheduler.LambdaLR(differ, lambda step: 0.0)
    assert lr_values(differ, [g["lr"] for g in differ.param_groups]) == {"lr": 0.0, "lr/decay": 0.0,
                                                                        "lr/no_decay": 0.0}


def test_descriptions_of_the_optional_tags_and_the_curated_keys_of_a_future_head():
    expected = {
        "grad_norm/features.0": "without a unit", "grad_norm/total": "without a unit", "system/rss_gb": "in GiB",
        "system/cpu_percent": "percent of one core", "system/cuda_peak_allocated_gb": "in GiB",
        "val/rmse_by_decade/1950s": "in years", "test/rmse_by_decade/1880s": "in years",
        "lr/decay": "without a unit", "best/loss": "without a unit", "best/mae": "in years",
        "train/skipped_steps": "count of steps", "data/skipped_rows": "count of rows",
        "early_stopping/stopped_epoch": "epoch number",
    }
    for tag, unit in expected.items():
        text = scalar_description(tag)
        assert text and text.startswith(f"{tag}: ") and unit in text, (tag, text)
    assert "Huber loss" in scalar_description("val/loss", loss="huber")
    assert scalar_description("something/new") is None
    flat = {k: 1 for k in (*HPARAM_MODEL_KEYS, *HPARAM_KEYS, "checkpoint.keep_last", "data.augment.other")}
    flat.update({"model.head": "mlp", "training.mixed_precision": None})
    picked = hparams_of(flat, mixed_precision="bf16")
    assert list(picked)[:6] == [*HPARAM_MODEL_KEYS, "model.head"]
    assert picked["training.mixed_precision"] == "bf16"
    assert "checkpoint.keep_last" not in picked and "data.augment.other" not in picked
