"""How well could any model date the synthetic images? Bayes-optimal RMSE of predictors that read
each era cue's own value exactly (docs/DATING.md, "The floor goal").

``train/synthetic.py`` drives every cue by the apparent age (true age + 10-year jitter) plus the
cue's own jitter (standard deviations below, on the 0-1 age scale of 1850-2020). A predictor that
knows every cue value exactly, which no image model does, still cannot beat the posterior mean
computed here on a grid over (date, apparent-age offset).

    python benchmarks/cue_floor.py          # about 20 s on one core
"""

from __future__ import annotations

import math

import numpy as np

SPAN, LAST = 170.0, 2020.0
CUE_SD = {"saturation": 0.06, "vignetting": math.hypot(0.08, 0.04 / 0.75), "blur": 0.08, "grain": 0.08,
          "fading": 0.10}


def _pdf(z):
    return np.exp(-0.5 * z**2)


def _cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def likelihood(cue: str, observed: np.ndarray, age: np.ndarray) -> np.ndarray:
    """p(observed cue value | latent age) on the grid; clipped values are probabilities of the tail.
    Saturation is seen only through clip((0.62 - cue age) / 0.4, 0, 1)."""
    sd = CUE_SD[cue]
    o = observed[:, None, None]
    if cue == "saturation":
        p = _pdf((0.62 - 0.4 * o - age) / sd)
        p = np.where(o >= 1, _cdf((0.22 - age) / sd), p)
        return np.where(o <= 0, 1 - _cdf((0.62 - age) / sd), p)
    p = _pdf((o - age) / sd)
    p = np.where(o <= 0, _cdf(-age / sd), p)
    return np.where(o >= 1, 1 - _cdf((1 - age) / sd), p)


def main(n: int = 1500, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    years = LAST - SPAN + SPAN * rng.random(n)
    age = np.clip((LAST - (years + rng.normal(0, 10, n))) / SPAN, 0, 1)
    seen = {c: np.clip(age + rng.normal(0, sd, n), 0, 1) for c, sd in CUE_SD.items()}
    seen["saturation"] = np.clip((0.62 - seen["saturation"]) / 0.4, 0, 1)
    grid_years = np.linspace(LAST - SPAN, LAST, 341)
    offsets = np.linspace(-6, 6, 121)  # apparent-age jitter, in units of its 10-year sd
    grid_age = np.clip((LAST - (grid_years[:, None] + 10 * offsets[None])) / SPAN, 0, 1)[None]
    for cues in (list(CUE_SD), ["grain", "blur", "vignetting", "saturation"], ["grain", "blur", "vignetting"]):
        post = np.ones((n, len(grid_years), len(offsets))) * _pdf(offsets)[None, None]
        for c in cues:
            post = post * likelihood(c, seen[c], grid_age)
        p_year = post.sum(2)
        estimate = (p_year / p_year.sum(1, keepdims=True)) @ grid_years
        rmse = float(np.sqrt(np.mean((estimate - years) ** 2)))
        print(f"every value of {', '.join(cues)} known exactly: RMSE {rmse:.2f} years ({n} draws)")


if __name__ == "__main__":
    main()
