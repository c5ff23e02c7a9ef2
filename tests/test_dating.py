"""Dating the way the field does: the distribution head, the field's metrics, conformal date intervals,
the synthetic floor, and predict's interval columns (train/heads.py, metrics.py, calibration.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import (
    DEFAULT_CONFIG, ROOT, accelerate_launch, env, free_port, run_main, tiny, wandb_records, wandb_summary,
)
from train.calibration import calibrate, conformal_quantile, coverage_report, intervals, quantile_levels
from train.checkpoints import CheckpointMeta, checkpoint_metadata, read_checkpoint
from train.config import ModelConfig
from train.heads import DistributionHead, YearBins, expected_year, head_from_meta, soft_labels, year_quantiles
from train.metrics import by_decade, date_metrics
from train.synthetic import apparent_years, floor_errors, make_synthetic, oracle_predictions

BINS = YearBins.for_years(1850.0, 2020.0, width=1.0, sigma=2.0)


def test_bins_span_the_train_range_with_a_margin():
    assert BINS.start <= 1850.0 - 6.0 and BINS.start + BINS.width * BINS.count >= 2020.0 + 6.0
    wide = YearBins.for_years(1900.0, 1950.0, width=5.0, sigma=2.0)
    assert wide.width == 5.0 and wide.start % 5 == 0 and wide.count == math.ceil((1960 - wide.start) / 5)


@pytest.mark.parametrize("year", [1850.3, 1937.4, 2019.6, 1900.5])
def test_soft_labels_sum_to_one_and_peak_at_the_true_bin(year):
    labels = soft_labels(torch.tensor([year]), BINS, sigma=2.0)[0]
    assert labels.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert labels.argmax().item() == int((year - BINS.start) // BINS.width)
    assert (labels >= 0).all()


def test_expected_value_of_a_one_hot_distribution_is_the_bin_centre():
    logits = torch.full((2, BINS.count), -1e4)
    logits[0, 10], logits[1, 100] = 0.0, 0.0
    centres = expected_year(logits, BINS)
    assert centres.tolist() == pytest.approx([BINS.start + 10.5, BINS.start + 100.5])
    q = year_quantiles(logits, BINS, [0.1, 0.5, 0.9])
    # All mass in one bin, spread uniformly over it: quantile tau lies tau of the way through the bin.
    assert q[0].tolist() == pytest.approx([BINS.start + 10.1, BINS.start + 10.5, BINS.start + 10.9], abs=1e-4)


def test_the_distribution_head_recovers_a_gaussian_date():
    head = DistributionHead(BINS, 2.0, target_mean=1935.0, target_std=50.0)
    logits = torch.log(soft_labels(torch.tensor([1960.0]), BINS, sigma=5.0).clamp_min(1e-30))
    assert head.point(logits).item() * 50.0 + 1935.0 == pytest.approx(1960.0, abs=0.05)
    low, mid, high = year_quantiles(logits, BINS, [0.1, 0.5, 0.9])[0].tolist()
    assert mid == pytest.approx(1960.0, abs=0.1) and high - low == pytest.approx(2 * 1.2816 * 5.0, abs=0.3)
    # The loss is smallest for the label the head was trained towards.
    y = torch.tensor([(1960.0 - 1935.0) / 50.0])
    assert head.per_sample(logits, y).item() < head.per_sample(logits, y + 0.5).item()


def test_bins_survive_a_checkpoint_round_trip(tmp_path):
    meta = checkpoint_metadata(model_cfg=ModelConfig(head="distribution"), epoch=1, global_step=3, monitor="val/rmse",
                               value=9.5, target_mean=1935.0, target_std=49.0, pixel_mean=[0.5] * 3,
                               pixel_std=[0.2] * 3, image_size=32, year_bins=BINS.as_meta())
    path = tmp_path / "best.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    _, back = read_checkpoint(path)
    assert back.out_dim == BINS.count
    assert head_from_meta(back).bins == BINS


def test_field_metrics_on_hand_computed_examples():
    true = np.array([1901.0, 1915.0, 1938.0, 1939.0, 2000.0])
    pred = np.array([1906.0, 1909.0, 1941.0, 1951.0, 1999.0])  # errors 5, -6, 3, 12, -1
    m = date_metrics(true, pred)
    assert m["mae"] == pytest.approx((5 + 6 + 3 + 12 + 1) / 5)
    assert m["rmse"] == pytest.approx(math.sqrt((25 + 36 + 9 + 144 + 1) / 5))
    assert m["acc_5y"] == pytest.approx(3 / 5)  # |error| <= 5: 5 (boundary counts), 3, 1
    # decades true->predicted: 1900->1900 (right), 1910->1900, 1930->1940, 1930->1950, 2000->1990
    assert m["acc_decade"] == pytest.approx(1 / 5)
    table = by_decade(true, pred)
    assert list(table) == [1900, 1910, 1930, 2000]
    assert table[1930] == {"n": 2, "rmse": pytest.approx(math.sqrt((9 + 144) / 2)), "mae": pytest.approx(7.5)}


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 11, dtype=float)  # n = 10
    assert conformal_quantile(scores, 0.8) == 9.0  # ceil(11 * 0.8) = 9th smallest
    assert conformal_quantile(scores, 0.9) == 10.0  # ceil(11 * 0.9) = 10th
    assert conformal_quantile(scores, 0.95) is None  # ceil(11 * 0.95) = 11 > n: not enough images


def _check_intervals(cal, point, q, true):
    for level, (low, high) in intervals(cal, point, q).items():
        assert (high - low > 0).all() and (low <= point).all() and (point <= high).all()
    report = coverage_report(cal, true, point, q, prefix="")
    for level in cal["levels"]:
        pct = round(level * 100)
        assert abs(report[f"coverage_{pct}"] - level) <= 0.03, report
    return report


def test_regression_intervals_cover_at_the_nominal_level():
    rng = np.random.default_rng(0)
    true = rng.uniform(1850, 2020, 6000)
    point = true + rng.normal(0, 10, 6000)  # a predictor with known noise
    cal, skipped = calibrate([0.8, 0.9], true[:2000], point[:2000], None)
    assert not skipped and cal["method"] == "abs_residual"
    assert cal["q"] == pytest.approx([1.2816 * 10, 1.6449 * 10], rel=0.06)
    report = _check_intervals(cal, point[2000:], None, true[2000:])
    assert report["width_80"] == pytest.approx(2 * cal["q"][0])


def test_distribution_intervals_adapt_their_width_and_cover():
    """Heteroscedastic noise: a well-specified predicted distribution gives narrow intervals where the
    noise is small and wide ones where it is large, and CQR keeps the coverage."""
    rng = np.random.default_rng(1)
    n = 6000
    true = rng.uniform(1870, 2000, n)
    sd = np.where(rng.random(n) < 0.5, 3.0, 15.0)
    centre = true + rng.normal(0, sd)
    taus = quantile_levels([0.8, 0.9])
    # Build each image's predicted distribution as a Gaussian of its own sd around its centre.
    z = (BINS.centres(dtype=torch.float64)[None] - torch.tensor(centre)[:, None]) / torch.tensor(sd)[:, None]
    logits = (-0.5 * z**2).float()
    q = year_quantiles(logits, BINS, taus).double().numpy()
    point = expected_year(logits, BINS).double().numpy()
    cal, _ = calibrate([0.8, 0.9], true[:2000], point[:2000], q[:2000])
    assert cal["method"] == "cqr"
    _check_intervals(cal, point[2000:], q[2000:], true[2000:])
    low, high = intervals(cal, point[2000:], q[2000:])[0.8]
    width = high - low
    assert width[sd[2000:] == 15.0].mean() > 3 * width[sd[2000:] == 3.0].mean()


def test_too_few_calibration_images_skip_that_level():
    cal, skipped = calibrate([0.8, 0.95], np.arange(10.0), np.arange(10.0) + 1, None)
    assert skipped == [0.95] and cal["levels"] == [0.8]


def test_the_floor_is_the_oracle_on_the_apparent_age():
    images_years = make_synthetic(300, 8, 5)[1]
    years, apparent = apparent_years(300, 5, 1850.0, 2020.0)
    assert np.array_equal(years, images_years)  # the same draws as the generator
    mean, median = oracle_predictions(np.array([1935.0, 2100.0]), 1850.0, 2020.0)
    assert mean[0] == pytest.approx(1935.0, abs=0.01)  # far from the ends: the posterior is the Gaussian
    assert 1995 < mean[1] < 2020  # clipped at 2020: only "at least 2020" is known
    floor = floor_errors(8000, 1000, 2000, 42, 1850.0, 2020.0)
    # A 10-year Gaussian jitter, slightly less where the prior's ends cut it.
    assert 9.0 < floor["floor/rmse"] < 10.0 and 7.0 < floor["floor/mae"] < 8.0


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

DIST = {"model.head": "distribution", "model.bin_years": 2.0, "data.synthetic.num_val": 37,
        "data.eval_batch_size": 8}


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **{**DIST, "experiment.name": "d",
                                                               "logging.wandb.enabled": "true"})])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "within 5 years:" in r.stdout and "Date intervals (calibrated on 37 val images)" in r.stdout
    return out / "d"


def test_a_distribution_run_reports_everywhere(dist_run):
    results = json.loads((dist_run / "results.json").read_text())
    for key in ("test/mae", "test/rmse", "test/acc_5y", "test/acc_decade", "test/coverage_80", "test/width_90",
                "test_gray/mae", "floor/rmse", "floor/mae", "test/mae_by_decade/1900s"):
        assert key in results and math.isfinite(results[key]), key
    assert results["calibration"]["method"] == "cqr" and results["calibration"]["n"] == 37
    _, meta = read_checkpoint(dist_run / "checkpoints/best.safetensors")
    assert meta.year_bins is not None and meta.calibration.levels == [0.8, 0.9]
    lines = [json.loads(x) for x in (dist_run / "metrics.jsonl").read_text().splitlines()]
    val_keys = set().union(*(x.keys() for x in lines))
    assert {"val/acc_5y", "val/acc_decade", "val/mae", "test/coverage_90"} <= val_keys
    with (dist_run / "predictions_test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"low_80", "high_80", "low_90", "high_90"} <= rows[0].keys()
    assert all(float(r["low_90"]) <= float(r["predicted_year"]) <= float(r["high_90"]) for r in rows)


def test_the_best_artifact_and_the_wandb_summary_carry_the_calibration(dist_run):
    records = wandb_records(dist_run)
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    last = artifacts[-1]
    assert sorted(last["aliases"]) == ["best", "latest"]
    assert json.loads(json.loads(last["metadata"])["calibration"])["levels"] == [0.8, 0.9]
    assert all("calibration" not in json.loads(a["metadata"]) for a in artifacts[:-1])  # saved during training
    summary = wandb_summary(next((dist_run / "wandb").glob("offline-run-*")))
    assert {"test/acc_5y", "test/coverage_90", "test_gray/mae", "floor/rmse"} <= summary["summary"].keys()


def _write_images(folder: Path, n: int, seed: int) -> tuple[Path, np.ndarray]:
    from PIL import Image

    images, years = make_synthetic(n, 32, seed)
    folder.mkdir(parents=True)
    with (folder / "m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "date"])
        for i, (img, y) in enumerate(zip(images, years)):
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i}.png")
            w.writerow([f"{i}.png", f"{y:.4f}"])
    return folder / "m.csv", years


def _predict(ckpt: Path, csv_path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.predict", "--checkpoint", str(ckpt), "--input", str(csv_path),
                           "--output", str(out), "--no-progress"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=240)


def test_predict_writes_interval_columns_and_reads_an_old_checkpoint(dist_run, tmp_path):
    csv_path, _ = _write_images(tmp_path / "imgs", 24, seed=7)
    r = _predict(dist_run / "checkpoints/best.safetensors", csv_path, tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    assert "within 5 years" in r.stdout and "90% date intervals:" in r.stdout
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header == ["path", "predicted_year", "calendar_year", "low_80", "high_80", "low_90", "high_90", "true_year"]
    # A checkpoint from before the intervals: no calibration key in its metadata.
    tensors = load_file(str(dist_run / "checkpoints/best.safetensors"))
    with open(dist_run / "checkpoints/best.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len))["__metadata__"]
    meta.pop("calibration")
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    r = _predict(old, csv_path, tmp_path / "old.csv")
    assert r.returncode == 0, r.stderr
    assert "no calibration" in r.stderr and "Traceback" not in r.stderr
    assert "low_80" not in (tmp_path / "old.csv").read_text().splitlines()[0]
    new_rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    old_rows = list(csv.DictReader((tmp_path / "old.csv").open()))
    assert [r["predicted_year"] for r in new_rows] == [r["predicted_year"] for r in old_rows]


def test_two_processes_give_the_metrics_one_process_computes_from_the_same_predictions(tmp_path):
    """37 val images in batches of 8 on 2 processes: the last batches are padded by the sampler; the
    gathered metrics must equal those of the same weights evaluated in one process."""
    from accelerate import Accelerator

    from train.checkpoints import build_from_checkpoint
    from train.config import load_config
    from train.data import build_data, make_loaders
    from train.heads import head_from_meta
    from train.loop import evaluate

    over = tiny(tmp_path, **{**DIST, "experiment.name": "two", "training.epochs": 1})
    launcher = accelerate_launch("--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                 "--dynamo_backend", "no", "--main_process_port", str(free_port()))
    r = run_main(["--config", DEFAULT_CONFIG, *over], launcher=launcher, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    val = next(x for x in logged if "val/acc_5y" in x)
    cfg = load_config(DEFAULT_CONFIG, over)
    data = build_data(cfg)
    model, meta = build_from_checkpoint(tmp_path / "two/checkpoints/best.safetensors")
    one = evaluate(Accelerator(cpu=True), model, make_loaders(cfg, data)[1], head_from_meta(meta))
    assert one["n"] == 37
    for k in ("mae", "rmse", "acc_5y", "acc_decade"):
        assert val[f"val/{k}"] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


def test_early_stopping_on_acc_5y_maximizes(tmp_path):
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(tmp_path, **{"experiment.name": "acc", "training.epochs": 3,
                                                                 "training.early_stopping.monitor": "val/acc_5y"})])
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "acc/results.json").read_text())
    logged = [json.loads(x) for x in (tmp_path / "acc/metrics.jsonl").read_text().splitlines()]
    accs = [x["val/acc_5y"] for x in logged if "val/acc_5y" in x]
    assert results["best/acc_5y"] == max(accs) and results["best_epoch"] == 1 + accs.index(max(accs))


def test_checkpoint_meta_without_the_new_fields_still_validates():
    raw = checkpoint_metadata(model_cfg=ModelConfig(), epoch=1, global_step=3, monitor="val/rmse", value=9.5,
                              target_mean=1935.0, target_std=49.0, pixel_mean=[0.5] * 3, pixel_std=[0.2] * 3,
                              image_size=32)
    for key in ("pixel_source",):
        raw.pop(key)
    meta = CheckpointMeta.model_validate(raw)
    assert meta.year_bins is None and meta.calibration is None and meta.out_dim == 1
