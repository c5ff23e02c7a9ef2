"""Date-preserving augmentation of the train split, applied to whole batches on the training device.

What it does to an image (``data.augment``): a random resized crop (area share in ``[crop_scale_min, 1]``,
aspect 3/4..4/3, resized back bilinearly), a horizontal flip, a brightness factor in ``[1 - b, 1 + b]``.
No colour, blur or noise changes: those are date cues.

Two halves, so that the random part is exact everywhere and the pixel part runs where the model is:

- ``augment_params``: what happens to each image (crop box, flip, brightness factor), drawn from a
  counter-based generator keyed by ``(seed, epoch, index)`` (splitmix64 integer mixing in NumPy uint64)
  and turned into integer crop boxes in float64. It runs in the loader, vectorized over the batch (a few
  microseconds), and travels with the batch as a small float32 tensor (``[B, 6]``). An image's draws
  depend on nothing else: not the batch it is in, the process, the worker, or where a resume started.
  Computed on the CPU on purpose: NumPy defines wrap-around uint64 arithmetic (torch int64 overflow is
  signed), float64 exists on every host (not on MPS), and a GPU's ``exp``/``log`` may differ from the
  CPU's in the last bit, which would move a crop box by a pixel between a GPU run and a CPU run.
  With a crop, ``with_taps`` appends each image's bilinear taps (source rows and columns, weights; the
  flip folded in; ``[B, 6 + 4 (H + W)]`` in all), also in NumPy float64 in the loader, so the training
  device does no small bookkeeping ops.
- ``augment_batch``: applies them to a uint8 batch ``[B, 3, H, W]`` on the batch's device, with the
  normalization folded in. On a GPU (any device but the CPU) as tensor ops: rows picked with
  ``index_select``, columns with one ``gather`` per tap, only kernels that treat every image alike (no
  ``lerp``/``addcmul``, whose vectorized and scalar code round differently and could give an image
  other bits in another batch). A crop on the CPU by one compiled loop (``train/augment_cpu.py``): the same
  tensor ops there are memory-bound at twice its time (docs/PERFORMANCE.md). Either way an image's
  pixels do not depend on its batch; the two paths agree to within float rounding.

``augment_one`` is the per-image reference (crop, ``F.interpolate``, flip, brightness): the tests check
that both paths of ``augment_batch`` give the same images. Runs before this module (numpy ``default_rng`` per image in
the loader workers) drew other random numbers: the same transforms and ranges, other augmented images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from train.config import AugmentConfig

# Columns of the parameter tensor augment_params returns.
TOP, LEFT, CROP_H, CROP_W, FLIP, BRIGHTNESS = range(6)
N_PARAMS = 6

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # aspect ratios of the crop, as in torchvision


def active(aug: AugmentConfig | None) -> bool:
    """Whether ``aug`` changes any image."""
    return aug is not None and (aug.hflip or aug.crop_scale_min < 1.0 or aug.brightness > 0)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 in which every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epochs, indices, n: int) -> np.ndarray:
    """``[len(indices), n]`` uniforms in ``[0, 1)``; row ``j`` depends only on ``(seed, epochs[j], indices[j])``.

    ``epochs``: one epoch for all rows or one per row. 53 random bits each (float64)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1).astype(np.uint64)
    ep = np.broadcast_to(np.asarray(epochs, dtype=np.int64).astype(np.uint64), idx.shape)
    key = _mix(np.full(idx.shape, seed, dtype=np.uint64) + _GOLDEN)
    key = _mix(key ^ (ep * _GOLDEN + _GOLDEN))  # array ops wrap modulo 2**64 (NumPy scalars would warn)
    key = _mix(key ^ (idx * _GOLDEN + _GOLDEN))
    counters = key[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    return (_mix(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def identity_params(n: int, size: tuple[int, int]) -> torch.Tensor:
    """Parameters that leave ``n`` images of ``size`` (h, w) as they are."""
    p = torch.zeros(n, N_PARAMS)
    p[:, CROP_H], p[:, CROP_W], p[:, BRIGHTNESS] = size[0], size[1], 1.0
    return p


def augment_params(aug: AugmentConfig, seed: int, epochs, indices, size: tuple[int, int]) -> torch.Tensor:
    """float32 ``[B, 6]``: top, left, crop height, crop width, flip (0/1), brightness factor, per image.

    Six draws per image, always in the same order (crop area, aspect, top, left, flip, brightness), so
    switching one transform on or off does not change the others' draws.
    """
    h, w = size
    u = uniforms(seed, epochs, indices, N_PARAMS)
    p = np.zeros((len(u), N_PARAMS))
    p[:, CROP_H], p[:, CROP_W], p[:, BRIGHTNESS] = h, w, 1.0
    if aug.crop_scale_min < 1.0:
        share = aug.crop_scale_min + (1.0 - aug.crop_scale_min) * u[:, 0]
        ratio = np.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[:, 1])
        cw = np.clip(np.round(np.sqrt(share * ratio) * w), 1, w)  # round half to even, like round()
        ch = np.clip(np.round(np.sqrt(share / ratio) * h), 1, h)
        p[:, TOP], p[:, LEFT] = np.floor(u[:, 2] * (h - ch + 1)), np.floor(u[:, 3] * (w - cw + 1))
        p[:, CROP_H], p[:, CROP_W] = ch, cw
    if aug.hflip:
        p[:, FLIP] = u[:, 4] < 0.5
    if aug.brightness > 0:
        p[:, BRIGHTNESS] = 1.0 - aug.brightness + 2.0 * aug.brightness * u[:, 5]
    return torch.from_numpy(p.astype(np.float32))


def _taps(start: np.ndarray, length: np.ndarray, size: int, flip: np.ndarray) -> list[np.ndarray]:
    """Bilinear taps of crops ``[start, start + length)`` (``[B]`` each) resized to ``size``: the two
    source positions and their weights, ``[B, size]`` each, as ``F.interpolate(align_corners=False)``
    places them (source ``(d + 0.5) * length / size - 0.5``, clamped at 0), except that the last pixel's
    source is clamped to it (weight 0 on a second tap past the crop, where interpolate puts both taps on
    the last pixel: the same value to within float rounding). Where ``flip`` is 1, output position ``d``
    takes the taps of ``size - 1 - d``: a flip for free. Float64: every host computes the same taps."""
    d = np.arange(size, dtype=np.float64)[None, :]
    d = np.where(flip[:, None] > 0.5, (size - 1) - d, d)
    src = np.minimum(np.maximum((d + 0.5) * (length / size)[:, None] - 0.5, 0.0), (length - 1)[:, None])
    i0 = np.floor(src)
    w1 = src - i0
    i1 = np.minimum(i0 + 1, (length - 1)[:, None])
    return [start[:, None] + i0, start[:, None] + i1, 1.0 - w1, w1]


def with_taps(params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``augment_params`` rows -> float32 ``[B, 6 + 4 (H + W)]``: the six parameters, then each image's
    bilinear taps (``_taps``) of the rows (``y0, y1, wy0, wy1``, H columns each) and of the columns (``x0,
    x1, wx0, wx1``, W each, the flip folded in). Computed in the loader with the parameters (NumPy:
    about 0.2 ms for a batch of 64 at 64 px, 2 ms at 224 px) so that the training device gets them with
    the batch: as tensor
    ops they were a fifth of the augmentation's time on the CPU, and would be dozens of tiny kernels on
    a GPU. Positions are integers below 2**24, exact in float32."""
    h, w = size
    p = params.double().numpy()
    rows = _taps(p[:, TOP], p[:, CROP_H], h, np.zeros(len(p)))
    cols = _taps(p[:, LEFT], p[:, CROP_W], w, p[:, FLIP])
    return torch.from_numpy(np.concatenate([p] + rows + cols, axis=1).astype(np.float32))


def _scratch(scratch: dict | None, name: str, like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """A buffer for an intermediate, reused from ``scratch`` across batches when one is given.

    Why: on the CPU, glibc hands the few MB of each freed intermediate back to the system and the next
    batch page-faults them in again; that tripled the time of a 64 x 3 x 64 x 64 batch here. (CUDA's
    caching allocator already reuses memory, so callers pass ``scratch`` on the CPU only.)"""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    t = scratch.get(name)
    if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != like.device:
        t = scratch[name] = torch.empty(shape, dtype=dtype, device=like.device)
    return t


def _resized_crop(images: torch.Tensor, plan: torch.Tensor, scale: torch.Tensor | None,
                  scratch: dict | None) -> torch.Tensor:
    """The tensor-op path (any device but the CPU; the tests run it on the CPU too): uint8 ``[B, C, H,
    W]`` -> float32, each image's crop box resized to ``H x W`` (and flipped) with the ``with_taps`` of
    ``plan``, times ``scale`` (``[B or 1, C, 1, 1]``, folded into the column weights: no pass of its own).
    Rows picked with ``index_select``, columns with one ``gather`` per tap: single-operation kernels only
    (no ``lerp``/``addcmul``, whose vectorized and scalar code round differently), so an image's pixels
    do not depend on its batch."""
    b, c, h, w = images.shape
    y0, y1, wy0, wy1 = plan[:, N_PARAMS:N_PARAMS + 4 * h].view(b, 4, h).unbind(1)
    x0, x1, wx0, wx1 = plan[:, N_PARAMS + 4 * h:].view(b, 4, w).unbind(1)
    # Rows: whole rows of W pixels copied (cheap); channel c of image i is row block (i * C + c) * H.
    # (Converted by copy_, then weighted: a uint8 x float32 multiply in one op was slower here.)
    rows = images.reshape(b * c * h, w)
    base = (torch.arange(b * c, device=images.device) * h).view(b, c, 1)
    picked = _scratch(scratch, "rows", images, (b * c * h, w), images.dtype)
    top = _scratch(scratch, "top", images, (b, c, h, w), torch.float32)
    bottom = _scratch(scratch, "bottom", images, (b, c, h, w), torch.float32)
    top.view(-1, w).copy_(torch.index_select(rows, 0, (base + y0.long()[:, None, :]).view(-1), out=picked))
    bottom.view(-1, w).copy_(torch.index_select(rows, 0, (base + y1.long()[:, None, :]).view(-1), out=picked))
    x = top.mul_(wy0.reshape(b, 1, h, 1)).add_(bottom.mul_(wy1.reshape(b, 1, h, 1)))
    # Columns: one gather per tap; the result is the only new tensor (it leaves this function).
    wx0, wx1 = wx0.reshape(b, 1, 1, w), wx1.reshape(b, 1, 1, w)
    if scale is not None:
        wx0, wx1 = wx0 * scale, wx1 * scale
    left = torch.gather(x, 3, x0.long().view(b, 1, 1, w).expand(b, c, h, w))
    right = torch.gather(x, 3, x1.long().view(b, 1, 1, w).expand(b, c, h, w), out=bottom)
    return left.mul_(wx0).add_(right.mul_(wx1))


def augment_batch(images: torch.Tensor, params: torch.Tensor, aug: AugmentConfig,
                  normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
                  scratch: dict | None = None, tensor_ops: bool | None = None) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` + ``augment_params`` rows (or ``with_taps`` of them, as the train loader
    sends them) -> a new float32 ``[B, C, H, W]`` on ``images``' device: in [0, 255], or with
    ``normalize=(mean, std)`` (``[C, 1, 1]``, pixels in [0, 1], on that device) already
    ``(x / 255 - mean) / std``, folded into the passes (to within float rounding). Rows of
    ``identity_params`` give the image unchanged, exactly (without ``normalize``).

    A crop on the CPU runs the compiled kernel (``train/augment_cpu.py``), anywhere else (or with
    ``tensor_ops=True``) tensor ops; both give the same images to within float rounding.
    ``scratch``: a dict the caller keeps between batches, for the intermediates (see ``_scratch``)."""
    b, c, h, w = images.shape
    if aug.crop_scale_min < 1.0 and params.shape[1] == N_PARAMS:  # not from the loader: taps here
        params = with_taps(params.cpu(), (h, w))
    params = params.to(device=images.device, dtype=torch.float32)
    scale = params[:, BRIGHTNESS].view(b, 1, 1, 1) if aug.brightness > 0 else None  # x * scale - offset
    offset, low, high = None, 0.0, 255.0
    if normalize is not None:
        mean, std = normalize
        scale = (scale if scale is not None else 1.0) / (255.0 * std)
        offset, low, high = mean / std, -mean / std, (1.0 - mean) / std
    if tensor_ops is None:
        tensor_ops = images.device.type != "cpu"
    if aug.crop_scale_min < 1.0 and not tensor_ops:
        if images.device.type != "cpu":
            raise ValueError(f"augment_batch: the compiled kernel runs on the CPU, the images are on {images.device}")
        return _resized_crop_cpu(images, params, scale, offset, high if aug.brightness > 0 else math.inf)
    if aug.crop_scale_min < 1.0:
        x = _resized_crop(images, params, scale, scratch)
    else:
        if aug.hflip:
            images = torch.where(params[:, FLIP].view(-1, 1, 1, 1) > 0.5, images.flip(-1), images)
        x = images.float() if scale is None else images * scale
    if offset is not None:
        x = x.sub_(offset)
    if aug.brightness > 0:  # a brightened pixel may pass white; a bilinear mix of pixels never leaves [0, 255]
        # Per-channel bounds: maximum/minimum in place, ~8x faster on the CPU than clamp_ with tensor bounds.
        x = x.clamp_(low, high) if normalize is None else torch.minimum(torch.maximum(x, low, out=x), high, out=x)
    return x


def _resized_crop_cpu(images: torch.Tensor, plan: torch.Tensor, scale, offset, high) -> torch.Tensor:
    """``augment_batch``'s crop on the CPU: the compiled kernel, imported (and compiled) on first use.
    ``scale``: None or broadcastable to ``[B, C, 1, 1]``; ``offset``, ``high`` (inf: no clamp): None/float
    or ``[C, 1, 1]``."""
    from train.augment_cpu import resized_crop

    b, c, h, w = images.shape

    def f32(value, shape) -> np.ndarray:
        return np.ascontiguousarray(torch.as_tensor(value, dtype=torch.float32).expand(shape).numpy())

    out = torch.empty(b, c, h, w)
    resized_crop(images.contiguous().numpy(), plan.contiguous().numpy(), N_PARAMS,
                 f32(1.0 if scale is None else scale, (b, c, 1, 1)).reshape(b, c),
                 f32(0.0 if offset is None else offset, (c, 1, 1)).reshape(c),
                 f32(high, (c, 1, 1)).reshape(c), out.numpy())
    return out


def augment_one(image: torch.Tensor, params: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """The reference for one uint8 ``[C, H, W]`` image and its ``[6]`` parameters -> float32 in [0, 255]:
    crop, ``F.interpolate`` back to ``H x W``, flip, brightness, one step after the other."""
    top, left, ch, cw, flip, _ = (int(v) for v in params.tolist())
    x = image.float()
    _, h, w = x.shape
    if aug.crop_scale_min < 1.0:
        x = F.interpolate(x[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear",
                          align_corners=False)[0]
    if aug.hflip and flip:
        x = x.flip(-1)
    if aug.brightness > 0:
        x = (x * params[BRIGHTNESS].float()).clamp_(0.0, 255.0)
    return x
