"""The run's plain records: metrics.jsonl holds what TensorBoard holds (also across a kill -9 and a
resume), predictions_test.csv holds the test set, and the console is readable as a file."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, MAIN, ROOT, env, run_main, tb_scalars, tiny
from train.config import load_config
from train.models import build_model
from train.records import read_metrics
from train.state import newest_complete

pytestmark = pytest.mark.slow

BASE = {"data.synthetic.num_train": 512, "training.epochs": 3, "training.num_threads": 1,
        "checkpoint.every_n_steps": 6, "training.early_stopping.enabled": "false"}


def args(out: Path, name: str, **extra) -> list[str]:
    return ["--config", DEFAULT_CONFIG, *tiny(out, **{**BASE, "experiment.name": name, **extra})]


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard's reader shows a run: per tag, (step, value) in order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in rec.items():
            if key not in ("step", "wall_time") and isinstance(value, (int, float)):
                out.setdefault(key, []).append((rec["step"], float(value)))
    return out


def assert_same_as_tensorboard(run_dir: Path) -> None:
    tb = {tag: [(e.step, e.value) for e in events] for tag, events in tb_scalars(run_dir / "tensorboard").items()}
    js = jsonl_scalars(run_dir)
    assert set(js) == set(tb)
    for tag in tb:
        assert [s for s, _ in js[tag]] == [s for s, _ in tb[tag]], tag
        # TensorBoard stores float32.
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for (_, a), (_, b) in zip(js[tag], tb[tag])), tag


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("records")
    r = run_main(args(out, "r", **{"logging.progress_bar": "true"}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "r", r


def test_metrics_jsonl_holds_exactly_what_tensorboard_holds(finished):
    run_dir, _ = finished
    assert_same_as_tensorboard(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert all(isinstance(r["wall_time"], float) for r in records)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)


def test_predictions_csv_is_the_test_set_and_gives_the_test_rmse(finished):
    run_dir, _ = finished
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "predictions_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == results["test_samples"] == 64
    errors = [float(r["predicted_year"]) - float(r["true_year"]) for r in rows]
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert rmse == pytest.approx(results["test/rmse"], rel=1e-4)
    assert all(float(r["abs_error_years"]) == pytest.approx(abs(e), abs=2e-4) for r, e in zip(rows, errors))


def test_redirected_console_has_plain_progress_lines_and_a_true_startup_summary(finished):
    _, r = finished
    text = r.stdout + r.stderr
    assert "\r" not in text, "no carriage-return progress updates in a file"
    assert "Epoch 1/3:  50% (" in r.stdout and "Epoch 1/3: 100% (" in r.stdout
    cfg = load_config(DEFAULT_CONFIG, tiny(Path("."), **BASE))
    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    line = next(line for line in r.stdout.splitlines() if line.startswith("Model:"))
    assert f"{n / 1e3:.1f} K trainable / {n / 1e3:.1f} K parameters" in line
    assert "Data:       synthetic 32x32 px: 512 train / 70 val / 64 test images" in r.stdout
    assert "Schedule:   3 epochs x 16 optimizer steps = 48 steps" in r.stdout
    assert "warning: the test split has only 64 images" in r.stdout
    assert r.stdout.count(" left") == 2, "a time estimate after every epoch but the last"
    assert "Val MAE:" in r.stdout and "years" in r.stdout


def test_after_kill_9_and_resume_no_step_appears_twice(finished, out):
    proc = subprocess.Popen([sys.executable, MAIN, *args(out, "k")], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while newest_complete(out / "k", warn=lambda *_: None) is None or \
            not read_metrics(out / "k/metrics.jsonl")[-1:] or read_metrics(out / "k/metrics.jsonl")[-1]["step"] < 10:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    r = run_main(args(out, "k") + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    # A step may hold two records (a log step that is also an epoch end); the lines of the killed
    # attempt after the resumed state are gone, so the records are exactly the uninterrupted run's.
    def shape(run_dir):
        return [(r["step"], sorted(set(r) - {"wall_time"})) for r in read_metrics(run_dir / "metrics.jsonl")]

    resumed = shape(out / "k")
    assert len({(s, tuple(k)) for s, k in resumed}) == len(resumed), "no record twice"
    assert resumed == shape(finished[0])
    assert_same_as_tensorboard(out / "k")


def test_the_summary_says_whether_the_image_cache_was_built_or_reused(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rows = ["path,date"] + [f"{i}.png,{1900 + 3 * i}" for i in range(40)]
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 6, 100, 200 - i * 4)).save(images / f"{i}.png")
    (images / "m.csv").write_text("\n".join(rows) + "\n")
    manifest = {"data.kind": "manifest", "data.manifest.path": str(images / "m.csv"), "data.image_size": 16,
                "data.cache": "true", "training.epochs": 1, "logging.progress_bar": "true"}
    first = run_main(args(tmp_path / "runs", "c1", **manifest))
    second = run_main(args(tmp_path / "runs", "c2", **manifest))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert "Data:       manifest (cached) 16x16 px" in first.stdout and "image cache built: " in first.stdout
    assert "image cache reused: " in second.stdout
    assert "\r" not in first.stdout + first.stderr, "the caching progress is plain lines in a file too"
    assert "Caching images: 100% (40/40 images" in first.stdout
