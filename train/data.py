"""Datasets, splits, target standardization and loaders.

``build_data(cfg)`` returns a ``Data`` bundle: the three splits as datasets of ``(image, target)``
pairs, where ``image`` is a normalized float tensor ``[3, H, W]`` and ``target`` is the date
standardized with train-split statistics (``(year - mean) / std``). Every metric is converted back
to years with the same ``mean``/``std``, which are also stored in the checkpoint.

Two kinds of data:
- ``synthetic``: generated in memory from the seed (``train.synthetic``), no files.
- ``manifest``: a CSV with an image path column and a date column; Pillow decodes and resizes.

The training order is a function of (seed, epoch) only (``EpochSampler``), never of a global random
stream, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import calendar
import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.config import Config, DataConfig, UserError


class DatedImages(Dataset):
    """uint8 images in memory (``[N, 3, H, W]``) with their dates in years."""

    def __init__(self, images: torch.Tensor, years: np.ndarray):
        self.images = images
        self.years = torch.as_tensor(years, dtype=torch.float64)
        self.mean = torch.zeros(3, 1, 1)
        self.std = torch.ones(3, 1, 1)
        self.target_mean, self.target_std = 0.0, 1.0

    def __len__(self) -> int:
        return len(self.years)

    def raw(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitem__(self, i: int):
        x = (self.raw(i).float() / 255.0 - self.mean) / self.std
        y = (self.years[i] - self.target_mean) / self.target_std
        return x, y.float()


class ManifestImages(DatedImages):
    """Images decoded from files on each access (Pillow), resized to ``size`` x ``size``."""

    def __init__(self, paths: list[Path], years: np.ndarray, size: int):
        super().__init__(images=torch.empty(0), years=years)
        self.paths = paths
        self.size = size

    def raw(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i], self.size)


def decode_image(path: Path, size: int) -> torch.Tensor:
    """Decode one image file to a uint8 ``[3, size, size]`` tensor (RGB, EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB").resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@dataclass
class Data:
    train: DatedImages
    val: DatedImages
    test: DatedImages
    target_mean: float
    target_std: float
    pixel_mean: list[float]
    pixel_std: list[float]


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``: the order depends on nothing else."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------

_DATE = re.compile(r"^(\d{1,4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?$")


def parse_date(text: str) -> float:
    """``YYYY`` -> middle of the year, ``YYYY-MM`` -> middle of the month, ``YYYY-MM-DD`` -> that
    day's middle, or a decimal year as is. Raises ``ValueError`` with the reason."""
    s = text.strip()
    m = _DATE.match(s)
    if m and (m.group(2) or len(m.group(1)) == 4):
        year = int(m.group(1))
        days = 366 if calendar.isleap(year) else 365
        if m.group(2) is None:
            return year + 0.5
        month = int(m.group(2))
        if not 1 <= month <= 12:
            raise ValueError(f"month {month} out of range")
        start = sum(calendar.monthrange(year, k)[1] for k in range(1, month))
        if m.group(3) is None:
            return year + (start + calendar.monthrange(year, month)[1] / 2) / days
        day = int(m.group(3))
        if not 1 <= day <= calendar.monthrange(year, month)[1]:
            raise ValueError(f"day {day} out of range for {year}-{month:02d}")
        return year + (start + day - 0.5) / days
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"'{text}' is not a date (YYYY, YYYY-MM, YYYY-MM-DD or a decimal year)") from None
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a finite number")
    return value


