"""Nothing lost, nothing leaked: refusals write nothing, finished runs stay finished, one trainer per
run directory, and a full or read-only disk is one error line with every earlier file intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, MAIN, ROOT, env, run_main, tb_scalars, tiny, wandb_summary
from train.state import list_states

pytestmark = pytest.mark.slow


def args(out: Path, name: str, **extra) -> list[str]:
    return ["--config", DEFAULT_CONFIG, *tiny(out, **{"experiment.name": name, "training.num_threads": 1, **extra})]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with its sha256: what 'untouched' means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run with W&B offline; tests copy it before they touch it."""
    out = tmp_path_factory.mktemp("finished")
    r = run_main(args(out, "done", **{"logging.wandb.enabled": "true"}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "done"


def copy_run(finished: Path, out: Path) -> Path:
    run_dir = out / finished.name
    shutil.copytree(finished, run_dir)
    return run_dir


def test_a_refused_resume_touches_neither_the_wandb_run_nor_tensorboard(finished, out):
    # Refused for a model that does not fit the saved state: the check must come before any tracker.
    run_dir = copy_run(finished, out)
    before = snapshot(run_dir)
    r = run_main(args(out, "done", **{"logging.wandb.enabled": "true", "model.channels": "[8,32]",
                                      "training.epochs": 3}) + ["--resume", "auto"])
    assert r.returncode == 2
    assert "does not fit the configured model" in one_error_line(r.stderr)
    assert snapshot(run_dir) == before, "no file of the run was written or changed"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and wandb_summary(offline[0])["state"] == "finished"


def test_resuming_a_finished_run_is_a_no_op(finished, out):
    run_dir = copy_run(finished, out)
    before = snapshot(run_dir)
    r = run_main(args(out, "done", **{"logging.wandb.enabled": "true"}) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is finished (epoch 2): nothing to do" in r.stdout
    assert snapshot(run_dir) == before


def test_more_epochs_for_a_finished_run_is_refused_with_a_warm_start_hint(finished, out):
    run_dir = copy_run(finished, out)
    before = snapshot(run_dir)
    r = run_main(args(out, "done", **{"training.epochs": 5}) + ["--resume", "auto"])
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "finished its 2 epochs" in line and f"model.init_from={run_dir / 'checkpoints/best.safetensors'}" in line
    assert snapshot(run_dir) == before


def test_a_run_whose_states_all_fail_is_never_retrained_in_place(finished, out):
    run_dir = copy_run(finished, out)
    for state in list_states(run_dir):
        (state / "model.safetensors").write_bytes(b"broken")
    before = snapshot(run_dir)
    r = run_main(args(out, "done") + ["--resume", "auto"])
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "results.json" in line and "best.safetensors" in line and "--restart" in line
    assert snapshot(run_dir) == before

    # --restart moves it aside (never deletes it) and starts the run again under its name.
    r = run_main(args(out, "done", **{"training.epochs": 1}) + ["--restart"])
    assert r.returncode == 0, r.stderr[-3000:]
    aside = [p for p in out.iterdir() if p.name.startswith("done.set-aside-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 1


def test_restart_and_resume_together_are_refused(out):
    r = run_main(args(out, "x") + ["--resume", "auto", "--restart"])
    assert r.returncode == 2 and "pass one of them" in one_error_line(r.stderr)
    assert list(out.iterdir()) == []


def _start(out: Path, name: str, *more: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MAIN, *args(out, name, **extra), *more], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


LONG = {"training.epochs": 30, "data.synthetic.num_train": 1024, "training.early_stopping.enabled": "false"}


def test_a_second_trainer_on_a_running_run_is_refused_and_the_first_is_unharmed(out):
    first = _start(out, "busy", "--resume", "auto", **LONG)
    try:
        _wait_for(out / "busy" / "checkpoints" / "state", first)
        r = run_main(args(out, "busy", **LONG) + ["--resume", "auto"])
        assert r.returncode == 2
        line = one_error_line(r.stderr)
        assert f"in use by pid {first.pid}" in line
        assert first.poll() is None, "the first trainer is still running"
        assert not list((out / "busy/checkpoints/state").glob("abandoned-*"))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 3  # stopped by our SIGTERM after saving, not by the second trainer


def test_kill_9_never_leaves_a_run_locked(out):
    proc = _start(out, "killed", **LONG)
    _wait_for(out / "killed" / "checkpoints" / "state", proc)
    proc.kill()
    proc.wait()
    r = run_main(args(out, "killed", **{**LONG, "training.epochs": 2}) + ["--resume", "auto"])
    assert r.returncode in (0, 2), r.stderr[-3000:]
    assert "in use by" not in r.stderr


# --- Full and read-only disks (a small tmpfs; needs root to mount) ----------------------------------


@contextmanager
def tmpfs(tmp_path: Path, size: str):
    """A tmpfs of ``size`` mounted under ``tmp_path`` for the body; unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machines run as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for the config, events and best.safetensors of the model below, not for
    its full state (weights + AdamW moments)."""
    with tmpfs(tmp_path, "3m") as mount:
        yield mount


# ~364k parameters: best.safetensors ~1.5 MB, a full state ~4.4 MB (weights + two AdamW moments).
WIDE = {"model.channels": "[8,16]", "model.hidden": 20000, "training.epochs": 2}


def test_a_full_disk_is_one_error_line_and_loses_nothing(small_disk):
    r = run_main(args(small_disk, "full", **WIDE))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "could not write the state" in line and "previous states are intact" in line
    run_dir = small_disk / "full"
    assert not list(run_dir.rglob(".tmp-*")) and not list(run_dir.rglob("*.tmp-*")), "temporary files removed"
    best = run_dir / "checkpoints/best.safetensors"
    from safetensors.torch import load_file

    assert load_file(str(best)), "the best checkpoint written before the disk filled is intact"
    assert "train/loss_step" in tb_scalars(run_dir / "tensorboard"), "TensorBoard was closed, its events readable"


def test_resuming_on_a_read_only_disk_is_refused_before_training(small_disk):
    r = run_main(args(small_disk, "ro", **{"training.epochs": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(small_disk / "ro")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = run_main(args(small_disk, "ro", **{"training.epochs": 1}) + ["--resume", "auto"])
    assert r.returncode == 2
    assert "cannot write in the run directory" in one_error_line(r.stderr)
    assert snapshot(small_disk / "ro") == before


@pytest.mark.parametrize("log_every", [2, 1000], ids=["caught-at-a-log-step", "caught-at-the-epoch-end"])
def test_nonfinite_loss_in_the_first_epoch_is_one_line(out, log_every):
    # With no log step in the epoch, the epoch block is printed before any best value exists: it used
    # to crash formatting None (TypeError) instead of stopping with the non-finite line.
    r = run_main(args(out, "nan", **{"training.optimizer.lr": "1.0e12", "training.epochs": 2,
                                     "logging.log_every_n_steps": log_every}))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert "non-finite" in one_error_line(r.stderr)
    assert "TypeError" not in r.stderr


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler (delete it to free)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def test_a_full_disk_at_the_best_checkpoint_keeps_the_previous_one(tmp_path):
    # 1 MiB: room for the config and events, not for a 1.5 MB best.safetensors.
    with tmpfs(tmp_path, "1m") as mount:
        r = run_main(args(mount, "best", **WIDE))
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        line = one_error_line(r.stderr)
        # The best checkpoint is written in the background, so the epoch-end state write (on the same full
        # disk) may be the first to fail; either way the line says what is intact and nothing is half-written.
        assert ("best.safetensors" in line and "previous best checkpoint is intact" in line) or (
            "could not write the state" in line and "previous states are intact" in line), line
        assert not list((mount / "best").rglob("*.tmp-*")), "the temporary file is removed"


FILL_BEFORE_RESULTS = """
import sys; sys.path.insert(0, {root!r})
from pathlib import Path
import train.loop as loop
real = loop.baselines
def baselines(*a, **k):
    out = real(*a, **k)
    # The disk fills up between the test pass and results.json.
    with open(Path({disk!r}) / "filler", "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\\0" * chunk)
            except OSError:
                pass
    return out
loop.baselines = baselines
from train.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_at_results_json_is_one_line_and_a_resume_tests_again(small_disk):
    script = FILL_BEFORE_RESULTS.format(root=str(ROOT), disk=str(small_disk))
    a = args(small_disk, "res", **{"training.epochs": 1})
    r = subprocess.run([sys.executable, "-c", script, *a], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "results.json" in one_error_line(r.stderr) and "--resume auto" in r.stderr
    assert not (small_disk / "res/results.json").exists()
    (small_disk / "filler").unlink()
    r = run_main(a + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((small_disk / "res/results.json").read_text())["epochs_run"] == 1


def test_a_full_disk_while_building_the_image_cache_is_one_line(small_disk, tmp_path):
    # Without reserving the cache file's blocks first, writing into its memory map on a full disk
    # killed the process with SIGBUS (no message at all).
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rows = ["path,date"]
    for i in range(40):
        Image.new("RGB", (64, 64), (i * 6, 100, 200 - i * 4)).save(images / f"{i}.png")
        rows.append(f"{i}.png,{1900 + i}")
    (images / "m.csv").write_text("\n".join(rows) + "\n")
    # Leave 200 kB free: less than the 40 x 3 x 64 x 64 bytes (490 kB) of the cache.
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 200_000))
    manifest = {"data.kind": "manifest", "data.manifest.path": str(images / "m.csv"), "data.image_size": 64,
                "data.cache": "true", "data.cache_dir": str(small_disk / "cache"), "training.epochs": 1}
    r = run_main(args(tmp_path / "runs", "cache", **manifest))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "cannot write the image cache" in one_error_line(r.stderr)
    assert not list((small_disk / "cache").glob("*.npy")) and not list((small_disk / "cache").glob(".*tmp*"))
    assert not (tmp_path / "runs" / "cache").exists(), "no run directory for a run that never started"


def test_a_sweep_on_a_full_disk_is_one_line(small_disk):
    _fill(small_disk)
    r = subprocess.run([sys.executable, "-m", "train.sweep", "configs/sweep.yml", "--max-runs", "1",
                        "--output-dir", str(small_disk), "--name", "s"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "No space left on device" in one_error_line(r.stderr)


def test_a_train_split_with_one_date_is_refused_before_anything_is_written(out):
    # torch's std of one value is NaN: that used to become the target standardization.
    r = run_main(args(out, "one", **{"data.synthetic.num_train": 1}))
    assert r.returncode == 2
    assert "at least two different dates" in one_error_line(r.stderr)
    assert list(out.iterdir()) == []


def test_a_secret_in_the_run_name_is_refused_and_the_resume_line_redacts_secrets(out):
    key = "k3y0123456789abcdef"
    r = run_main(args(out, f"run-{key}"), WANDB_API_KEY=key)
    assert r.returncode == 2 and key not in r.stderr and "contains a secret" in one_error_line(r.stderr)
    proc = subprocess.Popen([sys.executable, MAIN, *args(out, "sig", **{**LONG, "logging.wandb.tags": f"[{key}]"})],
                            cwd=ROOT, env=env(WANDB_API_KEY=key), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(out / "sig" / "checkpoints" / "state", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "Resume with:" in stderr
    assert key not in stdout + stderr
