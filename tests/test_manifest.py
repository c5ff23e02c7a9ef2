"""Manifest data, hardened: formats and modes, bad rows by row number, splits, augmentation, cache.

Every test writes its own small image files; most build the data in-process (seconds in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEFAULT_CONFIG, ROOT
from train import data as data_mod
from train.config import load_config
from train.errors import UserError
from train.data import build_data, decode_image, ensure_cache, make_loaders, read_manifest_rows, split_rows

RNG = np.random.default_rng(0)


def _rgb(w=24, h=20):
    return Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _collection(tmp_path: Path, n=30, groups=None, header="file,taken,split,item") -> tuple[Path, Path]:
    """``n`` PNG/JPEG files and a manifest with renamed columns, a split column and a group column."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    lines = [header]
    dates = ["1901", "1950-06", "1975-12-24", "1930.75"]
    for i in range(n):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        _rgb(24 + i % 5, 20).save(root / name)
        split = ["train", "train", "train", "val", "test"][i % 5]
        group = groups[i] if groups else f"g{i}"
        lines.append(f"{name},{dates[i % 4]},{split},{group}")
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv, root


def _cfg(tmp_path: Path, csv: Path, **extra):
    values = {
        "experiment.output_dir": str(tmp_path / "runs"), "data.kind": "manifest", "data.manifest.path": str(csv),
        "data.manifest.image_root": str(tmp_path / "images"),
        "data.manifest.path_column": "file", "data.manifest.date_column": "taken", "data.image_size": 16,
        "logging.progress_bar": "false",
    }
    values.update(extra)
    return load_config(DEFAULT_CONFIG, [f"{k}={v}" for k, v in values.items()])


# --- Formats, modes, orientation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("RGB", "WEBP"),
     ("L", "TIFF"), ("I;16", "PNG")],
)
def test_decode_formats_and_modes(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    im = _rgb(30, 22)
    im = im.convert(mode) if mode != "I;16" else Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257))
    im.save(path, fmt)
    x = decode_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert 20 < x.float().mean() < 235


def test_transparent_areas_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert decode_image(tmp_path / "t.png", 8).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 degrees for display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    x = decode_image(tmp_path / "o.jpg", 16).int()
    assert x[2, :, :6].float().mean() > 200 and x[0, :, :6].float().mean() < 60  # displayed left is blue


# --- Columns, paths, bad rows ------------------------------------------------------------------------


def test_renamed_columns_absolute_paths_and_image_root(tmp_path):
    csv, root = _collection(tmp_path, n=20)
    text = csv.read_text().splitlines()
    text[1] = text[1].replace("img0.jpg", str(root / "img0.jpg"))  # absolute path
    moved = tmp_path / "elsewhere" / "m.csv"
    moved.parent.mkdir()
    moved.write_text("\n".join(text) + "\n")
    d = build_data(_cfg(tmp_path, moved,
                        **{"data.manifest.image_root": str(root), "data.manifest.split_column": "split"}))
    assert (len(d.train), len(d.val), len(d.test)) == (12, 4, 4)
    assert d.train.years[0] == pytest.approx(1901.5)  # a year alone is its middle


def _with_bad_rows(tmp_path):
    csv, root = _collection(tmp_path, n=20)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = root / "img0.jpg"
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    lines = csv.read_text().splitlines()
    lines[2] = "img1.png,19x0,train,g1"  # row 3: bad date
    lines[4] = "gone.png,1950,train,g3"  # row 5: missing file
    lines[6] = "corrupt.jpg,1950,train,g5"  # row 7: does not decode
    lines[8] = "truncated.jpg,1950,train,g7"  # row 9: truncated
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.mark.parametrize("cache", [False, True])
def test_bad_rows_are_all_named_by_row_number_before_training(tmp_path, cache):
    csv = _with_bad_rows(tmp_path)
    with pytest.raises(UserError) as e:
        build_data(_cfg(tmp_path, csv, **{"data.cache": cache}))
    lines = e.value.lines
    assert [line.split(": ")[1] for line in lines] == ["row 3", "row 5", "row 7", "row 9"]
    assert "'19x0' is not a date" in lines[0] and "not found" in lines[1]
    assert "cannot be decoded" in lines[2] and "cannot be decoded" in lines[3]


def test_many_bad_rows_are_summarized(tmp_path):
    csv, _ = _collection(tmp_path, n=30)
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:1] + [line.split(",")[0] + ",never,train,g" for line in lines[1:]]) + "\n")
    with pytest.raises(UserError) as e:
        build_data(_cfg(tmp_path, csv))
    assert len(e.value.lines) == 11 and "row 11:" in e.value.lines[9]
    assert "30 bad rows in all (and 20 more)" in e.value.lines[-1]


