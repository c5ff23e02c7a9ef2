"""Predict the date of images with a trained checkpoint; evaluate when the dates are known.

    python -m train.predict --checkpoint runs/<name>/checkpoints/best.safetensors --input photos/ --output preds.csv
    python -m train.predict --checkpoint artifacts/model-best:v3 --input manifest.csv --output preds.csv
    python -m train.predict --checkpoint runs/<name>/checkpoints/best.safetensors --split test --output test.csv

``--checkpoint``: a ``best.safetensors`` written by the trainer, or a directory holding exactly one
``.safetensors`` file (what ``wandb artifact get`` downloads). The model is rebuilt from the
checkpoint's metadata alone; no config file is needed (except for ``--split``).

``--input``: a directory (searched recursively for JPEG/PNG/WebP/TIFF files) or a manifest CSV
(same column options as the trainer's ``data.manifest``). If the CSV has a date column, this is an
evaluation: RMSE and MAE in years and an RMSE-by-decade table are printed.

``--split train|val|test``: evaluate on exactly that split of the run the checkpoint belongs to: the
run's ``config.yaml`` (``<run_dir>/config.yaml`` next to ``<run_dir>/checkpoints/``) gives the
manifest, its columns and the split (split column, or the seeded random split), rebuilt with the
trainer's own code (``train.data.manifest_split_indices``); only that split's images are decoded
(except in the one case below). ``--input`` then defaults to the run's manifest and, if given, must
be it. A run with ``data.on_bad_row=skip`` left undecodable rows out before its random split, so
they must be known: when ``results.json`` shows that every skipped row is still a bad row of the CSV
there were none; else the run's image cache records them (``data.cache``); else every image is
decoded once to find them. For ``--split test`` the images are compared with the run's
``predictions_test.csv``; a difference (the manifest or its images changed) is a warning line.

``--on-bad-image error|skip`` (default ``error``, like the trainer's ``data.on_bad_row``): images that
cannot be decoded, and CSV rows whose file is missing, stop the command (``error``) or are left out of
the output and the evaluation, counted and the first named on stderr (``skip``).

``--output``: a CSV with one row per image: ``path`` (as written in the CSV, or relative to the
input directory), ``predicted_year`` (decimal year), ``calendar_year`` (its floor), the calibrated
date interval of each level the checkpoint carries (``low_80, high_80, low_90, high_90``: the
true date lies inside for about that share of images like the val split), and ``true_year`` in an
evaluation (which also prints MAE, within-5-years and decade accuracy and each level's coverage).
A checkpoint written before intervals existed predicts as before, without interval columns.

Images are decoded exactly as in training (``train.data.decode_image``), so the pixels, and hence
the predictions, match what the trainer evaluated. Exit codes: 0 done, 2 bad input (one ``error:``
line: missing or foreign checkpoint, checkpoint metadata that does not validate, unreadable images,
bad CSV rows or a CSV that is not UTF-8, ``--split`` without the run's config or on synthetic data).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from train.checkpoints import CheckpointMeta, build_from_checkpoint  # noqa: E402
from train.config import Config, load_config  # noqa: E402
from train.data import (  # noqa: E402
    IMAGE_EXTENSIONS,
    ManifestRows,
    bad_row_lines,
    cached_decode_errors,
    csv_header,
    decode_all,
    manifest_split_indices,
    read_config_manifest,
    read_manifest_rows,
    scan_images,
)
from train.errors import UserError, run_cli  # noqa: E402
from train.fsutil import atomic_file  # noqa: E402
from train.calibration import labelled_intervals, quantile_levels  # noqa: E402
from train.heads import head_from_meta  # noqa: E402
from train.metrics import year_errors  # noqa: E402

SPLITS = ("all", "train", "val", "test")


@dataclass
class Inputs:
    """What to predict: one entry per image file, plus what was left out before decoding."""

    names: list[str]  # for the output: as written in the CSV, or relative to the input directory
    files: list[Path]
    true: np.ndarray | None  # dates in years, in an evaluation
    order: list[int]  # each file's CSV row number (or position): which left-out image comes first
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (order, name, reason), missing files
    trainer_skips: bool = False  # --split of a run that left undecodable rows out: leave them out here too
    expected: list[str] | None = None  # --split test: the images of the run's predictions_test.csv


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
                image_root: str | None = None, on_bad_image: str = "error") -> Inputs:
    """The images of a directory or a CSV (with their dates, when the CSV has the date column).

    Bad CSV rows are one ``UserError``; with ``on_bad_image="skip"``, rows whose file is missing are
    left out instead (``Inputs.skipped``)."""
    p = Path(input_path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{p}'")
        return Inputs([str(f.relative_to(p)) for f in files], files, None, list(range(len(files))))
    if not p.is_file():
        raise UserError(f"input '{p}' not found (an image directory or a CSV file)")
    if p.suffix.lower() != ".csv":
        raise UserError(f"input '{p}' is neither a directory nor a .csv file")
    has_dates = date_column in csv_header(p)
    rows = read_manifest_rows(p, Path(image_root) if image_root else None, path_column,
                              date_column if has_dates else None)
    skip = on_bad_image == "skip"
    fatal = {r: why for r, why in rows.problems.items() if not (skip and r in rows.missing)}
    if fatal:
        first = bad_row_lines(p, fatal, "")[0]
        raise UserError(f"{len(fatal)} bad row(s) in '{p}'; first: {first}")
    skipped = [(r, rows.missing[r], f"{rows.problems[r]} (CSV row {r})") for r in sorted(rows.missing)]
    if not rows.paths:
        raise UserError(f"none of the {len(skipped)} image(s) listed in '{p}' exist; first: {skipped[0][2]}"
                        if skipped else f"'{p}' lists no images")
    true = np.asarray(rows.years, dtype=np.float64) if has_dates else None
    return Inputs(rows.texts, rows.paths, true, rows.row_numbers, skipped)


# --------------------------------------------------------------------------------------------------
# --split: a split of the checkpoint's own run, rebuilt as the trainer built it
# --------------------------------------------------------------------------------------------------


def run_config(ckpt: Path) -> tuple[Path, Config]:
    """``(run directory, its resolved config)`` for a checkpoint in ``<run_dir>/checkpoints/``; a manifest run."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"--split needs the run's config.yaml next to the checkpoint ('{path}' not found); pass the "
                        "checkpoint inside its run directory (runs/<name>/checkpoints/best.safetensors), not a copy "
                        "or a W&B artifact download")
    cfg = load_config(path)
    if cfg.data.kind != "manifest":
        raise UserError(f"--split: run '{run_dir}' trained on {cfg.data.kind} data (data.kind: {cfg.data.kind}), "
                        "which has no image files to split; --split needs a run trained on a manifest")
    return run_dir, cfg


