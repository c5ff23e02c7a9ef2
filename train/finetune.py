"""Fine-tuning controls: a pretrained backbone's inputs, a frozen backbone for the first epochs, and an
EMA of the weights.

Called from ``train.loop`` at fixed points (no callback framework):

- after ``build_data`` -> ``use_backbone_normalization`` (a pretrained backbone's pixel statistics, and
  the check that ``data.image_size`` fits it: before the run directory exists);
- ``train_epoch`` -> ``set_backbone_frozen`` after ``model.train()``, ``drop_frozen_grads`` before
  each optimizer step;
- ``start_run`` -> ``make_ema`` (registered for full states), ``after_optimizer_step`` ->
  ``ema.update``; validation and the best checkpoint run inside ``ema_weights``;
- the best checkpoint's metadata gets ``checkpoint_extras``.

The backbone is every parameter and module that is not the head (``train.models.is_head_parameter``),
for every model family.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from train.config import Config
from train.ema import WeightEMA
from train.errors import UserError
from train.models import is_head_parameter

# Where set_backbone_frozen keeps the parameters it switched off (to switch exactly those back on: some
# are off for good, e.g. DINOv2's mask token, which never gets a gradient).
_HELD = "_finetune_frozen_params"


def check_backbone(cfg: Config) -> None:
    """``model.name=hf``: refuse, in one line, a backbone that is not there (not in the cache when
    offline, a typo, no transformers), config fields it does not have, or a ``data.image_size`` it
    cannot take. Reads only config files (and the processor's), builds nothing real; cheap to repeat."""
    if cfg.model.name != "hf":
        return
    from train import hf_backbone

    hf_backbone.check_image_size(cfg.model.hf, cfg.data.image_size)
    hf_backbone.processor_spec(cfg.model.hf)


def use_backbone_normalization(cfg: Config, data) -> str | None:
    """A pretrained ``model.name=hf`` backbone: ``check_backbone``, then replace the data's pixel
    statistics (``data.pixel_mean/pixel_std`` and every split's ``mean/std``) by those of its image
    processor. Returns the line to print, or None (other models; the data's statistics)."""
    if cfg.model.name != "hf":
        return None
    from train import hf_backbone

    hf = cfg.model.hf
    check_backbone(cfg)
    spec = hf_backbone.processor_spec(hf)
    if spec is None:
        if hf.pretrained:
            return (f"note: no preprocessor_config.json for '{hf.name_or_path}': pixels are normalized with the "
                    "train split's statistics, not the ones the backbone was pretrained with")
        return None
    data.pixel_mean, data.pixel_std = list(spec.mean), list(spec.std)
    for ds in (data.train, data.val, data.test):
        ds.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        ds.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    size = ""
    if spec.size and spec.size != cfg.data.image_size:
        size = (f"; it was pretrained on {spec.size} px images, this run uses data.image_size={cfg.data.image_size} "
                "(docs/FINETUNING.md#image-size)")
    return (f"Pixel normalization: the backbone's image processor ({spec.path}): mean "
            f"{_fmt(spec.mean)}, std {_fmt(spec.std)}, not the train split's statistics{size}")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def checkpoint_extras(cfg: Config, model: nn.Module) -> dict:
    """Extra ``checkpoint_metadata`` arguments for this (unwrapped) model: for ``hf``, the backbone's
    config (so predict rebuilds it offline) and where the pixel statistics came from."""
    if cfg.model.name != "hf":
        return {}
    from train import hf_backbone

    model = getattr(model, "_orig_mod", model)
    processor = hf_backbone.processor_spec(cfg.model.hf) is not None
    return {"hf_config": hf_backbone.saved_config(model), "pixel_source": "processor" if processor else "data"}


# --------------------------------------------------------------------------------------------------
# A frozen backbone (training.freeze_backbone_epochs)
# --------------------------------------------------------------------------------------------------


def backbone_frozen(cfg: Config, epoch: int) -> bool:
    return epoch <= cfg.training.freeze_backbone_epochs


def _replicated() -> bool:
    """Several processes: DDP (or FSDP) wraps the model, and its gradient reducer expects every
    trainable parameter it was built with to get a gradient, so ``requires_grad`` must not change."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """At the start of each epoch, after ``model.train()`` (``model``: the unwrapped model).

    Frozen: the backbone's modules go to eval mode, so BatchNorm's running statistics (and dropout)
    stay as they are; its weights get no update because ``drop_frozen_grads`` removes their gradients.
    With one process the backbone's parameters are also switched to ``requires_grad=False`` for the
    epoch, so its backward pass is not computed at all (the head's gradients are the same either way).
    Not frozen: the backbone's modules follow the model's mode and the parameters are switched back."""
    model = getattr(model, "_orig_mod", model)
    for name, child in model.named_children():
        if name != "head":
            child.train(model.training and not frozen)
    held = getattr(model, _HELD, None)
    if frozen and held is None and not _replicated():
        held = [p for n, p in model.named_parameters() if not is_head_parameter(n) and p.requires_grad]
        for p in held:
            p.requires_grad_(False)
        setattr(model, _HELD, held)
    elif not frozen and held is not None:
        for p in held:
            p.requires_grad_(True)
        delattr(model, _HELD)


def drop_frozen_grads(model: nn.Module, frozen: bool) -> None:
    """Before the optimizer step (after the gradients were all-reduced): no gradient for the frozen
    backbone. AdamW and SGD skip a parameter whose ``.grad`` is None (no update, no weight decay, no
    optimizer state), and gradient clipping leaves it out of the norm."""
    if not frozen:
        return
    for name, p in getattr(model, "_orig_mod", model).named_parameters():
        if p.grad is not None and not is_head_parameter(name):
            p.grad = None


# --------------------------------------------------------------------------------------------------
# EMA of the weights (training.ema)
# --------------------------------------------------------------------------------------------------


def make_ema(cfg: Config, model: nn.Module) -> WeightEMA:
    """The EMA of the (unwrapped) model's weights. With ``training.ema.decay: null`` it is inactive (it
    holds nothing and does nothing) but still registered for checkpointing, so full states have the
    same files with the EMA on or off and a resume may switch it."""
    e = cfg.training.ema
    model = getattr(model, "_orig_mod", model)
    if e.decay is not None and any(type(p).__name__ == "DTensor" for p in model.parameters()):
        # Under FSDP each process holds a shard of every tensor, and Accelerate saves registered
        # objects from the main process only: the other shards of the average would be lost.
        raise UserError("training.ema is not supported with FSDP (the average of sharded weights cannot be saved "
                        "in the full state yet); set training.ema.decay=null, or train with DDP")
    return WeightEMA(model, e.decay, e.start_epoch)


@contextmanager
def ema_weights(ema: WeightEMA | None, model: nn.Module):
    """Inside: the model holds the EMA weights (when there is an average yet); restored on exit.
    ``model`` may be wrapped: the average was made of the unwrapped model's own tensors."""
    if ema is None:
        yield
        return
    with ema.swapped_in():
        yield