@pytest.mark.parametrize("cache", [False, True])
def test_skip_drops_and_counts_bad_rows(tmp_path, cache, capsys):
    csv = _with_bad_rows(tmp_path)
    d = build_data(_cfg(tmp_path, csv, **{"data.on_bad_row": "skip", "data.cache": cache}))
    assert d.skipped_rows == 4 and len(d.bad_rows) == 4
    assert len(d.train) + len(d.val) + len(d.test) == 16
    assert "skipped 4 bad row(s)" in capsys.readouterr().err


# --- Splits ------------------------------------------------------------------------------------------


def test_random_split_is_seeded_exact_and_stable_when_rows_are_dropped():
    keys = [f"p{i}" for i in range(200)]
    a = split_rows(keys, 0.1, 0.2, seed=1)
    assert [len(p) for p in a] == [140, 20, 40]
    assert all(np.array_equal(x, y) for x, y in zip(a, split_rows(keys, 0.1, 0.2, seed=1)))
    assert not np.array_equal(a[2], split_rows(keys, 0.1, 0.2, seed=2)[2])
    # Dropping one row keeps most others where they were (keyed by the row, not its position).
    b = split_rows(keys[1:], 0.1, 0.2, seed=1)
    test_a = {keys[i] for i in a[2]}
    test_b = {keys[1:][i] for i in b[2]}
    assert len(test_a & test_b) >= 36


def test_grouped_split_keeps_each_group_in_one_split(tmp_path):
    groups = [f"album{i // 3}" for i in range(30)]  # 10 albums of 3 images
    csv, _ = _collection(tmp_path, n=30, groups=groups)
    d = build_data(_cfg(tmp_path, csv, **{"data.manifest.group_column": "item", "data.manifest.val_fraction": 0.2,
                                         "data.manifest.test_fraction": 0.2}))
    seen = {}
    for name, ds in (("train", d.train), ("val", d.val), ("test", d.test)):
        for r in ds.row_numbers:
            seen.setdefault(groups[r - 2], set()).add(name)
    assert all(len(s) == 1 for s in seen.values())
    assert len(d.val) == 6 and len(d.test) == 6


def test_split_column_that_splits_a_group_is_refused(tmp_path):
    csv, _ = _collection(tmp_path, n=20, groups=["same"] * 20)
    with pytest.raises(UserError, match="group.*appear in several splits.*'same'"):
        build_data(_cfg(tmp_path, csv, **{"data.manifest.split_column": "split", "data.manifest.group_column": "item"}))


# --- Augmentation --------------------------------------------------------------------------------------


AUG = {"data.augment.hflip": "true", "data.augment.crop_scale_min": 0.6, "data.augment.brightness": 0.2}


def test_augmentation_is_a_function_of_seed_epoch_index_and_train_only(tmp_path):
    csv, _ = _collection(tmp_path, n=20)
    d = build_data(_cfg(tmp_path, csv, **AUG))
    plain = d.train[3][0]
    a1, a1_again, a2 = d.train[(1, 3)][0], d.train[(1, 3)][0], d.train[(2, 3)][0]
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2) and not torch.equal(a1, plain)
    assert d.val.augment is None and d.test.augment is None
    assert torch.equal(build_data(_cfg(tmp_path, csv, **AUG)).train[(1, 3)][0], a1)


def _epochs(loader, sampler, epochs=(1, 2), data=None):
    out = []
    for e in epochs:
        # A prepared loader passes its own epoch counter to the sampler when iterated, so the loop
        # sets the epoch on the loader; a plain DataLoader has no set_epoch.
        (loader.set_epoch if hasattr(loader, "set_epoch") else sampler.set_epoch)(e)
        # With augmentation on, the train loader yields raw batches that Data.train_batch augments.
        batches = (data.train_batch(b, e) for b in loader) if data is not None else loader
        out.append(torch.cat([x for x, _ in batches]))
    return out


def test_augmented_batches_do_not_depend_on_workers_or_accelerate(tmp_path):
    from accelerate import Accelerator

    csv, _ = _collection(tmp_path, n=20)
    cfg0 = _cfg(tmp_path, csv, **AUG, **{"data.batch_size": 4, "data.cache": "true"})
    cfg2 = _cfg(tmp_path, csv, **AUG, **{"data.batch_size": 4, "data.num_workers": 2})  # decoded in 2 workers
    d, d2 = build_data(cfg0), build_data(cfg2)
    tr0, _, _ = make_loaders(cfg0, d)
    tr2, _, _ = make_loaders(cfg2, d2)
    s0, s2 = tr0.sampler, tr2.sampler
    ref = _epochs(tr0, s0, data=d)
    assert not torch.equal(ref[0], ref[1])
    got = _epochs(tr2, s2, data=d2)  # persistent workers: the epoch must reach them through the sampler
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    prepared = Accelerator(cpu=True).prepare(tr2)
    assert all(torch.equal(a, b) for a, b in zip(ref, _epochs(prepared, s2, data=d2)))


# --- Cache ---------------------------------------------------------------------------------------------


