"""Batched augmentation on the training device (train.augment, Data.train_batch): the same images as the
per-image reference, on both paths (the compiled CPU kernel and the tensor ops other devices run), whatever
the batch split, the number of processes or a mid-epoch resume; val/test never augmented; and one kill -9
+ resume run with augmentation on that ends bit-identical."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches

from conftest import DEFAULT_CONFIG, ROOT, env, run_main
from train.augment import augment_batch, augment_one, augment_params, identity_params, uniforms
from train.config import AugmentConfig, load_config
from train.data import RawTrainBatches, build_data, make_loaders

ALL = AugmentConfig(hflip=True, crop_scale_min=0.6, brightness=0.2)
CONFIGS = {
    "all": ALL,
    "crop": AugmentConfig(crop_scale_min=0.5),
    "flip": AugmentConfig(hflip=True),
    "brightness": AugmentConfig(brightness=0.3),
}
PATHS = {"cpu_kernel": False, "tensor_ops": True}  # augment_batch's tensor_ops argument
AUG = ["data.augment.hflip=true", "data.augment.crop_scale_min=0.6", "data.augment.brightness=0.2"]


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _data(*extra: str, n: int = 48):
    cfg = load_config(DEFAULT_CONFIG, [f"data.synthetic.num_train={n}", "data.synthetic.num_val=16",
                                       "data.synthetic.num_test=16", "data.batch_size=8", *AUG, *extra])
    return cfg, build_data(cfg)


def _by_index(loader, data, epoch: int) -> dict[int, torch.Tensor]:
    """``index -> augmented normalized image`` over one pass, reading each batch's indices off its sampler keys."""
    out = {}
    loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else loader.sampler.set_epoch(epoch)
    for keys, batch in zip(_keys(loader, epoch), loader):
        x, _ = data.train_batch(batch, epoch)
        out.update({i: img for i, img in zip(keys, x)})
    return out


def _keys(loader, epoch: int):
    sampler = getattr(loader, "batch_sampler", None) or loader.sampler
    for batch in sampler:
        yield [i for _, i in batch]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (33, 21)], ids=["32px", "64px", "33x21"])
def test_batched_augmentation_matches_the_per_image_reference(name, size, path):
    aug = CONFIGS[name]
    images = _images(24, *size)
    params = augment_params(aug, 42, 3, np.arange(100, 124), size)
    batched = augment_batch(images, params, aug, tensor_ops=PATHS[path])
    reference = torch.stack([augment_one(img, p, aug) for img, p in zip(images, params)])
    assert batched.dtype == torch.float32 and batched.shape == images.shape
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-3)
    assert not torch.equal(batched, images.float()), "something was augmented"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["all", "crop"])
def test_normalization_folded_into_the_augmentation_matches_normalizing_after_it(name, path):
    aug, size = CONFIGS[name], (33, 21)
    images = _images(16, *size)
    params = augment_params(aug, 5, 1, np.arange(16), size)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    folded = augment_batch(images, params, aug, (mean, std), tensor_ops=PATHS[path])
    after = (augment_batch(images, params, aug, tensor_ops=PATHS[path]) / 255.0 - mean) / std
    torch.testing.assert_close(folded, after, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_an_image_does_not_depend_on_its_batch(path):
    images, idx = _images(20, 32, 32), np.arange(500, 520)

    def aug(at):
        return augment_batch(images[at], augment_params(ALL, 7, 2, idx[at], (32, 32)), ALL, tensor_ops=PATHS[path])

    whole = aug(np.arange(20))
    for parts in ([3, 17], [1] * 20, [11, 9]):  # other batch sizes, batch positions, thread splits
        pieces, a = [], 0
        for n in parts:
            pieces.append(aug(np.arange(a, a + n)))
            a += n
        assert torch.equal(torch.cat(pieces), whole)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1)).numpy()
    assert torch.equal(aug(order), whole[order])


def test_the_draws_are_a_function_of_seed_epoch_and_index():
    u = uniforms(42, 3, np.arange(1000), 6)
    assert u.shape == (1000, 6) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(uniforms(42, 3, [5, 900], 6), u[[5, 900]])
    assert np.array_equal(uniforms(42, [3, 3], [5, 900], 6), u[[5, 900]])
    for other in (uniforms(43, 3, np.arange(1000), 6), uniforms(42, 4, np.arange(1000), 6)):
        assert not np.isclose(other, u).any(axis=1).all()
    assert abs(u.mean() - 0.5) < 0.02 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1


def test_the_transforms_keep_their_ranges():
    h = w = 64
    p = augment_params(ALL, 0, 1, np.arange(4000), (h, w)).double()
    top, left, ch, cw, flip, bright = p.unbind(1)
    share, ratio = ch * cw / (h * w), cw / ch
    assert (ch >= 1).all() and (cw >= 1).all() and (top + ch <= h).all() and (left + cw <= w).all()
    assert share.min() > 0.6 * 0.9 and share.max() <= 1.0 and share.mean() < 0.85
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 / 0.9
    assert set(flip.unique().tolist()) == {0.0, 1.0} and abs(flip.mean() - 0.5) < 0.05
    assert bright.min() >= 0.8 and bright.max() <= 1.2 and abs(bright.mean() - 1.0) < 0.01
    off = augment_params(AugmentConfig(), 0, 1, np.arange(10), (h, w))
    assert torch.equal(off, identity_params(10, (h, w)))


