"""``model.name: hf``: a vision backbone from 🤗 transformers (``AutoModel``) with our head on top.

The backbone is whatever ``AutoModel`` builds from a config that takes ``pixel_values`` and gives pooled
features (ResNet, ConvNeXt, ViT, DINOv2, Swin, ...; CLIP-like models through their vision tower). It
lives under ``backbone.*``; the head (``head.*``: Linear -> ReLU -> Dropout -> Linear) is ours, so
freezing, the per-group learning rates and every checkpoint treat it like the other model families.

Where the backbone comes from (``model.hf``):

- ``name_or_path`` + ``pretrained: true``: the pretrained weights, from a local ``save_pretrained``
  directory or the Hub (the local cache first; never the network when ``HF_HUB_OFFLINE=1``);
- ``pretrained: false``: the same architecture, randomly initialized, from its config alone;
- ``config``: config fields (``model_type`` plus what differs from its defaults) for a backbone built
  with no file at all, or overrides of the fields of ``name_or_path``'s config;
- a checkpoint: the backbone config saved in ``best.safetensors`` (``saved_config``), so predict
  rebuilds the model with no network and no cache.

transformers is an optional dependency (``pip install -e ".[hf]"``), imported only from here.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from train.errors import UserError

if TYPE_CHECKING:
    from train.config import HFConfig, ModelConfig

INSTALL = 'pip install -e ".[hf]"'
# ViT-style models whose pooler is a freshly initialized dense+tanh layer in most checkpoints: their own
# classifiers read the class token after the final layer norm, so we do too (and build them without it).
_CLS_TOKEN_MODELS = {"vit", "deit"}
# Config fields that describe a classifier's labels, not the backbone: left out of checkpoint metadata
# (an ImageNet checkpoint's 1000 label names would make up most of it).
_LABEL_FIELDS = ("id2label", "label2id")
_PROBE_SIZE = 224  # the usual pretraining resolution: a size any vision backbone accepts


def transformers_module():
    """``import transformers``, or a ``UserError`` that says what to install."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(f"model.name=hf needs the transformers library, which is not installed ({e}); install it "
                        f"with: {INSTALL}") from None
    transformers.logging.disable_progress_bar()  # a per-tensor loading bar on every process says nothing
    return transformers


# --------------------------------------------------------------------------------------------------
# Where the backbone's files are
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A local directory, or a Hub id; ``local_only``: read no network (a directory, or already cached)."""

    where: str
    local_only: bool
    hub: bool


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or os.path.exists(text)


def resolve_source(name_or_path: str) -> Source:
    """Check ``model.hf.name_or_path`` before any download: a directory written by ``save_pretrained``,
    or a valid Hub id, which must be in the local cache when offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    key = "model.hf.name_or_path"
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise UserError(f"{key}: no directory '{name_or_path}'; give a directory written by save_pretrained, or a "
                            "Hub id such as facebook/convnext-tiny-224")
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: '{name_or_path}' has no config.json, so it is not a directory written by "
                            "save_pretrained (model.save_pretrained(dir) writes config.json and the weights)")
        return Source(str(path), local_only=True, hub=False)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise UserError(f"{key}: '{name_or_path}' is neither a directory nor a valid Hub id (owner/name, e.g. "
                        "facebook/convnext-tiny-224)") from None
    cached = isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    if not cached and is_offline_mode():
        raise UserError(_not_cached(name_or_path, "HF_HUB_OFFLINE=1 is set"))
    return Source(name_or_path, local_only=cached, hub=True)


def _not_cached(name: str, why: str, partly: bool = False) -> str:
    from huggingface_hub import constants

    where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    state = f"is only partly in {where} ({why})" if partly else f"is not in {where} and {why}"
    return (f"model.hf.name_or_path: '{name}' {state}; download it where there is a network (hf download {name}) "
            "and copy the cache here (or point HF_HOME at it), or pass a local directory written by save_pretrained")


