"""The run report (train/report.py): report.html after every run, its figures and their data, the
comparison of runs, a run stopped before testing, a drawing failure, and a real browser rendering it."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import DEFAULT_CONFIG, MAIN, ROOT, env, tiny
from train.report import interval_stats, read_predictions, run_figures, write_report
from train.state import newest_complete

RUN_FIGURES = {"loss", "error_years", "lr"}
TEST_FIGURES = {"scatter", "mae_by_decade", "residuals", "intervals"}  # intervals: the calibrated ones


class Page(HTMLParser):
    """The parts of a report the tests look at: images, table rows with a data-key, elements by id."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.row_keys: dict[str, list[str]] = {}  # table id -> data-key of each row
        self.ids: set[str] = set()
        self.tags: set[str] = set()
        self._table: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and "data-key" in a:
            self.row_keys.setdefault(self._table, []).append(a["data-key"])

    def figures(self) -> dict[str, dict]:
        return {img["data-figure"]: img for img in self.images if img.get("class") == "figure"}


def png_of(img: dict) -> Image.Image:
    src = img["src"]
    assert src.startswith("data:image/png;base64,"), src[:60]
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert im.format == "PNG"
    im.load()
    return im


def start(out: Path, name: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MAIN, "--config", DEFAULT_CONFIG, *tiny(out, **{"experiment.name": name,
                                                                                          **extra})],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env(PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny finished runs, ``a`` and ``b``, one config key apart (the optimizer's lr); started
    together to halve the wait."""
    out = tmp_path_factory.mktemp("report-runs")
    procs = {"a": start(out, "a", **{"training.epochs": 3}),
             "b": start(out, "b", **{"training.epochs": 3, "training.optimizer.lr": 0.001})}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"Report:  {out / name / 'report.html'}" in stdout, stdout[-2000:]
        assert "could not write the run report" not in stdout + stderr
    return {name: out / name for name in procs}


@pytest.mark.slow
def test_the_trainer_writes_a_self_contained_report(runs):
    text = (runs["a"] / "report.html").read_text()
    page = Page(text)
    assert set(page.figures()) == RUN_FIGURES | TEST_FIGURES
    for name, img in page.figures().items():
        w, h = png_of(img).size
        assert w >= 300 and h >= 200, (name, w, h)
    # nothing to fetch: every image inline, no script, stylesheet or frame
    assert all(img["src"].startswith("data:") for img in page.images)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "http://" not in text and "https://" not in text
    assert {"results", "config", "provenance", "hardware", "worst-predictions"} <= page.ids
    assert "stopped-note" not in page.ids
    header = {k: v for k, _, v in (line[2:].partition(": ") for line in
                                   (runs["a"] / "config.yaml").read_text().splitlines() if line.startswith("# "))}
    assert header["git_commit"] in text and f"torch</th><td><code>{header['torch']}" in text
    assert f"--config {runs['a'] / 'config.yaml'} experiment.name=a-rerun" in text


@pytest.mark.slow
def test_the_scatter_shows_exactly_the_test_predictions(runs):
    run = runs["a"]
    with (run / "predictions_test.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    results = json.loads((run / "results.json").read_text())
    assert len(rows) == results["test_samples"] == 64
    p = read_predictions(run)  # the reader the scatter is drawn from
    assert p.images == [r["image"] for r in rows]
    np.testing.assert_array_equal(p.true, [float(r["true_year"]) for r in rows])
    np.testing.assert_array_equal(p.predicted, [float(r["predicted_year"]) for r in rows])
    page = Page((run / "report.html").read_text())
    assert int(page.figures()["scatter"]["data-points"]) == len(rows)
    # the worst-predictions table: 10 rows, the largest error first
    text = (run / "report.html").read_text()
    worst = max(rows, key=lambda r: float(r["abs_error_years"]))
    table = text[text.index('id="worst-predictions"'):]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 11  # header + 10
    first_row = table.split("<tr>")[2]
    assert f"{float(worst['true_year']):.1f}" in first_row and f"{float(worst['predicted_year']):.1f}" in first_row


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.slow
def test_the_comparison_lists_exactly_the_keys_that_differ(runs, tmp_path):
    a, b = (_flat(yaml.safe_load((runs[n] / "config.yaml").read_text())) for n in ("a", "b"))
    expected = {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")} - {"experiment.name"}
    assert expected == {"training.optimizer.lr"}  # what the fixture changed, nothing else
    r = report_cli(str(runs["a"]), str(runs["b"]), cwd=tmp_path)  # default output: ./report-compare.html
    assert r.returncode == 0, r.stderr
    output = tmp_path / "report-compare.html"
    assert r.stdout.strip() == f"Report: {output}"
    page = Page(output.read_text())
    assert set(page.row_keys["config-diff"]) == expected
    assert set(page.figures()) == {"compare_val_rmse", "compare_loss"}
    assert all(png_of(img).size >= (300, 200) for img in page.images)
    assert "results-compare" in page.ids
    text = output.read_text()
    for run in runs.values():
        rmse = json.loads((run / "results.json").read_text())["test/rmse"]
        assert f"{rmse:.5g}" in text


def test_bad_run_directories_are_one_error_line(tmp_path):
    r = report_cli(str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: run directory '{tmp_path / 'nope'}' does not exist"]
    (tmp_path / "empty").mkdir()
    r = report_cli(str(tmp_path / "empty"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and "metrics.jsonl" in r.stderr
    assert not (tmp_path / "empty" / "report.html").exists()


@pytest.mark.slow
def test_a_run_stopped_before_testing_gets_its_curves_and_a_note(out):
    proc = start(out, "s", **{"training.epochs": 30, "checkpoint.every_n_steps": 2})
    deadline = time.monotonic() + 120
    while newest_complete(out / "s", warn=lambda *_: None) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    run = out / "s"
    assert not (run / "results.json").exists()
    by_trainer = Page((run / "report.html").read_text())  # publish_report runs on a stop too
    assert "stopped-note" in by_trainer.ids and set(by_trainer.figures()) == RUN_FIGURES
    (run / "report.html").unlink()
    r = report_cli(str(run))
    assert r.returncode == 0, r.stderr
    text = (run / "report.html").read_text()
    page = Page(text)
    assert set(page.figures()) == RUN_FIGURES
    assert "stopped before testing: resume with --resume auto" in text
    assert f"python train/main.py --config {run / 'config.yaml'} --resume auto" in text


BLOCK_MATPLOTLIB = """
import sys
class NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("matplotlib blocked by the test")
sys.meta_path.insert(0, NoMatplotlib())
sys.path.insert(0, {root!r})
from train.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_drawing_failure_is_a_warning_not_a_failed_run(out):
    script = BLOCK_MATPLOTLIB.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script, "--config", DEFAULT_CONFIG,
                        *tiny(out, **{"experiment.name": "nompl", "training.epochs": 1})],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: could not write the run report" in r.stdout and "matplotlib" in r.stdout, r.stdout[-2000:]
    assert f"python -m train.report {out / 'nompl'}" in r.stdout
    assert (out / "nompl" / "results.json").exists() and (out / "nompl" / "predictions_test.csv").exists()
    assert not (out / "nompl" / "report.html").exists()


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: run `bash .ci/system-deps.sh` (as root or with sudo) and test again")
    return found


@pytest.mark.slow
def test_a_real_browser_renders_the_report(runs, tmp_path):
    shot = tmp_path / "shot.png"
    r = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1200,3000", (runs["a"] / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-3000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 3000)
    small = np.asarray(im.resize((300, 750), Image.Resampling.BOX))
    assert len(np.unique(small.reshape(-1, 3), axis=0)) > 50  # not blank
    pixels = np.asarray(im).reshape(-1, 3).astype(int)
    for rgb in ((31, 119, 180), (255, 127, 14)):  # matplotlib's blue and orange: the figures were decoded and shown
        near = (np.abs(pixels - rgb).sum(axis=1) < 30).sum()
        assert near > 500, (rgb, near)


# --------------------------------------------------------------------------------------------------
# A run directory made by hand: intervals, thumbnails, early stopping, without training
# --------------------------------------------------------------------------------------------------

def _fake_run(root: Path) -> Path:
    run = root / "fake"
    run.mkdir()
    (run / "config.yaml").write_text("# Resolved config of run 'fake'.\n# git_commit: abc123\n# torch: 9.9\n"
                                     + yaml.safe_dump({"experiment": {"name": "fake", "seed": 1},
                                                       "data": {"kind": "manifest", "manifest": {"path": "x.csv"}},
                                                       "training": {"epochs": 5}}))
    lines = []
    for epoch in range(1, 5):
        for step in range(epoch * 4 - 3, epoch * 4 + 1):
            lines.append({"step": step, "wall_time": 1.0 * step, "train/loss_step": 1 / step, "lr": 0.01 / step})
        lines.append({"step": epoch * 4, "wall_time": 5.0, "epoch": float(epoch), "train/loss": 1 / epoch,
                      "val/loss": 1.2 / epoch if epoch < 3 else "nan", "val/rmse": [30, 20, 25, 26][epoch - 1],
                      "val/mae": 10.0, "best/rmse": [30, 20, 20, 20][epoch - 1], "epoch_time_s": 1.5})
    lines.append({"step": 16, "wall_time": 9.0, "early_stopping/stopped_epoch": 4,
                  "early_stopping/reason": "val/rmse did not improve"})
    lines.append('{"step": 17, "wall_ti')  # a torn last line
    (run / "metrics.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    (run / "results.json").write_text(json.dumps({"test/rmse": 21.5, "best_epoch": 2, "test_samples": 12}))
    rng = np.random.default_rng(0)
    with (run / "predictions_test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "true_year", "predicted_year", "abs_error_years", "low_80", "high_80", "low_50",
                    "high_50"])
        for i in range(12):
            image = root / f"img{i}.png"
            if i % 3 == 0:
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
            elif i % 3 == 1:
                image.write_bytes(b"not a png")  # unreadable: its row stays, without a thumbnail
            t, p = 1900 + 7 * i, 1900 + 7 * i + (i - 6) * 3
            w.writerow([str(image), t, p, abs(p - t), p - 10, p + 10, p - 4, p + 4])
    return run


def test_intervals_thumbnails_and_early_stopping_from_a_handmade_run(tmp_path):
    run = _fake_run(tmp_path)
    figures = run_figures(run)
    assert set(figures) == RUN_FIGURES | TEST_FIGURES | {"intervals"}
    p = read_predictions(run)
    stats = interval_stats(p)
    errors = np.abs((np.arange(12) - 6) * 3)
    assert stats["80"] == {"nominal": 0.8, "coverage": np.mean(errors <= 10), "width": 20.0}
    assert stats["50"]["coverage"] == np.mean(errors <= 4) and stats["50"]["width"] == 8.0
    output = write_report([run], tmp_path / "out.html")
    page = Page(output.read_text())
    assert set(page.figures()) == set(figures)
    thumbs = [img for img in page.images if img.get("class") == "thumb"]
    worst_ten = np.argsort(-errors, kind="stable")[:10]
    assert len(thumbs) == sum(1 for i in worst_ten if i % 3 == 0)
    assert all(png_of(t).size[0] <= 72 for t in thumbs)
    text = output.read_text()
    assert "early-stop-note" in page.ids and "val/rmse did not improve" in text
    assert "img1.png" in text  # the unreadable image keeps its row


def test_the_comparison_tells_a_missing_key_from_a_null_one(tmp_path):
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    first, second = _fake_run(tmp_path / "one"), _fake_run(tmp_path / "two")
    header = "# git_commit: def456\n"
    (second / "config.yaml").write_text(header + yaml.safe_dump({
        "experiment": {"name": "fake", "seed": 1}, "data": {"kind": "manifest", "manifest": {"path": None}},
        "training": {"epochs": 5, "max_time": None}}))
    text = write_report([first, second], tmp_path / "cmp.html").read_text()
    page = Page(text)
    assert set(page.row_keys["config-diff"]) == {"data.manifest.path", "training.max_time"}
    row = text[text.index('data-key="training.max_time"'):].split("</tr>")[0]
    assert "<i>(absent)</i>" in row and "<td>null</td>" in row
    assert str(first.parent) in text and str(second.parent) in text  # same name twice: labelled by directory
