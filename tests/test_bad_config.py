"""Bad input of any kind gives one `error:` line per problem, naming the file/line or the key and what
to do, exit code 2, no traceback: malformed config files (binary, not UTF-8, 10k levels deep, alias
bombs, duplicate keys, a directory) and override values out of the range a run can use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import Config, load_config
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LINE_MAX = 400  # an error line's length without the file path: values are quoted up to 80 characters


def _alias_bomb() -> bytes:
    """"Billion laughs": nine levels of nine aliases each stand for 9**9 strings in a few hundred bytes."""
    lines, prev = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'], "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
        prev = name
    return ("\n".join(lines) + "\nexperiment:\n  name: *i\n").encode()


# (id, file content or None for a directory, words the single error line must contain)
MALFORMED = [
    ("binary", b"\x00\x01\x02PK\x03\x04binary\x00data", ["character #x0000 is not allowed", "binary file", ":1:1:"]),
    ("not_utf8", "experiment:\n  name: caf\xe9\n".encode("latin-1"), ["not UTF-8", "byte 0xe9 at offset 23", "line 2"]),
    ("nested_10k", b"[" * 10_000 + b"]" * 10_000, ["nested more than 64 levels deep", ":1:65:"]),
    ("alias_bomb", _alias_bomb(), ["more than 10,000 values", "alias"]),
    ("recursive_alias", b"a: &a [1, *a]\n", ["alias *a is used inside its own anchor"]),
    ("duplicate_key", b"training:\n  epochs: 3\n  loss: mse\n  epochs: 5\n",
     ["duplicate key 'training.epochs'", "first at line 2, again at line 4", ":4:3:"]),
    ("huge_integer", b"experiment:\n  seed: " + b"9" * 5000 + b"\n", ["cannot read this value", ":2:9:"]),
    ("directory", None, ["is a directory"]),
    ("top_level_list", b"- a\n- b\n", ["the top level must be a mapping of sections, got list"]),
]


def _write(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / f"{name}.yml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_gives_one_capped_line(tmp_path, name, content, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert len(e.value.lines) == 1, e.value.lines
    line = e.value.lines[0]
    assert str(path) in line
    for word in words:
        assert word in line, line
    assert len(line) - len(str(path)) < LINE_MAX and "\n" not in line
    assert "lol" not in line  # an expanded alias is never echoed


def test_empty_file_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("")
    assert load_config(path) == Config()


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text("model: &m {name: resnet}\nlogging:\n  wandb: {<<: {project: a, tags: [x]}, project: b}\n")
    cfg = load_config(path)
    assert cfg.logging.wandb.project == "b" and cfg.logging.wandb.tags == ["x"] and cfg.model.name == "resnet"


@pytest.mark.parametrize("name", ["nested_10k", "duplicate_key"])
def test_main_exits_2_with_one_error_line(tmp_path, name):
    content = dict((m[0], m[1]) for m in MALFORMED)[name]
    path, out = _write(tmp_path, name, content), tmp_path / "runs"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "train/main.py", "--config", str(path), f"experiment.output_dir={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), r.stderr
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == [], "nothing may be written for a bad config"


SMALL_DATA = ["data.synthetic.num_train=64", "data.synthetic.num_val=8", "data.synthetic.num_test=8"]
DEEP = "model.channels=[8,16,32,64,128,256]"  # 32 px halved 5 times: the last block works on 1x1 maps

# (overrides, the key the error line names)
REJECTED = [
    (["experiment.seed=-1"], "experiment.seed"),
    (["experiment.seed=4294967296"], "experiment.seed"),  # 2**32: np.random.seed (accelerate's set_seed) refuses
    (["training.optimizer.lr=nan"], "training.optimizer.lr"),
    (["training.optimizer.lr=inf"], "training.optimizer.lr"),
    (["data.synthetic.year_min=-inf"], "data.synthetic.year_min"),
    (["data.synthetic.year_max=1e308"], "data.synthetic.year_max"),
    (["training.optimizer.betas=[0.9, .nan]"], "training.optimizer.betas"),
    (["data.batch_size=100000000", "data.image_size=1024", *SMALL_DATA], "data.batch_size"),
    ([DEEP, "data.batch_size=1"], "data.batch_size"),  # BatchNorm, training: one value per channel
    ([DEEP, "data.synthetic.num_train=129"], "data.synthetic.num_train"),  # last batch of 129 % 64 = 1
    (["model.norm=group", "model.channels=[8,8,8,8,8,8]", "data.eval_batch_size=1"], "data.eval_batch_size"),
    (["model.norm=group", "model.channels=[12,24]"], "model.channels"),
    (["training.num_threads=100000"], "training.num_threads"),
    (["logging.wandb.project=a/b"], "logging.wandb.project"),
    (["training={epochs: 1, epochs: 2}"], "duplicate key 'epochs'"),
    (["experiment.name=" + "x" * 10_000 + "/"], "experiment.name"),
]


@pytest.mark.parametrize("overrides,key", REJECTED, ids=[" ".join(o)[:50] for o, _ in REJECTED])
def test_out_of_range_override_names_the_key(monkeypatch, overrides, key):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process, as under `python train/main.py`
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert len(e.value.lines) == 1, e.value.lines
    assert key in e.value.lines[0]
    assert len(e.value.lines[0]) < LINE_MAX and "\n" not in e.value.lines[0]


def test_the_edges_of_each_range_are_accepted(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes: Accelerate fills up the last batch
    edges = ["experiment.seed=4294967295", "data.synthetic.year_min=1000", "data.synthetic.year_max=3000"]
    cfg = load_config(None, [*edges, DEEP, "data.batch_size=2", "data.synthetic.num_train=129"])
    assert cfg.experiment.seed == 2**32 - 1
    # resnet's stride-2 convolutions round up: more stages than halvings of the image still build.
    assert load_config(None, ["model.name=resnet", "data.image_size=8", "model.channels=[16,16,16,16,16]"])


def test_a_secret_in_a_value_is_not_echoed(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcd1234efgh5678")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["experiment.name=run-abcd1234efgh5678/x"])
    (line,) = e.value.lines
    assert line.startswith("experiment.name:") and "abcd1234efgh5678" not in line and "***" in line
