"""``python -m train.predict``: round trip from training, directory and W&B-artifact inputs, bad input."""

from __future__ import annotations

import csv as csv_mod
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
    header = "path,predicted_year,calendar_year,low_80,high_80,low_90,high_90"  # the calibrated intervals
    assert out_csv.read_text().splitlines()[0] == header and "RMSE" not in p.stdout


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


# --- Real folders: unreadable images ---------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv_mod.DictReader(f))


def _folder_with_one_unreadable_image(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    Image.new("RGB", (20, 14), (120, 90, 60)).save(folder / "a.jpg")
    Image.new("RGB", (9, 30), (30, 60, 90)).save(folder / "2024" / "c.png")
    (folder / "b.png").write_bytes(b"\x89PNG not really a png, just garbage bytes")
    return folder


def test_on_bad_image_skip_writes_the_others_and_names_the_skipped_one(trained, tmp_path, capsys):
    _, run_dir, _, _, _ = trained
    best = str(run_dir / "checkpoints" / "best.safetensors")
    folder = _folder_with_one_unreadable_image(tmp_path)
    out_csv = tmp_path / "p.csv"
    args = ["--checkpoint", best, "--input", str(folder), "--output", str(out_csv), "--no-progress"]
    # Default (error): today's behaviour, one line and exit 2, no output.
    _expect_one_line_exit_2(capsys, args, "1 of 3 image(s) cannot be read")
    assert not out_csv.exists()
    assert main(args + ["--on-bad-image", "skip"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: skipped 1 unreadable image(s); first: b.png: cannot be decoded")
    assert [r["path"] for r in _read_rows(out_csv)] == ["2024/c.png", "a.jpg"]
    # Run as users type it: exit 0, the same note.
    p = subprocess.run([sys.executable, "-m", "train.predict", *args, "--on-bad-image", "skip", "--device", "cpu"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "note: skipped 1 unreadable image(s); first: b.png: " in p.stderr, p.stderr


def test_on_bad_image_skip_evaluates_only_the_predicted_rows(trained, tmp_path, capsys):
    _, run_dir, _, root, lines = trained
    best = run_dir / "checkpoints" / "best.safetensors"
    (root / "broken.png").write_bytes(b"garbage")
    try:
        body = lines[1:13]
        m = tmp_path / "m.csv"
        m.write_text("\n".join([lines[0], "gone.jpg,1950,test", *body[:5], "broken.png,1960,test", *body[5:]]) + "\n")
        kw = dict(path_column="file", date_column="taken", image_root=str(root), progress=False)
        r = predict(best, m, on_bad_image="skip", **kw)
        assert [name for name, _ in r["skipped"]] == ["gone.jpg", "broken.png"]  # in CSV row order
        assert "not found (CSV row 2)" in r["skipped"][0][1] and "cannot be decoded" in r["skipped"][1][1]
        assert r["names"] == [ln.split(",")[0] for ln in body]
        # The metrics are those of the predicted rows alone: the same as a CSV of only those rows.
        clean = tmp_path / "clean.csv"
        clean.write_text("\n".join([lines[0], *body]) + "\n")
        ref = predict(best, clean, **kw)
        assert r["metrics"]["n"] == 12 and r["metrics"]["rmse"] == pytest.approx(ref["metrics"]["rmse"], rel=1e-9)
        out = ["--output", str(tmp_path / "o.csv")]
        args = ["--checkpoint", str(best), "--input", str(m), "--path-column", "file", "--date-column", "taken",
                "--image-root", str(root)] + out
        _expect_one_line_exit_2(capsys, args, "1 bad row(s)")  # error: the missing file is a bad row, as before
        # A bad date is not an unreadable image: still an error with skip.
        m.write_text("\n".join([lines[0], "gone.jpg,1950,test", "i1.jpg,later,test", *body]) + "\n")
        _expect_one_line_exit_2(capsys, args + ["--on-bad-image", "skip"], "1 bad row(s)")
    finally:
        (root / "broken.png").unlink()


# --- --split: exactly the run's split --------------------------------------------------------------


def _assert_is_the_runs_test_split(run_dir: Path, out_csv: Path, printed: str, names: list[str], root: Path):
    results = json.loads((run_dir / "results.json").read_text())
    rows = _read_rows(out_csv)
    assert len(rows) == results["test_samples"]
    rmse = float(printed.split("RMSE ")[1].split()[0])
    assert rmse == pytest.approx(results["test/rmse"], rel=1e-3)  # printed to 3 decimals
    logged = [r["image"] for r in _read_rows(run_dir / "predictions_test.csv")]
    assert [str(root / r["path"]) for r in rows] == logged  # the trainer's test images, in its order
    assert [r["path"] for r in rows] == names
    for r, ref in zip(rows, _read_rows(run_dir / "predictions_test.csv")):
        assert float(r["predicted_year"]) == pytest.approx(float(ref["predicted_year"]), abs=2e-4)


def test_split_test_of_a_split_column_run(trained, tmp_path, capsys):
    tmp, run_dir, csv, root, lines = trained
    best = str(run_dir / "checkpoints" / "best.safetensors")
    out_csv = tmp_path / "x.csv"
    assert main(["--checkpoint", best, "--split", "test", "--output", str(out_csv), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err and "the run's test split" in cap.out
    test_names = [ln.split(",")[0] for ln in lines[1:] if ln.endswith(",test")]
    _assert_is_the_runs_test_split(run_dir, out_csv, cap.out, test_names, root)
    results = json.loads((run_dir / "results.json").read_text())
    r = predict(best, split="test", progress=False)
    assert r["metrics"]["rmse"] == pytest.approx(results["test/rmse"], rel=1e-4)
    assert r["metrics"]["mae"] == pytest.approx(results["test/mae"], rel=1e-4)
    # --input may name the run's manifest; val is the split column's val rows.
    r = predict(best, csv, split="val", progress=False)
    assert r["names"] == [ln.split(",")[0] for ln in lines[1:] if ln.endswith(",val")]


def _random_split_collection(tmp: Path, n: int = 39):
    """A manifest without a split column, groups of two (some rows without), one bad date, one image
    that does not decode: with data.on_bad_row=skip the random split is over the other 37 rows."""
    root = tmp / "images"
    root.mkdir()
    rng = np.random.default_rng(1)
    lines = ["file,taken,album"]
    for i in range(n):
        year = 1900 + (i * 11) % 100
        img = np.clip(np.full((18, 22, 3), 40 + 2 * (year - 1900)) + rng.integers(0, 30, (18, 22, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(root / f"r{i}.png")
        lines.append(f"r{i}.png,{year},{'' if i % 4 == 0 else f'a{i // 2}'}")
    (root / "r5.png").write_bytes(b"garbage, not a png")
    lines[8] = "r7.png,19x7,a3"
    csv = tmp / "photos.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, root


def test_split_test_of_a_random_split_that_skipped_an_undecodable_row(tmp_path, capsys):
    from train.config import load_config
    from train.data import manifest_split_indices, read_config_manifest

    out = tmp_path / "runs"
    csv, root = _random_split_collection(tmp_path)
    extra = {"data.kind": "manifest", "data.manifest.path": str(csv), "data.manifest.path_column": "file",
             "data.manifest.image_root": str(root), "data.manifest.date_column": "taken",
             "data.manifest.group_column": "album",
             "data.manifest.val_fraction": 0.2, "data.manifest.test_fraction": 0.2, "data.on_bad_row": "skip",
             "data.image_size": 16, "data.cache": "true", "experiment.name": "rs", "experiment.seed": 7}
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)])
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "rs"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_rows"] == 2
    cfg = load_config(run_dir / "config.yaml")
    rows = read_config_manifest(cfg)
    broken = rows.texts.index("r5.png")
    trainer_test = manifest_split_indices(cfg, rows, {broken: "does not decode"})[2]
    # The test is only worth something if ignoring the undecodable row would give another split.
    assert manifest_split_indices(cfg, rows, {})[2].tolist() != trainer_test.tolist()
    names = [rows.texts[i] for i in trainer_test]
    best = str(run_dir / "checkpoints" / "best.safetensors")
    args = ["--checkpoint", best, "--split", "test", "--no-progress"]
    # With the run's image cache, its marker names the undecodable row: only the test split is decoded.
    assert main(args + ["--output", str(tmp_path / "a.csv")]) == 0
    cap = capsys.readouterr()
    assert "decoding all" not in cap.err and "warning" not in cap.err
    assert "note: 1 bad row(s) of" in cap.err and "in no split, as in training" in cap.err
    _assert_is_the_runs_test_split(run_dir, tmp_path / "a.csv", cap.out, names, root)
    # Without the cache, every image is decoded once to find it; the same split.
    shutil.rmtree(out / ".cache")
    assert main(args + ["--output", str(tmp_path / "b.csv")]) == 0
    cap = capsys.readouterr()
    assert "decoding all 38 images" in cap.err and "warning" not in cap.err
    _assert_is_the_runs_test_split(run_dir, tmp_path / "b.csv", cap.out, names, root)
    r = predict(best, split="test", progress=False)
    assert r["metrics"]["rmse"] == pytest.approx(results["test/rmse"], rel=1e-4)
    # A manifest changed since training: the rebuilt test split is not the logged one, and it says so.
    csv.write_text(csv.read_text() + "r0.png,1999,\n")
    assert main(args + ["--output", str(tmp_path / "c.csv")]) == 0
    assert "warning: the rebuilt test split" in capsys.readouterr().err


def test_split_needs_the_runs_config_a_manifest_run_and_its_manifest(trained, tmp_path, capsys):
    from train.config import load_config, to_yaml

    _, run_dir, csv, root, _ = trained
    best = run_dir / "checkpoints" / "best.safetensors"
    out = ["--output", str(tmp_path / "o.csv")]
    artifact = tmp_path / "artifacts" / "model-best-v0"
    artifact.mkdir(parents=True)
    shutil.copy(best, artifact / "best.safetensors")
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(artifact), "--split", "test"] + out,
                            "--split needs the run's config.yaml next to the checkpoint")
    synthetic = tmp_path / "synth"
    (synthetic / "checkpoints").mkdir(parents=True)
    shutil.copy(best, synthetic / "checkpoints" / "best.safetensors")
    (synthetic / "config.yaml").write_text(to_yaml(load_config(DEFAULT_CONFIG)))
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(synthetic / "checkpoints"), "--split", "test"] + out,
                            "trained on synthetic data")
    other = tmp_path / "other.csv"
    other.write_text(csv.read_text())
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(best), "--split", "test", "--input", str(other)] + out,
                            "is not the run's manifest")
    _expect_one_line_exit_2(capsys, ["--checkpoint", str(best), "--split", "test", "--date-column", "date"] + out,
                            "--date-column 'date' is not the run's ('taken')")
    # Same columns and root as the run: accepted.
    assert main(["--checkpoint", str(best), "--split", "test", "--input", str(csv), "--path-column", "file",
                 "--image-root", str(root), "--no-progress"] + out) == 0
    with pytest.raises(SystemExit) as e:  # neither --input nor --split: a usage error
        main(["--checkpoint", str(best)] + out)
    assert e.value.code == 2
    assert "--input is required" in capsys.readouterr().err


def test_split_column_run_that_skipped_rows_leaves_them_out_as_the_trainer_did(trained, tmp_path, capsys):
    """A split column places each row on its own: a test row that does not decode was left out by a
    data.on_bad_row=skip run, and is left out here whatever --on-bad-image, unless results.json shows
    that the run had no such row (then it changed since, and --on-bad-image decides)."""
    from train.config import load_config, to_yaml

    _, run_dir, csv, root, lines = trained
    (root / "broken.png").write_bytes(b"garbage")
    try:
        m = tmp_path / "m.csv"
        m.write_text("\n".join([lines[0], "broken.png,1960,test", *lines[1:]]) + "\n")
        run = tmp_path / "skiprun"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(run_dir / "checkpoints" / "best.safetensors", run / "checkpoints" / "best.safetensors")
        cfg = load_config(run_dir / "config.yaml", ["data.on_bad_row=skip", f"data.manifest.path={m}"])
        (run / "config.yaml").write_text(to_yaml(cfg))
        best = run / "checkpoints" / "best.safetensors"
        r = predict(best, split="test", progress=False)
        assert r["trainer_skips"] and [name for name, _ in r["skipped"]] == ["broken.png"]
        assert r["names"] == [ln.split(",")[0] for ln in lines[1:] if ln.endswith(",test")]
        (run / "results.json").write_text(json.dumps({"skipped_rows": 0}))
        _expect_one_line_exit_2(capsys, ["--checkpoint", str(best), "--split", "test", "--output",
                                         str(tmp_path / "o.csv")], "1 of 11 image(s) cannot be read")
    finally:
        (root / "broken.png").unlink()