def _check_split_options(cfg: Config, split: str, input_path, path_column, date_column, image_root) -> None:
    """With ``--split``, the manifest and its reading options are the run's: any given must agree."""
    m = cfg.data.manifest
    if input_path is not None and m.path and Path(input_path).resolve() != Path(m.path).resolve():
        raise UserError(f"--split {split}: --input '{input_path}' is not the run's manifest '{m.path}'; leave --input "
                        f"out (with --split it is the run's manifest), or leave --split out to predict '{input_path}'")
    for flag, given, own in (("--path-column", path_column, m.path_column),
                             ("--date-column", date_column, m.date_column)):
        if given is not None and given != own:
            raise UserError(f"--split {split}: {flag} '{given}' is not the run's ('{own}'); leave it out: --split "
                            "reads the manifest as the run did")
    own_root = Path(m.image_root) if m.image_root else Path(m.path or ".").parent
    if image_root is not None and Path(image_root).resolve() != own_root.resolve():
        raise UserError(f"--split {split}: --image-root '{image_root}' is not the run's ('{own_root}'); leave it out: "
                        "--split reads the manifest as the run did")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _training_decode_errors(cfg: Config, run_dir: Path, rows: ManifestRows, num_workers: int,
                            progress: bool) -> dict[int, str] | None:
    """The rows the run could not decode (index -> reason): it left them out before splitting.

    ``None``: unknown, and it need not be known: a split column places each row on its own, so a row
    of the split that does not decode is left out here as the trainer left it out."""
    if cfg.data.on_bad_row == "error":
        return {}  # the run trained, so every image decoded
    if _read_json(run_dir / "results.json").get("skipped_rows") == len(rows.problems):
        return {}  # each row the run skipped is still a bad row of the CSV: none failed to decode
    if cfg.data.manifest.split_column:
        return None
    cached = cached_decode_errors(cfg, rows)
    if cached is not None:
        return cached
    print(f"note: --split: decoding all {len(rows.paths)} images of {rows.csv_path} once, to find those the run "
          "could not decode and left out before its random split (data.on_bad_row=skip)", file=sys.stderr)
    return scan_images(rows.paths, cfg.data.image_size, num_workers, progress)[1]


