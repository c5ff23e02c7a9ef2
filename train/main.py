"""Train the image-dating CNN.

    accelerate launch train/main.py --config configs/model_config.yml
    accelerate launch train/main.py --config configs/model_config.yml training.epochs=3 logging.wandb.enabled=true
    python train/main.py --config configs/model_config.yml --print-config

Everything after the options is a dotted ``key=value`` override, validated like the file.
Exit codes: 0 done; 1 the run failed (e.g. a non-finite loss, or a crash with a traceback);
2 bad input (config, data, paths: one ``error:`` line each, no traceback, nothing existing touched);
3 stopped early on purpose with a full state saved (a signal, or training.max_time): resume with
``--resume auto``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # `python train/main.py` / `accelerate launch train/main.py` run this file as a script:
    # make the `train` package importable without an install.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import load_config, to_yaml  # noqa: E402
from train.errors import run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train/main.py",
        description="Train a CNN that predicts the date (year) of an image.",
        epilog="Example: accelerate launch train/main.py --config configs/model_config.yml training.epochs=3",
    )
    parser.add_argument("--config", default="configs/model_config.yml", help="YAML config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume", metavar="auto|PATH",
        help="auto: continue <output_dir>/<experiment.name> from its newest complete state, or start it fresh if "
        "it does not exist yet; PATH: a run directory or one of its checkpoints/state/step_* directories. "
        "A finished run is left as it is",
    )
    parser.add_argument(
        "--restart", action="store_true",
        help="the run directory exists: move it aside to <name>.set-aside-<time> (never deleted) and start again",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. training.optimizer.lr=1e-3")
    # Options and overrides may come in any order (`--resume auto training.epochs=3` too).
    args, unknown = parser.parse_known_intermixed_args(argv)
    # W&B sweep agents may pass --key=value (its ${args}); accept those as overrides too.
    for item in unknown:
        if not (item.startswith("--") and "=" in item):
            parser.error(f"unrecognized argument: {item}")
        args.overrides.append(item[2:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from train.loop import train  # heavy imports (torch, accelerate) only when training

        train(cfg, resume=args.resume, restart=args.restart)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
