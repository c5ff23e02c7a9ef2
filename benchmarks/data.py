"""Data-loading speed on a generated collection of JPEGs: decoding vs the cache vs a training step.

    python benchmarks/data.py                       # 2,000 JPEGs of 256x256 -> 64x64, batch 64, 2 workers
    python benchmarks/data.py --images 4000 --image-size 32 --num-workers 1
    python benchmarks/data.py --threads 1           # one torch thread (docs/PERFORMANCE.md: a shared 2-core VM)
    python benchmarks/data.py --device cuda --bf16  # augmentation and training step on a GPU (benchmarks/gpu.sh)

Measured in one run, as images per second:
- decoding: the train loader alone, one epoch, decoding and resizing every JPEG (no cache). The
  files were just written, so they come from the OS page cache, not from disk: the cost measured is
  decoding, the part the cache removes.
- cache build: the one-time decode into the memory-mapped array (what the first run pays).
- cached: the train loader alone, one epoch, reading the memory-mapped cache; also with the
  augmentations on (flip, resized crop, brightness). Every batch goes through ``Data.train_batch``,
  as in training: with augmentation on, that is where the whole batch is augmented and normalized
  (on the CPU here: the training device, so by the compiled kernel of train/augment_cpu.py), so
  "cached + augment" is the full path a step waits for. "cached + augment, tensor ops" is the same
  with the tensor-op path that every other device runs (``augment_batch(tensor_ops=True)``), timed
  on the CPU for comparison.
- training step: the default model (``build_model`` of the default config, or with ``--model``
  overrides) forward + backward + AdamW step on batches of the same size, no loader, on ``--device``
  (bf16 autocast with ``--bf16``).

With ``--device cuda`` every batch is moved to the GPU (non-blocking, from pinned memory, as in
training) before ``Data.train_batch``, so "cached + augment" times the GPU's tensor-op augmentation;
its goal there is >= 2x the training step, so that the GPU never waits for its input (issue 15).

Goals: cached >= 5x decoding, and cached >= 2x the training step, so that the loader is never what a
run waits for (the data issue); cached + augment >= 0.5x cached (issue 15: augmentation on whole
batches instead of per image). Results for this machine are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: the script's own folder)
from train.config import load_config  # noqa: E402
from train.augment import augment_batch  # noqa: E402
from train.data import build_data, make_loaders  # noqa: E402
from train.models import build_model  # noqa: E402
from train.synthetic import make_synthetic  # noqa: E402


def generate(root: Path, n: int, source_size: int, seed: int = 0) -> Path:
    """``n`` synthetic dated images upscaled to ``source_size`` and saved as JPEGs, plus a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,date"]
    for a in range(0, n, 256):
        images, years = make_synthetic(min(256, n - a), 64, seed + a)
        for k, (img, year) in enumerate(zip(images, years)):
            name = f"img{a + k:05d}.jpg"
            im = Image.fromarray(img.transpose(1, 2, 0)).resize((source_size, source_size), Image.BICUBIC)
            im.save(root / name, quality=90)
            lines.append(f"{name},{year:.4f}")
    csv = root / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


class TensorOps:
    """``data`` whose ``train_batch`` runs the tensor-op augmentation path (what a GPU runs) on the CPU."""

    def __init__(self, data):
        self.data, self.train, self.scratch = data, data.train, {}

    def train_batch(self, batch, epoch: int):
        images, y, params = batch
        norm = (self.train.mean, self.train.std)
        return augment_batch(images, params, self.train.augment, norm, self.scratch, tensor_ops=True), y


