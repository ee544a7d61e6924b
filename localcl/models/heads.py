"""Projection and auxiliary heads (methods.md §6.2), 2D and 3D where sensible.

- :class:`GlobalHead` g1 — GLCL (flatten the bottleneck -> FC 1024, ReLU, no bias -> FC 128,
  no bias) or MoCo/MixCL style (global average pooling -> MLP -> 128).
- :class:`DenseHead` g2 / IDEAL G / PLCL h_φ / MixCL g_lab — 1x1 conv -> BN -> ReLU -> 1x1 conv,
  or a single 1x1 conv (IDEAL's minimal reading, [R]).
- :class:`PatchHead` — GLCL local: each KxK window of a feature map, flattened (K·K·C values),
  through one shared linear map to 128-d (no bias).
- :class:`ReconHead` — MixCL g_rec: 1x1 or 3x3 conv to the image channels.
- :class:`SegHead` — re-exported from :mod:`localcl.models.unet`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from localcl.models._blocks import check_dim, conv, norm_layer
from localcl.models.unet import SegHead

__all__ = ["GlobalHead", "DenseHead", "PatchHead", "ReconHead", "SegHead"]


class GlobalHead(nn.Module):
    """Global projection g1: (B, C, *S) -> (B, out_dim).

    ``pool="flatten"`` (GLCL): z = W2 · ReLU(W1 · vec(f)), vec(f) ∈ R^{C·prod(S)}, W1: 1024 x
    C·prod(S), W2: 128 x 1024, no biases (4608 -> 1024 -> 128 for a 6x6x128 bottleneck).
    ``pool="gap"`` (MoCo v2 / MixCL g_id): the input is averaged over space first (C values).
    ``spatial_size`` is required for "flatten" (e.g. (6, 6) for 192x192 inputs and 6 levels).
    ``hidden_norm=True`` inserts BatchNorm1d after the hidden layer (not in GLCL).
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int = 128,
        hidden_dim: int = 1024,
        pool: str = "flatten",
        spatial_size: Sequence[int] | None = None,
        bias: bool = False,
        hidden_norm: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("flatten", "gap"):
            raise ValueError(f"pool must be 'flatten' or 'gap', got {pool!r}")
        if pool == "flatten":
            if spatial_size is None or not all(isinstance(s, int) and s > 0 for s in spatial_size):
                raise ValueError(f"spatial_size (positive ints) is required with pool='flatten', got {spatial_size!r}")
            self.spatial_size: tuple[int, ...] | None = tuple(spatial_size)
            in_features = in_channels * math.prod(spatial_size)
        else:
            self.spatial_size = None
            in_features = in_channels
        self.pool, self.in_channels = pool, in_channels
        layers: list[nn.Module] = [nn.Linear(in_features, hidden_dim, bias=bias)]
        if hidden_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=bias)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, *spatial), got {tuple(x.shape)}")
        if self.pool == "gap":
            v = x.flatten(2).mean(dim=2)
        else:
            if tuple(x.shape[2:]) != self.spatial_size:
                raise ValueError(f"x spatial size {tuple(x.shape[2:])} differs from spatial_size={self.spatial_size}")
            v = x.flatten(1)
        z: torch.Tensor = self.mlp(v)
        return z


class DenseHead(nn.Module):
    """Dense projection: (B, C, *S) -> (B, out_dim, *S), applied at every position.

    ``layers=2``: 1x1 conv C -> hidden (norm, ReLU) -> 1x1 conv hidden -> out_dim (linear);
    hidden defaults to C (GLCL g2 with out_dim=C_l, PLCL h_φ with out_dim=16, IDEAL/MixCL 128).
    ``layers=1``: a single 1x1 conv C -> out_dim (IDEAL's minimal reading [R]).
    ``bias=False`` matches the GLCL/PLCL reference.
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int = 128,
        hidden_dim: int | None = None,
        layers: int = 2,
        norm: str = "batch",
        bias: bool = False,
        dim: int = 2,
    ) -> None:
        super().__init__()
        check_dim(dim)
        if layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {layers!r}")
        hidden = in_channels if hidden_dim is None else hidden_dim
        if layers == 1:
            self.net = nn.Sequential(conv(dim, in_channels, out_dim, 1, bias=bias))
        else:
            self.net = nn.Sequential(
                conv(dim, in_channels, hidden, 1, bias=bias),
                norm_layer(norm, hidden, dim),
                nn.ReLU(inplace=True),
                conv(dim, hidden, out_dim, 1, bias=bias),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.net(x)
        return z


class PatchHead(nn.Module):
    """GLCL local region embedding (2D): v(u) = W · vec(f[:, u_y:u_y+K, u_x:u_x+K]), W ∈ R^{out x C·K·K},
    no bias; vec flattens in (C, ky, kx) order.

    ``forward(f (B, C, H, W), positions=None)``:
      - ``positions`` (A, 2) long top-left corners (row, col) -> (B, A, out_dim);
      - ``None`` -> every valid corner, (B, out_dim, H-K+1, W-K+1) (the same map as a KxK
        valid convolution with the same weights).
    """

    def __init__(self, in_channels: int, kernel: int = 3, out_dim: int = 128, bias: bool = False) -> None:
        super().__init__()
        if not isinstance(kernel, int) or kernel < 1:
            raise ValueError(f"kernel must be a positive int, got {kernel!r}")
        self.in_channels, self.kernel, self.out_dim = in_channels, kernel, out_dim
        self.linear = nn.Linear(in_channels * kernel * kernel, out_dim, bias=bias)

    def forward(self, f: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if f.dim() != 4 or f.shape[1] != self.in_channels:
            raise ValueError(f"f must have shape (B, {self.in_channels}, H, W), got {tuple(f.shape)}")
        k = self.kernel
        h, w = f.shape[2] - k + 1, f.shape[3] - k + 1
        if h < 1 or w < 1:
            raise ValueError(f"f spatial size {tuple(f.shape[2:])} is smaller than kernel={k}")
        weight = self.linear.weight.view(self.out_dim, self.in_channels, k, k)
        if positions is None:
            return F.conv2d(f, weight, self.linear.bias)
        if positions.dim() != 2 or positions.shape[1] != 2:
            raise ValueError(f"positions must have shape (A, 2), got {tuple(positions.shape)}")
        if len(positions) and (positions.min() < 0 or (positions[:, 0].max() >= h) or (positions[:, 1].max() >= w)):
            raise ValueError(f"positions must be top-left corners in [0, {h}) x [0, {w}) for kernel={k}")
        off = torch.arange(k, device=f.device)
        rows = (positions[:, 0, None] + off)[:, :, None].expand(-1, k, k)  # (A, k, k)
        cols = (positions[:, 1, None] + off)[:, None, :].expand(-1, k, k)
        win = f[:, :, rows, cols]  # (B, C, A, k, k)
        win = win.permute(0, 2, 1, 3, 4).flatten(2)  # (B, A, C*k*k) in (C, ky, kx) order
        z: torch.Tensor = self.linear(win)
        return z


class ReconHead(nn.Module):
    """MixCL reconstruction head g_rec: kxk conv (k = 1 or 3, with bias, no activation)
    (B, C, *S) -> (B, out_channels, *S)."""

    def __init__(self, in_channels: int, out_channels: int = 1, kernel: int = 1, dim: int = 2) -> None:
        super().__init__()
        check_dim(dim)
        if kernel not in (1, 3):
            raise ValueError(f"kernel must be 1 or 3, got {kernel!r}")
        self.conv = conv(dim, in_channels, out_channels, kernel, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.conv(x)
        return z
