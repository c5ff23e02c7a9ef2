"""Bad input is one ``error:`` line naming the file or key and what to do, exit code 2, no traceback,
nothing existing overwritten: damaged checkpoints, state manifests of the wrong shape, a CSV that is not
UTF-8, a damaged or foreign sweep study; and secrets stay out of W&B names, and options mix with overrides.

One tiny run (2 epochs, 2 states kept, W&B offline with a secret in its name, tags and group) serves
every test; each test copies what it changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import DEFAULT_CONFIG, MAIN, ROOT, env, run_main, run_sweep_cli, tiny, wandb_records, wandb_summary
from train.state import list_states, newest_complete, verify

pytestmark = pytest.mark.slow

SECRET = "Zq7Kx2Lm9Pw4Rt6Yb8Nc"  # 20 characters, as WANDB_API_KEY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run directory, its CompletedProcess, and a directory of 2 PNGs."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    out = tmp / "runs"
    out.mkdir()
    extra = {"experiment.name": "r", "checkpoint.keep_last": 3, "logging.wandb.enabled": "true",
             "logging.wandb.run_name": f"run-{SECRET}", "logging.wandb.tags": f"[t-{SECRET}]",
             "logging.wandb.group": f"g-{SECRET}"}
    r = run_main(["--config", DEFAULT_CONFIG, *tiny(out, **extra)], WANDB_API_KEY=SECRET)
    assert r.returncode == 0, r.stderr[-3000:]
    images = tmp / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20), (60 * i, 90, 30)).save(images / f"{i}.png")
    return {"run_dir": out / "r", "proc": r, "images": images}


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.predict", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# 1. Checkpoint metadata, one field broken each
# --------------------------------------------------------------------------------------------------


def _set(key, value):
    return lambda meta, tensors: meta.__setitem__(key, value)


def _drop(key):
    return lambda meta, tensors: meta.pop(key)


def _extra_model_key(meta, tensors):
    meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), "widht": 3})


def _drop_tensor(meta, tensors):
    tensors.pop(sorted(tensors)[-1])


CHECKPOINT_CASES = {
    "pixel_mean-wrong-length": (_set("pixel_mean", "[0.1, 0.2]"), "pixel_mean"),
    "pixel_std-zero": (_set("pixel_std", "[0.2, 0.0, 0.2]"), "pixel_std"),
    "target_std-missing": (_drop("target_std"), "target_std"),
    "target_std-nan": (_set("target_std", "nan"), "target_std"),
    "model_config-not-json": (_set("model_config", '{"name": "mok_cnn",'), "model_config"),
    "model_config-unknown-key": (_extra_model_key, "widht"),
    "image_size-abc": (_set("image_size", "abc"), "image_size"),
    "format-missing": (_drop("format"), "no model metadata"),
    "tensor-removed": (_drop_tensor, "does not fit"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_broken_checkpoint_metadata_is_one_line_and_writes_nothing(run, tmp_path, case):
    mutate, expected = CHECKPOINT_CASES[case]
    best = run["run_dir"] / "checkpoints" / "best.safetensors"
    tensors = load_file(str(best))
    with safe_open(str(best), "pt") as f:
        meta = dict(f.metadata())
    mutate(meta, tensors)
    ckpt = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(ckpt), metadata=meta)
    out_csv = tmp_path / "out.csv"
    p = _predict("--checkpoint", str(ckpt), "--input", str(run["images"]), "--output", str(out_csv))
    assert p.returncode == 2, p.stderr
    line = _one_error_line(p.stderr)
    assert str(ckpt) in line and expected in line, line
    assert not out_csv.exists() and not list(tmp_path.glob("*.csv*")), list(tmp_path.iterdir())


def test_intact_checkpoint_predicts(run, tmp_path):
    """The control: the same command on the run's own file works (so the cases above fail for their field)."""
    out_csv = tmp_path / "out.csv"
    p = _predict("--checkpoint", str(run["run_dir"] / "checkpoints" / "best.safetensors"),
                 "--input", str(run["images"]), "--output", str(out_csv))
    assert p.returncode == 0, p.stderr
    assert len(out_csv.read_text().splitlines()) == 3


# --------------------------------------------------------------------------------------------------
# 2. State manifests and progress of the wrong shape
# --------------------------------------------------------------------------------------------------