def _count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = data_mod.decode_image

    def counting(path, size):
        calls[0] += 1
        return real(path, size)

    monkeypatch.setattr(data_mod, "decode_image", counting)
    return calls


def test_cache_is_built_once_then_decodes_nothing(tmp_path, monkeypatch):
    csv, root = _collection(tmp_path, n=20)
    cache_dir = tmp_path / "node-local"
    cfg = _cfg(tmp_path, csv, **{"data.cache": "true", "data.cache_dir": str(cache_dir)})
    calls = _count_decodes(monkeypatch)
    d = build_data(cfg)
    assert calls[0] == 20 and len(list(cache_dir.glob("*.npy"))) == 1
    tr, _, _ = make_loaders(cfg, d)
    sampler = tr.sampler
    _epochs(tr, sampler)
    assert calls[0] == 20  # epochs decode nothing
    d2 = build_data(cfg)  # a later run
    assert calls[0] == 20
    for ds in (d2.train, d2.val, d2.test):  # the cache holds exactly what decoding gives
        assert isinstance(ds, data_mod.CachedImages)
        i = len(ds) - 1
        path = root / csv.read_text().splitlines()[ds.row_numbers[i] - 1].split(",")[0]
        assert torch.equal(ds.raw(i), decode_image(path, 16))
    assert d2.pixel_mean == pytest.approx(d.pixel_mean)


def test_cache_is_rebuilt_when_an_input_changes(tmp_path, monkeypatch):
    csv, root = _collection(tmp_path, n=20)
    base = {"data.cache": "true", "data.cache_dir": str(tmp_path / "c")}
    calls = _count_decodes(monkeypatch)
    build_data(_cfg(tmp_path, csv, **base))
    assert calls[0] == 20
    # An image replaced in place, same name and byte size: the modification time changes the key.
    target = root / "img3.png"
    st = target.stat()
    Image.open(target).transpose(Image.FLIP_LEFT_RIGHT).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    d = build_data(_cfg(tmp_path, csv, **base))
    assert calls[0] == 40
    slot = next(ds for ds in (d.train, d.val, d.test) if 5 in ds.row_numbers)
    assert torch.equal(slot.raw(slot.row_numbers.index(5)), decode_image(target, 16))
    build_data(_cfg(tmp_path, csv, **base, **{"data.image_size": 12}))  # another image size
    assert calls[0] == 60
    csv.write_text(csv.read_text().replace("1950-06", "1950-07"))  # the manifest's content
    build_data(_cfg(tmp_path, csv, **base))
    assert calls[0] == 80
    assert len(list((tmp_path / "c").glob("*.json"))) == 4


def _six_pngs(root):
    root.mkdir()
    paths = [root / f"{i}.png" for i in range(6)]
    for p in paths:
        _rgb().save(p)
    return paths


def test_cache_waiters_poll_until_the_builder_is_done(tmp_path):
    paths = _six_pngs(tmp_path / "i")
    results = {}

    def waiter():
        results["waiter"] = ensure_cache(paths, 8, tmp_path / "c", "k", builder=False, poll_s=0.01)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.3)
    assert t.is_alive() and "waiter" not in results  # nothing built yet: it waits
    built = ensure_cache(paths, 8, tmp_path / "c", "k", builder=True)
    t.join(10)
    assert results["waiter"] == built and not list((tmp_path / "c").glob(".*tmp*"))
    assert np.load(built[0], mmap_mode="r").shape == (6, 3, 8, 8)


def test_two_builders_at_once_build_once(tmp_path, monkeypatch):
    paths = _six_pngs(tmp_path / "i")
    calls = _count_decodes(monkeypatch)
    threads = [threading.Thread(target=ensure_cache, args=(paths, 8, tmp_path / "c", "k", True)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert calls[0] == 6


def test_a_failed_build_releases_the_waiters(tmp_path):
    results = {}

    def waiter():
        try:
            ensure_cache([], 8, tmp_path / "c", "k", builder=False, poll_s=0.01)
        except UserError as e:
            results["error"] = str(e)

    t = threading.Thread(target=waiter)
    t.start()
    with pytest.raises(ValueError):
        ensure_cache([tmp_path / "x.png"], 8, tmp_path / "c", "k", builder=True, num_workers=-1)  # a crash mid-build
    t.join(10)
    assert "building the image cache" in results["error"]


def test_read_manifest_rows_without_dates(tmp_path):
    csv, root = _collection(tmp_path, n=5)
    rows = read_manifest_rows(csv, root, "file", None)
    assert len(rows.paths) == 5 and all(np.isnan(rows.years))



def test_benchmark_script_runs_on_a_tiny_collection(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/data.py", "--images", "40", "--image-size", "16",
                        "--batch-size", "8", "--num-workers", "0", "--steps", "2", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cached / decoding" in r.stdout and "cached / training step" in r.stdout
