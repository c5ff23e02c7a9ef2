"""The CPU kernel of ``augment.augment_batch``: the whole batch in one compiled loop (numba).

Why compiled: on the CPU the same transform as tensor ops is a dozen passes over the batch's 3 MB of
float pixels, plus two per-pixel ``gather``/``index_select`` calls; it is bound by memory traffic, not
arithmetic (``benchmarks/data.py``: 0.34-0.47x the cached loader). Here each image's channel is
resampled inside one buffer of H x W floats (16 KB at 64 px: it stays in the L1 cache): the columns of
the crop's rows first, then the rows, with brightness, normalization and the white clamp in the same
write (0.64-0.86x, docs/PERFORMANCE.md). FFCV augments on the CPU the same way, for the same reason.
One thread: it was never what a CPU run waits for (the training step is two orders of magnitude
slower), and numba's parallel loops bring an OpenMP pool that forked loader workers would inherit.

Compiled on first use (1.2-1.4 s here) and cached on disk by numba, so a later process loads it in
about 0.25-0.4 s. Float32 arithmetic in a fixed order per image, no fast-math: an image's pixels do not
depend on its batch, the process or the run (the tests check it bit for bit).
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(fn):
    """``numba.njit`` with the on-disk cache, or without it where numba finds no writable cache
    directory (a read-only install and home): then every process compiles it once, about a second."""
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, boundscheck=False)(fn)


@_compiled
def resized_crop(images, plan, n_params, scale, offset, high, out):  # pragma: no cover - compiled
    """``images`` uint8 ``[B, C, H, W]``, ``plan`` float32 ``with_taps`` rows (taps after the first
    ``n_params`` columns: rows y0, y1, wy0, wy1, then columns x0, x1, wx0, wx1), ``scale`` float32
    ``[B, C]``, ``offset``/``high`` float32 ``[C]`` -> ``out`` float32 ``[B, C, H, W]``:
    ``min(resampled * scale - offset, high)`` (``high`` = inf: no clamp)."""
    b, c, h, w = images.shape
    ys, xs = n_params, n_params + 4 * h
    mixed = np.empty((h, w), np.float32)  # the crop's rows with their columns resampled, one channel
    x0 = np.empty(w, np.int64)
    x1 = np.empty(w, np.int64)
    wx0 = np.empty(w, np.float32)
    wx1 = np.empty(w, np.float32)
    for i in range(b):
        top, rows = int(plan[i, 0]), int(plan[i, 2])
        for x in range(w):
            x0[x], x1[x] = int(plan[i, xs + x]), int(plan[i, xs + w + x])
            wx0[x], wx1[x] = plan[i, xs + 2 * w + x], plan[i, xs + 3 * w + x]
        for k in range(c):
            s, o, hi = scale[i, k], offset[k], high[k]
            for r in range(rows):
                src, row = images[i, k, top + r], mixed[r]
                for x in range(w):
                    row[x] = np.float32(src[x0[x]]) * wx0[x] + np.float32(src[x1[x]]) * wx1[x]
            for y in range(h):
                a, bottom = mixed[int(plan[i, ys + y]) - top], mixed[int(plan[i, ys + h + y]) - top]
                wa, wb = plan[i, ys + 2 * h + y] * s, plan[i, ys + 3 * h + y] * s
                dst = out[i, k, y]
                for x in range(w):
                    dst[x] = min(a[x] * wa + bottom[x] * wb - o, hi)