# --------------------------------------------------------------------------------------------------
# Building the splits
# --------------------------------------------------------------------------------------------------


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _read_manifest(cfg: DataConfig, seed: int):
    m = cfg.manifest
    path = Path(m.path)
    if not path.is_file():
        raise UserError(f"data.manifest.path: '{path}' not found (a CSV with columns '{m.path_column}' and '{m.date_column}')")
    root = Path(m.image_root) if m.image_root else path.parent
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        needed = [m.path_column, m.date_column] + ([m.split_column] if m.split_column else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise UserError(f"{path}: column(s) {missing} not found; the header has {columns} (set data.manifest.*_column)")
        rows = list(reader)
    paths, years, splits, problems = [], [], [], []
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        p = Path(row[m.path_column])
        p = p if p.is_absolute() else root / p
        try:
            years.append(parse_date(row[m.date_column] or ""))
        except ValueError as e:
            problems.append(f"{path}: row {row_number}: {e}")
            continue
        if not p.is_file():
            problems.append(f"{path}: row {row_number}: image '{p}' not found")
            continue
        paths.append(p)
        if m.split_column:
            split = (row[m.split_column] or "").strip().lower()
            if split not in ("train", "val", "test"):
                problems.append(f"{path}: row {row_number}: split '{split}' is not train, val or test")
            splits.append(split)
    if problems:
        more = f" (and {len(problems) - 10} more bad rows)" if len(problems) > 10 else ""
        raise UserError(problems[:10] + ([f"{path}: {len(problems)} bad rows in all{more}; fix or remove them"] if more else []))
    years_arr = np.asarray(years, dtype=np.float64)
    if m.split_column:
        split_arr = np.asarray(splits)
        idx = [np.flatnonzero(split_arr == s) for s in ("train", "val", "test")]
    else:
        idx = list(_split_indices(len(paths), m.val_fraction, m.test_fraction, seed))
    for name, ix in zip(("train", "val", "test"), idx):
        if len(ix) == 0:
            raise UserError(f"{path}: the {name} split is empty ({len(paths)} usable rows); add rows or change the split")
    return [ManifestImages([paths[i] for i in ix], years_arr[ix], cfg.image_size) for ix in idx]


def _make_synthetic(cfg: DataConfig, seed: int):
    from train.synthetic import make_synthetic

    s = cfg.synthetic
    n = s.num_train + s.num_val + s.num_test
    images, years = make_synthetic(n, cfg.image_size, seed, s.year_min, s.year_max)
    images = torch.from_numpy(images)
    cuts = [0, s.num_train, s.num_train + s.num_val, n]
    return [DatedImages(images[a:b], years[a:b]) for a, b in zip(cuts, cuts[1:])]


def channel_stats(ds: DatedImages, batch_size: int = 256, num_workers: int = 0) -> np.ndarray:
    """Per-image ``[mean_r, mean_g, mean_b, std_r, std_g, std_b]`` of pixels in [0, 1], shape ``[N, 6]``.

    Used for the input normalization and for the colour-linear baseline.
    """
    if ds.images.numel():
        x = ds.images.float().div_(255.0).flatten(2)
        return torch.cat([x.mean(-1), x.std(-1)], dim=1).double().numpy()

    class _Raw(Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            x = ds.raw(i).float().div_(255.0).flatten(1)
            return torch.cat([x.mean(-1), x.std(-1)])

    loader = DataLoader(_Raw(), batch_size=batch_size, num_workers=num_workers)
    return torch.cat(list(loader)).double().numpy()


def build_data(cfg: Config) -> Data:
    """Build the train/val/test datasets with train-split target and pixel statistics applied."""
    d = cfg.data
    seed = cfg.experiment.seed
    train, val, test = _make_synthetic(d, seed) if d.kind == "synthetic" else _read_manifest(d, seed)
    stats = channel_stats(train, num_workers=d.num_workers)
    pixel_mean = stats[:, :3].mean(0)
    # std over all train pixels = sqrt(mean of per-image variances + variance of per-image means)
    pixel_std = np.sqrt((stats[:, 3:] ** 2).mean(0) + stats[:, :3].var(0))
    target_mean = float(train.years.mean())
    target_std = float(train.years.std()) or 1.0
    for ds in (train, val, test):
        ds.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        ds.std = torch.tensor(np.maximum(pixel_std, 1e-6), dtype=torch.float32).view(3, 1, 1)
        ds.target_mean, ds.target_std = target_mean, target_std
    return Data(train, val, test, target_mean, target_std, pixel_mean.tolist(), pixel_std.tolist())


def make_loaders(cfg: Config, data: Data) -> tuple[DataLoader, DataLoader, DataLoader, EpochSampler]:
    """Loaders for the three splits; the train loader's order comes from the returned sampler."""
    d = cfg.data
    sampler = EpochSampler(len(data.train), cfg.experiment.seed)
    common = dict(num_workers=d.num_workers, persistent_workers=d.num_workers > 0, pin_memory=torch.cuda.is_available())
    train = DataLoader(data.train, batch_size=d.batch_size, sampler=sampler, drop_last=False, **common)
    val = DataLoader(data.val, batch_size=d.eval_batch_size, shuffle=False, **common)
    test = DataLoader(data.test, batch_size=d.eval_batch_size, shuffle=False, **common)
    return train, val, test, sampler


def baselines(data: Data, num_workers: int = 0) -> dict[str, float]:
    """Test RMSE (years) of two baselines fitted on the train split.

    - ``mean``: always predict the train mean date.
    - ``colour_linear``: least squares on per-channel pixel mean and std (+ bias). If the CNN does
      not beat this clearly, it learned nothing a colour histogram could not tell.
    """
    y_train, y_test = data.train.years.numpy(), data.test.years.numpy()
    rmse_mean = float(np.sqrt(np.mean((y_test - y_train.mean()) ** 2)))
    f_train = channel_stats(data.train, num_workers=num_workers)
    f_test = channel_stats(data.test, num_workers=num_workers)
    a_train = np.hstack([f_train, np.ones((len(f_train), 1))])
    coef, *_ = np.linalg.lstsq(a_train, y_train, rcond=None)
    pred = np.hstack([f_test, np.ones((len(f_test), 1))]) @ coef
    rmse_lin = float(np.sqrt(np.mean((y_test - pred) ** 2)))
    return {"baseline/mean_rmse": rmse_mean, "baseline/colour_linear_rmse": rmse_lin}