def _causes(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _load_problem(what: str, source: Source | None, e: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    )

    chain = list(_causes(e))
    if source is not None and source.hub:
        name = source.where
        if any(isinstance(c, GatedRepoError) for c in chain):
            return (f"model.hf.name_or_path: '{name}' is a gated model on the Hub: accept its terms on "
                    f"https://huggingface.co/{name} and log in (hf auth login), or pass a local directory")
        if any(isinstance(c, RepositoryNotFoundError) for c in chain):
            return (f"model.hf.name_or_path: there is no model '{name}' on the Hub (check the spelling on "
                    f"https://huggingface.co/models), and no directory of that name")
        if source.local_only and isinstance(e, OSError):
            # its config.json is cached (that is what made it local_only), another file is not
            return _not_cached(name, _first_line(e).rstrip("."), partly=True)
        if any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for c in chain) or \
                "couldn't connect" in str(e):
            return _not_cached(name, "the Hub could not be reached")
    return f"model.hf: transformers could not {what} ({type(e).__name__}: {_first_line(e)})"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@contextmanager
def _transformers_errors(what: str, source: Source | None = None):
    """Whatever transformers raises while reading files or building a model from user-given fields
    becomes one line (a bad field value can fail anywhere in a model's constructor)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(_load_problem(what, source, e)) from None


# --------------------------------------------------------------------------------------------------
# The backbone's config
# --------------------------------------------------------------------------------------------------


def _vision_part(config):
    # CLIP, SigLIP and friends pair a text and a vision tower; AutoModel of the vision config is the
    # vision tower alone (CLIPVisionModel), and it loads from the full model's weights.
    vision = getattr(config, "vision_config", None)
    return vision if vision is not None else config


def _check_fields(config, fields: dict[str, Any], origin: str) -> None:
    """A misspelled config field would silently become a new attribute: refuse it, naming the closest."""
    known = set(config.to_dict())
    for key in fields:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise UserError(f"model.hf.config.{key}: not a field of the {config.model_type} config ({origin}){hint}")


def _from_fields(fields: dict[str, Any]):
    """A config from ``model.hf.config`` alone: ``model_type`` plus the fields that differ from its defaults."""
    from transformers import AutoConfig, CONFIG_MAPPING

    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise UserError("model.hf.config needs model_type (e.g. convnext, resnet, vit, dinov2, clip_vision_model) "
                        "when model.hf.name_or_path is not set")
    if model_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise UserError(f"model.hf.config.model_type: transformers {_version()} has no model type '{model_type}'"
                        + (f"; did you mean {', '.join(near)}?" if near else ""))
    _check_fields(AutoConfig.for_model(model_type), fields, "model.hf.config")
    with _transformers_errors(f"build a {model_type} config from model.hf.config"):
        return AutoConfig.for_model(model_type, **fields)


def _version() -> str:
    import transformers

    return transformers.__version__


def backbone_config(hf: "HFConfig", saved: dict | None = None):
    """The backbone's ``PretrainedConfig``: from a checkpoint's ``saved`` dict (no file read), else from
    ``name_or_path`` (its config.json, with ``config`` overriding fields), else from ``config`` alone."""
    transformers_module()
    from transformers import AutoConfig

    if saved is not None:
        fields = dict(saved)
        with _transformers_errors("rebuild the backbone config stored in the checkpoint"):
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if hf.name_or_path is None:
        return _vision_part(_from_fields(hf.config or {}))
    source = resolve_source(hf.name_or_path)
    with _transformers_errors(f"read the config of '{hf.name_or_path}'", source):
        config = _vision_part(AutoConfig.from_pretrained(source.where, local_files_only=source.local_only))
    overrides = {k: v for k, v in (hf.config or {}).items() if k != "model_type"}
    _check_fields(config, overrides, f"of {hf.name_or_path}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def saved_config(model: nn.Module) -> dict:
    """The backbone's config as JSON-ready fields, for the checkpoint metadata (``backbone_config(saved=...)``)."""
    fields = json.loads(model.backbone.config.to_json_string(use_diff=False))
    return {k: v for k, v in fields.items() if k not in _LABEL_FIELDS}


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _native_size(config) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def _pool(out, cls_token: bool) -> torch.Tensor:
    """``[B, features]`` from a backbone's output: its pooler (ResNet's is ``[B, C, 1, 1]``), the class
    token for ViT-style models, else the mean of the last hidden state over tokens or pixels."""
    if cls_token:
        return out.last_hidden_state[:, 0]
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        hidden = out.last_hidden_state
        pooled = hidden.mean(1) if hidden.ndim == 3 else hidden.mean((2, 3))
    return pooled.flatten(1)


