"""Never lose a run: exact resume after kill -9 (epoch boundary and mid-epoch, with dropout),
preemption by SIGTERM, corrupt states, warm starts, time limits, non-finite losses, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import DEFAULT_CONFIG, MAIN, ROOT, env, run_main, tb_scalars, tiny, wandb_summary
from train.state import list_states, newest_complete, read_progress, verify

pytestmark = pytest.mark.slow

# 512 images / batch 32 = 16 steps per epoch; dropout on, one thread (bit-exact needs the same
# thread count on both sides).
BASE = {
    "data.synthetic.num_train": 512, "model.dropout": 0.3, "training.epochs": 4, "training.num_threads": 1,
    "checkpoint.keep_last": 10, "logging.log_every_n_steps": 4, "training.early_stopping.enabled": "false",
}


def args(out: Path, name: str, **extra) -> list[str]:
    return ["--config", DEFAULT_CONFIG, *tiny(out, **{**BASE, "experiment.name": name, **extra})]


def start(out: Path, name: str, *more: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MAIN, *args(out, name, **extra), *more], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_state(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if newest_complete(run_dir, warn=lambda *_: None) is not None:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no state was written in time")


def final_weights(run_dir: Path) -> dict:
    return load_file(str(list_states(run_dir)[-1] / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    r = run_main(args(out, "s", **{"checkpoint.every_n_steps": 6}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "s"


@pytest.mark.parametrize("every_n_steps", [None, 6], ids=["epoch-boundary", "mid-epoch"])
def test_kill_9_and_resume_is_bit_identical(straight, out, every_n_steps):
    extra = {"checkpoint.every_n_steps": every_n_steps} if every_n_steps else {}
    proc = start(out, "k", **extra)
    wait_for_state(out / "k", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    first = read_progress(newest_complete(out / "k"))
    if every_n_steps:
        assert not first.epoch_done and first.batches_done > 0, "the state the resume starts from is mid-epoch"
    r = run_main(args(out, "k", **extra) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming run 'k'" in r.stdout
    assert_same_weights(final_weights(straight), final_weights(out / "k"))
    assert (load_file(str(straight / "checkpoints/best.safetensors")).keys()
            == load_file(str(out / "k/checkpoints/best.safetensors")).keys())
    assert (json.loads((out / "k/results.json").read_text())["test/rmse"]
            == json.loads((straight / "results.json").read_text())["test/rmse"])
    # TensorBoard continues the stream: one val/rmse point per epoch, no step repeated or going back.
    steps = [e.step for e in tb_scalars(out / "k/tensorboard")["val/rmse"]]
    assert steps == sorted(set(steps)) and len(steps) == 4


def test_kill_9_and_resume_with_the_distribution_head_is_bit_identical(out):
    extra = {"checkpoint.every_n_steps": 6, "model.head": "distribution", "training.epochs": 2}
    r = run_main(args(out, "ds", **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start(out, "dk", **extra)
    wait_for_state(out / "dk", proc)
    proc.kill()
    proc.wait()
    r = run_main(args(out, "dk", **extra) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(out / "ds"), final_weights(out / "dk"))
    done = [json.loads((out / name / "results.json").read_text()) for name in ("ds", "dk")]
    assert done[0]["test/mae"] == done[1]["test/mae"] and done[0]["calibration"] == done[1]["calibration"]


def test_sigterm_saves_resumes_same_wandb_run_and_is_exact(straight, out):
    proc = start(out, "t", **{"logging.wandb.enabled": "true", "checkpoint.every_n_steps": 6})
    wait_for_state(out / "t", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-3000:]
    assert "Stopped: SIGTERM received; full state saved" in stderr
    assert "--resume auto" in stderr and "experiment.name=t" in stderr
    first_run = list((out / "t/wandb").glob("offline-run-*"))
    assert len(first_run) == 1
    s = wandb_summary(first_run[0])
    assert s["exit_code"] == 3
    run_id = s["run_id"]

    r = run_main(args(out, "t", **{"logging.wandb.enabled": "true", "checkpoint.every_n_steps": 6})
                 + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((out / "t/wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs), "W&B continues the same run id"
    assert wandb_summary(runs[-1])["state"] == "finished"
    assert_same_weights(final_weights(straight), final_weights(out / "t"))


def test_corrupt_newest_state_falls_back_to_the_previous_one(straight, out):
    run_dir = out / "s"
    shutil.copytree(straight, run_dir)
    newest = list_states(run_dir)[-1]
    victim = newest / "optimizer.bin"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    assert verify(newest) is not None
    shutil.rmtree(run_dir / "tensorboard")
    r = run_main(args(out, "s", **{"checkpoint.every_n_steps": 6}) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: skipping state {newest.name}: {victim}" in r.stdout
    assert_same_weights(final_weights(straight), final_weights(run_dir))


def test_resume_auto_with_nothing_to_resume_starts_fresh(out):
    r = run_main(args(out, "fresh", **{"training.epochs": 1}) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No complete state in" in r.stdout and (out / "fresh/results.json").exists()


def test_state_layout_and_pruning(straight):
    states = list_states(straight)
    assert [p.name for p in states][-1] == "step_0000064"
    assert all(verify(p) is None for p in states)
    files = {p.name for p in states[-1].iterdir()}
    assert {"model.safetensors", "optimizer.bin", "progress.json", "manifest.json"} <= files
    assert not any(f.endswith(".pkl") and "model" in f for f in files), "weights only as safetensors"


def test_keep_last_prunes_old_states_but_never_best(out):
    r = run_main(args(out, "p", **{"checkpoint.keep_last": 1, "training.epochs": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in list_states(out / "p")] == ["step_0000032"]
    assert (out / "p/checkpoints/best.safetensors").exists()


def test_init_from_warm_start_and_mismatch(straight, out, tmp_path):
    best = straight / "checkpoints/best.safetensors"
    r = run_main(args(out, "warm", **{"training.epochs": 1, "model.init_from": str(best)}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Initialized the model from" in r.stdout

    r = run_main(args(out, "wide", **{"training.epochs": 1, "model.init_from": str(best), "model.channels": "[8,32]"}))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not fit the configured model" in r.stderr and "shape" in r.stderr
    assert not (out / "wide").exists()

    r = run_main(args(out, "gone", **{"model.init_from": str(tmp_path / "nope.safetensors")}))
    assert r.returncode == 2 and "model.init_from: '" in r.stderr and "not found" in r.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    r = run_main(args(out, "junk", **{"model.init_from": str(junk)}))
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr and "Traceback" not in r.stderr


def test_resume_with_a_changed_model_names_the_tensors(straight, out):
    shutil.copytree(straight, out / "s")
    before = {p: p.stat().st_mtime_ns for p in (out / "s").rglob("*") if p.is_file()}
    r = run_main(args(out, "s", **{"model.channels": "[8,24]"}) + ["--resume", "auto"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "does not fit the configured model" in r.stderr and "Traceback" not in r.stderr
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "a refused resume changes no existing file"


@pytest.mark.parametrize("path,line", [("missing", "not found"), ("foreign", "is not a state of this trainer")])
def test_bad_resume_paths(out, tmp_path, path, line):
    target = tmp_path / "missing"
    if path == "foreign":
        target = tmp_path / "step_0000010"
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps({"format": "someone-else/1", "files": {}}))
    r = run_main(args(out, "x") + ["--resume", str(target)])
    assert r.returncode == 2 and line in r.stderr and "Traceback" not in r.stderr


def test_max_time_stops_cleanly_with_a_state(out):
    r = run_main(args(out, "mt", **{"data.synthetic.num_train": 4096, "training.epochs": 50,
                                    "training.max_time": "00:00:06"}))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "training.max_time (00:00:06) nearly reached" in r.stderr
    state = newest_complete(out / "mt")
    assert state is not None and verify(state) is None


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(blocker / "runs", **{"experiment.name": "n"})])
    assert r.returncode == 2 and "cannot create run directory" in r.stderr and "Traceback" not in r.stderr


INJECT = """
import sys; sys.path.insert(0, {root!r})
import train.loop as loop
calls = {{"n": 0}}
real_build_loss = loop.build_loss
def build_loss(cfg, reduction="mean"):
    fn = real_build_loss(cfg, reduction)
    if reduction != "mean":
        return fn
    def poisoned(pred, y):
        calls["n"] += 1
        loss = fn(pred, y)
        return loss * float("nan") if calls["n"] == {bad_call} else loss
    return poisoned
