"""What the run prints for a person: the per-epoch block of the original design and the test summary."""

from __future__ import annotations

from pathlib import Path


def _value(v: float | None) -> str:
    return "none finite yet" if v is None else f"{v:.6f}"


def epoch_block(epoch: int, epochs: int, m: dict, improved: bool, patience: int | None = None,
                bad_epochs: int = 0, best_value: float | None = None, best_epoch: int = 0) -> str:
    """The original design's per-epoch console block, plus the early-stopping count when it moves
    (``patience`` None: early stopping is off)."""
    star = "  (best so far, saved)" if improved else ""
    block = (
        f"\nEpoch [{epoch}/{epochs}] Results:{star}\n"
        f"  Train Loss: {m['train/loss']:.6f}  |  Train RMSE: {m['train/rmse']:.6f}\n"
        f"  Val Loss:   {m['val/loss']:.6f}  |  Val RMSE:   {m['val/rmse']:.6f}\n"
        f"  Learning Rate: {m['lr']:.2e}"
    )
    if patience is not None and bad_epochs:
        where = f" at epoch {best_epoch}" if best_epoch else ""
        block += (f"\n  Early stopping: no improvement for {bad_epochs}/{patience} epochs "
                  f"(best {_value(best_value)}{where})")
    return block


def early_stop_reason(monitor: str, min_delta: float, patience: int, best_value: float | None, best_epoch: int) -> str:
    where = f" at epoch {best_epoch}" if best_epoch else ""
    return (f"{monitor} did not improve by more than {min_delta} for {patience} epochs "
            f"(best {_value(best_value)}{where})")


def print_results(r: dict) -> None:
    print(
        f"\nTest results (best weights from epoch {r['best_epoch']}, {r['test_samples']} images):\n"
        f"  Test Loss: {r['test/loss']:.6f}  |  Test RMSE: {r['test/rmse']:.3f} years  |  "
        f"Test MAE: {r['test/mae']:.3f} years\n"
        f"  Baseline RMSE, predict the train mean:       {r['baseline/mean_rmse']:.3f} years "
        f"(CNN/baseline = {r['test/rmse_over_mean_baseline']:.2f})\n"
        f"  Baseline RMSE, linear on colour mean/std:    {r['baseline/colour_linear_rmse']:.3f} years "
        f"(CNN/baseline = {r['test/rmse_over_colour_linear_baseline']:.2f})\n"
        f"  Results: {Path(r['run_dir']) / 'results.json'}"
    )
