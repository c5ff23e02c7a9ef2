"""Predict the date of images with a trained checkpoint; evaluate when the dates are known.

    python -m train.predict --checkpoint runs/<name>/checkpoints/best.safetensors --input photos/ --output preds.csv
    python -m train.predict --checkpoint artifacts/model-best:v3 --input manifest.csv --output preds.csv

``--checkpoint``: a ``best.safetensors`` written by the trainer, or a directory holding exactly one
``.safetensors`` file (what ``wandb artifact get`` downloads). The model is rebuilt from the
checkpoint's metadata alone; no config file is needed.

``--input``: a directory (searched recursively for JPEG/PNG/WebP/TIFF files) or a manifest CSV
(same column options as the trainer's ``data.manifest``). If the CSV has a date column, this is an
evaluation: RMSE and MAE in years and an RMSE-by-decade table are printed.

``--output``: a CSV with one row per image: ``path`` (as written in the CSV, or relative to the
input directory), ``predicted_year`` (decimal year), ``calendar_year`` (its floor), and
``true_year`` in an evaluation.

Images are decoded exactly as in training (``train.data.decode_image``), so the pixels, and hence
the predictions, match what the trainer evaluated. Exit codes: 0 done, 2 bad input (one ``error:``
line: missing or foreign checkpoint, checkpoint metadata that does not validate, unreadable images,
bad CSV rows or a CSV that is not UTF-8).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from train.checkpoints import CheckpointMeta, build_from_checkpoint  # noqa: E402
from train.data import IMAGE_EXTENSIONS, bad_row_lines, csv_header, decode_all, read_manifest_rows  # noqa: E402
from train.errors import UserError, run_cli  # noqa: E402
from train.fsutil import atomic_file  # noqa: E402
from train.metrics import year_errors  # noqa: E402


def find_checkpoint(path: str | Path) -> Path:
    """A ``.safetensors`` file, or the single ``.safetensors`` file inside a (W&B artifact) directory."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors")) or sorted(p.rglob("*.safetensors"))
        if len(found) != 1:
            what = ("no .safetensors file" if not found
                    else f"{len(found)} .safetensors files ({', '.join(f.name for f in found[:4])})")
            raise UserError(f"checkpoint directory '{p}' holds {what}; pass the file itself")
        return found[0]
    if not p.is_file():
        raise UserError(f"checkpoint '{p}' not found")
    return p


def list_inputs(input_path: str | Path, path_column: str = "path", date_column: str = "date",
                image_root: str | None = None) -> tuple[list[str], list[Path], np.ndarray | None]:
    """``(names for the output, files, true years or None)`` for an image directory or a CSV."""
    p = Path(input_path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{p}'")
        return [str(f.relative_to(p)) for f in files], files, None
    if not p.is_file():
        raise UserError(f"input '{p}' not found (an image directory or a CSV file)")
    if p.suffix.lower() != ".csv":
        raise UserError(f"input '{p}' is neither a directory nor a .csv file")
    has_dates = date_column in csv_header(p)
    rows = read_manifest_rows(p, Path(image_root) if image_root else None, path_column,
                              date_column if has_dates else None)
    if rows.problems:
        first = bad_row_lines(p, rows.problems, "")[0]
        raise UserError(f"{len(rows.problems)} bad row(s) in '{p}'; first: {first}")
    if not rows.paths:
        raise UserError(f"'{p}' lists no images")
    return rows.texts, rows.paths, np.asarray(rows.years, dtype=np.float64) if has_dates else None


def predict_years(model: torch.nn.Module, meta: CheckpointMeta, images_uint8: torch.Tensor) -> torch.Tensor:
    """Dates in decimal years for a batch of uint8 ``[B, 3, H, W]`` images (already resized), on the
    model's device; normalized with the checkpoint's pixel statistics as in training."""
    mean = torch.tensor(meta.pixel_mean, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(meta.pixel_std, device=images_uint8.device).view(1, 3, 1, 1)
    x = (images_uint8.float() / 255.0 - mean) / std
    with torch.no_grad():
        out = model(x).double()
    return out.cpu() * meta.target_std + meta.target_mean


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def predict(checkpoint: str | Path, input_path: str | Path, batch_size: int = 64, device: str = "auto",
            num_workers: int = 0, path_column: str = "path", date_column: str = "date", image_root: str | None = None,
            progress: bool = True) -> dict:
    """Predict every input image; return ``{"names", "predicted" (years), "true" (or None), "metrics"}``.

    Raises ``UserError`` (one line) for a bad checkpoint, bad CSV rows or images that do not decode.
    """
    ckpt = find_checkpoint(checkpoint)
    names, files, true = list_inputs(input_path, path_column, date_column, image_root)
    model, meta = build_from_checkpoint(ckpt)
    dev = resolve_device(device)
    model.to(dev)
    predicted = np.full(len(files), np.nan)
    errors: dict[int, str] = {}
    for idx, imgs, errs in decode_all(files, meta.image_size, num_workers, "Predicting", progress,
                                      batch_size=batch_size):
        if idx:
            predicted[idx] = predict_years(model, meta, imgs.to(dev, non_blocking=True)).view(-1).numpy()
        errors.update(errs)
    if errors:
        first = min(errors)
        raise UserError(f"{len(errors)} of {len(files)} image(s) cannot be read; first: {errors[first]}")
    metrics = year_errors(true, predicted) if true is not None else {}
    return {"names": names, "predicted": predicted, "true": true, "metrics": metrics}


def write_csv(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_year", "calendar_year"] + (["true_year"] if result["true"] is not None else []))
        for i, (name, y) in enumerate(zip(result["names"], result["predicted"])):
            w.writerow([name, f"{y:.6f}", math.floor(y)]
                       + ([f"{result['true'][i]:.6f}"] if result["true"] is not None else []))


def format_metrics(m: dict) -> str:
    lines = [f"Evaluation on {m['n']} images: RMSE {m['rmse']:.3f} years  |  MAE {m['mae']:.3f} years", "",
             f"{'decade':>8} {'images':>7} {'RMSE':>9} {'MAE':>9}"]
    for d, v in m["by_decade"].items():
        lines.append(f"{str(d) + 's':>8} {v['n']:>7} {v['rmse']:>9.3f} {v['mae']:>9.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.predict",
                                     description="Predict the date (decimal year) of images with a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="best.safetensors, or a W&B artifact directory holding one .safetensors file")
    parser.add_argument("--input", required=True, help="an image directory (recursive) or a CSV manifest")
    parser.add_argument("--output", required=True, help="CSV to write: path, predicted_year, calendar_year")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: CUDA when available")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding worker processes (default: %(default)s)")
    parser.add_argument("--path-column", default="path", help="CSV column with the image path (default: %(default)s)")
    parser.add_argument("--date-column", default="date",
                        help="CSV column with the date; if present, also evaluate (default: %(default)s)")
    parser.add_argument("--image-root", default=None,
                        help="directory relative CSV paths start from (default: the CSV's directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        result = predict(args.checkpoint, args.input, args.batch_size, args.device, args.num_workers,
                         args.path_column, args.date_column, args.image_root, progress=not args.no_progress)
        write_csv(args.output, result)
        print(f"Wrote {len(result['names'])} predictions to {args.output}")
        if result["metrics"]:
            print(format_metrics(result["metrics"]))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
