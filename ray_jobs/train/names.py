"""Names shared by the driver, the Ray Train workers and campaigns (no heavy imports): the
run-directory stage folders, the checkpoint files and the per-epoch validation metrics."""

from __future__ import annotations

__all__ = ["BEST_FILE", "STAGE_DIRS", "STATE_FILE", "VAL_METRICS"]

STAGE_DIRS = {"pretrain": "pretrain", "finetune": "finetune", "baseline": "finetune_baseline"}
STATE_FILE = "state.pt"  # checkpoint: model/optimiser/scheduler/scaler state, epoch, history, best
BEST_FILE = "best.pt"  # checkpoint: state_dict with the best validation Dice
VAL_METRICS = ("val_dice", "val_hd95", "best_val_dice")  # per-epoch validation metrics (fine-tuning)
