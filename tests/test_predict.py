"""``python -m train.predict``: round trip from training, directory and W&B-artifact inputs, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from conftest import DEFAULT_CONFIG, ROOT, env, run_main, tiny
from train.predict import main, predict


def _collection(tmp_path: Path, n=50):
    """Dated JPEG/PNG files whose brightness carries the date, and a manifest with a split column."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file,taken,split"]
    for i in range(n):
        year = 1900 + (i * 7) % 100
        base = np.full((20, 26, 3), 40 + 2 * (year - 1900), dtype=np.uint8)
        img = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
        name = f"sub/i{i}.png" if i % 3 == 0 else f"i{i}.jpg"
        Image.fromarray(img).save(root / name)
        lines.append(f"{name},{year}-0{1 + i % 9},{['train', 'train', 'train', 'val', 'test'][i % 5]}")
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, root, lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny manifest run (cache and workers on): its run directory, the data and the lines."""
    tmp = tmp_path_factory.mktemp("predict")
    out = tmp / "runs"
    out.mkdir()
    csv, root, lines = _collection(tmp)
    extra = {
        "data.kind": "manifest", "data.manifest.path": str(csv), "data.manifest.path_column": "file",
        "data.manifest.image_root": str(root), "data.manifest.date_column": "taken",
        "data.manifest.split_column": "split", "data.image_size": 16,
        "data.cache": "true", "data.num_workers": 1, "experiment.name": "p", "data.augment.hflip": "true",
    }
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)])
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out / "p", csv, root, lines


def test_round_trip_reproduces_the_logged_test_rmse(trained, capsys):
    tmp, run_dir, csv, root, lines = trained
    results = json.loads((run_dir / "results.json").read_text())
    test_csv = tmp / "test.csv"
    test_csv.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.endswith(",test")]) + "\n")
    out_csv = tmp / "preds" / "test_preds.csv"
    code = main(["--checkpoint", str(run_dir / "checkpoints" / "best.safetensors"), "--input", str(test_csv),
                 "--output", str(out_csv), "--path-column", "file", "--date-column", "taken",
                 "--image-root", str(root), "--batch-size", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    rmse = float(printed.split("RMSE ")[1].split()[0])
    assert rmse == pytest.approx(results["test/rmse"], rel=1e-3)  # printed to 3 decimals
    rows = list(__import__("csv").DictReader(out_csv.open()))
    assert len(rows) == results["test_samples"] == 10
    assert all(int(r["calendar_year"]) == math.floor(float(r["predicted_year"])) for r in rows)
    assert "decade" in printed and re.search(r"\n\s+19\d0s\s+\d+\s", printed)
    # The exact value, not the printed one:
    r = predict(run_dir / "checkpoints" / "best.safetensors", test_csv, path_column="file", date_column="taken",
                image_root=str(root), progress=False)
    assert r["metrics"]["rmse"] == pytest.approx(results["test/rmse"], rel=1e-4)
    assert r["metrics"]["mae"] == pytest.approx(results["test/mae"], rel=1e-4)


def test_directory_input_and_wandb_artifact_directory(trained, tmp_path):
    _, run_dir, _, root, lines = trained
    artifact = tmp_path / "artifacts" / "model-best-v0"
    artifact.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "best.safetensors", artifact / "best.safetensors")
    r = predict(artifact, root, progress=False)
    assert len(r["names"]) == len(lines) - 1 and "sub/i0.png" in r["names"] and r["true"] is None
    # Subprocess: the command as users type it, without dates (no evaluation).
    out_csv = tmp_path / "p.csv"
    p = subprocess.run([sys.executable, "-m", "train.predict", "--checkpoint", str(artifact), "--input", str(root),
                        "--output", str(out_csv), "--device", "cpu"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out_csv.read_text().splitlines()[0] == "path,predicted_year,calendar_year" and "RMSE" not in p.stdout


def _expect_one_line_exit_2(capsys, args, match):
    assert main(args + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    _, run_dir, _, root, _ = trained
    best = str(run_dir / "checkpoints" / "best.safetensors")
    out = ["--output", str(tmp_path / "o.csv")]
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(tmp_path / "nope.safetensors"), "--input", str(root)] + out,
                            "not found")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not safetensors")
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(tmp_path / "junk.safetensors"), "--input", str(root)] + out,
                            "not a readable safetensors")
    import torch

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(tmp_path / "foreign.safetensors"), "--input", str(root)] + out,
                            "no model metadata")
    (tmp_path / "empty").mkdir()
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(tmp_path / "empty"), "--input", str(root)] + out,
                            "no .safetensors file")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (9, 9)).save(bad / "ok.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (bad / "broken2.png").write_bytes(b"garbage")
    _expect_one_line_exit_2(capsys, ["--checkpoint", best, "--input", str(bad)] + out, "2 of 3 image(s) cannot be read")
    assert not (tmp_path / "o.csv").exists()
    (tmp_path / "m.csv").write_text("path,date\nok.png,1950\nmissing.png,1951\nok.png,later\n")
    _expect_one_line_exit_2(capsys,
                            ["--checkpoint", best, "--input", str(tmp_path / "m.csv"), "--image-root", str(bad)] + out,
                            "2 bad row(s)")
