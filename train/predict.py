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
line: missing or foreign checkpoint, unreadable images, bad CSV rows).
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

from train.checkpoints import load_model, predict_years  # noqa: E402
from train.errors import UserError  # noqa: E402
from train.data import IMAGE_EXTENSIONS, bad_row_lines, decode_all, read_manifest_rows  # noqa: E402


def find_checkpoint(path: str | Path) -> Path:
    """A ``.safetensors`` file, or the single ``.safetensors`` file inside a (W&B artifact) directory."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors")) or sorted(p.rglob("*.safetensors"))
        if len(found) != 1:
            what = "no .safetensors file" if not found else f"{len(found)} .safetensors files ({', '.join(f.name for f in found[:4])})"
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
    with p.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    has_dates = date_column in header
    rows = read_manifest_rows(p, Path(image_root) if image_root else None, path_column, date_column if has_dates else None)
    if rows.problems:
        first = bad_row_lines(p, rows.problems, "")[0]
        raise UserError(f"{len(rows.problems)} bad row(s) in '{p}'; first: {first}")
    if not rows.paths:
        raise UserError(f"'{p}' lists no images")
    with p.open(newline="", encoding="utf-8-sig") as f:
        texts = {i: (r.get(path_column) or "").strip() for i, r in enumerate(csv.DictReader(f), start=2)}
    names = [texts[r] for r in rows.row_numbers]
    return names, rows.paths, np.asarray(rows.years, dtype=np.float64) if has_dates else None


def _years(model: torch.nn.Module, metadata: dict[str, str], images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return predict_years(model, metadata, images.to(device, non_blocking=True))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def predict(checkpoint: str | Path, input_path: str | Path, batch_size: int = 64, device: str = "auto", num_workers: int = 0,
            path_column: str = "path", date_column: str = "date", image_root: str | None = None,
            progress: bool = True) -> dict:
    """Predict every input image; return ``{"names", "predicted" (years), "true" (or None), "metrics"}``.

    Raises ``UserError`` (one line) for a bad checkpoint, bad CSV rows or images that do not decode.
    """
    ckpt = find_checkpoint(checkpoint)
    names, files, true = list_inputs(input_path, path_column, date_column, image_root)
    try:
        model, metadata = load_model(ckpt)
        size = int(metadata["image_size"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint '{ckpt}' has incomplete or inconsistent metadata ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    dev = resolve_device(device)
    model.to(dev)
    predicted = np.full(len(files), np.nan)
    errors: dict[int, str] = {}
    for idx, imgs, errs in decode_all(files, size, num_workers, "Predicting", progress, batch_size=batch_size):
        if idx:
            predicted[idx] = _years(model, metadata, imgs, dev).view(-1).numpy()
        errors.update(errs)
    if errors:
        first = min(errors)
        raise UserError(f"{len(errors)} of {len(files)} image(s) cannot be read; first: {errors[first]}")
    metrics = evaluate(predicted, true) if true is not None else {}
    return {"names": names, "predicted": predicted, "true": true, "metrics": metrics}


def evaluate(predicted: np.ndarray, true: np.ndarray) -> dict:
    """RMSE and MAE in years, overall and per decade of the true date."""
    err = predicted - true
    decades = {}
    for d in sorted(set(int(math.floor(y / 10) * 10) for y in true)):
        sel = np.floor(true / 10) * 10 == d
        decades[d] = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean(err[sel] ** 2))), "mae": float(np.mean(np.abs(err[sel])))}
    return {"n": len(err), "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))), "by_decade": decades}


def write_csv(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted_year", "calendar_year"] + (["true_year"] if result["true"] is not None else []))
        for i, (name, y) in enumerate(zip(result["names"], result["predicted"])):
            w.writerow([name, f"{y:.6f}", math.floor(y)] + ([f"{result['true'][i]:.6f}"] if result["true"] is not None else []))


def format_metrics(m: dict) -> str:
    lines = [f"Evaluation on {m['n']} images: RMSE {m['rmse']:.3f} years  |  MAE {m['mae']:.3f} years", "",
             f"{'decade':>8} {'images':>7} {'RMSE':>9} {'MAE':>9}"]
    for d, v in m["by_decade"].items():
        lines.append(f"{str(d) + 's':>8} {v['n']:>7} {v['rmse']:>9.3f} {v['mae']:>9.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.predict", description="Predict the date (decimal year) of images with a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="best.safetensors, or a W&B artifact directory holding one .safetensors file")
    parser.add_argument("--input", required=True, help="an image directory (recursive) or a CSV manifest")
    parser.add_argument("--output", required=True, help="CSV to write: path, predicted_year, calendar_year")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding worker processes (default: %(default)s)")
    parser.add_argument("--path-column", default="path", help="CSV column with the image path (default: %(default)s)")
    parser.add_argument("--date-column", default="date", help="CSV column with the date; if present, also evaluate (default: %(default)s)")
    parser.add_argument("--image-root", default=None, help="directory relative CSV paths start from (default: the CSV's directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = predict(args.checkpoint, args.input, args.batch_size, args.device, args.num_workers,
                         args.path_column, args.date_column, args.image_root, progress=not args.no_progress)
        write_csv(args.output, result)
    except UserError as e:
        print(f"error: {' '.join(e.lines)}", file=sys.stderr)  # one line, whatever went wrong
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {len(result['names'])} predictions to {args.output}")
    if result["metrics"]:
        print(format_metrics(result["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
