"""LRC: Localized Region Contrast on Felzenszwalb super-pixels, plugged into MoCo (or supervised)
pre-training.

Yan, Naushad, You, Tang, Sun, Han, Ma, Duncan, Xie, *Localized Region Contrast for Enhancing
Self-Supervised Learning in Medical Image Segmentation*, MICCAI 2023, arXiv 2304.03406 (no public
code); point-sampling principle of PLRC (Bai et al., arXiv 2202.04639). Components [P], formulas
and settings [R] (spec ``methods.md`` §5). Losses: :mod:`localcl.losses.lrc`.

Batch (``pretrain_batch = "slices+superpixels"``): ``image`` (B,1,H,W), ``superpixels`` (B,H,W)
int (Felzenszwalb map of the un-augmented slice, cached by ``storage``; -1 = ignore) and, for
``global_loss="supervised"``, ``label`` (B,H,W) (-1 unknown). Two views per slice with tracked
warps (:func:`localcl.methods.mixcl.make_views`); the super-pixel map is warped with each view
(nearest), so a region id names the same tissue in both views.

.. math::

    \\mathcal L = \\mathcal L_{global} + \\lambda_{loc}\\,\\mathcal L_{LRC}

- ``global_loss="moco"`` (default, the paper's overview): MoCo v2, ``q = g(e(x^1))``
  (GAP → MLP → 128), ``k = g_K(e_K(x^2))`` from the EMA key encoder (momentum 0.999), negatives a
  queue of 16,384 keys, symmetrised over the two views; ``"supervised"``: Dice + CE of the U-Net's
  segmentation head on both views' labelled pixels; ``"none"``: LRC alone.
- ``L_LRC``: :func:`localcl.losses.lrc.lrc_loss` on ``w = g_loc(d(e(x^v)))`` (1×1 conv C, BN, ReLU →
  1×1 conv 128, full resolution) with ``K_r = 16`` regions × ``P_r = 8`` points per view, τ = 0.1.

``dims=3``: 3D patches (B,1,D,H,W) with super-pixels (B,D,H,W), a 3D U-Net and axis-flip views;
depth is folded into rows for the point sampler. Region ids must be unique within a patch: when
stacking slice-wise Felzenszwalb maps, offset each slice's ids (e.g. ``+ z * 2**16``), otherwise
equal ids of different slices count as one region.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from localcl.losses.ideal import DenseQueue
from localcl.losses.lrc import lrc_loss
from localcl.methods import _nets
from localcl.methods._moco import ema_update, grouped_forward, make_key_copy, moco_loss, momentum_at
from localcl.methods.base import (
    BaseMethodConfig,
    Count,
    NonNegative,
    PositiveFinite,
    PretrainMethod,
    Temperature,
    UnitInterval,
    check_batch,
)
from localcl.methods.mixcl import as_2d, make_views
from localcl.models.heads import DenseHead, GlobalHead

__all__ = ["LRC", "LRCConfig", "lrc_step"]


class LRCConfig(BaseMethodConfig):
    """LRC settings (spec §5.5; all [R]).

    Attributes:
        global_loss: "moco" (default), "supervised" or "none".
        lambda_loc: λ_loc (1.0). tau_local: 0.1. tau_global: MoCo temperature (0.2, MoCo v2).
        num_regions: K_r (16). points_per_region: P_r (8). min_pix: smallest region kept after
            warping (1). allow_fewer: images with fewer than K_r regions use all they have (True).
        loss_mode: "summed" (multi-positive, default) or "per_positive" (SupCon form).
        same_view_positives: also count same-view points of the region as positives (False).
        superpixel_scale, superpixel_sigma, superpixel_min_size: Felzenszwalb parameters used by
            ``storage`` when it computes the cache (100, 0.8, 50).
        momentum: 0.999. queue_size: 16,384. proj_dim: 128.
        momentum_schedule: "constant" (spec) or "cosine" (from ``momentum`` to 1 over the stage).
        shuffle_bn_groups: 1 (off) or G > 1: shuffle-BN on one worker for the MoCo global term
            (:func:`localcl.methods._moco.grouped_forward` on the key branch; the queries keep
            the whole two-view batch, whose features also feed the local loss).
        dims: 2 (slices) or 3 (patches). crop_area, rotation_deg, scale, flip_p: 2D views.
        batch_size: slices per step (32; read by ``ray_jobs``).
    """

    global_loss: Literal["moco", "supervised", "none"] = "moco"
    lambda_loc: NonNegative = 1.0
    tau_local: Temperature = 0.1
    tau_global: Temperature = 0.2
    num_regions: Count = 16
    points_per_region: Count = 8
    min_pix: Count = 1
    allow_fewer: bool = True
    loss_mode: Literal["summed", "per_positive"] = "summed"
    same_view_positives: bool = False
    superpixel_scale: PositiveFinite = 100.0
    superpixel_sigma: NonNegative = 0.8
    superpixel_min_size: Count = 50
    momentum: UnitInterval = 0.999
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    shuffle_bn_groups: Count = 1
    queue_size: Count = 16384
    proj_dim: Count = 128
    dims: Literal[2, 3] = 2
    crop_area: tuple[float, float] = (0.4, 1.0)
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: UnitInterval = 0.5
    batch_size: Count = 32


class LRC(PretrainMethod):
    """LRC pre-training (module docstring). Returns ``{"loss", "global", "lrc"}``."""

    name = "lrc"
    Config = LRCConfig
    cfg: LRCConfig
    pretrain_batch = "slices+superpixels"
    default_finetune = "supervised"

    def __init__(self, cfg: LRCConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes, dim=cfg.dims)
        cb, cf = cfg.widths[-1], cfg.decoder_widths[-1]
        self.g_loc = DenseHead(cf, out_dim=cfg.proj_dim, hidden_dim=cf, layers=2, norm=cfg.norm, dim=cfg.dims)
        if cfg.global_loss == "moco":
            self.g_glob = GlobalHead(cb, cfg.proj_dim, hidden_dim=cb, pool="gap", bias=True)
            self.key_encoder = make_key_copy(self.unet.encoder)
            self.key_glob = make_key_copy(self.g_glob)
            self.queue = DenseQueue(cfg.queue_size, cfg.proj_dim)
        self._pending_keys: Tensor | None = None
        self._step = 0

    @classmethod
    def pretrain_reads_labels(cls, cfg: BaseMethodConfig) -> bool:
        """With ``global_loss="supervised"`` (its Dice + CE term reads ``batch["label"]``)."""
        return isinstance(cfg, LRCConfig) and cfg.global_loss == "supervised"

    @classmethod
    def superpixel_params(cls, cfg: BaseMethodConfig) -> dict[str, Any]:
        """Felzenszwalb ``scale``, ``sigma``, ``min_size`` from the ``superpixel_*`` fields."""
        if not isinstance(cfg, LRCConfig):
            raise TypeError(f"lrc needs an LRCConfig, got {type(cfg).__name__}")
        return {"scale": cfg.superpixel_scale, "sigma": cfg.superpixel_sigma, "min_size": cfg.superpixel_min_size}

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)
        self._step = int(step)
        return lrc_step(self, batch)

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        self._stage(stage)
        return [p for p in self.parameters() if p.requires_grad]

    def on_after_step(self) -> None:
        if self.cfg.global_loss != "moco":
            return
        m = momentum_at(self._step, self.total_steps, self.cfg.momentum, self.cfg.momentum_schedule)
        ema_update(self.key_encoder, self.unet.encoder, m)
        ema_update(self.key_glob, self.g_glob, m)
        if self._pending_keys is not None:
            self.queue.push(self._pending_keys)
            self._pending_keys = None


def lrc_step(model: LRC, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One LRC step: two tracked views, global term + λ_loc · L_LRC on warped super-pixels."""
    cfg = model.cfg
    keys = ("image", "superpixels") + (("label",) if cfg.global_loss == "supervised" else ())
    check_batch(batch, keys, "lrc")
    x, sp = batch["image"], batch["superpixels"].long()
    if x.dim() != cfg.dims + 2 or sp.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"lrc: image must be (B, C, *S) with {cfg.dims} spatial dims and superpixels (B, *S); "
            f"got {tuple(x.shape)} and {tuple(sp.shape)}"
        )
    b = x.shape[0]
    maps_in = [sp, batch["label"].long()] if cfg.global_loss == "supervised" else [sp]
    views, maps, _, _ = make_views(x, maps_in, model.generator, cfg, cfg.dims)
    taps = ("features",) if cfg.global_loss != "moco" else ("bottleneck", "features")
    out = model.unet(torch.cat(views, 0), taps=taps, logits=cfg.global_loss == "supervised")
    w = model.g_loc(out["features"])
    regions = torch.stack([as_2d(maps[0][0][:, None])[:, 0], as_2d(maps[1][0][:, None])[:, 0]], 1)
    emb = torch.stack([as_2d(w[:b]), as_2d(w[b:])], 1)
    l_loc = lrc_loss(
        emb,
        regions,
        tau=cfg.tau_local,
        num_regions=cfg.num_regions,
        points_per_region=cfg.points_per_region,
        min_pix=cfg.min_pix,
        mode=cfg.loss_mode,
        same_view_positives=cfg.same_view_positives,
        generator=model.generator_for(x.device),
        allow_fewer=cfg.allow_fewer,
    )
    if cfg.global_loss == "moco":
        q1, q2 = model.g_glob(out["bottleneck"]).chunk(2, 0)
        with torch.no_grad():
            model.key_encoder.train(model.training)
            model.key_glob.train(model.training)
            groups = cfg.shuffle_bn_groups
            k = grouped_forward(
                lambda v: model.key_glob(model.key_encoder(v)[-1]),
                torch.cat([views[1], views[0]], 0),
                groups,
                model.generator if groups > 1 else None,
            )
        k2, k1 = k.chunk(2, 0)  # k2: key of view 2 (positive of q1), k1: key of view 1
        negatives = model.queue.negatives()
        if negatives.shape[0] == 0:
            negatives = torch.nn.functional.normalize(k.detach(), dim=1)  # first step: in-batch keys
        l_glob = 0.5 * (moco_loss(q1, k2, negatives, cfg.tau_global) + moco_loss(q2, k1, negatives, cfg.tau_global))
        model._pending_keys = k.detach()
    elif cfg.global_loss == "supervised":
        lab = torch.cat([maps[0][1], maps[1][1]], 0)
        l_glob = _nets.seg_loss(out["logits"], lab, "dice_ce")["loss"]
    else:
        l_glob = l_loc.new_zeros(())
    loss = l_glob + cfg.lambda_loc * l_loc
    return {"loss": loss, "global": l_glob.detach(), "lrc": l_loc.detach()}
