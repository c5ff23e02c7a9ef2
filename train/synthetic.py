"""Deterministic synthetic "dated photographs" for the date-regression CNN.

Each sample is a random scene (a two-colour gradient "sky", soft blobs, hard-edged rectangles and
thin lines) rendered as if photographed, printed, aged and scanned at a decimal year ``y``.  The
pipeline, in physical order:

1. **Scene** - random content in [0, 1] RGB with a random content contrast.
2. **Palette** (era) - saturation falls with age: modern images keep full colour, mid-century ones
   are desaturated with a dye shift, pre-~1910 ones are monochrome.
3. **Vignetting** (spatial) - radial darkening, stronger for older lenses.
4. **Blur** (spatial) - separable Gaussian with a per-image sigma, larger for older optics; the
   hard rectangle/line edges are what make it visible.
5. **Grain** (spatial) - additive noise whose amplitude *and* coarseness grow with age.
6. **Fading and tint** (era) - lifted blacks, lowered whites and a sepia tint for old prints.
7. **Scan** (nuisance) - random exposure, per-channel colour cast and black offset, then uint8.

Which cue carries the date: every era cue is driven by an "apparent age" that is the true age plus
a shared Gaussian jitter (``_APPARENT_AGE_SD`` years: old equipment used late, new used early), so
the date is only partly determined even for a perfect model; each cue adds its own smaller jitter.
Grain, blur and vignetting are the reliable cues and need spatial filters to read. The global
colour cues (tint, saturation, fading) are swamped by the random content contrast and the scan's
exposure/cast, so a linear fit on per-channel mean/std recovers only a small part of the signal.

Years are uniform in ``[year_min, year_max]``. The look depends on the absolute year (the eras are
fixed at 1850-2020), so a narrower range gives a harder task rather than a rescaled one.

Determinism: samples are generated in fixed chunks of ``_CHUNK`` with a generator keyed by
``(seed, chunk index)``; sample ``i`` therefore depends on (seed, i, image_size, year range) only,
never on ``n``.
"""

from __future__ import annotations

import math

import numpy as np

_CHUNK = 256
_ERA_FIRST, _ERA_LAST = 1850.0, 2020.0
_APPARENT_AGE_SD = 10.0  # years; the irreducible part of the error
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def make_synthetic(
    n: int, image_size: int, seed: int, year_min: float = 1850.0, year_max: float = 2020.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, years): images uint8 of shape [n, 3, image_size, image_size] (channels first),
    years float64 [n] decimal years."""
    if n < 0 or image_size < 4 or not year_max >= year_min:
        raise ValueError("need n >= 0, image_size >= 4 and year_max >= year_min")
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    years = np.empty(n, dtype=np.float64)
    for c in range(math.ceil(n / _CHUNK)):
        # Always build the whole chunk so that a sample never depends on how many were requested.
        img, yr = _make_chunk(np.random.default_rng([seed, c]), image_size, year_min, year_max)
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        images[lo:hi] = img[: hi - lo]
        years[lo:hi] = yr[: hi - lo]
    return images, years


def _make_chunk(rng: np.random.Generator, s: int, year_min: float, year_max: float) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of images and their dates; the cues are applied in a fixed order (each draws from
    ``rng``, so the order is part of what the seed means)."""
    b = _CHUNK
    years = year_min + (year_max - year_min) * rng.random(b)
    apparent = years + rng.normal(0.0, _APPARENT_AGE_SD, b)
    age = np.clip((_ERA_LAST - apparent) / (_ERA_LAST - _ERA_FIRST), 0.0, 1.0)

    def cue_age(sd: float) -> np.ndarray:
        # Own jitter per cue: cues agree roughly, not exactly, like real mixed equipment.
        return np.clip(age + rng.normal(0.0, sd, b), 0.0, 1.0)[:, None, None, None].astype(np.float32)

    x = _scene(rng, b, s)
    x, sat = _palette(x, rng, cue_age)
    x = _optics(x, rng, cue_age, s)
    x = _grain(x, rng, cue_age, sat, s)
    x = _print_and_scan(x, rng, cue_age, sat)
    # Dithered quantisation (add U[0,1), then truncate) avoids banding in smooth gradients.
    x = np.clip(x * 255.0 + rng.random(x.shape, dtype=np.float32), 0.0, 255.0)
    return x.astype(np.uint8), years