loop.build_loss = build_loss
{extra}
from train.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_injected(a: list[str], bad_call: int, extra: str = "") -> subprocess.CompletedProcess:
    script = INJECT.format(root=str(ROOT), bad_call=bad_call, extra=extra)
    return subprocess.run([sys.executable, "-c", script, *a], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=240)


def test_nonfinite_loss_stop(out):
    # NaN on the 20th batch (epoch 2): stop at the next log step, never save a state with it.
    r = run_injected(args(out, "nan", **{"logging.wandb.enabled": "true"}), bad_call=20)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: non-finite training loss in epoch 2 by step 20" in r.stderr and "Traceback" not in r.stderr
    assert [read_progress(p).global_step for p in list_states(out / "nan")] == [16], "no state after the NaN"
    assert load_file(str(out / "nan/checkpoints/best.safetensors"))  # untouched, readable
    s = wandb_summary(next((out / "nan/wandb").glob("offline-run-*")))
    assert s["state"] == "failed" and s["exit_code"] == 1


def test_nonfinite_loss_skip_step(out):
    r = run_injected(args(out, "skip", **{"training.on_nonfinite": "skip_step", "training.epochs": 2}), bad_call=5)
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = tb_scalars(out / "skip/tensorboard")["train/skipped_steps"]
    assert [e.value for e in skipped] == [1, 1]
    assert all(t.isfinite().all() for t in final_weights(out / "skip").values())


