"""Slice-wise inference on the training grid, mapped back exactly onto the native voxel grid.

For a volume ``I`` of shape ``(X, Y, Z)`` with in-plane spacing ``(s_x, s_y)`` mm and a model
exported with spec ``size = [H, W]`` and ``spacing_mm = t`` (a number, ``[t, t]`` or null), each
slice goes through the training preprocessing of :mod:`storage.preprocess` (the samplers use
the same functions, so training and inference cannot drift apart):

1. ``x = (I - p1) / max(p99 - p1, 1e-8)`` with the volume's 1st/99th intensity percentiles
   (a store's stored ``meta["intensity"]``, or ``np.percentile`` of the scan as at ingest);
2. resampling to ``(X', Y') = (round(X s_x / t), round(Y s_y / t))`` (bilinear,
   ``align_corners=False``; identity when ``(X', Y') == (X, Y)`` or ``t`` is null);
3. centre crop / zero-pad to ``(H, W)``;
4. class probabilities ``(B, K, H, W)`` for batches of ``B`` slices (``model.predict`` when the
   module has it, else ``softmax(model(x))``), mixed precision on CUDA;
5. :func:`storage.preprocess.restore_slice` undoes 3. (cropped-away voxels get probability 0
   for every class, i.e. background after the arg-max) and 2. by resampling the
   *probabilities* bilinearly back to ``(X, Y)``; the label is the arg-max over ``K``.

Steps 2-3 are identity maps when the spacing and size already match, so a model that returns
the reference on the training grid reproduces it exactly (tested); otherwise the label maps
differ only by the resampling of boundaries.

The slice axis is axis 2 (``Z``); the first slice axis (``X``) is the network's ``H``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_jobs.errors import UserError
from storage.preprocess import preprocess_slice, restore_slice


def preprocessing_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing a model spec asks for.

    Returns:
        ``{"size": (H, W), "spacing_mm": float | None, "low_percentile": float,
        "high_percentile": float}``.

    Raises:
        UserError: naming the spec key when ``size`` / ``spacing_mm`` / ``normalisation`` is bad.
    """
    size = spec.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise UserError(f"model spec 'size' must be [H, W] positive ints, got {size!r}")
    sp = spec.get("spacing_mm")
    spacing: float | None
    if sp is None:
        spacing = None
    elif isinstance(sp, (int, float)) and not isinstance(sp, bool):
        spacing = float(sp)
    elif isinstance(sp, (list, tuple)) and len(sp) == 2 and float(sp[0]) == float(sp[1]):
        spacing = float(sp[0])
    else:
        raise UserError(f"model spec 'spacing_mm' must be null, a number or [t, t] (isotropic in-plane), got {sp!r}")
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise UserError(f"model spec 'spacing_mm' must be positive, got {sp!r}")
    norm = spec.get("normalisation") or {}
    if not isinstance(norm, Mapping):
        raise UserError(f"model spec 'normalisation' must be an object, got {norm!r}")
    lo = float(norm.get("low_percentile", 1.0))
    hi = float(norm.get("high_percentile", 99.0))
    if not 0.0 <= lo < hi <= 100.0:
        raise UserError(f"model spec 'normalisation' percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}")
    return {"size": (int(size[0]), int(size[1])), "spacing_mm": spacing, "low_percentile": lo, "high_percentile": hi}


def _forward_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)`` for images ``(B, 1, H, W)``."""
    predict = getattr(model, "predict", None)
    if callable(predict):
        probs: torch.Tensor = predict(x)
        return probs.float()
    return torch.softmax(model(x).float(), dim=1)


class StreamView(nn.Module):
    """One prediction stream of a multi-stream model (``model.streams``, e.g. IDEAL's two
    decoders) as a model of its own: ``predict(x) = model.predict_stream(x, name)``, so
    :func:`predict_volume` can segment with that stream alone."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        probs: torch.Tensor = self.model.predict_stream(x, self.name)  # type: ignore[operator]
        return probs


