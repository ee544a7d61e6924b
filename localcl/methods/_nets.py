"""Glue between method configs and ``localcl.models`` / ``localcl.losses.segmentation``.

Backbone state convention: a "backbone state" is the U-Net's ``encoder.*`` and ``decoder.*``
entries (never the segmentation head or projection heads, which fine-tuning re-initialises).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from localcl.models.unet import UNet, UNet2D, UNet3D

if TYPE_CHECKING:
    from localcl.methods.base import BaseMethodConfig

__all__ = ["backbone_keys", "build_unet", "load_unet", "seg_loss", "unet_backbone_state"]

BACKBONE_PREFIXES = ("encoder.", "decoder.")


def build_unet(
    cfg: BaseMethodConfig, in_channels: int, num_classes: int = 2, dim: int = 2, upsample: str = "nearest"
) -> UNet:
    """U-Net of ``cfg.widths``/``cfg.decoder_widths``/``cfg.norm`` (2D or 3D)."""
    cls = UNet2D if dim == 2 else UNet3D
    return cls(
        in_channels,
        num_classes,
        widths=tuple(cfg.widths),
        decoder_widths=tuple(cfg.decoder_widths),
        norm=cfg.norm,
        upsample=upsample,
    )


def backbone_keys(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k in state if k.startswith(BACKBONE_PREFIXES)]


def unet_backbone_state(unet: nn.Module, decoder_blocks: int | None = None) -> dict[str, Tensor]:
    """CPU copy of ``encoder.*`` and ``decoder.*`` (only blocks ``< decoder_blocks`` if given)."""
    out: dict[str, Tensor] = {}
    for k, v in unet.state_dict().items():
        if k.startswith("encoder."):
            out[k] = v.detach().cpu().clone()
        elif k.startswith("decoder."):
            idx = int(k.split(".")[2])  # decoder.blocks.<i>.
            if decoder_blocks is None or idx < decoder_blocks:
                out[k] = v.detach().cpu().clone()
    return out


def load_unet(unet: nn.Module, state: Mapping[str, Tensor], strict: bool = False) -> tuple[list[str], list[str]]:
    """Load a backbone state into ``unet`` (its ``seg_head`` keeps its fresh initialisation).

    Returns ``(missing, unexpected)`` backbone keys. With ``strict=True`` raises ``ValueError``
    if any backbone key is missing or unexpected; shape mismatches always raise.
    """
    own = unet.state_dict()
    own_bb = set(backbone_keys(own))
    given = {k: v for k, v in state.items()}
    unexpected = sorted(k for k in given if k not in own_bb)
    missing = sorted(k for k in own_bb if k not in given)
    if strict and (missing or unexpected):
        raise ValueError(f"backbone state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k in sorted(own_bb & set(given)):
        if tuple(own[k].shape) != tuple(given[k].shape):
            raise ValueError(
                f"backbone state entry {k!r} has shape {tuple(given[k].shape)}, "
                f"the network expects {tuple(own[k].shape)}"
            )
    unet.load_state_dict({k: given[k] for k in own_bb & set(given)}, strict=False)
    return missing, unexpected


def seg_loss(logits: Tensor, label: Tensor, kind: str, include_background: bool = True) -> dict[str, Tensor]:
    """Dice (``kind="dice"``) or Dice + CE (``"dice_ce"``); label -1 = ignored pixel.

    Shapes: ``logits`` (B, K, *S), ``label`` (B, *S) int64. Returns ``{"loss", "dice", ["ce"]}``.
    """
    from localcl.losses.segmentation import cross_entropy_loss, dice_loss

    dice = dice_loss(logits, label, include_background=include_background, ignore_index=-1)
    out = {"dice": dice}
    loss = dice
    if kind == "dice_ce":
        ce = cross_entropy_loss(logits, label, ignore_index=-1)
        out["ce"] = ce
        loss = loss + ce
    out["loss"] = loss
    return out
