"""An exponential moving average (EMA) of the model's weights (``training.ema``).

After every optimizer step from epoch ``start_epoch`` on: ``avg <- d * avg + (1 - d) * weights`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates. The warm-up term (TensorFlow's
``ExponentialMovingAverage(num_updates=...)``) keeps the first steps' weights, and the random
initialization before them, from dominating short runs: with ``decay`` 0.999 the plain average would
still hold a third of the weights of 1000 steps earlier after 1000 steps.

Every floating tensor of the state dict is averaged, BatchNorm's running mean and variance included
(as timm's ``ModelEmaV2`` does): they then follow the averaged weights instead of the last step's,
which is what normalizes the averaged network's activations best without a recomputation pass.
Integer buffers (``num_batches_tracked``) are left as the live model has them.

The average is a registered checkpoint object (``state_dict``/``load_state_dict``), so it is part of
every full state and a resume continues it bit for bit. With ``decay: null`` the object is inactive
(no copy of the weights, nothing to do per step) but still registered: a state saved with the EMA off
can be resumed with it on (the average starts there) and the other way round.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from train.errors import UserError


def _averaged(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The live tensors the average follows, by state-dict name (parameters and floating buffers)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return [(name, t) for name, t in tensors.items() if t.is_floating_point()]


class WeightEMA:
    """The average of one model's weights; ``update`` after each optimizer step, ``swapped_in`` to use it."""

    def __init__(self, model: nn.Module, decay: float | None, start_epoch: int = 1):
        self.decay, self.start_epoch = decay, start_epoch
        self.updates = 0
        self._live = _averaged(model) if decay is not None else []
        self._shadow: list[torch.Tensor] = []  # made at the first update: a copy of the weights then

    @property
    def active(self) -> bool:
        """Whether there is an average to use (EMA on and at least one update made)."""
        return self.decay is not None and self.updates > 0

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """One step of the average (``model``: the unwrapped model ``__init__`` saw; its tensors are
        followed by reference, so it is not walked again every step)."""
        if self.decay is None or epoch < self.start_epoch:
            return
        live = [t for _, t in self._live]
        if not self._shadow:
            self._shadow = [t.detach().clone() for t in live]
        else:
            d = min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(self._shadow, live, 1.0 - d)  # shadow += (1 - d) * (live - shadow)
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        """Inside: the model's tensors hold the average (when ``active``); the live values are put back
        exactly on exit, also after an exception."""
        if not self.active:
            yield
            return
        live = [t for _, t in self._live]
        with torch.no_grad():
            kept = [t.clone() for t in live]
            torch._foreach_copy_(live, self._shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, kept)

    def state_dict(self) -> dict:
        names = [name for name, _ in self._live]
        return {"decay": self.decay, "start_epoch": self.start_epoch, "updates": self.updates,
                "shadow": dict(zip(names, self._shadow))}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved average. The config's ``decay``/``start_epoch`` stay (a resume may change
        them); an average of another model is refused."""
        shadow = state.get("shadow") or {}
        if self.decay is None:
            return  # EMA off now: the saved average, if any, is not needed
        if not shadow:
            self.updates, self._shadow = 0, []  # saved with the EMA off, or before start_epoch
            return
        names = [name for name, _ in self._live]
        wrong = [n for n, t in self._live if n not in shadow or shadow[n].shape != t.shape]
        if wrong or len(shadow) != len(names):
            raise UserError(f"--resume: the saved EMA of the weights does not fit this model ({len(wrong)} tensors "
                            f"differ, first: {(wrong or sorted(set(shadow) - set(names)))[0]}); resume with the "
                            "model the state was saved with")
        self._shadow = [shadow[n].to(device=t.device, dtype=t.dtype).clone() for n, t in self._live]
        self.updates = int(state["updates"])