def _logged_test_images(run_dir: Path) -> list[str] | None:
    try:
        with (run_dir / "predictions_test.csv").open(newline="") as f:
            return [row["image"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return None


def split_inputs(ckpt: Path, split: str, input_path=None, path_column=None, date_column=None, image_root=None,
                 num_workers: int = 0, progress: bool = True) -> Inputs:
    """The images of the run's ``split`` (train, val or test), in the trainer's order, with their dates."""
    run_dir, cfg = run_config(ckpt)
    _check_split_options(cfg, split, input_path, path_column, date_column, image_root)
    try:
        rows = read_config_manifest(cfg)
    except UserError as e:
        raise UserError([f"--split {split}: the run's {line}" for line in e.lines]) from None
    if rows.problems:
        first = bad_row_lines(rows.csv_path, rows.problems, "")[0]
        if cfg.data.on_bad_row == "error":
            raise UserError(f"--split {split}: the run's manifest has {len(rows.problems)} bad row(s) now but had none "
                            f"in training (data.on_bad_row=error), so it changed and the split is lost; first: {first}")
        print(f"note: {len(rows.problems)} bad row(s) of {rows.csv_path} are in no split, as in training "
              f"(data.on_bad_row=skip); first: {first}", file=sys.stderr)
    errors = _training_decode_errors(cfg, run_dir, rows, num_workers, progress)
    ix = manifest_split_indices(cfg, rows, errors or {})[SPLITS.index(split) - 1]
    years = np.asarray(rows.years, dtype=np.float64)[ix]
    return Inputs([rows.texts[i] for i in ix], [rows.paths[i] for i in ix], years, [rows.row_numbers[i] for i in ix],
                  trainer_skips=errors is None, expected=_logged_test_images(run_dir) if split == "test" else None)


# --------------------------------------------------------------------------------------------------
# Predicting
# --------------------------------------------------------------------------------------------------


def predict_years(model: torch.nn.Module, meta: CheckpointMeta,
                  images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dates in decimal years for a batch of uint8 ``[B, 3, H, W]`` images (already resized), on the
    model's device; normalized with the checkpoint's pixel statistics as in training. Also the
    predicted quantiles ``[B, 2 x levels]`` the calibrated intervals need (distribution head with a
    calibration; else None)."""
    mean = torch.tensor(meta.pixel_mean, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(meta.pixel_std, device=images_uint8.device).view(1, 3, 1, 1)
    x = (images_uint8.float() / 255.0 - mean) / std
    head = head_from_meta(meta)
    with torch.no_grad():
        out = model(x).float()
        years = head.point(out).double().cpu() * meta.target_std + meta.target_mean
        taus = quantile_levels(meta.calibration.levels) if meta.calibration is not None else None
        q = head.quantiles(out, taus) if taus else None
    return years, (q.double().cpu() if q is not None else None)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _predict_files(model: torch.nn.Module, meta: CheckpointMeta, files: list[Path], dev: torch.device,
                   batch_size: int, num_workers: int, progress: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Predicted years of every file (NaN where it does not decode), the predicted quantiles (None
    unless ``predict_years`` gives them) and ``{index: decode error}``."""
    predicted = np.full(len(files), np.nan)
    quantiles = None
    errors: dict[int, str] = {}
    for idx, imgs, errs in decode_all(files, meta.image_size, num_workers, "Predicting", progress,
                                      batch_size=batch_size):
        if idx:
            years, q = predict_years(model, meta, imgs.to(dev, non_blocking=True))
            predicted[idx] = years.view(-1).numpy()
            if q is not None:
                quantiles = np.full((len(files), q.shape[1]), np.nan) if quantiles is None else quantiles
                quantiles[idx] = q.numpy()
        errors.update(errs)
    return predicted, quantiles, errors


def _left_out(inputs: Inputs, errors: dict[int, str], on_bad_image: str) -> list[tuple[int, str, str]]:
    """Every image left out, ``(order, name, reason)`` sorted; raises where none may be (``error``) or all are."""
    n = len(inputs.files)
    if errors and on_bad_image == "error" and not inputs.trainer_skips:
        raise UserError(f"{len(errors)} of {n} image(s) cannot be read; first: {errors[min(errors)]} "
                        "(--on-bad-image skip leaves them out)")
    if len(errors) == n:
        raise UserError(f"none of the {n} image(s) can be read; first: {errors[min(errors)]}")

    def reason(i: int) -> str:
        prefix = f"image '{inputs.files[i]}' "  # the name goes in front of the reason instead
        return errors[i][len(prefix):] if errors[i].startswith(prefix) else errors[i]

    return sorted(inputs.skipped + [(inputs.order[i], inputs.names[i], reason(i)) for i in errors])


def predict(checkpoint: str | Path, input_path: str | Path | None = None, batch_size: int = 64, device: str = "auto",
            num_workers: int = 0, path_column: str | None = None, date_column: str | None = None,
            image_root: str | None = None, progress: bool = True, on_bad_image: str = "error",
            split: str = "all") -> dict:
    """Predict every input image (or the images of the run's ``split``); return ``{"names", "files",
    "predicted" (years), "true" (or None), "metrics", "skipped" ([(name, reason)]), "trainer_skips"}``.

    Raises ``UserError`` (one line) for a bad checkpoint, bad CSV rows, or images that do not decode
    (``on_bad_image="error"``; ``"skip"`` leaves them out, and out of the metrics).
    """
    ckpt = find_checkpoint(checkpoint)
    if split == "all":
        if input_path is None:
            raise UserError("no --input (an image directory or a CSV); only --split train|val|test does without")
        inputs = list_inputs(input_path, path_column or "path", date_column or "date", image_root, on_bad_image)
    else:
        inputs = split_inputs(ckpt, split, input_path, path_column, date_column, image_root, num_workers, progress)
    model, meta = build_from_checkpoint(ckpt)
    dev = resolve_device(device)
    model.to(dev)
    predicted, quantiles, errors = _predict_files(model, meta, inputs.files, dev, batch_size, num_workers, progress)
    left_out = _left_out(inputs, errors, on_bad_image)
    keep = [i for i in range(len(inputs.files)) if i not in errors]
    files = [inputs.files[i] for i in keep]
    if inputs.expected is not None and [str(f) for f in files] != inputs.expected:
        print(f"warning: the rebuilt test split ({len(files)} images) is not the run's ({len(inputs.expected)} images "
              "in predictions_test.csv): the manifest or its images changed since training", file=sys.stderr)
    true = inputs.true[keep] if inputs.true is not None else None
    bounds = _intervals(meta, predicted[keep], quantiles[keep] if quantiles is not None else None)
    metrics = year_errors(true, predicted[keep]) if true is not None else {}
    if metrics and bounds:
        metrics["coverage"] = {lv: (float(np.mean((true >= lo) & (true <= hi))), float(np.mean(hi - lo)))
                               for lv, (lo, hi) in bounds.items()}
    return {"names": [inputs.names[i] for i in keep], "files": files, "predicted": predicted[keep], "true": true,
            "metrics": metrics, "skipped": [(name, why) for _, name, why in left_out],
            "trainer_skips": inputs.trainer_skips, "intervals": bounds,
            "note": None if meta.calibration is not None else NO_CALIBRATION}


NO_CALIBRATION = ("note: this checkpoint has no calibration (written before date intervals existed, or with "
                  "calibration.levels: []), so the output has no interval columns; train again to get them")


def _intervals(meta: CheckpointMeta, predicted: np.ndarray, quantiles: np.ndarray | None) -> dict[str, tuple]:
    """``{"80": (low, high), ...}`` from the checkpoint's calibration; empty without one."""
    if meta.calibration is None:
        return {}
    cal = meta.calibration.model_dump()
    return labelled_intervals(cal, predicted, quantiles)


def write_csv(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        bounds = result.get("intervals") or {}
        w.writerow(["path", "predicted_year", "calendar_year"]
                   + [f"{side}_{lv}" for lv in bounds for side in ("low", "high")]
                   + (["true_year"] if result["true"] is not None else []))
        for i, (name, y) in enumerate(zip(result["names"], result["predicted"])):
            w.writerow([name, f"{y:.6f}", math.floor(y)]
                       + [f"{b[side][i]:.2f}" for b in bounds.values() for side in (0, 1)]
                       + ([f"{result['true'][i]:.6f}"] if result["true"] is not None else []))


def format_metrics(m: dict) -> str:
    lines = [f"Evaluation on {m['n']} images: RMSE {m['rmse']:.3f} years  |  MAE {m['mae']:.3f} years  |  "
             f"within 5 years {100 * m['acc_5y']:.1f}%  |  decade {100 * m['acc_decade']:.1f}%"]
    for lv, (cov, width) in (m.get("coverage") or {}).items():
        lines.append(f"  {lv}% date intervals: {100 * cov:.1f}% contain the true date, mean width {width:.1f} years")
    lines += ["", f"{'decade':>8} {'images':>7} {'RMSE':>9} {'MAE':>9}"]
    for d, v in m["by_decade"].items():
        lines.append(f"{str(d) + 's':>8} {v['n']:>7} {v['rmse']:>9.3f} {v['mae']:>9.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.predict",
                                     description="Predict the date (decimal year) of images with a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="best.safetensors, or a W&B artifact directory holding one .safetensors file")
    parser.add_argument("--input", default=None,
                        help="an image directory (recursive) or a CSV manifest; with --split: the run's manifest")
    parser.add_argument("--output", required=True, help="CSV to write: path, predicted_year, calendar_year")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: CUDA when available")
    parser.add_argument("--num-workers", type=int, default=0, help="decoding worker processes (default: %(default)s)")
    parser.add_argument("--path-column", default=None,
                        help="CSV column with the image path (default: path; with --split: the run's)")
    parser.add_argument("--date-column", default=None,
                        help="CSV column with the date; if present, also evaluate (default: date; with --split: "
                             "the run's)")
    parser.add_argument("--image-root", default=None,
                        help="directory relative CSV paths start from (default: the CSV's directory; with --split: "
                             "the run's)")
    parser.add_argument("--on-bad-image", choices=["error", "skip"], default="error",
                        help="images that cannot be read (undecodable, or missing from a CSV): stop with an error, or "
                             "leave them out and name the first on stderr (default: %(default)s)")
    parser.add_argument("--split", choices=list(SPLITS), default="all",
                        help="all: every input image (default); train/val/test: exactly that split of the "
                             "checkpoint's own manifest run (needs <run_dir>/config.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")
    if args.input is None and args.split == "all":
        parser.error("--input is required (an image directory or a CSV), except with --split train|val|test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        result = predict(args.checkpoint, args.input, args.batch_size, args.device, args.num_workers,
                         args.path_column, args.date_column, args.image_root, progress=not args.no_progress,
                         on_bad_image=args.on_bad_image, split=args.split)
        write_csv(args.output, result)
        if result["skipped"]:
            name, why = result["skipped"][0]
            also = "; the run left them out too (data.on_bad_row=skip)" if result["trainer_skips"] else ""
            print(f"note: skipped {len(result['skipped'])} unreadable image(s); first: {name}: {why}{also}",
                  file=sys.stderr)
        which = f" (the run's {args.split} split)" if args.split != "all" else ""
        print(f"Wrote {len(result['names'])} predictions{which} to {args.output}")
        if result["note"]:
            print(result["note"], file=sys.stderr)
        if result["metrics"]:
            print(format_metrics(result["metrics"]))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
