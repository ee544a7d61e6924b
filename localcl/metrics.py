"""Evaluation metrics per case and per class on 3D volumes, in millimetres: Dice, HD95, ASD.

Definitions (A = predicted mask of a class, B = reference mask, both on the same voxel grid):

- Dice: ``2|A ∩ B| / (|A| + |B|)``.
- Surfaces ∂A, ∂B: the mask voxels that have a 6-connected (4 in 2D) neighbour outside the
  mask (``mask XOR binary_erosion(mask)``), as in MONAI. Directed surface distances
  ``d(a, ∂B) = min_{b ∈ ∂B} ‖(a − b) ⊙ spacing‖₂`` for a ∈ ∂A (voxel indices scaled by the
  voxel spacing, so the result is in mm), computed by MONAI with an exact Euclidean distance
  transform using ``sampling=spacing``.
- HD95 (MONAI ``compute_hausdorff_distance(percentile=95)``): ``max(P95{d(a, ∂B)}_{a∈∂A},
  P95{d(b, ∂A)}_{b∈∂B})`` with numpy's linear-interpolation percentile.
- ASD (MONAI ``compute_average_surface_distance(symmetric=True)``), the symmetric average:
  ``(Σ_{a∈∂A} d(a, ∂B) + Σ_{b∈∂B} d(b, ∂A)) / (|∂A| + |∂B|)``.

Empty masks (decided here, tested):

- both empty (class absent from prediction and reference): dice = 1, hd95 = asd = 0;
- exactly one empty: dice = 0, hd95 = asd = NaN (a distance to nothing is undefined; NaN
  rather than inf so means can skip it with ``nanmean`` and the case stays visible as missing).

The implementation is MONAI's (``monai.metrics``), called only for non-empty pairs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "dice_score",
    "surface_metrics",
    "evaluate_case",
    "mean_over_classes",
    "volume_from_slices",
]

METRICS = ("dice", "hd95", "asd")


def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"pred and ref must be 2D or 3D label maps, got ndim={pred.ndim}")


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as e:
        raise ValueError(f"spacing must be a sequence of {ndim} positive numbers, got {spacing!r}") from e
    if len(sp) != ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm per voxel), got {spacing!r}")
    return sp


def dice_score(pred_mask: Any, ref_mask: Any) -> float:
    """Dice of two boolean masks of equal shape; 1.0 when both are empty."""
    a = _np(pred_mask, "pred_mask").astype(bool)
    b = _np(ref_mask, "ref_mask").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"pred_mask shape {a.shape} differs from ref_mask shape {b.shape}")
    den = int(a.sum()) + int(b.sum())
    if den == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / den


def surface_metrics(pred_mask: Any, ref_mask: Any, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASD) in the units of ``spacing`` (mm) for two boolean masks (2D or 3D).

    Both empty -> (0, 0); exactly one empty -> (NaN, NaN). See the module docstring.
    """
    a = _np(pred_mask, "pred_mask").astype(bool)
    b = _np(ref_mask, "ref_mask").astype(bool)
    _check_pair(a, b)
    sp = _check_spacing(spacing, a.ndim)
    ea, eb = bool(a.any()), bool(b.any())
    if not ea and not eb:
        return 0.0, 0.0
    if ea != eb:
        return float("nan"), float("nan")
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    ya = torch.from_numpy(a[None, None].astype(np.float32))
    yb = torch.from_numpy(b[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(ya, yb, include_background=True, percentile=95, spacing=list(sp))
        asd = compute_average_surface_distance(ya, yb, include_background=True, symmetric=True, spacing=list(sp))
    return float(hd.item()), float(asd.item())


def evaluate_case(
    pred: Any,
    ref: Any,
    spacing: Sequence[float],
    labels: Sequence[int] | Mapping[int, str] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-class Dice, HD95 (mm) and ASD (mm) of one case.

    Args:
        pred: (X, Y, Z) (or (X, Y)) integer label map, e.g. from :func:`volume_from_slices`.
        ref: reference label map of the same shape.
        spacing: voxel size in mm per axis, in the arrays' axis order (e.g. ``meta["spacing"]``).
        labels: class indices to evaluate (a dict {index: name} is accepted, its keys are
            used); default: every non-zero label present in ``pred`` or ``ref``.

    Returns:
        ``{label: {"dice": float, "hd95": float, "asd": float}}`` keyed by the int label.
    """
    p = _np(pred, "pred")
    r = _np(ref, "ref")
    _check_pair(p, r)
    sp = _check_spacing(spacing, p.ndim)
    if labels is None:
        labs = sorted(int(v) for v in np.union1d(np.unique(p), np.unique(r)) if v != 0)
    else:
        labs = [int(k) for k in (labels.keys() if isinstance(labels, Mapping) else labels)]
    out: dict[int, dict[str, float]] = {}
    for lab in labs:
        pm, rm = p == lab, r == lab
        hd95, asd = surface_metrics(pm, rm, sp)
        out[lab] = {"dice": dice_score(pm, rm), "hd95": hd95, "asd": asd}
    return out


def mean_over_classes(result: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the classes of one case, skipping NaN (NaN if all are NaN)."""
    out: dict[str, float] = {}
    for m in METRICS:
        vals = np.array([v[m] for v in result.values()], dtype=np.float64)
        finite = vals[~np.isnan(vals)]
        out[m] = float(finite.mean()) if finite.size else float("nan")
    return out


def volume_from_slices(
    slices: Any,
    slice_indices: Sequence[int] | None = None,
    num_slices: int | None = None,
) -> np.ndarray:
    """Reassemble slice-wise predictions into an (X, Y, Z) label volume (slice axis last).

    Args:
        slices: (Z, X, Y) integer labels, or (Z, K, X, Y) scores/probabilities (argmax over K),
            numpy or torch; ``slices[i]`` is the slice at ``slice_indices[i]``.
        slice_indices: position of each slice along Z (default 0..Z-1 in order).
        num_slices: depth of the volume (default: max(slice_indices) + 1); every position must be
            covered exactly once.

    Returns:
        int64 array (X, Y, Z).
    """
    s = _np(slices, "slices")
    if s.ndim == 4:
        s = s.argmax(axis=1)
    elif s.ndim != 3:
        raise ValueError(f"slices must have shape (Z, X, Y) or (Z, K, X, Y), got {s.shape}")
    z = s.shape[0]
    idx = np.arange(z) if slice_indices is None else np.asarray(slice_indices, dtype=np.int64)
    if idx.shape != (z,):
        raise ValueError(f"slice_indices must have one entry per slice ({z}), got shape {idx.shape}")
    depth = int(idx.max()) + 1 if num_slices is None and z else int(num_slices or 0)
    if z and (idx.min() < 0 or idx.max() >= depth):
        raise ValueError(f"slice_indices must lie in [0, {depth}), got [{idx.min()}, {idx.max()}]")
    counts = np.bincount(idx, minlength=depth) if z else np.zeros(depth, dtype=np.int64)
    if (counts != 1).any():
        missing = np.flatnonzero(counts == 0).tolist()
        dup = np.flatnonzero(counts > 1).tolist()
        raise ValueError(f"slice_indices must cover 0..{depth - 1} exactly once (missing {missing}, repeated {dup})")
    vol = np.empty(s.shape[1:] + (depth,), dtype=np.int64)
    vol[..., idx] = np.moveaxis(s, 0, -1)
    return vol