class HFModel(nn.Module):
    """``backbone`` (a transformers vision model) -> pooled features -> ``head``."""

    def __init__(self, backbone: nn.Module, features: int, hidden: int, dropout: float, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_dim),
        )
        config = backbone.config
        self._cls_token = config.model_type in _CLS_TOKEN_MODELS
        self._native = _native_size(config)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters
        # FSDP's transformer wrap policy reads the wrapped model's _no_split_modules (the backbone's
        # layer classes; docs/FINETUNING.md). Only classes this model has: Accelerate stops on a name it
        # cannot find (CLIP's vision tower lists the text tower's embeddings too).
        present = {type(m).__name__ for m in backbone.modules()}
        self._no_split_modules = [c for c in getattr(backbone, "_no_split_modules", None) or [] if c in present]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=x, **self._size_kwargs(x))
        y = self.head(_pool(out, self._cls_token))
        return y.squeeze(-1) if self.out_dim == 1 else y  # the regression head's output is [batch]

    def _size_kwargs(self, x: torch.Tensor) -> dict:
        return _size_kwargs(self._interpolate, self._native, x)


def _size_kwargs(can_interpolate: bool, native: tuple[int, int] | None, x: torch.Tensor) -> dict:
    # Position embeddings learned at the pretraining size are interpolated to other sizes where the
    # model can (ViT, CLIP); DINOv2 always does it by itself; convolutional models take any size.
    if can_interpolate and native is not None and tuple(x.shape[-2:]) != native:
        return {"interpolate_pos_encoding": True}
    return {}


def _model_kwargs(config) -> dict:
    return {"add_pooling_layer": False} if config.model_type in _CLS_TOKEN_MODELS else {}


def _meta_backbone(config) -> nn.Module:
    """The backbone on the meta device: shapes without memory or compute (and without drawing from
    the RNG that the real model's initialization uses)."""
    from transformers import AutoModel

    with _transformers_errors(f"build a {config.model_type} backbone from its config (check model.hf.config)"):
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = AutoModel.from_config(config, **_model_kwargs(config))
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise UserError(f"model.hf: {type(model).__name__} (model_type {config.model_type}) is not a vision backbone: "
                        "it takes no pixel_values; use an image model (ResNet, ConvNeXt, ViT, DINOv2, CLIP, ...)")
    return model


def _probe(model: nn.Module, size: int) -> tuple[int, list[str]]:
    """One forward and backward pass of a meta backbone at ``size`` px: ``(feature width, names of the
    parameters that get no gradient)``. Raises what the model raises for an input it does not take."""
    config = model.config
    model.zero_grad(set_to_none=True)
    x = torch.empty(2, 3, size, size, device="meta")
    can_interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    out = model(pixel_values=x, **_size_kwargs(can_interpolate, _native_size(config), x))
    features = _pool(out, config.model_type in _CLS_TOKEN_MODELS)
    features.sum().backward()
    return features.shape[1], [n for n, p in model.named_parameters() if p.grad is None]


def probe_size(config) -> int:
    native = _native_size(config)
    return native[0] if native else _PROBE_SIZE


def _load_backbone(hf: "HFConfig", config, saved: bool) -> nn.Module:
    from transformers import AutoModel

    kwargs = _model_kwargs(config)
    if saved or not hf.pretrained or hf.name_or_path is None:
        with _transformers_errors(f"build a {config.model_type} backbone from its config"):
            return AutoModel.from_config(config, **kwargs)
    source = resolve_source(hf.name_or_path)
    with _transformers_errors(f"load the weights of '{hf.name_or_path}'", source), _quiet():
        model, info = AutoModel.from_pretrained(source.where, config=config, dtype=torch.float32,
                                                local_files_only=source.local_only, output_loading_info=True,
                                                **kwargs)
    fresh = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if fresh and os.environ.get("RANK", "0") == "0":
        print(f"warning: model.hf: {len(fresh)} backbone tensors are not in the weights of '{hf.name_or_path}' and "
              f"start from random values (first: {fresh[0]})", file=sys.stderr)
    return model


