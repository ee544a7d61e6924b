"""Small dimension-generic building blocks (2D/3D) shared by the U-Nets and the heads."""

from __future__ import annotations

from typing import Any

from torch import nn

NORMS = ("batch", "instance", "group", "none")


def check_dim(dim: int) -> None:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")


def conv(dim: int, *args: Any, **kwargs: Any) -> nn.Module:
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(*args, **kwargs)


def conv_transpose(dim: int, *args: Any, **kwargs: Any) -> nn.Module:
    return (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)(*args, **kwargs)


def max_pool(dim: int, k: int) -> nn.Module:
    return (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)(k)


def norm_layer(kind: str, channels: int, dim: int) -> nn.Module:
    """``batch`` (BatchNorm), ``instance`` (affine InstanceNorm), ``group`` (GroupNorm with
    min(8, C) groups dividing C) or ``none``."""
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv_norm_relu(dim: int, cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    """kxk conv (TF-style SAME padding, bias only without norm) -> norm -> ReLU.

    Even kernels (the decoder's 2x2 conv) pad 0 before / k-1 after, as TensorFlow's SAME does,
    with an explicit pad layer (torch's ``padding="same"`` would copy the input with a warning).
    """
    if kernel % 2:
        layer: list[nn.Module] = [conv(dim, cin, cout, kernel, padding=kernel // 2, bias=(norm == "none"))]
    else:
        padding: Any = (0, kernel - 1) * dim  # (left, right) per spatial dim, 4 or 6 entries
        pad = (nn.ConstantPad2d if dim == 2 else nn.ConstantPad3d)(padding, 0.0)
        layer = [pad, conv(dim, cin, cout, kernel, padding=0, bias=(norm == "none"))]
    return nn.Sequential(
        *layer,
        norm_layer(norm, cout, dim),
        nn.ReLU(inplace=True),
    )