def stream_views(model: nn.Module) -> dict[str, StreamView]:
    """``{stream name: StreamView}`` of a model that declares ``streams``; ``{}`` otherwise."""
    return {name: StreamView(model, name) for name in getattr(model, "streams", ())}


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    spec: Mapping[str, Any],
    image_xyz: np.ndarray,
    spacing: Sequence[float],
    *,
    intensity_range: tuple[float, float] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Segment a volume slice by slice (see the module docstring for the exact maps).

    Args:
        model: the fine-tuned network (on any device; inputs follow its parameters). It is
            put in eval mode.
        spec: the model's ``model.json`` (``size``, ``spacing_mm``, ``normalisation``).
        image_xyz: the scan, shape ``(X, Y, Z)`` (any real dtype).
        spacing: voxel size in mm, at least ``(s_x, s_y)``.
        intensity_range: ``(p_lo, p_hi)`` to normalise with (e.g. a store's stored p1/p99);
            computed from ``image_xyz`` with the spec's percentiles when omitted.
        batch_size: slices per forward pass.

    Returns:
        Labels ``(X, Y, Z)`` uint8 on the native grid.
    """
    if image_xyz.ndim != 3:
        raise UserError(f"expected a 3D image (X, Y, Z), got shape {tuple(image_xyz.shape)}")
    if len(spacing) < 2 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing[:2]):
        raise UserError(f"spacing must hold positive in-plane voxel sizes, got {tuple(spacing)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    pre = preprocessing_from_spec(spec)
    size, target = pre["size"], pre["spacing_mm"]
    X, Y, Z = image_xyz.shape
    sp2 = (float(spacing[0]), float(spacing[1]))
    if intensity_range is None:
        lo, hi = (float(v) for v in np.percentile(image_xyz, [pre["low_percentile"], pre["high_percentile"]]))
    else:
        lo, hi = (float(v) for v in intensity_range)

    model.eval()
    device = _device_of(model)
    use_amp = device.type == "cuda"
    out = np.empty((X, Y, Z), np.uint8)
    for z0 in range(0, Z, batch_size):
        zs = range(z0, min(Z, z0 + batch_size))
        # (B, 1, H, W) on the training grid
        x = torch.stack([preprocess_slice(image_xyz[:, :, z], sp2, lo, hi, size, target)["image"] for z in zs])
        with torch.autocast(device_type=device.type, enabled=use_amp):
            probs = _forward_probs(model, x.to(device))
        if probs.ndim != 4 or probs.shape[0] != len(zs) or tuple(probs.shape[2:]) != tuple(size):
            raise UserError(f"model returned shape {tuple(probs.shape)}, expected (B, K, {size[0]}, {size[1]})")
        b, k = probs.shape[:2]
        # slices x classes as channels: (B*K, H, W) -> (B*K, X, Y) on the native grid
        native = restore_slice(probs.float().cpu().reshape(b * k, *size), (X, Y), sp2, target)
        out[:, :, z0 : z0 + b] = native.reshape(b, k, X, Y).argmax(dim=1).to(torch.uint8).numpy().transpose(1, 2, 0)
    return out


def predict_case(
    model: nn.Module, spec: Mapping[str, Any], store: Any, case: str, *, batch_size: int = 16
) -> np.ndarray:
    """:func:`predict_volume` for one case of a ``storage`` store, normalised with the stored
    percentiles (``meta["intensity"]["p1"/"p99"]``, as the samplers do) when the spec uses the
    default (1, 99)."""
    meta = store.meta(case)
    return predict_volume(
        model,
        spec,
        store.image(case),
        meta["spacing"],
        intensity_range=stored_intensity_range(spec, meta),
        batch_size=batch_size,
    )


def stored_intensity_range(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """A store case's stored ``(p1, p99)`` when the spec normalises with percentiles (1, 99)
    (what the samplers used in training); ``None`` (compute from the scan) otherwise."""
    pre = preprocessing_from_spec(spec)
    stats = meta.get("intensity") or {}
    if (pre["low_percentile"], pre["high_percentile"]) == (1.0, 99.0) and "p1" in stats and "p99" in stats:
        return float(stats["p1"]), float(stats["p99"])
    return None
