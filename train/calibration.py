"""Date intervals with a finite-sample coverage guarantee: split-conformal calibration on the val split.

For a level ``1 - a`` and ``n`` calibration images with nonconformity scores ``s_i``, the corrected
quantile is the ``ceil((n + 1)(1 - a))``-th smallest score; for a new image exchangeable with them,
``P(true date in interval) >= 1 - a`` (Vovk et al. 2005; Lei et al. 2018), whatever the model.

- regression head (``abs_residual``): ``s = |y - yhat|``; interval ``yhat +- q``; one width for all.
- distribution head (``cqr``, Romano et al. 2019): the predicted ``a/2`` and ``1 - a/2`` quantiles
  ``[l, u]``; ``s = max(l - y, y - u)``; interval ``[l - q, u + q]`` (q < 0 narrows an over-wide
  distribution), so widths follow each image's own uncertainty. The interval is stretched to
  contain the point estimate when a negative q would exclude it; that only adds coverage.

The guarantee assumes the calibration images were not used to fit anything. Here the val split also
chose the best epoch (early stopping): one choice among a few epochs, which in practice costs little
coverage, but it is no longer exact; test coverage (reported at the end of every run) is the check.
"""

from __future__ import annotations

import math

import numpy as np


def quantile_levels(levels: list[float]) -> list[float]:
    """The predicted quantiles the intervals need: ``[a/2, 1 - a/2]`` for each level, in order."""
    return [t for lv in levels for t in ((1 - lv) / 2, (1 + lv) / 2)]


def conformal_quantile(scores: np.ndarray, level: float) -> float | None:
    """The ``ceil((n + 1) level)``-th smallest score; None when ``n`` is too small for the level."""
    n = len(scores)
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n:
        return None
    return float(np.sort(scores)[k - 1])


def _scores(level_index: int, true: np.ndarray, point: np.ndarray, quantiles: np.ndarray | None) -> np.ndarray:
    if quantiles is None:
        return np.abs(true - point)
    low, high = quantiles[:, 2 * level_index], quantiles[:, 2 * level_index + 1]
    return np.maximum(low - true, true - high)


def calibrate(levels: list[float], true: np.ndarray, point: np.ndarray,
              quantiles: np.ndarray | None) -> tuple[dict | None, list[float]]:
    """Fit the corrections on calibration data (years). Returns ``(calibration, skipped levels)``;
    the calibration is None when no level can be calibrated on this few images.

    ``quantiles``: ``[n, 2 * len(levels)]`` predicted quantiles (``quantile_levels`` order) for the
    distribution head, None for the regression head."""
    kept, qs, skipped = [], [], []
    for i, level in enumerate(levels):
        q = conformal_quantile(_scores(i, true, point, quantiles), level)
        if q is None:
            skipped.append(level)
        else:
            kept.append(level)
            qs.append(q)
    if not kept:
        return None, skipped
    method = "abs_residual" if quantiles is None else "cqr"
    return {"method": method, "levels": kept, "q": qs, "n": int(len(true))}, skipped


def intervals(calibration: dict, point: np.ndarray, quantiles: np.ndarray | None) -> dict[float, tuple]:
    """``{level: (low, high)}`` in years for each calibrated level.

    ``quantiles`` as in ``calibrate`` but for the calibration's own levels, in its order."""
    out = {}
    for i, (level, q) in enumerate(zip(calibration["levels"], calibration["q"])):
        if calibration["method"] == "abs_residual":
            low, high = point - q, point + q
        else:
            low = np.minimum(quantiles[:, 2 * i] - q, point)
            high = np.maximum(quantiles[:, 2 * i + 1] + q, point)
        out[level] = (low, high)
    return out


def labelled_intervals(calibration: dict, point: np.ndarray, quantiles: np.ndarray | None) -> dict[str, tuple]:
    """``intervals`` keyed by the column label of each level (``"80"``: ``low_80``, ``high_80``)."""
    return {level_label(lv): b for lv, b in intervals(calibration, point, quantiles).items()}


def coverage_report(calibration: dict, true: np.ndarray, point: np.ndarray, quantiles: np.ndarray | None,
                    prefix: str) -> dict[str, float]:
    """``<prefix>coverage_80``, ``<prefix>width_80`` ...: the share of images whose true date lies in
    its interval, and the intervals' mean width in years."""
    out = {}
    for level, (low, high) in intervals(calibration, point, quantiles).items():
        pct = round(level * 100)
        out[f"{prefix}coverage_{pct}"] = float(np.mean((true >= low) & (true <= high)))
        out[f"{prefix}width_{pct}"] = float(np.mean(high - low))
    return out


def level_label(level: float) -> str:
    return str(round(level * 100))
