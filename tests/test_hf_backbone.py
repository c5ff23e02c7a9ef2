"""``model.name: hf``: transformers backbones built from config fields or a local pretrained directory,
trained end to end (1 and 2 processes), predicted from ``best.safetensors`` alone with no cache and no
network, and the one-line refusals (offline, typos, image sizes, a missing transformers)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DEFAULT_CONFIG, ROOT, accelerate_launch, env, free_port, run_main, tiny
from train.config import ModelConfig, load_config
from train.errors import UserError
from train.models import build_model

pytest.importorskip("transformers")
from train import hf_backbone  # noqa: E402

# Tiny random backbones (a few thousand parameters) described by config fields alone: no download.
CONVNEXT = {"model_type": "convnext", "hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}
RESNET = {"model_type": "resnet", "hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8}
VIT = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
       "intermediate_size": 32, "image_size": 32, "patch_size": 8}
DINOV2 = {**{k: v for k, v in VIT.items() if k != "intermediate_size"}, "model_type": "dinov2", "mlp_ratio": 2}
CLIP = {"model_type": "clip", "vision_config": {k: v for k, v in VIT.items() if k != "model_type"}}
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _flow(fields: dict) -> str:
    return json.dumps(fields)  # JSON is YAML: a key=value override of a whole mapping


def hf_args(out: Path, name: str, fields: dict | None = None, **extra) -> list[str]:
    values = {"experiment.name": name, "model.name": "hf", "model.hidden": 16, "data.image_size": 32,
              "training.num_threads": 1}
    if fields is not None:
        values.update({"model.hf.pretrained": "false", "model.hf.config": _flow(fields)})
    return ["--config", DEFAULT_CONFIG, *tiny(out, **{**values, **extra})]


def _cfg(fields: dict, **hf) -> ModelConfig:
    return ModelConfig(name="hf", hidden=8, hf={"pretrained": False, "config": fields, **hf})


# --------------------------------------------------------------------------------------------------
# Building (in this process)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [CONVNEXT, RESNET, VIT, DINOV2, CLIP], ids=["convnext", "resnet", "vit", "dinov2",
                                                                             "clip"])
def test_backbones_get_our_head_and_rebuild_from_their_saved_config(fields):
    torch.manual_seed(0)
    model = build_model(_cfg(fields), out_dim=1)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert [n for n in names if n.startswith("head.")] == ["head.0.weight", "head.0.bias", "head.3.weight",
                                                          "head.3.bias"]
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3,)
    assert build_model(_cfg(fields), out_dim=7)(x).shape == (3, 7)
    # What a checkpoint stores is enough to rebuild the same network (no file, no download).
    saved = json.loads(json.dumps(hf_backbone.saved_config(model)))
    again = build_model(_cfg({"model_type": "resnet"}), out_dim=1, hf_config=saved)
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    if fields is CLIP:
        assert saved["model_type"] == "clip_vision_model"  # the vision tower alone
    # FSDP's transformer wrap policy gets the backbone's layer classes, only ones the model has.
    present = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= present


def test_parameters_without_gradients_are_not_trained():
    model = build_model(_cfg(DINOV2))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.embeddings.mask_token"]  # only used for masked pretraining: DDP would stop


def test_vit_runs_at_other_sizes_by_interpolating_its_position_embeddings():
    model = build_model(_cfg(VIT)).eval()
    assert model(torch.randn(2, 3, 48, 48)).shape == (2,)
    hf_backbone.check_image_size(_cfg(VIT).hf, 48)


@pytest.mark.parametrize("fields, size, match", [
    (CONVNEXT, 4, "data.image_size=4 does not fit the convnext backbone .*; use data.image_size >= 16"),
    (VIT, 4, "data.image_size=4 does not fit the vit backbone .*; use data.image_size >= 16"),
])
def test_an_image_size_the_backbone_cannot_take_is_one_line(fields, size, match):
    with pytest.raises(UserError, match=match):
        hf_backbone.check_image_size(_cfg(fields).hf, size)


def test_check_backbone_runs_the_same_checks_from_the_whole_config():
    from train.config import Config
    from train.finetune import check_backbone

    check_backbone(Config())  # mok_cnn: nothing to check, transformers not needed
    cfg = Config(model=_cfg(CONVNEXT), data={"image_size": 8})
    check_backbone(cfg)
    with pytest.raises(UserError, match="data.image_size=4 does not fit"):
        check_backbone(cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": 4})}))


@pytest.mark.parametrize("fields, match", [
    ({"model_type": "convnxt"}, "model.hf.config.model_type: transformers .* has no model type 'convnxt'; did you "
                                "mean convnext"),
    ({"hidden_sizes": [8]}, "model.hf.config needs model_type"),
    ({**CONVNEXT, "hiden_sizes": [8]}, "model.hf.config.hiden_sizes: not a field of the convnext config .*did you "
                                       "mean 'hidden_sizes'"),
    ({**CONVNEXT, "depths": [1]}, "model.hf: transformers could not build a convnext backbone from its config"),
    ({"model_type": "bert"}, "BertModel .* is not a vision backbone"),
])
def test_bad_config_fields_are_one_line(fields, match):
    with pytest.raises(UserError, match=match) as e:
        build_model(_cfg(fields))
    assert "\n" not in str(e.value)


def test_name_or_path_problems_are_one_line(tmp_path):
    cases = [
        (str(tmp_path / "missing"), "no directory"),
        (str(tmp_path), "has no config.json"),
        ("not a valid id!", "neither a directory nor a valid Hub id"),
    ]
    for name, match in cases:
        with pytest.raises(UserError, match=match):
            build_model(ModelConfig(name="hf", hf={"name_or_path": name}))


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match=r'needs the transformers library.*pip install -e "\.\[hf\]"'):
        build_model(_cfg(CONVNEXT))


def test_mok_cnn_does_not_import_transformers():
    code = ("import sys; from train.config import ModelConfig; from train.models import build_model; "
            "build_model(ModelConfig()); import train.loop, train.predict; print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# A "pretrained" backbone from a local directory
# --------------------------------------------------------------------------------------------------

PROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
             "image_std": [0.2, 0.25, 0.3], "size": {"shortest_edge": 32}}


def _pretrained_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(123)
    fields = dict(CONVNEXT)
    saved = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    path = tmp_path / "tiny-convnext"
    saved.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    return path, saved.eval()


def test_pretrained_weights_and_processor_come_from_a_local_directory(tmp_path):
    path, saved = _pretrained_dir(tmp_path)
    cfg = ModelConfig(name="hf", hidden=8, hf={"name_or_path": str(path)})
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.backbone(pixel_values=x).pooler_output, saved(pixel_values=x).pooler_output)
    spec = hf_backbone.processor_spec(cfg.hf)
    assert (spec.mean, spec.std, spec.size) == (PROCESSOR["image_mean"], PROCESSOR["image_std"], 32)
    # pretrained: false takes the architecture only (random weights) and the data's statistics.
    scratch = ModelConfig(name="hf", hidden=8, hf={"name_or_path": str(path), "pretrained": False})
    random = build_model(scratch)
    assert not torch.equal(random.backbone.embeddings.patch_embeddings.weight,
                           saved.embeddings.patch_embeddings.weight)
    assert hf_backbone.processor_spec(scratch.hf) is None


def test_the_processor_statistics_replace_the_datas_in_every_split(tmp_path):
    from train.data import build_data
    from train.finetune import use_backbone_normalization

    path, _ = _pretrained_dir(tmp_path)
    cfg = load_config(DEFAULT_CONFIG, tiny(tmp_path, **{"model.name": "hf", "model.hf.name_or_path": str(path),
                                                       "data.augment.hflip": "true"}))
    data = build_data(cfg)
    line = use_backbone_normalization(cfg, data)
    assert line.startswith("Pixel normalization: the backbone's image processor (") and str(path) in line
    assert "pretrained on 32 px images" not in line  # the processor's size is data.image_size here
    mean, std = torch.tensor(PROCESSOR["image_mean"]).view(3, 1, 1), torch.tensor(PROCESSOR["image_std"]).view(3, 1, 1)
    assert (data.pixel_mean, data.pixel_std) == (PROCESSOR["image_mean"], PROCESSOR["image_std"])
    for split in (data.train, data.val, data.test):
        assert torch.equal(split.mean, mean) and torch.equal(split.std, std)
    x, _ = data.val[0]
    assert torch.allclose(x, (data.val.raw(0).float() / 255 - mean) / std)
    # The augmented training batches are normalized where the model is, from the train split's tensors.
    on_cpu = data._normalization_on(torch.device("cpu"))
    assert torch.equal(on_cpu[0], mean) and torch.equal(on_cpu[1], std)


def _collection(tmp_path: Path, n: int = 60) -> tuple[Path, Path, list[str]]:
    """Dated PNGs whose brightness carries the date, and a manifest with a split column."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["file,taken,split"]
    for i in range(n):
        year = 1900 + (i * 7) % 100
        img = np.clip(40 + 2 * (year - 1900) + rng.integers(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"i{i}.png")
        lines.append(f"i{i}.png,{year},{['train', 'train', 'train', 'val', 'test'][i % 5]}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    val = tmp_path / "val.csv"
    val.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.endswith(",val")]) + "\n")
    return manifest, root, lines


