"""Fine-tuning controls: a frozen backbone for the first epochs, and an EMA of the weights.

Called from ``train.loop`` at fixed points (no callback framework):

- ``build_run_model`` -> ``use_backbone_normalization`` (a pretrained backbone's pixel statistics);
- ``train_epoch`` -> ``set_backbone_frozen`` after ``model.train()``, ``drop_frozen_grads`` before
  each optimizer step;
- ``start_run`` -> ``make_ema`` (registered for full states), ``after_optimizer_step`` ->
  ``ema.update``; validation and the best checkpoint run inside ``ema_weights``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from torch import nn

from train.config import Config


def use_backbone_normalization(cfg: Config, data) -> str | None:
    """Replace the data's pixel statistics by the pretrained backbone's, when there is one.
    Returns a line to print, or None."""
    return None


def checkpoint_extras(cfg: Config, model: nn.Module) -> dict:
    """Extra ``checkpoint_metadata`` arguments for this model (``hf_config``, ``pixel_source``)."""
    return {}


def backbone_frozen(cfg: Config, epoch: int) -> bool:
    return epoch <= cfg.training.freeze_backbone_epochs


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Put the (unwrapped) backbone in eval mode while it is frozen."""


def drop_frozen_grads(model: nn.Module, frozen: bool) -> None:
    """Before the optimizer step: no gradient for frozen parameters, so the optimizer leaves them alone."""


def make_ema(cfg: Config, model: nn.Module):
    """The EMA of the model's weights, or None when ``training.ema.decay`` is null."""
    return None


@contextmanager
def ema_weights(ema, model: nn.Module):
    """Inside: the model holds the EMA weights (when there is an EMA); restored on exit."""
    with nullcontext():
        yield
