"""The U-Net backbone of GLCL/PLCL (methods.md §1.3) in 2D, and a 3D variant for patches.

Reference configuration (Chaitanya et al., NeurIPS 2020, code ``krishnabits001/domain_specific_cl``):

- encoder: L = 6 levels, each two 3x3 convs (SAME padding, BN, ReLU); widths
  16-32-64-128-128-128; 2x2 max-pooling between levels, so a 192x192 slice gives a 6x6x128
  bottleneck (stride 2^(L-1) = 32);
- decoder: L-1 = 5 blocks; block i: x2 upsampling -> 2x2 conv (BN, ReLU) -> concatenation with
  the encoder output of the same resolution -> two 3x3 convs (BN, ReLU; the last block has
  one); widths 128-128-64-32-16; block 1 is the first after the bottleneck (stride 16),
  block 3 has stride 4 (48x48x64 for 192x192, GLCL's local-loss depth), block 5 full resolution;
- segmentation head: two 3x3 convs (16 ch, BN, ReLU) and a final 3x3 conv to K logits.

Upsampling ``"nearest"`` (the reference), ``"bilinear"`` (trilinear in 3D; + 2x2 conv) or
``"transposed"`` (2x2 transposed conv with stride 2, BN, ReLU: IDEAL's second decoder [R]).

Tensor shapes: 2D input (B, C_in, H, W) with H, W divisible by 2^(L-1); 3D input
(B, C_in, D, H, W) with D, H, W divisible by 2^(L-1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from localcl.models._blocks import NORMS, check_dim, conv, conv_norm_relu, conv_transpose, max_pool, norm_layer

__all__ = ["UNet", "UNet2D", "UNet3D", "UNetEncoder", "UNetDecoder", "SegHead", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear", "transposed")


def _check_widths(name: str, widths: Sequence[int]) -> tuple[int, ...]:
    w = tuple(widths)
    if not w or not all(isinstance(c, int) and c > 0 for c in w):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {widths!r}")
    return w


class UNetEncoder(nn.Module):
    """Encoder ``e``: level l (l = 1..L) = ``convs_per_level`` 3x3 conv-norm-ReLU at
    stride 2^(l-1); max-pooling 2 between levels.

    ``forward(x (B, C_in, *S)) -> list`` of L tensors, level l: (B, widths[l-1], *S / 2^(l-1));
    the last one is the bottleneck.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int] = (16, 32, 64, 128, 128, 128),
        norm: str = "batch",
        dim: int = 2,
        convs_per_level: int = 2,
    ) -> None:
        super().__init__()
        check_dim(dim)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.widths = _check_widths("widths", widths)
        self.in_channels, self.dim = in_channels, dim
        self.levels = nn.ModuleList()
        cin = in_channels
        for w in self.widths:
            self.levels.append(
                nn.Sequential(*[conv_norm_relu(dim, cin if k == 0 else w, w, 3, norm) for k in range(convs_per_level)])
            )
            cin = w
        self.pool = max_pool(dim, 2)

    @property
    def stride(self) -> int:
        """Total down-sampling factor of the bottleneck, 2^(L-1)."""
        return int(2 ** (len(self.widths) - 1))

    def forward(self, x: torch.Tensor, num_levels: int | None = None) -> list[torch.Tensor]:
        feats: list[torch.Tensor] = []
        n = len(self.levels) if num_levels is None else num_levels
        for i in range(n):
            x = self.levels[i](x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class _UpBlock(nn.Module):
    """x2 upsampling -> 2x2 conv (norm, ReLU) [or 2x2 transposed conv] -> concat skip -> n 3x3 convs."""

    def __init__(self, dim: int, cin: int, cskip: int, cout: int, n_convs: int, norm: str, upsample: str) -> None:
        super().__init__()
        if upsample == "transposed":
            self.up = nn.Sequential(
                conv_transpose(dim, cin, cout, 2, stride=2, bias=(norm == "none")),
                norm_layer(norm, cout, dim),
                nn.ReLU(inplace=True),
            )
        else:
            mode = "nearest" if upsample == "nearest" else ("bilinear" if dim == 2 else "trilinear")
            align = None if mode == "nearest" else False
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode=mode, align_corners=align),
                *conv_norm_relu(dim, cin, cout, 2, norm),
            )
        self.convs = nn.Sequential(
            *[conv_norm_relu(dim, cout + cskip if k == 0 else cout, cout, 3, norm) for k in range(n_convs)]
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.convs(torch.cat([self.up(x), skip], dim=1))
        return out


class UNetDecoder(nn.Module):
    """Decoder ``d``: block i (i = 1..L-1) upsamples the previous output and fuses the encoder
    level L-i. ``forward(feats, num_blocks=None) -> list`` of block outputs, block i:
    (B, decoder_widths[i-1], *S / 2^(L-1-i)); ``num_blocks`` = l runs only ``d_l``."""

    def __init__(
        self,
        encoder_widths: Sequence[int],
        decoder_widths: Sequence[int] = (128, 128, 64, 32, 16),
        norm: str = "batch",
        upsample: str = "nearest",
        dim: int = 2,
        last_block_convs: int = 1,
    ) -> None:
        super().__init__()
        check_dim(dim)
        enc = _check_widths("widths", encoder_widths)
        self.widths = _check_widths("decoder_widths", decoder_widths)
        if len(self.widths) != len(enc) - 1:
            raise ValueError(
                f"decoder_widths must have len(widths) - 1 = {len(enc) - 1} entries, got {len(self.widths)}"
            )
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.upsample = upsample
        self.blocks = nn.ModuleList()
        cin = enc[-1]
        for i, w in enumerate(self.widths):
            last = i == len(self.widths) - 1
            self.blocks.append(_UpBlock(dim, cin, enc[-2 - i], w, last_block_convs if last else 2, norm, upsample))
            cin = w

    def forward(self, feats: Sequence[torch.Tensor], num_blocks: int | None = None) -> list[torch.Tensor]:
        if len(feats) != len(self.blocks) + 1:
            raise ValueError(f"feats must hold the {len(self.blocks) + 1} encoder outputs, got {len(feats)}")
        n = len(self.blocks) if num_blocks is None else num_blocks
        x = feats[-1]
        outs: list[torch.Tensor] = []
        for i in range(n):
            x = self.blocks[i](x, feats[-2 - i])
            outs.append(x)
        return outs


class SegHead(nn.Module):
    """Segmentation head g_ξ: ``num_convs`` 3x3 conv-norm-ReLU of ``width`` channels, then a
    3x3 conv (with bias, no norm, no activation) to K logits.
    (B, C, *S) -> (B, num_classes, *S)."""

    def __init__(
        self, in_channels: int, num_classes: int, width: int = 16, num_convs: int = 2, norm: str = "batch", dim: int = 2
    ) -> None:
        super().__init__()
        check_dim(dim)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(num_convs):
            layers.extend(conv_norm_relu(dim, cin, width, 3, norm))
            cin = width
        layers.append(conv(dim, cin, num_classes, 3, padding="same"))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class UNet(nn.Module):
    """U-Net with named taps (dimension-generic; use :class:`UNet2D` or :class:`UNet3D`).

    ``forward(x, taps=(), logits=True) -> dict``:
      - ``"logits"``: (B, K, *S) (omitted when ``logits=False``; then only the layers the taps
        need are run, e.g. the encoder alone for ``taps=("bottleneck",)``);
      - ``"enc{l}"``, l = 1..L: encoder level l, (B, widths[l-1], *S/2^(l-1));
      - ``"bottleneck"`` = ``"enc{L}"``;
      - ``"dec{i}"``, i = 1..L-1: decoder block i (dec1 first after the bottleneck),
        (B, decoder_widths[i-1], *S/2^(L-1-i));
      - ``"features"``: last decoder output, (B, decoder_widths[-1], *S).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 128, 128),
        decoder_widths: Sequence[int] = (128, 128, 64, 32, 16),
        norm: str = "batch",
        upsample: str = "nearest",
        seg_head_width: int = 16,
        seg_head_convs: int = 2,
        dim: int = 2,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.dim = dim
        self.in_channels, self.num_classes = in_channels, num_classes
        self.encoder = UNetEncoder(in_channels, widths, norm, dim)
        self.decoder = UNetDecoder(self.encoder.widths, decoder_widths, norm, upsample, dim)
        self.seg_head = SegHead(self.decoder.widths[-1], num_classes, seg_head_width, seg_head_convs, norm, dim)
        n_lev = len(self.encoder.widths)
        self.tap_names = (
            ("bottleneck", "features")
            + tuple(f"enc{i}" for i in range(1, n_lev + 1))
            + tuple(f"dec{i}" for i in range(1, n_lev))
        )

    @property
    def stride(self) -> int:
        return self.encoder.stride

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != self.dim + 2:
            layout = "(B, C, H, W)" if self.dim == 2 else "(B, C, D, H, W)"
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {layout}, got {got}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the model expects in_channels={self.in_channels}")
        bad = [s for s in x.shape[2:] if s % self.stride]
        if bad:
            raise ValueError(f"x spatial size {tuple(x.shape[2:])} must be divisible by 2^(levels-1) = {self.stride}")

    def forward(self, x: torch.Tensor, taps: Iterable[str] = (), logits: bool = True) -> dict[str, torch.Tensor]:
        taps = tuple(taps)
        unknown = [t for t in taps if t not in self.tap_names]
        if unknown:
            raise ValueError(f"unknown taps {unknown}; allowed: {sorted(self.tap_names)}")
        self._check_input(x)
        n_lev = len(self.encoder.widths)
        need_dec = 0
        if logits or "features" in taps:
            need_dec = n_lev - 1
        for t in taps:
            if t.startswith("dec"):
                need_dec = max(need_dec, int(t[3:]))
        need_enc = (
            n_lev
            if (need_dec or "bottleneck" in taps)
            else max([int(t[3:]) for t in taps if t.startswith("enc")] or [0])
        )
        feats = self.encoder(x, num_levels=need_enc) if need_enc else []
        decs = self.decoder(feats, num_blocks=need_dec) if need_dec else []
        out: dict[str, torch.Tensor] = {}
        if logits:
            out["logits"] = self.seg_head(decs[-1])
        for t in taps:
            if t == "bottleneck":
                out[t] = feats[-1]
            elif t == "features":
                out[t] = decs[-1]
            elif t.startswith("enc"):
                out[t] = feats[int(t[3:]) - 1]
            else:
                out[t] = decs[int(t[3:]) - 1]
        return out


class UNet2D(UNet):
    """2D U-Net of methods.md §1.3; (B, C_in, H, W) -> dict (see :class:`UNet`)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 128, 128),
        decoder_widths: Sequence[int] = (128, 128, 64, 32, 16),
        norm: str = "batch",
        upsample: str = "nearest",
        seg_head_width: int = 16,
        seg_head_convs: int = 2,
    ) -> None:
        super().__init__(
            in_channels, num_classes, widths, decoder_widths, norm, upsample, seg_head_width, seg_head_convs, dim=2
        )


class UNet3D(UNet):
    """3D variant for patch training (MixCL/LRC option): Conv3d/MaxPool3d, same API;
    (B, C_in, D, H, W) -> dict. Default depth 4 levels (patches are small)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128),
        decoder_widths: Sequence[int] = (64, 32, 16),
        norm: str = "batch",
        upsample: str = "nearest",
        seg_head_width: int = 16,
        seg_head_convs: int = 2,
    ) -> None:
        super().__init__(
            in_channels, num_classes, widths, decoder_widths, norm, upsample, seg_head_width, seg_head_convs, dim=3
        )
