"""What the model's outputs mean: the regression head (one standardized number) or the distribution
head (logits over year bins), and everything the loop and predict do with them.

The distribution head follows the image-dating literature (classification over years with soft
labels): K bins of ``model.bin_years`` years spanning the train split's dates plus a margin, trained
with cross-entropy against a Gaussian soft label centred on the true date
(``training.label_sigma_years``). The point estimate is the distribution's **mean**: it minimizes the
expected squared error, and RMSE is what early stopping monitors by default; the median (which
minimizes absolute error) is within a fraction of a year of it for the unimodal distributions this
head learns. The predicted quantiles (linear inside each bin) give the per-image date intervals
that ``train.calibration`` conformalizes.

Both heads work in standardized units at the boundary with the loop (targets ``y`` are
``(year - target_mean) / target_std``), so the training sums, the losses and the gathered evaluation
do not care which head is on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config


@dataclass(frozen=True)
class YearBins:
    """Bin ``k`` covers ``[start + k * width, start + (k + 1) * width)`` years."""

    start: float
    width: float
    count: int

    @classmethod
    def for_years(cls, year_min: float, year_max: float, width: float, sigma: float) -> "YearBins":
        # Margin: a soft label centred on the earliest/latest train date keeps >= 99.7% of its mass
        # (3 sigma), and a test date slightly outside the train range still has a bin.
        margin = max(3.0 * sigma, 2.0 * width)
        start = math.floor((year_min - margin) / width) * width
        count = max(2, math.ceil((year_max + margin - start) / width))
        return cls(float(start), float(width), int(count))

    def centres(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.start + self.width * (torch.arange(self.count, device=device, dtype=dtype) + 0.5)

    def edges(self, device=None) -> torch.Tensor:
        return self.start + self.width * torch.arange(self.count + 1, device=device, dtype=torch.float64)

    def as_meta(self) -> dict:
        return {"start": self.start, "width": self.width, "count": self.count}


class Head:
    """The regression head: the output is the standardized date; the loss is ``training.loss``."""

    kind = "regression"
    out_dim = 1

    def __init__(self, loss: nn.Module, per_sample: nn.Module, target_mean: float, target_std: float):
        self.loss, self.per_sample = loss, per_sample
        self.target_mean, self.target_std = target_mean, target_std

    def point(self, out: torch.Tensor) -> torch.Tensor:
        """The standardized point estimate, shape ``[B]``."""
        return out

    def quantiles(self, out: torch.Tensor, taus: list[float]) -> torch.Tensor | None:
        """``[B, len(taus)]`` predicted quantiles in years, or None (regression has none)."""
        return None


class DistributionHead(Head):
    """Logits over ``bins``; soft-label cross-entropy; mean as the point estimate."""

    kind = "distribution"

    def __init__(self, bins: YearBins, sigma: float, target_mean: float, target_std: float):
        self.bins, self.sigma = bins, sigma
        self.out_dim = bins.count
        self.target_mean, self.target_std = target_mean, target_std
        self.loss = lambda out, y: self._ce(out, y).mean()
        self.per_sample = self._ce
        self._grid: dict = {}  # device -> (bin centres, bin edges): built once, not every step

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._grid:
            self._grid[device] = (self.bins.centres(device), self.bins.edges(device))
        return self._grid[device]

    def _years(self, y: torch.Tensor) -> torch.Tensor:
        return y.double() * self.target_std + self.target_mean

    def _ce(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = soft_labels(self._years(y), self.bins, self.sigma, self._on(out.device)[1]).to(out.dtype)
        return -(target * F.log_softmax(out.float(), dim=-1)).sum(-1)

    def point(self, out: torch.Tensor) -> torch.Tensor:
        years = F.softmax(out.float(), dim=-1) @ self._on(out.device)[0]  # expected_year, with cached centres
        return ((years.double() - self.target_mean) / self.target_std).to(torch.float32)

    def quantiles(self, out: torch.Tensor, taus: list[float]) -> torch.Tensor:
        return year_quantiles(out, self.bins, taus)


def soft_labels(years: torch.Tensor, bins: YearBins, sigma: float, edges: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K]`` Gaussian soft labels: each bin gets the normal density's mass over its interval
    (a CDF difference, so narrow bins and wide sigmas are both exact), renormalized to sum to 1 over
    the bins (the tails beyond the margin are dropped)."""
    edges = bins.edges(years.device) if edges is None else edges
    z = (edges[None, :] - years.double()[:, None]) / (sigma * math.sqrt(2.0))
    mass = 0.5 * (torch.erf(z[:, 1:]) - torch.erf(z[:, :-1]))
    return (mass / mass.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def expected_year(logits: torch.Tensor, bins: YearBins) -> torch.Tensor:
    """``[B]`` mean of the predicted distribution (bin centres weighted by the softmax), in years."""
    probs = F.softmax(logits.float(), dim=-1)
    return probs @ bins.centres(logits.device)


def year_quantiles(logits: torch.Tensor, bins: YearBins, taus: list[float]) -> torch.Tensor:
    """``[B, len(taus)]`` quantiles in years of the predicted distribution, each bin's mass spread
    uniformly over the bin (so quantiles move continuously rather than in bin steps)."""
    probs = F.softmax(logits.double(), dim=-1)
    cdf = probs.cumsum(-1)  # cdf[:, k] = mass up to the right edge of bin k
    t = torch.tensor(taus, dtype=torch.float64, device=logits.device).expand(len(probs), -1).contiguous()
    k = torch.searchsorted(cdf, t).clamp_(max=bins.count - 1)  # first bin whose right edge reaches tau
    below = torch.where(k > 0, cdf.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(t))
    inside = ((t - below) / probs.gather(1, k).clamp_min(1e-12)).clamp_(0.0, 1.0)
    return (bins.start + bins.width * (k.double() + inside)).float()


def build_head(cfg: Config, target_mean: float, target_std: float, train_years: torch.Tensor, loss: nn.Module,
               per_sample: nn.Module) -> Head:
    """The configured head for a run whose train split has dates ``train_years``."""
    if cfg.model.head == "regression":
        return Head(loss, per_sample, target_mean, target_std)
    sigma = cfg.training.label_sigma_years
    bins = YearBins.for_years(float(train_years.min()), float(train_years.max()), cfg.model.bin_years, sigma)
    return DistributionHead(bins, sigma, target_mean, target_std)


def head_from_meta(meta, sigma: float = 2.0) -> Head:
    """The head a best checkpoint's metadata describes (predict: no training loss is needed)."""
    if meta.year_bins is None:
        return Head(None, None, meta.target_mean, meta.target_std)
    b = meta.year_bins
    return DistributionHead(YearBins(b.start, b.width, b.count), sigma, meta.target_mean, meta.target_std)
