"""Backbones and heads (pure PyTorch)."""

from localcl.models.heads import DenseHead, GlobalHead, PatchHead, ReconHead  # noqa: F401
from localcl.models.unet import SegHead, UNet, UNet2D, UNet3D, UNetDecoder, UNetEncoder  # noqa: F401
