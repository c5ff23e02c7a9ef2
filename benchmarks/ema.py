"""What ``training.ema`` costs per optimizer step, next to the same steps without it, on one CPU process.

    python benchmarks/ema.py                 # the default config's model, 1 thread, 15 rounds x 40 steps per arm
    python benchmarks/ema.py --rounds 31 --steps 60 --threads 2
    python benchmarks/ema.py --quick         # 3 rounds x 5 steps: checks that it runs

The model, optimizer, loss and batch are the trainer's (``configs/model_config.yml``: build_model,
build_optimizer, build_loss; a batch of ``data.batch_size`` random ``image_size`` images). Each round
runs the two arms one after the other in alternating order, ``--steps`` optimizer steps each
(forward, backward, AdamW step; the EMA arm adds ``WeightEMA.update`` as the loop calls it), so the
arms see the same machine within seconds; the ratio is the median over rounds of the per-round ratio.
Times are process CPU seconds (another process's load on a shared machine does not count). Also
printed: the update alone, and the swap in and out of the averaged weights that validation and the
best checkpoint pay once per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train.config import load_config  # noqa: E402
from train.ema import WeightEMA  # noqa: E402
from train.models import build_model  # noqa: E402
from train.optim import build_loss, build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "model_config.yml"))
    p.add_argument("--decay", type=float, default=0.999)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 rounds x 5 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 5
    return args


class Arm:
    """One model + optimizer, trained on a fixed batch; ``ema`` is None for the plain arm."""

    def __init__(self, cfg, decay: float | None):
        torch.manual_seed(cfg.experiment.seed)
        self.model = build_model(cfg.model).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.loss = build_loss(cfg)
        n, s = cfg.data.batch_size, cfg.data.image_size
        self.x, self.y = torch.randn(n, 3, s, s), torch.randn(n)
        self.ema = WeightEMA(self.model, decay) if decay is not None else None

    def steps(self, n: int) -> float:
        """CPU seconds for ``n`` optimizer steps."""
        t0 = time.process_time()
        for _ in range(n):
            loss = self.loss(self.model(self.x), self.y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model, 1)
        return time.process_time() - t0


def _per_call(fn, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    plain, ema = Arm(cfg, None), Arm(cfg, args.decay)
    plain.steps(3), ema.steps(3)  # warm-up: allocator, first AdamW state
    rows = []
    for r in range(args.rounds):
        order = (plain, ema) if r % 2 == 0 else (ema, plain)
        times = {id(arm): arm.steps(args.steps) / args.steps for arm in order}
        rows.append((times[id(plain)], times[id(ema)]))

    def swap():
        with ema.ema.swapped_in():
            pass

    update = _per_call(lambda: ema.ema.update(ema.model, 1), max(20, args.steps))
    params = sum(p.numel() for p in ema.model.parameters())
    return {"rows": rows, "update": update, "swap": _per_call(swap, max(20, args.steps)), "params": params,
            "cfg": cfg}


def report(args, m: dict) -> str:
    plain = statistics.median(a for a, _ in m["rows"])
    with_ema = statistics.median(b for _, b in m["rows"])
    ratio = statistics.median(b / a for a, b in m["rows"])
    spread = sorted(b / a for a, b in m["rows"])
    cfg = m["cfg"]
    steps_per_epoch = -(-cfg.data.synthetic.num_train // cfg.data.batch_size)
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s); model {cfg.model.name} {list(cfg.model.channels)} "
        f"({m['params']:,} parameters), batch {cfg.data.batch_size} x {cfg.data.image_size}px, AdamW; "
        f"{args.rounds} rounds x {args.steps} steps per arm, CPU time",
        f"{'arm':<22}{'ms/step':>10}",
        f"{'no EMA':<22}{plain * 1e3:>10.3f}",
        f"{'EMA decay ' + str(args.decay):<22}{with_ema * 1e3:>10.3f}",
        f"ratio EMA/no EMA      {ratio:.3f}  (median of per-round ratios; rounds range "
        f"{spread[0]:.3f}-{spread[-1]:.3f})",
        f"EMA update alone      {m['update'] * 1e6:.1f} us/step",
        f"swap in + out         {m['swap'] * 1e6:.1f} us (twice per epoch: validation, best checkpoint); "
        f"{steps_per_epoch} steps/epoch in the default config",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(report(args, measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
