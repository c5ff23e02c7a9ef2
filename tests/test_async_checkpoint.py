"""The best checkpoint is written on a background thread (train.checkpoints.BestCheckpoint): training waits
for a real copy of the weights only; the end of the run, the next save and every read of the path wait for
the write; a failed write is one UserError there; kill -9 mid-write leaves the previous best loadable."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoints as checkpoints
from conftest import DEFAULT_CONFIG, ROOT, env, tiny
from train.checkpoints import BestCheckpoint, read_checkpoint, read_safetensors
from train.errors import UserError
from train.state import list_states

META = {"format": "test", "epoch": "1"}
REAL_SAVE_FILE = checkpoints.save_file


def _weights(value: float, n: int = 3) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((4, 5), value + i) for i in range(n)}


def _assert_file_holds(path: Path, weights: dict[str, torch.Tensor]) -> None:
    on_disk = load_file(str(path))
    assert on_disk.keys() == weights.keys()
    assert all(torch.equal(on_disk[k], weights[k]) for k in weights)


@pytest.fixture
def held_writer(monkeypatch):
    """The background save_file waits for ``release`` before writing: the write is still in flight for
    as long as the test wants, without any timing."""
    release, started = threading.Event(), threading.Event()

    def held(tensors, filename, metadata=None):
        started.set()
        assert release.wait(30), "the test never released the writer"
        REAL_SAVE_FILE(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", held)
    return release, started


def test_training_waits_for_a_copy_not_for_the_write(tmp_path, held_writer):
    release, started = held_writer
    live = _weights(1.0)
    expected = {k: v.clone() for k, v in live.items()}
    best = BestCheckpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    best.write(live, META)  # returns while the writer is held: training goes on
    assert started.wait(10) and not best._path.exists()
    for v in live.values():
        v.add_(100.0)  # the next optimizer steps change the live parameters in place
    release.set()
    best.close()
    _assert_file_holds(best.path, expected)  # the copy, not the parameters as they are now


def test_the_end_and_the_path_wait_for_the_last_write(tmp_path, held_writer):
    release, _ = held_writer
    (tmp_path / "checkpoints").mkdir()
    with BestCheckpoint(tmp_path) as best:
        best.write(_weights(1.0), META)
        threading.Timer(0.2, release.set).start()
        path = best.path  # waits for the write
        _assert_file_holds(path, _weights(1.0))
        best.write(_weights(2.0), META)  # the run ends with this write in flight
    _assert_file_holds(path, _weights(2.0))
    assert not list(path.parent.glob(".*tmp-*"))


def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def test_a_failed_write_is_one_user_error_at_the_next_save_and_the_old_file_stays(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    best = BestCheckpoint(tmp_path)
    best.write(_weights(1.0), META)
    best.wait()
    monkeypatch.setattr(checkpoints, "save_file", _failing_save_file)
    best.write(_weights(2.0), META)  # fails on the writer thread, after returning
    with pytest.raises(UserError) as e:
        best.write(_weights(3.0), META)
    assert len(e.value.lines) == 1
    assert "could not write" in e.value.lines[0] and "No space left on device" in e.value.lines[0]
    assert "previous best checkpoint is intact" in e.value.lines[0]
    _assert_file_holds(best._path, _weights(1.0))
    assert not list(best._path.parent.glob(".*tmp-*")), "the temporary file is removed"
    monkeypatch.setattr(checkpoints, "save_file", REAL_SAVE_FILE)
    best.write(_weights(4.0), META)  # reported once; the next save works again
    best.close()
    _assert_file_holds(best._path, _weights(4.0))


def test_a_failed_write_does_not_hide_the_error_the_run_is_ending_with(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setattr(checkpoints, "save_file", _failing_save_file)
    with pytest.raises(RuntimeError, match="the run's own error"):
        with BestCheckpoint(tmp_path) as best:
            best.write(_weights(1.0), META)
            raise RuntimeError("the run's own error")
    assert "warning: could not write" in capsys.readouterr().err
    with pytest.raises(UserError, match="could not write"):  # a normal end reports it as the error
        with BestCheckpoint(tmp_path) as best:
            best.write(_weights(1.0), META)


def test_update_metadata_keeps_the_tensors_and_merges_the_metadata(tmp_path):
    from train.checkpoints import checkpoint_metadata
    from train.config import load_config

    cfg = load_config(DEFAULT_CONFIG, [])
    meta = checkpoint_metadata(model_cfg=cfg.model, epoch=2, global_step=20, monitor="val/rmse", value=12.5,
                               target_mean=1950.0, target_std=30.0, pixel_mean=[0.5] * 3, pixel_std=[0.2] * 3,
                               image_size=32)
    (tmp_path / "checkpoints").mkdir()
    calibration = {"method": "abs_residual", "levels": [0.8, 0.9], "q": [7.5, 11.0], "n": 40}
    with BestCheckpoint(tmp_path) as best:
        best.write(_weights(1.0), meta)
        best.update_metadata({"calibration": json.dumps(calibration)})  # waits for the write first
    tensors, raw = read_safetensors(best.path)
    assert raw == {**meta, "calibration": json.dumps(calibration)}
    assert all(torch.equal(tensors[k], v) for k, v in _weights(1.0).items())
    assert read_checkpoint(best.path)[1].calibration.q == [7.5, 11.0]
    with pytest.raises(UserError, match="not found"):
        BestCheckpoint(tmp_path / "elsewhere").update_metadata({"calibration": "{}"})


# --- kill -9 in the middle of a write ---------------------------------------------------------------

WRITER = """
import sys, time
sys.path.insert(0, {root!r})
import torch
import train.checkpoints as checkpoints
from train.checkpoints import BestCheckpoint
mode, run_dir = sys.argv[1], sys.argv[2]
best = BestCheckpoint(run_dir)
best.write({{"w": torch.full((64, 64), 1.0)}}, {{"which": "previous"}})
best.wait()
print("PREVIOUS WRITTEN", flush=True)
if mode == "held":
    real = checkpoints.save_file
    def written_then_stuck(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the whole temporary file, not yet fsynced or renamed
        print("TEMPORARY FILE WRITTEN", flush=True)
        time.sleep(120)
    checkpoints.save_file = written_then_stuck
    new = {{"w": torch.full((64, 64), 2.0)}}
else:  # a real write of 256 MiB, killed whenever the temporary file is seen
    new = {{f"w{{i}}": torch.zeros(1024, 1024) for i in range(64)}}
best.write(new, {{"which": "new"}})
print("COPIED", flush=True)
time.sleep(120)
"""


def _kill_mid_write(tmp_path: Path, mode: str) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT)), mode, str(run_dir)], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "PREVIOUS WRITTEN", proc.communicate()
        if mode == "held":
            for line in proc.stdout:  # "COPIED" (write() returned) comes before or after it
                if line.strip() == "TEMPORARY FILE WRITTEN":
                    break
            else:
                raise AssertionError(proc.communicate())
        else:
            deadline = time.monotonic() + 120
            while not list((run_dir / "checkpoints").glob(".best.safetensors.tmp-*")):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.0005)
    finally:
        proc.kill()  # SIGKILL: no handler, no finally, no atexit
        proc.wait()
    return run_dir / "checkpoints" / "best.safetensors"


@pytest.mark.parametrize("mode", ["held", "real"], ids=["before-the-rename", "during-a-256MiB-write"])
def test_kill_9_during_a_write_leaves_the_previous_best_loadable(tmp_path, mode):
    path = _kill_mid_write(tmp_path, mode)
    tensors, metadata = read_safetensors(path)
    assert metadata == {"which": "previous"}
    assert torch.equal(tensors["w"], torch.full((64, 64), 1.0))
    assert list(path.parent.glob(".best.safetensors.tmp-*")), "the write was cut off in the middle"


SLOW_WRITER_RUN = """
import sys, time
sys.path.insert(0, {root!r})
import train.checkpoints as checkpoints
real = checkpoints.save_file
def slow(tensors, filename, metadata=None):
    time.sleep(0.5)  # the run reaches its end, and the test evaluation, with the last write in flight
    real(tensors, filename, metadata=metadata)
checkpoints.save_file = slow
from train.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_ends_with_its_last_best_weights_on_disk(out):
    args = ["--config", DEFAULT_CONFIG, *tiny(out, **{"experiment.name": "slow", "training.epochs": 2,
                                                      "checkpoint.keep_last": 10,
                                                      "training.early_stopping.enabled": "false"})]
    r = subprocess.run([sys.executable, "-c", SLOW_WRITER_RUN.format(root=str(ROOT)), *args], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "slow"
    best = run_dir / "checkpoints" / "best.safetensors"
    tensors, meta = read_checkpoint(best)
    state = next(p for p in list_states(run_dir) if p.name == f"step_{meta.global_step:07d}")
    weights = load_file(str(state / "model.safetensors"))  # the model at the best epoch's end, as its state saved it
    assert tensors.keys() == weights.keys() and all(torch.equal(tensors[k], weights[k]) for k in weights)
    assert not list(best.parent.glob(".*tmp-*"))