@contextmanager
def _quiet():
    # transformers prints a load report listing every unused tensor (a CLIP checkpoint's whole text
    # tower); what matters, tensors left random, is said in one line instead.
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def build_hf_model(cfg: "ModelConfig", out_dim: int = 1, saved: dict | None = None) -> HFModel:
    """The backbone (pretrained or not, or rebuilt from a checkpoint's ``saved`` config) with our head.

    Parameters that never get a gradient (DINOv2's mask token, used only for masked pretraining) are
    set ``requires_grad=False``: DDP stops at the second step when a trainable parameter gets none."""
    hf = cfg.hf
    config = backbone_config(hf, saved)
    meta = _meta_backbone(config)
    with _transformers_errors(f"run the {config.model_type} backbone at {probe_size(config)} px"):
        features, unused = _probe(meta, probe_size(config))
    backbone = _load_backbone(hf, config, saved is not None)
    for name, p in backbone.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    if hf.gradient_checkpointing:
        if not backbone.supports_gradient_checkpointing:
            raise UserError(f"model.hf.gradient_checkpointing: transformers' {type(backbone).__name__} does not "
                            "support gradient checkpointing; set it to false (or use a smaller data.batch_size)")
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFModel(backbone, features, cfg.hidden, cfg.dropout, out_dim)


# --------------------------------------------------------------------------------------------------
# Inputs: the image size the backbone accepts, the pixel statistics it was pretrained with
# --------------------------------------------------------------------------------------------------


def check_image_size(hf: "HFConfig", image_size: int) -> None:
    """Refuse a ``data.image_size`` the backbone cannot take (a forward pass on the meta device),
    naming the smallest usual size that works."""
    config = backbone_config(hf)
    model = _meta_backbone(config)
    try:
        _probe(model, image_size)
    except Exception as e:
        first = _first_line(e)
        fits = next((s for s in (16, 32, 64, 128, 224, 256, 384, 512) if s > image_size and _takes(model, s)), None)
        fix = f"use data.image_size >= {fits}" if fits else "use another data.image_size"
        raise UserError(f"data.image_size={image_size} does not fit the {config.model_type} backbone "
                        f"({first[:200]}); {fix}") from None


def _takes(model: nn.Module, size: int) -> bool:
    try:
        _probe(model, size)
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Processor:
    """What a pretrained backbone's ``preprocessor_config.json`` says about its inputs."""

    mean: list[float]
    std: list[float]
    path: str
    size: int | None  # the side of the images it was pretrained on (its crop, or resize target)


def processor_spec(hf: "HFConfig") -> Processor | None:
    """The pretrained backbone's image processor settings, or None when there are none to follow
    (random init, or a directory without ``preprocessor_config.json``)."""
    if not hf.pretrained or hf.name_or_path is None:
        return None
    path = _processor_file(resolve_source(hf.name_or_path))
    if path is None:
        return None
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model.hf.name_or_path: cannot read '{path}' ({e})") from None
    size = _side(spec.get("crop_size")) or _side(spec.get("size"))
    if spec.get("do_normalize") is False:  # the model takes pixels in [0, 1] as they are
        return Processor([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], str(path), size)
    mean, std = _three(spec.get("image_mean")), _three(spec.get("image_std"))
    if mean is None or std is None or min(std) <= 0:
        raise UserError(f"model.hf.name_or_path: '{path}' has no usable image_mean/image_std (3 numbers each, std > 0)")
    return Processor(mean, std, str(path), size)


def _side(value) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        side = value.get("height") or value.get("shortest_edge")
        return side if isinstance(side, int) else None
    return None


def _three(value) -> list[float] | None:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None


def _processor_file(source: Source) -> str | None:
    name = "preprocessor_config.json"
    if not source.hub:
        path = Path(source.where) / name
        return str(path) if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    if source.local_only:
        cached = try_to_load_from_cache(source.where, name)
        return cached if isinstance(cached, str) else None
    with _transformers_errors(f"download {name} of '{source.where}'", source):
        try:
            return hf_hub_download(source.where, name)
        except EntryNotFoundError:
            return None
