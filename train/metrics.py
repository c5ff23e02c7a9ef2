"""Errors in years, computed one way for every place that reports them (the loop, the optional logs,
predict), always from per-sample predictions gathered from all processes.

The field's metrics (Müller et al., ECIR 2017 and the work on its benchmark): mean absolute error in
years, accuracy within +-5 years (the "lustrum" criterion), decade accuracy (predicted decade equals
the true decade), and the error by decade of the true date. RMSE is kept as the loss-aligned metric.
"""

from __future__ import annotations

import numpy as np


def decade(years: np.ndarray) -> np.ndarray:
    """1937.4 -> 1930; 1940.0 -> 1940."""
    return np.floor(np.asarray(years, dtype=np.float64) / 10) * 10


def by_decade(true: np.ndarray, predicted: np.ndarray) -> dict[int, dict[str, float]]:
    """``{decade: {"n", "rmse", "mae"}}`` of the errors, grouped by the decade of the true date
    (1937.4 -> 1930), decades in increasing order."""
    err = np.asarray(predicted, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    decades = decade(true)
    out = {}
    for d in np.unique(decades):
        sel = decades == d
        out[int(d)] = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean(err[sel] ** 2))),
                       "mae": float(np.mean(np.abs(err[sel])))}
    return out


def date_metrics(true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """``mae``, ``rmse`` (years), ``acc_5y`` (share with |error| <= 5 years) and ``acc_decade``."""
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    err = predicted - true
    if len(err) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "acc_5y": float("nan"), "acc_decade": float("nan")}
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        # A small tolerance: 1995.0 predicted for 1990.0 is within 5 years despite float rounding.
        "acc_5y": float(np.mean(np.abs(err) <= 5.0 + 1e-9)),
        "acc_decade": float(np.mean(decade(predicted) == decade(true))),
    }


def year_errors(true: np.ndarray, predicted: np.ndarray) -> dict:
    """The field's metrics over all images (``n`` too), and RMSE/MAE per decade of the true date."""
    return {"n": len(np.asarray(true)), **date_metrics(true, predicted), "by_decade": by_decade(true, predicted)}