def _palette(x: np.ndarray, rng: np.random.Generator, cue_age) -> tuple[np.ndarray, np.ndarray]:
    """Colour film arrives mid-century; before that everything is monochrome. Returns the saturation too."""
    b = len(x)
    sat = np.clip((0.62 - cue_age(0.06)) / 0.4, 0.0, 1.0) ** 0.8
    luma = np.einsum("bchw,c->bhw", x, _LUMA)[:, None]
    x = luma + sat * (x - luma)
    # Random colours have similar luma, so a plain desaturation looks flat; monochrome emulsions
    # were printed with a wider tonal range, so stretch the tones back (random content contrast
    # below hides this from the global std).
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (1.0 + 0.8 * (1.0 - sat)) * (x - mean)
    # Partly-faded colour prints lose the cyan/blue dye first, drifting towards red/magenta.
    dye = (sat * (1.0 - sat) * 4.0) * rng.uniform(0.0, 0.25, (b, 1, 1, 1)).astype(np.float32)
    return x * (1.0 - dye * np.array([0.0, 0.4, 1.0], dtype=np.float32)[:, None, None]), sat


def _optics(x: np.ndarray, rng: np.random.Generator, cue_age, s: int) -> np.ndarray:
    """Vignetting (radial fall-off around a slightly off-centre optical axis), then lens blur."""
    b = len(x)
    u = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    cy, cx = (rng.uniform(-0.08, 0.08, (2, b, 1, 1, 1))).astype(np.float32)
    r2 = ((u[None, None, :, None] - cy) ** 2 + (u[None, None, None, :] - cx) ** 2) / 0.5
    strength = np.clip(0.75 * cue_age(0.08) + rng.normal(0.0, 0.04, (b, 1, 1, 1)).astype(np.float32), 0.0, 0.9)
    x = x * (1.0 - strength * r2)
    # Blur sigma is defined at 32 px and scales with the image so the cue is resolution-free.
    sigma = (0.2 + 1.1 * cue_age(0.08)[:, 0, 0, 0] ** 1.2) * (s / 32.0)
    return _blur(x, sigma)


def _grain(x: np.ndarray, rng: np.random.Generator, cue_age, sat: np.ndarray, s: int) -> np.ndarray:
    """Older emulsions have bigger silver clumps, so the noise is both stronger and coarser."""
    b = len(x)
    ga = cue_age(0.08)
    fine = rng.standard_normal((b, 1, s, s), dtype=np.float32)
    coarse = _blur(rng.standard_normal((b, 1, s, s), dtype=np.float32), np.full(b, 0.9 * (s / 32.0)))
    coarse /= coarse.std(axis=(2, 3), keepdims=True) + 1e-6
    grain = (1.0 - ga) * fine + ga * coarse
    # Colour film grain is partly per dye layer; monochrome film has one layer.
    grain = grain + 0.5 * sat * rng.standard_normal((b, 3, s, s), dtype=np.float32)
    return x + (0.012 + 0.05 * ga) * grain


