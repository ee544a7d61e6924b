"""2D slice preprocessing shared by the samplers and by inference (and its inverse).

Forward, for a slice ``s`` of shape (X, Y) with in-plane spacing ``(dx, dy)`` mm:

1. intensity: ``x = (s - p1) / (p99 - p1)`` with the case's stored 1st/99th percentiles
   (no clipping; ``p99 - p1`` is floored at 1e-8);
2. optional resampling to ``spacing_mm``: output grid ``(round(X * dx / spacing_mm),
   round(Y * dy / spacing_mm))``; bilinear (``align_corners=False``) for intensities, nearest
   for label/region maps;
3. centre crop / pad to ``size = (H, W)``: crop offset ``(X' - H) // 2``, pad before
   ``(H - X') // 2``; padding is 0 for intensities and ``-1`` (unknown) for label/region maps.

The tensor axes are the store's axes: H runs along X, W along Y. :func:`restore_slice` undoes
step 3 then step 2, so a prediction on the network grid maps back to the native (X, Y) grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-8


def normalise(x: np.ndarray, p1: float, p99: float) -> np.ndarray:
    """``(x - p1) / max(p99 - p1, 1e-8)`` as float32."""
    return ((np.asarray(x, dtype=np.float32) - np.float32(p1)) / np.float32(max(p99 - p1, EPS))).astype(np.float32)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], spacing_mm: float | None) -> tuple[int, int]:
    """In-plane grid after resampling (X', Y'); ``spacing_mm=None`` keeps ``shape``."""
    if spacing_mm is None:
        return int(shape[0]), int(shape[1])
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    return (
        max(1, round(shape[0] * float(spacing[0]) / spacing_mm)),
        max(1, round(shape[1] * float(spacing[1]) / spacing_mm)),
    )


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis, ``align_corners=False`` (torch's convention):
    ``src = max((i + 0.5) * n_in / n_out - 0.5, 0)``, ``i0 = floor(src)``,
    ``i1 = min(i0 + 1, n_in - 1)``, weight of ``i1`` = ``src - i0``."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize2d(x: np.ndarray, out: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize a 2D array to ``out`` in numpy (no thread pool; cheap in DataLoader workers).

    ``nearest``: ``src = min(floor((i + 0.5) * n_in / n_out), n_in - 1)`` (torch
    "nearest-exact"), values copied exactly. Else separable bilinear as torch
    ``interpolate(mode="bilinear", align_corners=False)``, float32.
    """
    if tuple(x.shape) == tuple(out):
        return x
    if nearest:
        idx = [
            np.minimum(np.floor((np.arange(o) + 0.5) * (n / o)).astype(np.int64), n - 1) for n, o in zip(x.shape, out)
        ]
        nearest_x: np.ndarray = x[idx[0][:, None], idx[1][None, :]]
        return nearest_x
    (r0, r1, wr), (c0, c1, wc) = _axis_weights(x.shape[0], out[0]), _axis_weights(x.shape[1], out[1])
    x = np.asarray(x, dtype=np.float32)
    rows = x[r0] * (1 - wr)[:, None] + x[r1] * wr[:, None]
    resized: np.ndarray = rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]
    return resized


def _resize(x: torch.Tensor, out: tuple[int, int], nearest: bool) -> torch.Tensor:
    """(C, H0, W0) -> (C, *out); nearest keeps integer values exactly (float64 carrier)."""
    if tuple(x.shape[-2:]) == tuple(out):
        return x
    if nearest:
        y = F.interpolate(x[None].to(torch.float64), size=out, mode="nearest-exact")[0]
        return y.round().to(x.dtype)
    return F.interpolate(x[None].to(torch.float32), size=out, mode="bilinear", align_corners=False)[0]


def crop_or_pad(x: Any, size: Sequence[int], pad_value: float) -> Any:
    """Centre crop / pad the last two axes of ``x`` (..., H0, W0) to ``size`` (H, W).

    Works on numpy arrays and torch tensors (returns the same kind and dtype).
    """
    h, w = int(size[0]), int(size[1])
    h0, w0 = x.shape[-2:]
    sy, dy, ny = _span(h0, h)
    sx, dx, nx = _span(w0, w)
    out: Any  # the type of x: a tensor or an array
    if isinstance(x, torch.Tensor):
        out = torch.full((*x.shape[:-2], h, w), pad_value, dtype=x.dtype)
    else:
        out = np.full((*x.shape[:-2], h, w), pad_value, dtype=x.dtype)
    out[..., dy : dy + ny, dx : dx + nx] = x[..., sy : sy + ny, sx : sx + nx]
    return out


def _span(src: int, dst: int) -> tuple[int, int, int]:
    """(source start, destination start, length) of a centred crop (src > dst) or pad."""
    if src >= dst:
        return (src - dst) // 2, 0, dst
    return 0, (dst - src) // 2, src


def preprocess_slice(
    image: np.ndarray,
    spacing: Sequence[float],
    p1: float,
    p99: float,
    size: Sequence[int],
    spacing_mm: float | None = None,
    maps: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward transform (module docstring) of one (X, Y) slice.

    Returns ``{"image": float32 (1, H, W)}`` plus, for every entry of ``maps`` (label or region
    maps (X, Y), integers), ``int64 (H, W)`` resampled with nearest and padded with -1.
    """
    out_hw = resampled_shape(image.shape, spacing, spacing_mm)
    resample = out_hw != tuple(image.shape[:2])
    img = normalise(image, p1, p99)
    if resample:
        img = resize2d(img, out_hw, nearest=False)
    result = {"image": torch.from_numpy(np.ascontiguousarray(crop_or_pad(img, size, 0.0))[None])}
    for name, m in (maps or {}).items():
        arr = np.asarray(m).astype(np.int64)
        if resample:
            arr = resize2d(arr, out_hw, nearest=True)
        result[name] = torch.from_numpy(np.ascontiguousarray(crop_or_pad(arr, size, -1)))
    return result


def restore_slice(
    x: torch.Tensor,
    native_shape: Sequence[int],
    spacing: Sequence[float],
    spacing_mm: float | None = None,
    nearest: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`preprocess_slice` for network outputs ``x`` (C, H, W) -> (C, X, Y).

    Undoes the crop/pad (regions cropped away come back as 0) and the resampling (to exactly
    ``native_shape``); use ``nearest=True`` for label maps, bilinear for probabilities/logits.
    """
    mid = resampled_shape(native_shape, spacing, spacing_mm)
    y = crop_or_pad(x, mid, 0)
    return _resize(y, (int(native_shape[0]), int(native_shape[1])), nearest=nearest)
