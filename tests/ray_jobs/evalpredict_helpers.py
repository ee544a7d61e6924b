"""Shared builders for test_evaluate.py / test_predict.py: a phantom store and a tiny model.

The model is a real ``FINETUNE["supervised"]`` U-Net (widths 4, 8), exported with
``ray_jobs.train.checkpoint.export_model`` into ``RUN/finetune/model`` like a pipeline run. It is not
trained (training even a tiny net costs tens of seconds on the shared 2-core CI box); instead
its segmentation head's last weights are scaled up and its bias zeroed, so the arg-max follows
the spatially varying features and the predictions contain every class with finite, non-trivial
Dice/HD95/ASD. ``RUN/finetune/history.csv`` is a hand-written fixture for the loss-curve plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LABEL_NAMES = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
SHAPE = (48, 48, 4)
SPACING = (3.0, 3.0, 8.0)
SIZE = [48, 48]
HISTORY = "epoch,loss,val_dice,time\n0,1.20,0.31,2.0\n1,0.85,0.52,3.9\n2,0.61,0.66,5.8\n3,0.50,0.71,7.7\n"


def make_phantom_store(root: Path) -> tuple[Path, str]:
    """(phantom MSD folder, store path) with 6 cases (3 patients), 48 x 48 x 4 voxels."""
    import storage
    from storage.phantom import make_phantom_dataset

    src = make_phantom_dataset(root / "phantom", n_cases=6, seed=1, shape=SHAPE, spacing=SPACING)
    uri = str(root / "store.zarr")
    rep = storage.ingest(src, uri, progress=False)
    assert rep.ok, rep.summary()
    return src, uri


def make_tiny_run(
    root: Path, stage: str = "finetune", seed: int = 0, method: str = "supervised", **method_cfg: object
) -> Path:
    """Export a tiny U-Net of ``method`` (``supervised``, or ``ideal``: two decoder streams) as
    ``root/run-<stage>/<stage>/model``; returns the run dir."""
    from localcl.methods import FINETUNE, METHODS
    from ray_jobs.train.checkpoint import export_model

    registry = FINETUNE if stage == "finetune" else METHODS
    cls = registry[method]
    cfg = cls.Config(widths=(4, 8), decoder_widths=(4,), **method_cfg)
    torch.manual_seed(seed)
    net = cls(cfg, in_channels=1, num_classes=4).eval()
    if stage == "finetune":
        heads = [net.unet.seg_head] + ([net.seg_head2] if hasattr(net, "seg_head2") else [])
        for head in heads:
            last = head.net[-1]
            with torch.no_grad():
                last.weight.mul_(30.0)
                last.bias.zero_()
    spec = {
        "stage": stage,
        "name": method,
        "config": cfg.model_dump(mode="json"),
        "in_channels": 1,
        "num_classes": 4,
        "size": SIZE,
        "spacing_mm": None,
        "normalisation": {"kind": "percentile_minmax", "low_percentile": 1.0, "high_percentile": 99.0},
        "label_names": LABEL_NAMES,
    }
    run = root / (f"run-{stage}" if method == "supervised" else f"run-{method}-{stage}")
    export_model(str(run / stage / "model"), net, spec)
    (run / stage / "history.csv").write_text(HISTORY)
    return run


def nan_equal(a: float | None, b: float | None, tol: float = 1e-9) -> bool:
    a = float("nan") if a is None else a
    b = float("nan") if b is None else b
    return bool((np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b)))