@pytest.mark.parametrize("path", PATHS)
def test_identity_parameters_leave_the_images_exactly_as_they_are(path):
    images = _images(6, 40, 40)
    assert torch.equal(augment_batch(images, identity_params(6, (40, 40)), ALL, tensor_ops=PATHS[path]),
                       images.float())


def test_train_batch_augments_on_the_batch_and_val_test_stay_plain():
    cfg, data = _data()
    train, val, test = make_loaders(cfg, data)
    assert isinstance(train.dataset, RawTrainBatches) and train.num_workers == 0, "in-memory: no workers"
    assert data.val.augment is None and data.test.augment is None
    train.sampler.set_epoch(1)
    images, y, params = next(iter(train))
    h, w = images.shape[-2:]
    assert images.dtype == torch.uint8 and params.shape == (8, 6 + 4 * (h + w)), "parameters and their taps"
    x, y2 = data.train_batch((images, y, params), 1)
    assert x.dtype == torch.float32 and x.shape == images.shape and y2 is y
    # The dataset's own indexing gives the same image (the reference path for inspection).
    first = next(iter(train.sampler))
    torch.testing.assert_close(x[0], data.train[first][0], rtol=0, atol=1e-5)
    assert x.contiguous(memory_format=torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    plain = torch.cat([x for x, _ in val])  # val/test: the plain normalized images, as before
    raw = data.val.images.float()
    torch.testing.assert_close(plain, (raw / 255.0 - data.val.mean) / data.val.std)
    # Without augmentation the loader and train_batch are today's fast path.
    cfg0, data0 = _data("data.augment.hflip=false", "data.augment.crop_scale_min=1.0", "data.augment.brightness=0")
    train0, _, _ = make_loaders(cfg0, data0)
    train0.sampler.set_epoch(1)
    batch = next(iter(train0))
    assert len(batch) == 2 and data0.train_batch(batch, 1)[0] is batch[0]


def test_two_processes_see_the_images_one_process_sees():
    cfg, data = _data(n=52)  # 52 images, batch 8: an uneven last batch
    one = _by_index(prepare_data_loader(make_loaders(cfg, data)[0], num_processes=1, process_index=0), data, 2)
    assert len(one) == 52
    two = {}
    for rank in (0, 1):
        shard = prepare_data_loader(make_loaders(cfg, data)[0], num_processes=2, process_index=rank)
        two.update(_by_index(shard, data, 2))
    assert two.keys() == one.keys()
    assert all(torch.equal(two[i], one[i]) for i in one)


def test_a_mid_epoch_resume_sees_the_images_of_an_uninterrupted_epoch():
    cfg, data = _data()
    prepared = prepare_data_loader(make_loaders(cfg, data)[0], num_processes=1, process_index=0)
    full = _by_index(prepared, data, 3)
    resumed_loader = prepare_data_loader(make_loaders(cfg, build_data(cfg))[0], num_processes=1, process_index=0)
    resumed = _by_index(skip_first_batches(resumed_loader, 2), data, 3)
    assert len(resumed) == len(full) - 16
    assert all(torch.equal(resumed[i], full[i]) for i in resumed)
    other_epoch = _by_index(prepared, data, 4)
    assert not any(torch.equal(other_epoch[i], full[i]) for i in full)


def test_dataset_indexing_gives_the_batched_images():
    _, data = _data()
    keys = [(2, 5), (2, 9), 9, (3, 5)]
    batch = data.train.__getitems__(keys)
    for k, (x, _) in zip(keys, batch):
        torch.testing.assert_close(data.train[k][0], x, rtol=0, atol=1e-5)
    assert torch.equal(batch[2][0], (data.train.images[9].float() / 255.0 - data.train.mean) / data.train.std)
    assert not torch.equal(batch[0][0], batch[3][0])


def test_the_data_benchmark_measures_the_augmented_path():
    # Tiny sizes: checks that benchmarks/data.py runs loader + train_batch and prints its lines (never timings).
    r = subprocess.run([sys.executable, "benchmarks/data.py", "--images", "120", "--source-size", "48",
                        "--image-size", "16", "--batch-size", "16", "--num-workers", "1", "--repeats", "1",
                        "--steps", "1", "--threads", "1"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = ("loader, cached:", "loader, cached + augment:", "  the same, tensor ops:", "cached + augment / cached:")
    for line in lines:
        assert re.search(rf"^{re.escape(line)}\s+[\d.]+", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_kill_9_and_resume_with_augmentation_is_bit_identical(out):
    from test_resume import args, assert_same_weights, final_weights, start, wait_for_state
    from train.state import newest_complete, read_progress

    extra = {"checkpoint.every_n_steps": 6, "training.epochs": 2, "data.augment.hflip": "true",
             "data.augment.crop_scale_min": 0.6, "data.augment.brightness": 0.2}
    r = run_main(args(out, "straight", **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start(out, "k", **extra)
    wait_for_state(out / "k", proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    first = read_progress(newest_complete(out / "k"))
    assert not first.epoch_done and first.batches_done > 0, "the state the resume starts from is mid-epoch"
    r = run_main(args(out, "k", **extra) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(out / "straight"), final_weights(out / "k"))
    assert "Resuming run 'k'" in r.stdout
