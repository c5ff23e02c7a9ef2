"""Errors in years, computed one way for every place that reports them (the optional logs, predict)."""

from __future__ import annotations

import numpy as np


def by_decade(true: np.ndarray, predicted: np.ndarray) -> dict[int, dict[str, float]]:
    """``{decade: {"n", "rmse", "mae"}}`` of the errors, grouped by the decade of the true date
    (1937.4 -> 1930), decades in increasing order."""
    err = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    decades = np.floor(np.asarray(true, dtype=np.float64) / 10) * 10
    out = {}
    for d in np.unique(decades):
        sel = decades == d
        out[int(d)] = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean(err[sel] ** 2))),
                       "mae": float(np.mean(np.abs(err[sel])))}
    return out


def year_errors(true: np.ndarray, predicted: np.ndarray) -> dict:
    """RMSE and MAE in years over all images, and the same per decade of the true date."""
    err = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return {"n": len(err), "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
            "by_decade": by_decade(true, predicted)}
