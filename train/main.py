"""Train the image-dating CNN.

    accelerate launch train/main.py --config configs/model_config.yml
    accelerate launch train/main.py --config configs/model_config.yml training.epochs=3 logging.wandb.enabled=true
    python train/main.py --config configs/model_config.yml --print-config

Everything after the options is a dotted ``key=value`` override, validated like the file.
Exit codes: 0 done, 2 bad input (config, data, paths: one ``error:`` line each, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python train/main.py` / `accelerate launch train/main.py` run this file as a script:
    # make the `train` package importable without an install.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import UserError, load_config, to_yaml  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train/main.py",
        description="Train a CNN that predicts the date (year) of an image.",
        epilog="Example: accelerate launch train/main.py --config configs/model_config.yml training.epochs=3",
    )
    parser.add_argument("--config", default="configs/model_config.yml", help="YAML config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.optimizer.lr=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from train.loop import train  # heavy imports (torch, accelerate) only when training

        train(cfg)
    except UserError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
