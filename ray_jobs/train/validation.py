"""Validation during fine-tuning: mean foreground Dice (and HD95) of the validation cases,
predicted on the native grid and summed over the Ray Train workers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import storage
from localcl.metrics import evaluate_case
from ray_jobs.evaluation.inference import predict_case
from ray_jobs.train.stage import LoopSpec

__all__ = ["mean_fg_dice", "mean_fg_hd95", "validation_dice"]


def validation_dice(
    method: nn.Module, spec: LoopSpec, rank: int, world: int, device: torch.device
) -> dict[str, float] | None:
    """Mean foreground Dice over the validation cases (native grid, 3D per case).

    Each rank predicts the cases ``val[rank::W]``; the per-case means are summed across ranks
    with an all-reduce, so every rank returns the same value:
    ``dice = (1/N) sum_cases (1/|C|) sum_{c in C} 2|P_c & R_c| / (|P_c| + |R_c|)`` with ``C`` the
    foreground classes present in the reference or the prediction (absent in both: skipped).
    """
    cases = list(spec.val)
    if not cases:
        return None
    cfg = spec.config
    st = storage.open_store(spec.store, storage_options=cfg.data.storage_options or None)
    want_hd = cfg.evaluate.val_hd95
    tot = torch.zeros(4, dtype=torch.float64)  # dice sum, n, hd95 sum, n(hd95 finite)
    was_training = method.training
    method.eval()
    with torch.no_grad():
        for case in cases[rank :: max(world, 1)]:
            ref = st.label(case)
            if ref is None:  # validation cases come from the labelled split
                raise ValueError(f"validation case {case!r} is unlabelled")
            pred = predict_case(method, spec.model, st, case)
            tot[0] += mean_fg_dice(pred, ref, spec.num_classes)
            tot[1] += 1
            if want_hd:
                hd = mean_fg_hd95(pred, ref, st.meta(case)["spacing"], spec.num_classes)
                if hd is not None:
                    tot[2] += hd
                    tot[3] += 1
    method.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = tot.to(device) if torch.distributed.get_backend() == "nccl" else tot
        torch.distributed.all_reduce(t)
        tot = t.cpu()
    if tot[1] == 0:
        return None
    out = {"val_dice": float(tot[0] / tot[1])}
    if want_hd and tot[3] > 0:
        out["val_hd95"] = float(tot[2] / tot[3])
    return out


def mean_fg_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Any, num_classes: int) -> float | None:
    """Mean over foreground classes of HD95 (mm) from ``localcl.metrics.evaluate_case``;
    classes where it is undefined (empty prediction or reference) are skipped."""
    res = evaluate_case(pred.astype(np.int64), ref.astype(np.int64), tuple(spacing), list(range(1, num_classes)))
    vals = [float(v["hd95"]) for v in res.values() if np.isfinite(v.get("hd95", np.nan))]
    return float(np.mean(vals)) if vals else None


def mean_fg_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    vals = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        if denom:
            vals.append(2.0 * np.logical_and(p, r).sum() / denom)
    return float(np.mean(vals)) if vals else 1.0