def _reseal_progress(state: Path, text: str) -> None:
    """Write ``progress.json`` and fix its manifest entry, so that only the shape is wrong."""
    (state / "progress.json").write_text(text)
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["files"]["progress.json"] = {"size": len(text.encode()),
                                          "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (state / "manifest.json").write_text(json.dumps(manifest))


def _progress_with(**changes):
    def mutate(state: Path) -> None:
        progress = json.loads((state / "progress.json").read_text())
        progress.update(changes)
        _reseal_progress(state, json.dumps(progress))
    return mutate


STATE_CASES = {
    "manifest-list": (lambda s: (s / "manifest.json").write_text("[]"), "manifest.json"),
    "manifest-no-files": (lambda s: (s / "manifest.json").write_text('{"format": "mok-date-state/1"}'),
                          "manifest.json"),
    "manifest-file-entry-int": (
        lambda s: (s / "manifest.json").write_text('{"format": "mok-date-state/1", "files": {"model.safetensors": 5}}'),
        "manifest.json"),
    "progress-list": (lambda s: _reseal_progress(s, "[]"), "progress.json"),
    "progress-field-of-another-type": (_progress_with(epoch="two"), "progress.json"),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_of_the_wrong_shape_is_a_reason_and_the_previous_state_is_used(run, tmp_path, case):
    mutate, named = STATE_CASES[case]
    run_dir = tmp_path / "r"
    shutil.copytree(run["run_dir"], run_dir, ignore=shutil.ignore_patterns("wandb", "tensorboard"))
    states = list_states(run_dir)
    assert len(states) == 2 and all(verify(s) is None for s in states)
    mutate(states[-1])
    reason = verify(states[-1])
    assert isinstance(reason, str) and named in reason, reason
    warnings = []
    assert newest_complete(run_dir, warn=warnings.append) == states[-2]
    assert len(warnings) == 1 and states[-1].name in warnings[0], warnings


# --------------------------------------------------------------------------------------------------
# 3. A CSV in another encoding
# --------------------------------------------------------------------------------------------------


def test_latin1_csv_is_one_line(run, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    shutil.copy(run["images"] / "0.png", root / "café.png")
    shutil.copy(run["images"] / "1.png", root / "b.png")
    csv = tmp_path / "in.csv"
    csv.write_bytes("path,date\ncafé.png,1950\nb.png,1960\n".encode("latin-1"))
    out_csv = tmp_path / "out.csv"
    p = _predict("--checkpoint", str(run["run_dir"] / "checkpoints" / "best.safetensors"), "--input", str(csv),
                 "--image-root", str(root), "--output", str(out_csv))
    assert p.returncode == 2, p.stderr
    line = _one_error_line(p.stderr)
    assert "not a readable UTF-8 CSV" in line and str(csv) in line, line
    assert not out_csv.exists()


# --------------------------------------------------------------------------------------------------
# 4. The sweep's study: its journal file truncated, edited or someone else's; a storage URL that fails
# --------------------------------------------------------------------------------------------------

# Should a damaged study ever be taken for a valid one, the trial it starts is tiny.
SWEEP_FIXED = ["training.epochs=1", "data.synthetic.num_train=64", "data.synthetic.num_val=32",
               "data.synthetic.num_test=32", "logging.progress_bar=false"]
SWEEP_ARGS = ["configs/sweep.yml", "--max-runs", "1", "--name", "s", *SWEEP_FIXED]


def _sweep_journal(out: Path, fixed: list[str] = SWEEP_FIXED) -> bytes:
    """The journal the sweep itself writes for SWEEP_ARGS before its first trial (the study, its definition)."""
    from train.sweep import open_sweep, parse_args

    open_sweep(parse_args([*SWEEP_ARGS[:-len(SWEEP_FIXED)], "--output-dir", str(out), *fixed]))
    return (out / "s" / "optuna.journal").read_bytes()


def _foreign_journal(tmp: Path) -> bytes:
    """A study named s made with Optuna directly (one trial), not by train.sweep."""
    import optuna

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "foreign.journal"
    study = optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))
    study.tell(study.ask(), 1.0)
    return path.read_bytes()


JOURNAL_CASES = {
    "torn-last-record": (lambda tmp: _sweep_journal(tmp)[:-20], "line 2 is not an Optuna journal record (no newline"),
    "garbage": (lambda tmp: b"\x00\xff not a journal\n", "line 1 is not an Optuna journal record"),
    "a-json-list": (lambda tmp: b"[]\n", "line 1 is not an Optuna journal record (no op_code)"),
    "edited-first-line": (lambda tmp: _sweep_journal(tmp).replace(b'"op_code":0', b'"op_code":0,,', 1),
                          "line 1 is not an Optuna journal record (not JSON"),
    "another-sweep": (lambda tmp: _sweep_journal(tmp, [*SWEEP_FIXED, "training.epochs=2"]),
                      "holds a different sweep"),
    "not-made-by-train-sweep": (_foreign_journal, "was not created by train.sweep"),
}


@pytest.mark.parametrize("case", list(JOURNAL_CASES))
def test_a_damaged_or_foreign_study_journal_is_one_line_and_left_as_it_was(tmp_path, case):
    make, message = JOURNAL_CASES[case]
    payload = make(tmp_path / "ref")
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "optuna.journal").write_bytes(payload)
    p = run_sweep_cli([*SWEEP_ARGS, "--output-dir", str(tmp_path / "sweeps")], timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = _one_error_line(p.stderr)
    assert message in line, line
    assert (sweep_dir / "optuna.journal").read_bytes() == payload
    assert [q.name for q in sweep_dir.iterdir()] == ["optuna.journal"], "a trial started or a file was written"


def test_the_reference_study_journal_is_accepted(tmp_path):
    """The control for the cases above: the study as the sweep wrote it is opened again, unchanged."""
    first = _sweep_journal(tmp_path)
    assert _sweep_journal(tmp_path) == first
    assert first.count(b"\n") == 2, "the study and its definition, nothing more"


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/sweeps", "nosuchdb://x/y"])
def test_a_storage_url_that_cannot_be_opened_is_one_line(tmp_path, url):
    p = run_sweep_cli([*SWEEP_ARGS, "--output-dir", str(tmp_path), "--storage", url], timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    line = _one_error_line(p.stderr)
    assert line.startswith(f"error: --storage {url}: cannot open it"), line
    assert list(tmp_path.iterdir()) == [], "nothing written"


# --------------------------------------------------------------------------------------------------
# 5. Secrets in the W&B run name, tags and group
# --------------------------------------------------------------------------------------------------


def test_secret_in_wandb_names_appears_nowhere(run):
    r, run_dir = run["proc"], run["run_dir"]
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert "run-***" in r.stdout  # redacted, not dropped
    assert SECRET not in (run_dir / "config.yaml").read_text()
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    summary = wandb_summary(offline)
    assert summary["name"] == "run-***" and summary["tags"] == ["t-***"]
    for key in ("name", "tags", "config"):
        assert SECRET not in json.dumps(summary.get(key)), key
    assert SECRET not in json.dumps(summary)
    (run_record,) = [rec["run"] for rec in wandb_records(run_dir) if rec["type"] == "run"]
    assert run_record["run_group"] == "g-***" and SECRET not in json.dumps(run_record)
    output_log = offline / "files" / "output.log"
    if output_log.is_file():
        assert SECRET not in output_log.read_text()


def test_secret_is_not_in_the_recorded_command_line(run):
    records = wandb_records(run["run_dir"])
    assert SECRET not in json.dumps([rec for rec in records if rec["type"] == "environment"])


# --------------------------------------------------------------------------------------------------
# 6. Options and overrides in any order
# --------------------------------------------------------------------------------------------------


def test_overrides_after_options_are_read():
    p = subprocess.run([sys.executable, MAIN, "--config", DEFAULT_CONFIG, "--resume", "auto", "training.epochs=3",
                        "experiment.name=x", "--print-config"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "  epochs: 3\n" in p.stdout and "  name: x\n" in p.stdout


def test_sweep_check_reads_overrides_anywhere():
    # --check prints no config; that the override is read shows in its validation: a good one passes,
    # a bad one before or after --check is refused once, naming the key.
    ok = run_sweep_cli(["configs/sweep.yml", "--check", "training.epochs=3"], timeout=60)
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr
    for args in (["--check", "training.epochs=0"], ["training.epochs=0", "--check"]):
        bad = run_sweep_cli(["configs/sweep.yml", *args], timeout=60)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
        assert "training.epochs" in _one_error_line(bad.stderr)
