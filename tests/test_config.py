"""Config: every shipped file validates, overrides parse as people write them, and each class of
bad input gives one clear line, exit code 2, no traceback and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_CONFIG, ROOT, run_main
from train.config import Config, flatten, load_config, parse_yaml
from train.errors import ConfigError

# sweep.yml is a W&B sweep file, not a trainer config (tests/test_sweep.py checks it).
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yml") if p.name != "sweep.yml")


def leaves(d: dict, prefix: str = "") -> dict:
    """Nested dict -> ``{"a.b.c": value}``, lists kept as lists (unlike ``flatten``, which stringifies them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    # Every value the file states, read with plain PyYAML, arrives in the validated config unchanged
    # (e.g. model_config_with_wandb.yml's logging.wandb.enabled: true and tags: [baseline]); every key
    # it leaves out keeps the schema default.
    stated = leaves(yaml.safe_load(path.read_text()))
    loaded = leaves(cfg.model_dump(mode="json"))
    defaults = leaves(Config().model_dump(mode="json"))
    assert stated and stated.keys() <= loaded.keys(), sorted(stated.keys() - loaded.keys())
    assert {k: loaded[k] for k in stated} == stated
    assert ({k: v for k, v in loaded.items() if k not in stated}
            == {k: v for k, v in defaults.items() if k not in stated})
    text = path.read_text()
    assert text.startswith("#") and "train/main.py" in text.split("\n\n")[0], (
        "configs open with the command that uses them"
    )


def test_model_config_spells_out_every_default():
    # The commented default file and the schema must not drift apart.
    assert yaml.safe_load(Path(DEFAULT_CONFIG).read_text()) == Config().model_dump(mode="json")


def test_every_key_of_model_config_is_commented():
    for number, line in enumerate(Path(DEFAULT_CONFIG).read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"line {number} has no comment: {line!r}"


def test_numbers_as_people_write_them(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("training:\n  optimizer:\n    lr: 1e-3\n    weight_decay: 5E-4\n")
    cfg = load_config(f, ["training.max_grad_norm=1e0", "logging.wandb.tags=[a,b]", "logging.wandb.entity=None"])
    assert cfg.training.optimizer.lr == 1e-3 and isinstance(cfg.training.optimizer.lr, float)
    assert cfg.training.optimizer.weight_decay == 5e-4
    assert cfg.training.max_grad_norm == 1.0
    assert cfg.logging.wandb.tags == ["a", "b"]
    assert cfg.logging.wandb.entity is None


def test_sweep_agent_text_values_parse():
    # W&B agents pass Python reprs: 1e-05, None, True.
    cfg = load_config(DEFAULT_CONFIG,
                      ["training.optimizer.lr=1e-05", "training.max_grad_norm=None", "logging.wandb.enabled=True"])
    assert cfg.training.optimizer.lr == 1e-05
    assert cfg.training.max_grad_norm is None
    assert cfg.logging.wandb.enabled is True
    assert parse_yaml("1e-3") == 1e-3 and parse_yaml("2020") == 2020 and parse_yaml("abc") == "abc"


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, ["training.epochz=3", "training.optimizer.lr=-1", "model.name=vgg"])
    text = "\n".join(e.value.lines)
    assert len(e.value.lines) == 3
    assert "training.epochz" in text and "training.epochs" in text
    assert "training.optimizer.lr" in text and "model.name" in text


def test_yaml_1_1_surprises_are_avoided():
    cfg = load_config(DEFAULT_CONFIG,
                      ["training.max_time=23:50:00", "experiment.name=2024-01-01", "training.mixed_precision=no"])
    assert cfg.training.max_time == "23:50:00"
    assert cfg.experiment.name == "2024-01-01"
    assert cfg.training.mixed_precision == "no"


def test_flatten_gives_scalars_only():
    flat = flatten(Config().model_dump(mode="json"))
    assert flat["training.optimizer.lr"] == 2e-3
    assert flat["model.channels"] == "[16, 32, 64]"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in flat.values())


BAD = [
    (["training.epochz=3"], "unknown config key 'training.epochz'; did you mean 'training.epochs'?"),
    (["training.epochs=three"], "training.epochs: Input should be a valid integer"),
    (["training.optimizer.lr=0"], "training.optimizer.lr: Input should be greater than 0"),
    (["training.epochs=0"], "training.epochs: Input should be greater than or equal to 1"),
    (["model.name=vgg16"], "model.name: Input should be 'mok_cnn', 'resnet' or 'hf'"),
    (["training.optimizer.name=adam"], "training.optimizer.name: Input should be 'adamw' or 'sgd'"),
    (["training.scheduler.name=linear"], "training.scheduler.name: Input should be"),
    (["data.kind=manifest"], "data: kind is 'manifest' but manifest.path is not set"),
    (["epochs"], "override 'epochs' is not of the form section.key=value"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_exit_2_one_line_no_traceback(out, overrides, line):
    r = run_main(["--config", DEFAULT_CONFIG, f"experiment.output_dir={out}", *overrides])
    assert r.returncode == 2, r.stderr
    assert f"error: {line}" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(out.iterdir()) == [], "nothing may be written for a bad config"


def test_missing_config_file(out):
    r = run_main(["--config", str(out / "nope.yml")])
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: config file '{out / 'nope.yml'}' not found "
                                "(pass an existing YAML file, e.g. --config configs/model_config.yml)")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yml"
    f.write_text("training:\n  epochs: 3\n  optimizer: {lr: 1e-3\n")
    r = run_main(["--config", str(f)])
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {f}:") and "YAML syntax error" in r.stderr
    assert "Traceback" not in r.stderr


def test_print_config_shows_resolved_values():
    r = run_main(["--config", DEFAULT_CONFIG, "--print-config", "training.optimizer.lr=1e-4"])
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["training"]["optimizer"]["lr"] == 1e-4
    assert Config.model_validate(printed)