def test_a_state_write_that_fails_part_way_loses_nothing(out):
    # The second save_state writes one file, then the disk is "full".
    extra = """
from accelerate import Accelerator
real_save = Accelerator.save_state
saves = {"n": 0}
def save_state(self, output_dir=None, **kw):
    saves["n"] += 1
    if saves["n"] == 2:
        import os
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    return real_save(self, output_dir, **kw)
Accelerator.save_state = save_state
"""
    r = run_injected(args(out, "full"), bad_call=-1, extra=extra)
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("could not write the state" in r.stderr and "No space left on device" in r.stderr
            and "Traceback" not in r.stderr)
    states = list_states(out / "full")
    assert len(states) == 1 and verify(states[0]) is None, "the previous state is complete and loadable"
    assert not list((out / "full/checkpoints/state").glob(".tmp-*"))


def test_secrets_are_redacted(out):
    key = "supersecretapikey0123456789"
    r = run_main(args(out, "sec", **{"training.epochs": 1, "logging.wandb.enabled": "true",
                                     "logging.wandb.tags": f"[{key}]"}),
                 WANDB_API_KEY=key, WANDB_MODE="offline")
    assert r.returncode == 0, r.stderr[-3000:]
    assert key not in (out / "sec/config.yaml").read_text()
    summary = wandb_summary(next((out / "sec/wandb").glob("offline-run-*")))
    assert key not in json.dumps(summary["config"])
    assert key not in r.stdout + r.stderr


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(out):
    # Only rank 1 gets the signal: the ranks agree at the next log step, save one state, exit 3.
    from conftest import accelerate_launch, free_port

    cmd = (accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()))
           + [MAIN] + args(out, "two", **{"training.epochs": 20, "checkpoint.every_n_epochs": 1}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_state(out / "two", proc)
    children = subprocess.run(["pgrep", "-f", f"{MAIN}.*experiment.name=two"],
                              capture_output=True, text=True).stdout.split()
    def rank(pid: str) -> str | None:
        items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        return dict(i.split("=", 1) for i in items if "=" in i).get("RANK")

    workers = [int(pid) for pid in children if rank(pid) == "1"]
    assert len(workers) == 1, children
    os.kill(workers[0], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the launcher reports the workers' exit code 3 as a failure
    assert stderr.count("Stopped: ") == 1 and "signal to another process received; full state saved" in stderr, (
        stderr[-3000:]
    )
    state = newest_complete(out / "two")
    assert verify(state) is None and read_progress(state).num_processes == 2
    assert not (out / "two/results.json").exists()


def test_corrupt_best_checkpoint_at_the_test_evaluation(out):
    extra = """
from train.checkpoints import BestCheckpoint
real_load = BestCheckpoint.load_into
def load_into(self, accelerator, model):
    self.path.write_bytes(self.path.read_bytes()[:50])  # corrupted behind the trainer's back
    return real_load(self, accelerator, model)
BestCheckpoint.load_into = load_into
"""
    r = run_injected(args(out, "cb", **{"training.epochs": 1}), bad_call=-1, extra=extra)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "best.safetensors' is not a readable safetensors file" in r.stderr and "Traceback" not in r.stderr
    assert verify(list_states(out / "cb")[-1]) is None, "the full state is still there to retry from"
    assert not (out / "cb/results.json").exists()
