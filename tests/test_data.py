"""Data: dates, the synthetic set, and a manifest of real image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import DEFAULT_CONFIG, run_main, tiny
from train.config import load_config
from train.errors import UserError
from train.data import build_data, parse_date


@pytest.mark.parametrize(
    "text,year",
    [
        ("1901", 1901.5),
        ("1900-01", 1900 + 15.5 / 365),
        ("2000-03-01", 2000 + (31 + 29 + 0.5) / 366),
        ("1955.25", 1955.25),
        (" 1970 ", 1970.5),
    ],
)
def test_parse_date(text, year):
    assert parse_date(text) == pytest.approx(year)


@pytest.mark.parametrize("text", ["", "19x5", "1999-13", "1999-02-30", "nan", "yesterday"])
def test_parse_date_rejects(text):
    with pytest.raises(ValueError):
        parse_date(text)


@pytest.mark.parametrize("text", ["1e308", "19850", "-5", "0999", "1700000000"])
def test_parse_date_rejects_implausible_dates(text):
    # A typo or a Unix timestamp in the date column would dominate the target mean and std.
    with pytest.raises(ValueError, match="not a plausible date"):
        parse_date(text)


def test_synthetic_is_deterministic_and_standardized():
    cfg = load_config(DEFAULT_CONFIG,
                      ["data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.num_test=16"])
    a, b = build_data(cfg), build_data(cfg)
    assert np.array_equal(a.train.images.numpy(), b.train.images.numpy())
    assert a.train.images.shape == (64, 3, 32, 32)
    ys = np.array([float(a.train[i][1]) for i in range(64)])
    assert abs(ys.mean()) < 1e-6 and ys.std(ddof=1) == pytest.approx(1.0, abs=1e-3)
    assert 1850 <= a.test.years.min() and a.test.years.max() <= 2020


def _collection(tmp_path, n=60, bad_row=None):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    formats = ["2001", "1950-06", "1975-12-24", "1930.75"]
    lines = ["file,taken,split"]
    for i in range(n):
        size = (40, 30) if i % 2 else (24, 24)
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / f"img{i}.png")
        date = formats[i % 4]
        split = ["train", "train", "train", "val", "test"][i % 5]
        lines.append(f"img{i}.png,{date},{split}")
    if bad_row is not None:
        lines[bad_row] = "missing.png,19x0,train"
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, root


def test_manifest_trains_end_to_end(out, tmp_path):
    csv, root = _collection(tmp_path)
    extra = {
        "data.kind": "manifest", "data.manifest.path": str(csv), "data.manifest.image_root": str(root),
        "data.manifest.path_column": "file", "data.manifest.date_column": "taken",
        "data.manifest.split_column": "split", "data.image_size": 16, "training.epochs": 1, "experiment.name": "m",
    }
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)])
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "m" / "results.json").read_text())
    assert results["val_samples"] == 12 and results["test_samples"] == 12


def test_manifest_bad_rows_are_named_by_row_number(out, tmp_path):
    csv, _ = _collection(tmp_path, n=10, bad_row=3)
    extra = {"data.kind": "manifest", "data.manifest.path": str(csv), "data.manifest.path_column": "file",
             "data.manifest.date_column": "taken"}
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)])
    assert r.returncode == 2
    assert f"error: {csv}: row 4: '19x0' is not a date" in r.stderr
    assert "Traceback" not in r.stderr and list(out.iterdir()) == []


def test_manifest_missing_column_is_a_clear_error(tmp_path):
    csv, _ = _collection(tmp_path, n=10)
    cfg = load_config(DEFAULT_CONFIG, ["data.kind=manifest", f"data.manifest.path={csv}"])
    with pytest.raises(UserError, match=r"column\(s\) \['path', 'date'\] not found"):
        build_data(cfg)