def loader_epoch(loader, data, epoch: int, device: torch.device) -> float:
    """Images/s of one pass over a train loader and ``Data.train_batch`` (what the training loop calls on
    each batch), no model. Batches go to ``device`` first, as the prepared loader moves them in training
    (from pinned memory when CUDA is there), so on a GPU the augmentation runs there."""
    loader.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        if device.type != "cpu":
            batch = [t.to(device, non_blocking=True) for t in batch]
        n += len(data.train_batch(batch, epoch)[1])
    _sync(device)
    return n / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rates(setups: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """``repeats`` epochs of each ``name -> (cfg, data)``, interleaved (epoch 1 of each, then epoch 2 of
    each, ...): the setups see the same machine within seconds, which a shared VM's drifting speed needs
    for their ratios to mean something. One warm-up epoch each first, not counted."""
    loaders = {name: (make_loaders(cfg, data.data if isinstance(data, TensorOps) else data)[0], data)
               for name, (cfg, data) in setups.items()}
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for epoch in range(repeats + 1):
        for name, (loader, data) in loaders.items():
            rate = loader_epoch(loader, data, epoch + 1, device)
            if epoch:
                rates[name].append(rate)
    return rates


def train_step_rate(cfg, steps: int, device: torch.device, bf16: bool) -> float:
    """Images/s of forward + backward + AdamW steps of the default model, on random batches on ``device``
    (in bf16 autocast with ``bf16``)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randn(cfg.data.batch_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.mse_loss(model(x).float().view(-1), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, first-call overheads
        step()
    best = 0.0
    for _ in range(3):  # best of three, as for the loader
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        best = max(best, steps * cfg.data.batch_size / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="JPEGs to generate (default: %(default)s)")
    ap.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=64,
                    help="data.image_size the loader resizes to (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="data.batch_size (default: %(default)s)")
    ap.add_argument("--num-workers", type=int, default=2, help="data.num_workers (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    ap.add_argument("--workdir", default=None, help="where to write the images and the cache (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed epochs of each loader, interleaved; medians reported (default: %(default)s)")
    ap.add_argument("--device", default="cpu",
                    help="where train_batch and the training step run, e.g. cuda (default: %(default)s)")
    ap.add_argument("--bf16", action="store_true", help="the training step in bf16 autocast (default: fp32)")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the training step's model, e.g. model.name=resnet (repeatable)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        csv = generate(tmp / "images", args.images, args.source_size)
        print(f"generated {args.images} JPEGs of {args.source_size}x{args.source_size} "
              f"in {time.perf_counter() - t0:.1f} s")
        base = [
            "data.kind=manifest", f"data.manifest.path={csv}", f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}", "logging.progress_bar=false",
            f"experiment.output_dir={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}",
        ]
        base += args.model  # only the training step's model reads them
        cfg_plain = load_config(None, base)
        cfg_cache = load_config(None, base + ["data.cache=true"])
        cfg_aug = load_config(None, base + ["data.cache=true", "data.augment.hflip=true",
                                            "data.augment.crop_scale_min=0.7", "data.augment.brightness=0.1"])

        t0 = time.perf_counter()
        plain = build_data(cfg_plain)  # includes the startup check: every image decoded once
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached_data = build_data(cfg_cache)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        aug_data = build_data(cfg_aug)
        reopen_s = time.perf_counter() - t0
        setups = {"decoding": (cfg_plain, plain), "cached": (cfg_cache, cached_data),
                  "cached + augment": (cfg_aug, aug_data)}
        if device.type == "cpu":  # elsewhere "cached + augment" already is the tensor-op path
            setups["tensor ops"] = (cfg_aug, TensorOps(aug_data))
        rates = loader_rates(setups, args.repeats, device)
        step = train_step_rate(cfg_cache, args.steps, device, args.bf16)

    n_train = len(plain.train)
    where = "the CPU: the compiled kernel" if device.type == "cpu" else f"{device}: tensor ops"
    if device.type == "cuda":
        print(f"\ndevice: {torch.cuda.get_device_name(device)}")
    print(f"\nmachine: {cpu_name()}, load average {os.getloadavg()[0]:.1f}, "
          f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"images {args.images} ({n_train} in the train split), {args.source_size}px JPEG -> {args.image_size}px, "
          f"batch {args.batch_size}, num_workers {args.num_workers}")
    print(f"startup without cache (decode check of all images): {startup:6.2f} s")
    print(f"cache build (first run, all images):                {build_s:6.2f} s  "
          f"({args.images / build_s:8.0f} images/s)")
    print(f"startup with an existing cache (later runs):        {reopen_s:6.2f} s")
    decoding, cached, cached_aug = (statistics.median(rates[k]) for k in ("decoding", "cached", "cached + augment"))
    print(f"loader epochs: {args.repeats} of each, interleaved, after one warm-up; medians")
    print(f"loader, decoding JPEGs:       {decoding:9.0f} images/s")
    print(f"loader, cached:               {cached:9.0f} images/s")
    print(f"loader, cached + augment:     {cached_aug:9.0f} images/s  "
          f"(augmented and normalized by Data.train_batch on {where})")
    if "tensor ops" in rates:
        tensor_ops = statistics.median(rates["tensor ops"])
        print(f"  the same, tensor ops:       {tensor_ops:9.0f} images/s  (the path other devices run)")
    model = " ".join(args.model) or "default model"
    print(f"training step ({model}{', bf16' if args.bf16 else ''}): {step:8.0f} images/s  (on {device})")
    print(f"\ncached / decoding:              {cached / decoding:6.1f}x   (goal >= 5x)")
    print(f"cached / training step:         {cached / step:6.1f}x   (goal >= 2x)")
    print(f"cached + augment / training step: {cached_aug / step:4.1f}x   (goal on a GPU >= 2x: never starved)")
    paired = statistics.median(a / c for a, c in zip(rates["cached + augment"], rates["cached"]))
    print(f"cached + augment / cached:      {cached_aug / cached:6.2f}x   (goal >= 0.5x; "
          f"{paired:.2f}x paired: the median of the per-round ratios)")
    if "tensor ops" in rates:
        paired_ops = statistics.median(a / c for a, c in zip(rates["tensor ops"], rates["cached"]))
        print(f"  with tensor ops instead:      {tensor_ops / cached:6.2f}x   ({paired_ops:.2f}x paired)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