def _print_and_scan(x: np.ndarray, rng: np.random.Generator, cue_age, sat: np.ndarray) -> np.ndarray:
    """Ageing of the print (lifted blacks, dimmer whites, sepia on old monochrome prints), then the scan."""
    b = len(x)
    fa = cue_age(0.1)
    black = 0.12 * fa * rng.uniform(0.3, 1.0, (b, 1, 1, 1)).astype(np.float32)
    x = black + (1.0 - black - 0.08 * fa) * x
    sepia = np.array([1.0, 0.82, 0.6], dtype=np.float32)[:, None, None]
    tone = (1.0 - sat) * rng.uniform(0.0, 0.8, (b, 1, 1, 1)).astype(np.float32)
    x = x * (1.0 - tone + tone * sepia)
    # Scanning: exposure, colour cast and offset vary a lot and hide the global colour cues.
    exposure = np.exp(rng.normal(0.0, 0.3, (b, 1, 1, 1)))
    cast = np.exp(rng.normal(0.0, 0.12, (b, 3, 1, 1)))
    offset = rng.uniform(-0.1, 0.1, (b, 1, 1, 1))
    return x * (exposure * cast).astype(np.float32) + offset.astype(np.float32)


def _scene(rng: np.random.Generator, b: int, s: int) -> np.ndarray:
    """Random content in [0, 1]: gradient background, soft blobs, sharp rectangles and lines."""
    u = (np.arange(s, dtype=np.float32) + 0.5) / s
    yy, xx = u[None, :, None], u[None, None, :]

    def colours(k: int) -> np.ndarray:
        return rng.random((b, k, 3), dtype=np.float32)

    def paint(x: np.ndarray, mask: np.ndarray, col: np.ndarray) -> np.ndarray:
        x += mask[:, None] * (col[:, :, None, None] - x)  # alpha-over, in place
        return x

    theta = rng.uniform(0.0, 2.0 * np.pi, (b, 1, 1)).astype(np.float32)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta), 0.0, 1.0)
    ends = colours(2)
    x = ends[:, 0, :, None, None] + (ends[:, 1] - ends[:, 0])[:, :, None, None] * t[:, None]

    blob_col = colours(3)
    for k in range(3):
        cy, cx = rng.random((2, b, 1, 1), dtype=np.float32)
        ry, rx = rng.uniform(0.06, 0.25, (2, b, 1, 1)).astype(np.float32)
        on = (rng.random((b, 1, 1)) < 0.7).astype(np.float32)
        mask = on * np.exp(-0.5 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        x = paint(x, mask, blob_col[:, k])

    rect_col = colours(4)
    for k in range(4):
        y0, x0 = rng.uniform(-0.1, 0.9, (2, b, 1, 1)).astype(np.float32)
        h, w = rng.uniform(0.1, 0.6, (2, b, 1, 1)).astype(np.float32)
        on = rng.random((b, 1, 1)) < 0.75
        mask = on & (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        x = paint(x, mask.astype(np.float32), rect_col[:, k])

    line_col = colours(3)
    for k in range(3):
        phi = rng.uniform(0.0, np.pi, (b, 1, 1)).astype(np.float32)
        cy, cx = rng.random((2, b, 1, 1), dtype=np.float32)
        width = rng.uniform(0.6, 2.0, (b, 1, 1)).astype(np.float32) / s
        on = rng.random((b, 1, 1)) < 0.6
        dist = np.abs((xx - cx) * np.sin(phi) - (yy - cy) * np.cos(phi))
        x = paint(x, (on & (dist < width / 2)).astype(np.float32), line_col[:, k])

    # Content contrast varies (haze, lighting), so pixel std says little about the date.
    contrast = np.exp(rng.uniform(np.log(0.35), np.log(1.3), (b, 1, 1, 1))).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + contrast * (x - mean)


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of [B, C, H, W] (H == W) with one sigma (pixels) per image.

    Each image's 1-D kernel becomes an [S, S] matrix (reflect padding folded in), so the blur is two
    batched matmuls - much faster in numpy than a loop of shifted adds.
    """
    s = x.shape[-1]
    radius = max(1, min(int(math.ceil(3.0 * float(sigma.max()))), s - 1))
    taps = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (taps[None] / np.maximum(sigma[:, None], 1e-3)) ** 2)
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    src = np.arange(s)[None, :] + taps[:, None]  # [taps, S]: which input pixel each tap reads
    src = np.abs(src)
    src = np.where(src > s - 1, 2 * (s - 1) - src, src)
    shift = np.zeros((len(taps), s, s), dtype=np.float32)
    shift[np.arange(len(taps))[:, None], np.arange(s)[None, :], src] = 1.0
    k = np.einsum("bt,tij->bij", w, shift)[:, None]  # [B, 1, S_out, S_in]
    return k @ x @ k.transpose(0, 1, 3, 2)


def apparent_years(n: int, seed: int, year_min: float, year_max: float) -> tuple[np.ndarray, np.ndarray]:
    """``(years, apparent)`` of samples ``0..n-1`` of ``make_synthetic`` without rendering any image:
    the first two draws of each chunk's generator are the dates and the apparent-age jitter."""
    years, apparent = np.empty(n), np.empty(n)
    for c in range(math.ceil(n / _CHUNK)):
        rng = np.random.default_rng([seed, c])
        yr = year_min + (year_max - year_min) * rng.random(_CHUNK)
        ap = yr + rng.normal(0.0, _APPARENT_AGE_SD, _CHUNK)
        lo, hi = c * _CHUNK, min(n, (c + 1) * _CHUNK)
        years[lo:hi], apparent[lo:hi] = yr[: hi - lo], ap[: hi - lo]
    return years, apparent


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def oracle_predictions(apparent: np.ndarray, year_min: float, year_max: float,
                       grid: int = 4001) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and median of the true date given what the images show of the apparent age,
    under the uniform prior on ``[year_min, year_max]``.

    The images show the apparent age only through cues clipped to the eras (``age`` is clipped to
    [0, 1]): an apparent date after 2020 looks like 2020, one before 1850 like 1850. So the posterior
    given an apparent date inside the eras is the Gaussian likelihood times the prior; at a clipped
    end it is the probability of the apparent date lying beyond it."""
    t = np.linspace(year_min, year_max, grid) if year_max > year_min else np.array([year_min])
    a = np.clip(apparent, _ERA_FIRST, _ERA_LAST)[:, None]
    sd = _APPARENT_AGE_SD
    like = np.exp(-0.5 * ((a - t[None]) / sd) ** 2)
    like = np.where(a >= _ERA_LAST, _normal_cdf((t[None] - _ERA_LAST) / sd), like)
    like = np.where(a <= _ERA_FIRST, _normal_cdf((_ERA_FIRST - t[None]) / sd), like)
    post = like / np.maximum(like.sum(1, keepdims=True), 1e-300)
    mean = post @ t
    median = t[np.minimum((post.cumsum(1) < 0.5).sum(1), len(t) - 1)]
    return mean, median


def floor_errors(n_train: int, n_val: int, n_test: int, seed: int, year_min: float,
                 year_max: float, test_years: np.ndarray | None = None) -> dict[str, float]:
    """RMSE of the posterior mean and MAE of the posterior median on the test split: what the best
    possible predictor, one that reads every test image's apparent age exactly, would score. No image
    model can beat it (each cue adds its own jitter on top, so the reachable error is higher).
    ``test_years``: the split's own dates, checked against the draws ({} when they differ)."""
    years, apparent = apparent_years(n_train + n_val + n_test, seed, year_min, year_max)
    years, apparent = years[n_train + n_val:], apparent[n_train + n_val:]
    if test_years is not None and not np.allclose(years, test_years):
        return {}  # not the generator's split (should not happen): no floor rather than a wrong one
    mean, median = oracle_predictions(apparent, year_min, year_max)
    return {"floor/rmse": float(np.sqrt(np.mean((mean - years) ** 2))),
            "floor/mae": float(np.mean(np.abs(median - years)))}


def synthetic_floor(cfg, test_years: np.ndarray) -> dict[str, float]:
    """``floor_errors`` for a run's synthetic test split (checked against the split's own dates)."""
    s = cfg.data.synthetic
    return floor_errors(s.num_train, s.num_val, s.num_test, cfg.experiment.seed, s.year_min, s.year_max, test_years)
