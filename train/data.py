"""Datasets, splits, target standardization, the image cache and loaders.

``build_data(cfg)`` returns a ``Data`` bundle: the three splits as datasets of ``(image, target)``
pairs, where ``image`` is a normalized float tensor ``[3, H, W]`` and ``target`` is the date
standardized with train-split statistics (``(year - mean) / std``). Every metric is converted back
to years with the same ``mean``/``std``, which are also stored in the checkpoint.

Two kinds of data:
- ``synthetic``: generated in memory from the seed (``train.synthetic``), no files.
- ``manifest``: a CSV with an image path column and a date column (``docs/DATA.md``). Every image
  is decoded once at startup, so that every bad row (bad date, missing file, undecodable image) is
  named by its CSV row number before any training. With ``data.cache: true`` that pass writes the
  resized images to a memory-mapped uint8 array on disk, and later epochs and runs decode nothing.

The training order is a function of (seed, epoch) only (``EpochSampler``), and so is augmentation:
the sampler yields ``(epoch, index)`` keys and each image's augmentation is drawn from
``(seed, epoch, index)`` (``train.augment``). Neither touches a global random stream, so a resumed run
sees the same batches and the same augmented images as an uninterrupted one, whatever the number of
workers or processes. With augmentation on, the train loader yields uint8 images with their
augmentation parameters, and ``Data.train_batch`` augments and normalizes the whole batch on the
training device; workers only decode.
"""

from __future__ import annotations

import calendar
import csv
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.augment import active, augment_batch, augment_params, identity_params, with_taps
from train.config import YEAR_RANGE, AugmentConfig, Config, DataConfig
from train.console import progress_bar
from train.errors import UserError
from train.fsutil import atomic_file, atomic_write_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
_MAX_LISTED = 10  # bad rows listed one per line before the summary line
_CACHE_FORMAT = "mok-image-cache/1"