def _manifest(manifest: Path, root: Path) -> dict:
    return {"data.kind": "manifest", "data.manifest.path": str(manifest), "data.manifest.path_column": "file",
            "data.manifest.image_root": str(root), "data.manifest.date_column": "taken",
            "data.manifest.split_column": "split", "data.batch_size": 8, "data.eval_batch_size": 8}


def _predict_val_rmse(tmp_path: Path, ckpt: Path, root: Path) -> float:
    """``python -m train.predict`` on the val images in a process with an empty HF cache, offline."""
    empty = tmp_path / "empty-hf-home"
    empty.mkdir(exist_ok=True)
    out_csv = tmp_path / "val_preds.csv"
    r = subprocess.run([sys.executable, "-m", "train.predict", "--checkpoint", str(ckpt), "--input",
                        str(tmp_path / "val.csv"), "--output", str(out_csv), "--path-column", "file",
                        "--date-column", "taken", "--image-root", str(root), "--no-progress"],
                       cwd=ROOT, env=env(HF_HOME=str(empty), **OFFLINE), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not any(empty.iterdir()), "predict wrote to (so looked for) the Hugging Face cache"
    rows = list(csv.DictReader(out_csv.open()))
    err = [float(row["predicted_year"]) - float(row["true_year"]) for row in rows]
    return math.sqrt(sum(e * e for e in err) / len(err))


def _best_val_rmse(run_dir: Path) -> float:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best/rmse"] is not None
    return results["best/rmse"]


@pytest.mark.slow
def test_pretrained_local_directory_trains_with_its_processor_statistics(tmp_path):
    path, _ = _pretrained_dir(tmp_path)
    manifest, root, _ = _collection(tmp_path)
    out = tmp_path / "runs"
    r = run_main(hf_args(out, "pre", **_manifest(manifest, root), **{"model.hf.name_or_path": str(path)}),
                 **OFFLINE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Pixel normalization: the backbone's image processor" in r.stdout
    assert "mean [0.5, 0.4, 0.3], std [0.2, 0.25, 0.3]" in r.stdout
    from train.checkpoints import read_checkpoint

    tensors, meta = read_checkpoint(out / "pre" / "checkpoints" / "best.safetensors")
    assert meta.pixel_source == "processor"
    assert meta.pixel_mean == PROCESSOR["image_mean"] and meta.pixel_std == PROCESSOR["image_std"]
    assert meta.hf_config["model_type"] == "convnext" and meta.hf_config["hidden_sizes"] == [8, 16]
    # The checkpoint is self-contained: predict works with the pretrained directory gone.
    path.rename(tmp_path / "gone")
    assert _predict_val_rmse(tmp_path, out / "pre" / "checkpoints" / "best.safetensors", root) == pytest.approx(
        _best_val_rmse(out / "pre"), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# End to end through accelerate launch, and predict from best.safetensors alone
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fields, processes", [(CONVNEXT, 1), (RESNET, 2)], ids=["convnext-1", "resnet-2"])
def test_trains_through_accelerate_launch_and_predicts_offline(tmp_path, fields, processes):
    manifest, root, _ = _collection(tmp_path)
    out = tmp_path / "runs"
    flags = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
             "no", "--main_process_port", str(free_port())]
    if processes > 1:
        flags.insert(0, "--multi_gpu")
    extra = {"training.freeze_backbone_epochs": 1, "training.optimizer.backbone_lr_ratio": 0.5,
             "training.ema.decay": 0.9, "training.epochs": 3}
    r = run_main(hf_args(out, "e2e", fields, **_manifest(manifest, root), **extra), launcher=accelerate_launch(*flags),
                 timeout=300, ACCELERATE_USE_CPU="1", **OFFLINE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = out / "e2e"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == processes
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("lr/backbone/decay" in x and "lr/head/decay" in x for x in logged)
    state = sorted((run_dir / "checkpoints" / "state").iterdir())[-1]
    assert set(load_file(str(state / "model.safetensors"))) == set(
        load_file(str(run_dir / "checkpoints" / "best.safetensors")))
    ckpt = run_dir / "checkpoints" / "best.safetensors"
    assert _predict_val_rmse(tmp_path, ckpt, root) == pytest.approx(_best_val_rmse(run_dir), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# No network
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["facebook/convnext-tiny-224", "facebok/convnxt-tiny-224"])
def test_a_hub_id_not_in_the_cache_offline_is_one_line_and_writes_nothing(tmp_path, name):
    out = tmp_path / "runs"
    out.mkdir()
    empty = tmp_path / "hf-home"
    r = run_main(hf_args(out, "no-network", **{"model.hf.name_or_path": name}), HF_HOME=str(empty), **OFFLINE)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.hf.name_or_path:"), r.stderr
    assert f"'{name}' is not in the local Hugging Face cache" in lines[0]
    assert f"hf download {name}" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert not any(out.iterdir()), "no run directory"


def _fake_hub_cache(tmp_path: Path, repo: str, files: dict[str, Path]) -> Path:
    """An HF_HOME whose hub cache holds ``repo`` at revision main, laid out as huggingface_hub writes it."""
    home = tmp_path / "hf-home"
    entry = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return home


_FROM_CACHE = ("import json; from train.config import ModelConfig; from train.models import build_model; "
               "from train.hf_backbone import processor_spec; cfg = ModelConfig(name='hf', hf={'name_or_path': "
               "'tiny-org/tiny-convnext'}); m = build_model(cfg); print(json.dumps(processor_spec(cfg.hf).mean))")


def test_a_cached_hub_id_is_used_offline_and_a_partly_cached_one_is_one_line(tmp_path):
    path, _ = _pretrained_dir(tmp_path)
    files = {p.name: p for p in path.iterdir()}
    home = _fake_hub_cache(tmp_path / "full", "tiny-org/tiny-convnext", files)
    r = subprocess.run([sys.executable, "-c", _FROM_CACHE], cwd=ROOT, env=env(HF_HOME=str(home), **OFFLINE),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == PROCESSOR["image_mean"]
    partial = _fake_hub_cache(tmp_path / "partial", "tiny-org/tiny-convnext", {"config.json": path / "config.json"})
    r = subprocess.run([sys.executable, "-c", _FROM_CACHE], cwd=ROOT,
                       env=env(HF_HOME=str(partial), **OFFLINE), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "'tiny-org/tiny-convnext' is only partly in the local Hugging Face cache" in r.stderr


def test_shipped_finetune_config_validates_and_names_a_pretrained_convnext():
    cfg = load_config(ROOT / "configs" / "finetune_hf.yml")
    assert cfg.model.name == "hf" and cfg.model.hf.name_or_path == "facebook/convnext-tiny-224"
    assert cfg.model.hf.pretrained and cfg.data.image_size == 224 and cfg.data.kind == "manifest"
    assert cfg.training.freeze_backbone_epochs >= 1 and cfg.training.optimizer.backbone_lr_ratio < 1
    assert cfg.training.ema.decay is not None