class DatedImages(Dataset):
    """uint8 images in memory (``[N, 3, H, W]``) with their dates in years.

    Indexing with an int gives the plain image; indexing with ``(epoch, i)`` (what ``EpochSampler``
    yields) also applies ``augment`` when it is set, drawn from ``(seed, epoch, i)``. Either way the
    image comes back normalized, with its standardized target. (The train loader reads the train split
    through ``RawTrainBatches`` instead, and augments on the training device.)
    """

    def __init__(self, images: torch.Tensor, years: np.ndarray):
        self.images = images
        self.years = torch.as_tensor(years, dtype=torch.float64)
        self.mean = torch.zeros(3, 1, 1)
        self.std = torch.ones(3, 1, 1)
        self.target_mean, self.target_std = 0.0, 1.0
        self.augment: AugmentConfig | None = None  # set on the train split only
        self.seed = 0
        self.stats: np.ndarray | None = None  # per-image channel stats, when already computed
        self.paths: list[Path] | None = None  # source files, where the images came from files
        self.row_numbers: list[int] | None = None  # manifest CSV row of each image, where there is a manifest

    def __len__(self) -> int:
        return len(self.years)

    def raw(self, i: int) -> torch.Tensor:
        return self.images[i]

    def raw_many(self, idx: list[int]) -> torch.Tensor:
        return self.images[idx]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """A whole batch at once (the DataLoader calls this when it exists): one read and one
        vectorized normalization (and augmentation) instead of per-image work."""
        raw, y, params = self.raw_batch(keys)
        x = raw.float() if params is None else augment_batch(raw, params, self.augment)
        return list(zip((x / 255.0 - self.mean) / self.std, y))

    def raw_batch(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(uint8 images [B, 3, H, W], standardized targets [B], augmentation parameters or None)``
        for int or ``(epoch, index)`` keys; parameters (``[B, 6]``, with ``with_taps`` columns when there is
        a crop) only with ``augment`` set (identity rows for int keys)."""
        pairs = [k if isinstance(k, tuple) else (None, k) for k in keys]
        idx = [i for _, i in pairs]
        raw = self.raw_many(idx)
        y = ((self.years[idx] - self.target_mean) / self.target_std).float()
        if self.augment is None:
            return raw, y, None
        size = tuple(raw.shape[-2:])
        at = [j for j, (e, _) in enumerate(pairs) if e is not None]
        if len(at) == len(pairs):  # what the train loader asks for
            params = augment_params(self.augment, self.seed, [e for e, _ in pairs], idx, size)
        else:
            params = identity_params(len(idx), size)
            if at:
                params[at] = augment_params(self.augment, self.seed, [pairs[j][0] for j in at],
                                            [idx[j] for j in at], size)
        # With a crop, the bilinear taps travel with the batch too (see with_taps).
        return raw, y, with_taps(params, size) if self.augment.crop_scale_min < 1.0 else params


class RawTrainBatches(Dataset):
    """The train split as the train loader reads it with augmentation on: each batch (pre-collated,
    see ``_collated``) is ``(uint8 images [B, 3, H, W], standardized targets [B], augmentation
    parameters [B, 6], or their ``with_taps`` with a crop)``. ``Data.train_batch`` turns it into
    normalized augmented images on the device the loader moved it to, so the loader (and its workers)
    do no pixel work beyond decoding."""

    def __init__(self, images: DatedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        raw, y, params = self.images.raw_batch([key])
        return raw[0], y[0], params[0]

    def __getitems__(self, keys: list):
        return self.images.raw_batch(keys)


def _collated(batch):
    """collate_fn of ``RawTrainBatches``: its ``__getitems__`` already returns the stacked batch."""
    return batch


class ManifestImages(DatedImages):
    """Images decoded from files on each access (Pillow), resized to ``size`` x ``size``."""

    def __init__(self, paths: list[Path], years: np.ndarray, size: int):
        super().__init__(images=torch.empty(0), years=years)
        self.paths = paths
        self.size = size

    def raw_many(self, idx: list[int]) -> torch.Tensor:
        return torch.stack([self.raw(i) for i in idx])

    def raw(self, i: int) -> torch.Tensor:
        try:
            return decode_image(self.paths[i], self.size)
        except Exception as e:  # noqa: BLE001 - a file changed after the startup check
            # UserError survives the trip from a DataLoader worker (rebuilt from its message).
            raise UserError(f"image '{self.paths[i]}' can no longer be decoded ({e}); "
                            "it changed after startup") from None


class CachedImages(DatedImages):
    """Rows ``slots`` of a memory-mapped uint8 cache file ``[M, 3, S, S]``.

    The file is opened lazily in each process (and dropped when pickled), so DataLoader workers map
    the same pages instead of receiving a copy of the array.
    """

    def __init__(self, cache_file: Path, slots: np.ndarray, years: np.ndarray):
        super().__init__(images=torch.empty(0), years=years)
        self.cache_file = Path(cache_file)
        self.slots = np.asarray(slots, dtype=np.int64)
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.cache_file, mmap_mode="r")
        return self._array

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def raw(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[self.slots[i]]))

    def raw_many(self, idx: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[self.slots[idx]]))  # one fancy-indexed read


def decode_image(path: Path, size: int) -> torch.Tensor:
    """Decode one image file to a uint8 ``[3, size, size]`` tensor.

    Any mode Pillow reads (grayscale, RGBA, palette, CMYK, 16-bit) becomes RGB, and the EXIF
    orientation is applied. The trainer, the cache and ``train.predict`` all decode through here, so
    a checkpoint sees the same pixels at prediction time as in training.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that small
        # (still at least `size` on each side); several times faster on photographs.
        im.draft("RGB", (size, size))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Transparent areas would otherwise become whatever colour they store (often black).
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit scans: scale to 8 bits instead of clipping everything above 255 to white.
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
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
    skipped_rows: int = 0  # manifest rows dropped under data.on_bad_row=skip
    bad_rows: list[str] = field(default_factory=list)  # their reasons, "row N: ..."
    cache_note: str = ""  # with data.cache: "image cache built: <file>" or "... reused: <file>"

    _scratch: dict = field(default_factory=dict, repr=False)  # train_batch's reused CPU buffers
    _normalization: dict = field(default_factory=dict, repr=False)  # device -> pixel mean/std there

    def train_batch(self, batch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` to train on from what the (prepared) train loader yielded in ``epoch``.

        Without augmentation the loader already made ``x``. With it, ``batch`` is ``RawTrainBatches``'
        ``(uint8 images, y, parameters)``, already on the training device: the whole batch is augmented and
        normalized there. (``epoch`` is not needed: the parameters were drawn from each key's own epoch.)
        """
        if len(batch) == 2:
            return batch[0], batch[1]
        images, y, params = batch
        scratch = self._scratch if images.device.type == "cpu" else None
        return augment_batch(images, params, self.train.augment, self._normalization_on(images.device), scratch), y

    def _normalization_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The train split's pixel mean and std (``[3, 1, 1]``) on ``device``, copied there once: a copy
        per batch from pageable host memory would make every step wait for the GPU."""
        mean, std = self.train.mean, self.train.std
        cached = self._normalization.get(device)
        if cached is None or cached[0] is not mean or cached[1] is not std:  # replaced (a backbone's statistics)
            cached = self._normalization[device] = (mean, std, mean.to(device), std.to(device))
        return cached[2], cached[3]


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles with a generator seeded by ``seed + epoch``: the order depends on nothing else.

    Yields ``(epoch, index)`` keys: the epoch travels with each index into the DataLoader workers
    (a dataset attribute set in the main process would not reach persistent workers), and the
    dataset seeds augmentation from it.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        epoch = self.epoch
        return iter([(epoch, i) for i in torch.randperm(self.n, generator=g).tolist()])

    def __len__(self) -> int:
        return self.n


# --------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------

_DATE = re.compile(r"^(\d{1,4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?$")


def parse_date(text: str) -> float:
    """``YYYY`` -> middle of the year, ``YYYY-MM`` -> middle of the month, ``YYYY-MM-DD`` -> that
    day's middle, or a decimal year as is. Raises ``ValueError`` with the reason, also for a date
    outside ``YEAR_RANGE``: a typo (19850) or a unit mix-up (a timestamp) would otherwise dominate
    the target statistics."""
    value = _parse_date(text)
    low, high = YEAR_RANGE
    if not low <= value <= high:
        raise ValueError(f"'{text.strip()}' is outside {low:.0f}..{high:.0f}, not a plausible date of an image")
    return value


def _parse_date(text: str) -> float:
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
# The manifest: rows, bad rows, splits
# --------------------------------------------------------------------------------------------------


@dataclass
class ManifestRows:
    """The usable-so-far rows of a manifest CSV (date parsed, file present)."""

    csv_path: Path
    row_numbers: list[int]  # CSV row numbers (the header is row 1)
    texts: list[str]  # the path column as written in the CSV
    paths: list[Path]
    years: list[float]
    splits: list[str]  # "" without a split column
    groups: list[str]  # "" without a group column
    problems: dict[int, str]  # row number -> reason, for rows already dropped
    missing: dict[int, str] = field(default_factory=dict)  # row number -> path text, of the missing-file problems


def _unreadable_csv(csv_path: Path, e: Exception) -> UserError:
    return UserError(f"{csv_path}: not a readable UTF-8 CSV file ({e}); save it as UTF-8 (a spreadsheet's "
                     "'CSV UTF-8')")


def csv_header(csv_path: Path) -> list[str]:
    """The column names of a CSV, with the same error as ``read_manifest_rows`` for an unreadable file."""
    try:
        with Path(csv_path).open(newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise _unreadable_csv(csv_path, e) from None


def read_manifest_rows(csv_path: Path, image_root: Path | None, path_column: str, date_column: str | None,
                       split_column: str | None = None, group_column: str | None = None) -> ManifestRows:
    """Read a manifest CSV: resolve paths (relative to ``image_root``, default the CSV's directory,
    or absolute), parse dates, and note every row whose date is bad or whose file is missing.

    ``date_column=None`` reads paths only (prediction without labels). A missing CSV or column is a
    ``UserError``; bad rows are returned in ``problems``, not raised, so the caller can list them all.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"'{csv_path}' not found (a CSV with columns '{path_column}' and '{date_column or 'date'}')")
    root = Path(image_root) if image_root else csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            needed = [c for c in (path_column, date_column, split_column, group_column) if c]
            missing = [c for c in needed if c not in columns]
            if missing:
                raise UserError(f"{csv_path}: column(s) {missing} not found; the header has {columns} "
                                "(set data.manifest.*_column)")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise _unreadable_csv(csv_path, e) from None
    out = ManifestRows(csv_path, [], [], [], [], [], [], {})
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        text = (row.get(path_column) or "").strip()
        if not text:
            out.problems[row_number] = f"empty '{path_column}'"
            continue
        p = Path(text).expanduser()
        p = p if p.is_absolute() else root / p
        year = math.nan
        if date_column:
            try:
                year = parse_date(row.get(date_column) or "")
            except ValueError as e:
                out.problems[row_number] = str(e)
                continue
        split = (row.get(split_column) or "").strip().lower() if split_column else ""
        if split_column and split not in ("train", "val", "test"):
            out.problems[row_number] = f"split '{split}' is not train, val or test"
            continue
        if not p.is_file():
            out.problems[row_number] = f"image '{p}' not found"
            out.missing[row_number] = text
            continue
        out.row_numbers.append(row_number)
        out.texts.append(text)
        out.paths.append(p)
        out.years.append(year)
        out.splits.append(split)
        out.groups.append((row.get(group_column) or "").strip() if group_column else "")
    return out


def bad_row_lines(csv_path: Path, problems: dict[int, str], action: str) -> list[str]:
    """The first bad rows, one line each in row order, plus a summary line when there are more."""
    rows = sorted(problems)
    lines = [f"{csv_path}: row {r}: {problems[r]}" for r in rows[:_MAX_LISTED]]
    if len(rows) > _MAX_LISTED:
        lines.append(f"{csv_path}: {len(rows)} bad rows in all (and {len(rows) - _MAX_LISTED} more); {action}")
    return lines


def _unit_order(keys: list[str], seed: int) -> list[str]:
    """Distinct keys in a seeded order that depends on each key alone, not on its position or on the
    other rows: adding or dropping rows moves few others between splits."""
    return sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())


def split_rows(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[np.ndarray]:
    """Seeded random split of rows into (train, val, test) index arrays.

    Rows with the same key stay together (the key is the group; a row without a group is keyed by
    its own path). Units go to val until it holds ``val_fraction`` of the rows, then to test, the
    rest to train; with one row per unit the counts are exact.
    """
    n = len(keys)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    parts: list[list[int]] = [[], [], []]  # train, val, test
    for k in _unit_order(keys, seed):
        target = 1 if len(parts[1]) < n_val else 2 if len(parts[2]) < n_test else 0
        parts[target].extend(members[k])
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


# --------------------------------------------------------------------------------------------------
# Decoding every image once: the startup check, and the on-disk cache
# --------------------------------------------------------------------------------------------------


class _DecodeAll(Dataset):
    """Decodes file ``i`` -> ``(i, image or None, error or "")``: a bad file is data, not a crash."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, decode_image(self.paths[i], self.size), ""
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad row
            return i, None, f"image '{self.paths[i]}' cannot be decoded ({type(e).__name__}: {e})"


def _image_stats(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> per-image ``[B, 6]`` channel means and stds of pixels in [0, 1]."""
    x = x.float().div_(255.0).flatten(2)
    return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def decode_all(paths: list[Path], size: int, num_workers: int, desc: str, show_bar: bool, batch_size: int = 32):
    """Decode every file in parallel; yield ``(indices, uint8 images [B,3,S,S], {index: error})``."""

    def collate(items):
        ok = [(i, img) for i, img, _ in items if img is not None]
        errors = {i: err for i, _, err in items if err}
        imgs = torch.stack([img for _, img in ok]) if ok else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return [i for i, _ in ok], imgs, errors

    loader = DataLoader(_DecodeAll(paths, size), batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        pin_memory=torch.cuda.is_available())
    bar = progress_bar(len(paths), 0, desc, show_bar, unit="images")
    try:
        for batch in loader:
            yield batch
            bar.update(len(batch[0]) + len(batch[2]))
    finally:
        bar.close()


def scan_images(paths: list[Path], size: int, num_workers: int,
                show_bar: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """Decode every image once (no cache): per-image channel stats ``[N, 6]`` and ``{index: error}``.

    The stats serve the pixel normalization and the colour baseline, so this check pass is not extra
    work for the train split.
    """
    stats = np.full((len(paths), 6), np.nan)
    errors: dict[int, str] = {}
    for idx, imgs, errs in decode_all(paths, size, num_workers, "Checking images", show_bar):
        if idx:
            stats[idx] = _image_stats(imgs).double().numpy()
        errors.update(errs)
    return stats, errors


def cache_key(csv_path: Path, paths: list[Path], size: int) -> str:
    """Hash of the manifest's bytes, each image file's path, size and modification time, and the
    image size: any change (an image replaced in place too) gives a new key, hence a rebuild."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{size}\0".encode())
    h.update(Path(csv_path).read_bytes())
    for p in paths:
        st = p.stat()
        h.update(f"\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _reserve(path: Path) -> None:
    """Allocate a file's blocks now (ENOSPC here, not SIGBUS later); skipped where unsupported."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    with open(path, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _build_cache(paths: list[Path], size: int, array_file: Path, marker: Path, num_workers: int,
                 show_bar: bool) -> None:
    """Decode everything into ``array_file``, then write ``marker`` (the decode errors), each
    atomically. Readers trust only a cache whose marker exists."""
    errors: dict[int, str] = {}
    with atomic_file(array_file) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
        # The memory map's file is sparse: on a full disk, writing into it would kill the process with
        # SIGBUS. Reserving its blocks first turns that into an OSError (ENOSPC) before any decoding.
        _reserve(tmp)
        for idx, imgs, errs in decode_all(paths, size, num_workers, "Caching images", show_bar):
            if idx:
                arr[idx] = imgs.numpy()
            errors.update(errs)
        arr.flush()
        del arr
    payload = {"format": _CACHE_FORMAT, "count": len(paths), "image_size": size,
               "errors": {str(k): v for k, v in errors.items()}}
    atomic_write_bytes(marker, json.dumps(payload).encode())


def ensure_cache(paths: list[Path], size: int, cache_dir: Path, key: str, builder: bool, num_workers: int = 0,
                 show_bar: bool = False, poll_s: float = 0.5) -> tuple[Path, dict[int, str]]:
    """Return ``(array file, {index: decode error})`` of the cache for ``key``, building it if needed.

    ``builder``: this process may build (one per machine, the local main process). Builders of
    independent runs sharing ``cache_dir`` take turns through an ``flock`` (released by the kernel
    if a builder dies, so no stale lock). Other processes poll for the completion marker with a
    plain sleep loop: a long build never trips a distributed collective's timeout.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    array_file, marker, failed = cache_dir / f"{key}.npy", cache_dir / f"{key}.json", cache_dir / f"{key}.failed"
    if builder:
        with open(cache_dir / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run builds the same cache: wait, then reuse it
            if not (marker.is_file() and array_file.is_file()):
                failed.unlink(missing_ok=True)
                try:
                    _build_cache(paths, size, array_file, marker, num_workers, show_bar)
                except BaseException as e:
                    # Tell the waiting processes instead of leaving them polling forever.
                    failed.write_text(f"{type(e).__name__}: {e}")
                    raise
    else:
        t0 = time.monotonic()
        next_note = 60.0
        while not marker.is_file():
            if failed.is_file():
                raise UserError(f"building the image cache in '{cache_dir}' failed on this machine's main process: "
                                f"{failed.read_text()}")
            if time.monotonic() - t0 > next_note:
                print(f"waiting for the image cache in '{cache_dir}' ({next_note:.0f} s so far)", file=sys.stderr)
                next_note += 300.0
            time.sleep(poll_s)
    info = json.loads(marker.read_text())
    return array_file, {int(k): v for k, v in info["errors"].items()}


def _cached_stats(ds: CachedImages, chunk: int = 1024) -> np.ndarray:
    out = []
    order = np.argsort(ds.slots)  # read the memory map forwards
    for a in range(0, len(order), chunk):
        sel = order[a : a + chunk]
        out.append(_image_stats(torch.from_numpy(np.asarray(ds.array[ds.slots[sel]]))).double().numpy())
    stats = np.empty((len(ds), 6))
    if out:
        stats[order] = np.concatenate(out)
    return stats


# --------------------------------------------------------------------------------------------------
# Building the splits
# --------------------------------------------------------------------------------------------------


def _first_pass(cfg: Config, rows: "ManifestRows", csv_path: Path, local_main: bool, show_bar: bool):
    """Decode every image once: it finds undecodable files before training and yields pixel stats
    (or, with ``data.cache``, fills the cache). Returns ``(stats or None, cache file or None, errors,
    what happened to the cache)``."""
    d = cfg.data
    if not d.cache:
        stats, errors = scan_images(rows.paths, d.image_size, d.num_workers, show_bar)
        return stats, None, errors, ""
    cache_dir = _cache_dir(cfg)
    key = cache_key(csv_path, rows.paths, d.image_size)
    reused = (cache_dir / f"{key}.json").is_file()  # the completion marker: nothing to decode
    try:
        cache_file, errors = ensure_cache(rows.paths, d.image_size, cache_dir, key, builder=local_main,
                                          num_workers=d.num_workers, show_bar=show_bar)
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot write the image cache in '{cache_dir}' ({e.strerror or e}); "
                        "free disk space or set data.cache_dir") from None
    return None, cache_file, errors, f"image cache {'reused' if reused else 'built'}: {cache_file}"


def _read_manifest(cfg: Config, local_main: bool, main: bool):
    """The three manifest datasets, plus ``(skipped row count, bad-row lines)``.

    ``local_main``: this process builds the image cache for its machine (the others wait for it);
    ``main``: this process prints the skipped-rows note."""
    d = cfg.data
    rows = read_config_manifest(cfg)
    csv_path, problems = rows.csv_path, dict(rows.problems)
    show_bar = local_main and cfg.logging.progress_bar

    stats, cache_file, errors, cache_note = _first_pass(cfg, rows, csv_path, local_main, show_bar)
    for i, err in errors.items():
        problems[rows.row_numbers[i]] = err

    if problems and d.on_bad_row == "error":
        raise UserError(bad_row_lines(csv_path, problems, "fix or remove them, or set data.on_bad_row=skip"))
    skipped = bad_row_lines(csv_path, problems, "all skipped") if problems else []
    if problems and main:
        print(f"note: skipped {len(problems)} bad row(s) of {csv_path} (data.on_bad_row=skip); "
              f"first: {skipped[0]}", file=sys.stderr)
    idx = manifest_split_indices(cfg, rows, errors)
    years = np.asarray(rows.years, dtype=np.float64)
    datasets = []
    for ix in idx:
        if cache_file is not None:
            ds = CachedImages(cache_file, ix, years[ix])
            ds.paths = [rows.paths[i] for i in ix]  # names only (prediction tables); pixels come from the cache
        else:
            ds = ManifestImages([rows.paths[i] for i in ix], years[ix], d.image_size)
            ds.stats = stats[ix]
        ds.row_numbers = [rows.row_numbers[i] for i in ix]
        datasets.append(ds)
    return datasets, len(problems), skipped, cache_note


def read_config_manifest(cfg: Config) -> ManifestRows:
    """The rows of ``data.manifest.path`` read with the config's column options, as the trainer reads them."""
    m = cfg.data.manifest
    if not m.path or not Path(m.path).is_file():
        raise UserError(f"data.manifest.path: '{m.path}' not found "
                        f"(a CSV with columns '{m.path_column}' and '{m.date_column}')")
    return read_manifest_rows(Path(m.path), Path(m.image_root) if m.image_root else None, m.path_column, m.date_column,
                              m.split_column, m.group_column)


def manifest_split_indices(cfg: Config, rows: ManifestRows, errors: dict[int, str]) -> list[np.ndarray]:
    """The trainer's ``(train, val, test)`` split: index arrays into ``rows`` (from ``read_config_manifest``),
    in dataset order, leaving out the rows in ``errors`` (index -> why the image does not decode).

    Only the split column or the seeded random split (``experiment.seed``, ``data.manifest.*``) decide;
    the random split depends on which rows are left out, so ``errors`` must be the decode errors the
    run had (``train.predict --split`` rebuilds a run's split through here). Raises ``UserError`` for
    no usable row, an empty split, or a group found in several splits of the split column.
    """
    m, csv_path = cfg.data.manifest, rows.csv_path
    good = np.asarray([i for i in range(len(rows.paths)) if i not in errors], dtype=np.int64)
    if len(good) == 0:
        raise UserError(f"{csv_path}: no usable rows")
    if m.split_column:
        split_arr = np.asarray(rows.splits)[good]
        idx = [good[split_arr == s] for s in ("train", "val", "test")]
        if m.group_column:
            _check_groups_do_not_straddle(csv_path, rows, idx)
    else:
        keys = [rows.groups[i] if rows.groups[i] else f"\0path\0{rows.paths[i]}" for i in good]
        idx = [good[ix] for ix in split_rows(keys, m.val_fraction, m.test_fraction, cfg.experiment.seed)]
    for name, ix in zip(("train", "val", "test"), idx):
        if len(ix) == 0:
            raise UserError(f"{csv_path}: the {name} split is empty ({len(good)} usable rows); "
                            "add rows or change the split")
    return idx


def _cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.experiment.output_dir) / ".cache"


def cached_decode_errors(cfg: Config, rows: ManifestRows) -> dict[int, str] | None:
    """The decode errors (index -> reason) recorded by a finished ``data.cache`` of exactly these rows,
    files and image size; ``None`` without such a cache. Reads the marker only, decodes nothing."""
    if not cfg.data.cache:
        return None
    marker = _cache_dir(cfg) / f"{cache_key(rows.csv_path, rows.paths, cfg.data.image_size)}.json"
    try:
        info = json.loads(marker.read_text())
        return {int(k): v for k, v in info["errors"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_groups_do_not_straddle(csv_path: Path, rows: ManifestRows, idx: list[np.ndarray]) -> None:
    where: dict[str, set[str]] = {}
    for name, ix in zip(("train", "val", "test"), idx):
        for i in ix:
            if rows.groups[i]:
                where.setdefault(rows.groups[i], set()).add(name)
    mixed = [g for g, s in where.items() if len(s) > 1]
    if mixed:
        shown = ", ".join(f"'{g}' ({'/'.join(sorted(where[g]))})" for g in mixed[:5])
        raise UserError(f"{csv_path}: {len(mixed)} group(s) of data.manifest.group_column appear in several splits "
                        f"of the split column: {shown}")


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

    Used for the input normalization and for the colour-linear baseline. Reuses the stats of the
    startup decode pass when there are some; reads a cache from the memory map; decodes otherwise.
    """
    if ds.stats is not None:
        return ds.stats
    if isinstance(ds, CachedImages):
        ds.stats = _cached_stats(ds)
        return ds.stats
    if ds.images.numel():
        return _image_stats(ds.images).double().numpy()

    class _Raw(Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return _image_stats(ds.raw(i)[None])[0]

    loader = DataLoader(_Raw(), batch_size=batch_size, num_workers=num_workers)
    return torch.cat(list(loader)).double().numpy()


def build_data(cfg: Config, is_local_main: bool = True, is_main: bool = True) -> Data:
    """Build the train/val/test datasets with train-split target and pixel statistics applied.

    Manifest data: raises ``UserError`` naming the bad rows (``data.on_bad_row=error``) or drops them
    and counts them in ``Data.skipped_rows`` (``skip``).
    """
    d = cfg.data
    seed = cfg.experiment.seed
    skipped, bad, cache_note = 0, [], ""
    if d.kind == "synthetic":
        train, val, test = _make_synthetic(d, seed)
    else:
        (train, val, test), skipped, bad, cache_note = _read_manifest(cfg, is_local_main, is_main)
    stats = channel_stats(train, num_workers=d.num_workers)
    pixel_mean = stats[:, :3].mean(0)
    # std over all train pixels = sqrt(mean of per-image variances + variance of per-image means)
    # Floored: a channel that never varies (a constant tint) must not divide by zero, and the
    # checkpoint must carry the value that was used.
    pixel_std = np.maximum(np.sqrt((stats[:, 3:] ** 2).mean(0) + stats[:, :3].var(0)), 1e-6)
    target_mean = float(train.years.mean())
    # (torch's std of one value is NaN, which used to slip through as the standardization.)
    target_std = float(train.years.std()) if len(train) > 1 else 0.0
    if target_std == 0.0:
        # The targets are standardized with the train split's date std: with one image, or one date
        # for every image, there is nothing to standardize with (and nothing to learn).
        where = d.manifest.path if d.kind == "manifest" else "data.synthetic.num_train"
        raise UserError(f"{where}: the train split has {len(train)} image(s), all dated {train.years[0].item():.2f}; "
                        "a date model needs at least two different dates to train on: add rows or change the split")
    for ds in (train, val, test):
        ds.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        ds.std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
        ds.target_mean, ds.target_std = target_mean, target_std
    if active(d.augment):
        train.augment, train.seed = d.augment, seed  # train only: val/test measure the plain images
    return Data(train, val, test, target_mean, target_std, pixel_mean.tolist(), pixel_std.tolist(), skipped, bad,
                cache_note)


def make_loaders(cfg: Config, data: Data) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Loaders for the three splits; the train loader's order comes from an ``EpochSampler``.

    Decoding runs in ``data.num_workers`` worker processes, kept alive across epochs; batches are
    pinned when a CUDA device is there to receive them. With augmentation on, the train loader yields
    ``RawTrainBatches`` batches: pass each through ``Data.train_batch``, which augments on their device.
    """
    d = cfg.data
    sampler = EpochSampler(len(data.train), cfg.experiment.seed)

    def common(ds: DatedImages) -> dict:
        # Workers pay off only where there is per-image work: decoding. A cached or in-memory split is
        # one array read per batch (__getitems__), plus one vectorized normalization or, for the
        # augmented train split, nothing (train_batch does the rest on the training device); shipping
        # that batch back from a worker costs more than making it.
        n = d.num_workers if isinstance(ds, ManifestImages) else 0
        return dict(num_workers=n, persistent_workers=n > 0, pin_memory=torch.cuda.is_available())

    # Its own generator: otherwise creating the iterator draws from the global RNG that dropout
    # uses, and a mid-epoch resume (which creates it at another point) would shift that stream.
    generator = torch.Generator().manual_seed(cfg.experiment.seed)
    augmented = data.train.augment is not None
    train = DataLoader(RawTrainBatches(data.train) if augmented else data.train, batch_size=d.batch_size,
                       sampler=sampler, drop_last=False, generator=generator,
                       collate_fn=_collated if augmented else None, **common(data.train))
    val = DataLoader(data.val, batch_size=d.eval_batch_size, shuffle=False, **common(data.val))
    test = DataLoader(data.test, batch_size=d.eval_batch_size, shuffle=False, **common(data.test))
    return train, val, test


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
