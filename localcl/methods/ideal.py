"""IDEAL: dense contrastive encoder pre-training + two-stream bidirectional-consistency fine-tuning.

Basak, Chattopadhyay, Kundu, Nag, Mallipeddi, *IDEAL: Improved DEnse locAL Contrastive Learning
for Semi-Supervised Medical Image Segmentation*, ICASSP 2023, arXiv 2210.15075 (notebooks of
``hritam-98/IDEAL-ICASSP23`` not retrievable). Structure [P]; equations and settings [R] in the
DenseCL form (Wang et al., CVPR 2021). Spec ``methods.md`` §3.

Pre-training (:class:`IDEAL`, ``pretrain_batch = "slices"``): two views ``x_q, x_k`` of every
slice (:func:`localcl.augment.random_geometric` crop/flip/rotation/scale, then brightness/contrast),
query branch ``r = G_Q(E_Q(x_q))`` at encoder level ``feature_level`` (default: the bottleneck),
key branch ``t = G_K(E_K(x_k))`` = EMA copies (momentum 0.999, no gradient), and

.. math::

    \\mathcal L_{dense} = \\frac{1}{|V|}\\sum_{(b,s)} -\\log
        \\frac{e^{r_s\\cdot t_{s^+}/\\tau}}{e^{r_s\\cdot t_{s^+}/\\tau} + \\sum_{k\\in Q} e^{r_s\\cdot k/\\tau}}

(:func:`localcl.losses.ideal.ideal_dense_loss`), ``s⁺`` = argmax backbone similarity (default) or
the tracked geometric correspondence (``match="geometric"``), ``Q`` = queue of pooled keys
(16,384), optional global term ``(1−λ)`` with λ = 1 by default. ``G`` = 1×1 conv (C, BN, ReLU) →
1×1 conv (128) (``head_layers=1``: a single 1×1 conv). :meth:`IDEAL.on_after_step` does the EMA
update and pushes this step's pooled keys. :meth:`IDEAL.backbone_state` = the encoder only
(decoders are random at fine-tuning, §3.7).

Fine-tuning (:class:`IDEALFinetune`): shared encoder ``E``, decoder 1 with transposed-conv
upsampling and decoder 2 with bilinear upsampling + conv (two architectures, [R]), each with a
segmentation head:

.. math::

    \\mathcal L = \\sum_{k=1,2} (\\mathrm{CE} + \\mathrm{Dice})(p_k^L, y) +
        \\lambda_c(t)\\,[\\mathrm{CE}(p_1, \\mathrm{sg}(\\arg\\max p_2)) + \\mathrm{CE}(p_2, \\mathrm{sg}(\\arg\\max p_1))]

over labelled + unlabelled slices, ``λ_c(t) = λ_max exp(−5(1 − t/t_r)²)`` for ``t < t_r =
ramp_fraction · total_steps``. Inference: mean of the two streams' softmax (or stream 1).
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from pydantic import model_validator
from torch import Tensor, nn

from localcl.augment import Warp, correspondence, intensity_view, random_geometric, warp_image
from localcl.losses.ideal import IDEALDenseLoss, bidirectional_consistency, consistency_weight, grid_match_from_coords
from localcl.methods import _nets
from localcl.methods._moco import ema_update, make_key_copy
from localcl.methods.base import (
    BaseMethodConfig,
    Count,
    FinetuneStrategy,
    NonNegative,
    PretrainMethod,
    Temperature,
    UnitInterval,
    check_batch,
)
from localcl.methods.supervised import augment_labelled
from localcl.models.heads import DenseHead
from localcl.models.unet import SegHead, UNetDecoder

__all__ = ["IDEAL", "IDEALConfig", "IDEALFinetune", "IDEALFinetuneConfig", "ideal_finetune_step", "ideal_pretrain_step"]


class IDEALConfig(BaseMethodConfig):
    """IDEAL pre-training settings (spec §3.6; all [R]).

    Attributes:
        tau: 0.2 (DenseCL). lam: dense weight λ (1.0: dense only; < 1 adds the global term).
        momentum: EMA momentum of the key branch (0.999). queue_size: 16,384. proj_dim: 128.
        head_layers: 2 (1×1 conv stack, default) or 1 (single 1×1 conv).
        feature_level: encoder level of the dense grid, 1..L (None = bottleneck).
        match: "argmax" (DenseCL backbone similarity) or "geometric" (tracked transforms).
        negatives: "queue" (default) or "batch" (other images' dense keys).
        crop_area, rotation_deg, scale, flip_p: view geometry (random_geometric).
        batch_size: slices per step (32; read by ``ray_jobs``). optimizer lr: 1e-3 (Adam).
    """

    tau: Temperature = 0.2
    lam: UnitInterval = 1.0
    momentum: UnitInterval = 0.999
    queue_size: Count = 16384
    proj_dim: Count = 128
    head_layers: Literal[1, 2] = 2
    feature_level: int | None = None
    match: Literal["argmax", "geometric"] = "argmax"
    negatives: Literal["queue", "batch"] = "queue"
    crop_area: tuple[float, float] = (0.4, 1.0)
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: UnitInterval = 0.5
    batch_size: Count = 32

    @model_validator(mode="after")
    def _level(self) -> "IDEALConfig":
        if self.feature_level is not None and not 1 <= self.feature_level <= len(self.widths):
            raise ValueError(f"feature_level must be in [1, {len(self.widths)}] or None, got {self.feature_level}")
        return self


class IDEAL(PretrainMethod):
    """IDEAL dense pre-training of the encoder (module docstring). Returns ``{"loss", "dense"}``."""

    name = "ideal"
    Config = IDEALConfig
    pretrain_batch = "slices"
    default_finetune = "ideal"

    def __init__(self, cfg: IDEALConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)
        self.level = cfg.feature_level or len(cfg.widths)
        c = cfg.widths[self.level - 1]
        self.head = DenseHead(c, out_dim=cfg.proj_dim, hidden_dim=c, layers=cfg.head_layers, norm=cfg.norm)
        self.key_encoder = make_key_copy(self.unet.encoder)
        self.key_head = make_key_copy(self.head)
        self.loss_fn = IDEALDenseLoss(tau=cfg.tau, lam=cfg.lam, match=cfg.match, negatives=cfg.negatives,
                                      queue_size=cfg.queue_size, dim=cfg.proj_dim)
        self._pending_keys: Tensor | None = None

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        self._stage(stage)
        return [*self.unet.encoder.parameters(), *self.head.parameters()]

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)
        return ideal_pretrain_step(self, batch)

    def on_after_step(self) -> None:
        ema_update(self.key_encoder, self.unet.encoder, self.cfg.momentum)
        ema_update(self.key_head, self.head, self.cfg.momentum)
        if self._pending_keys is not None:
            self.loss_fn.enqueue(self._pending_keys)
            self._pending_keys = None

    def backbone_state(self) -> dict[str, Tensor]:
        """Encoder only (``encoder.*``): IDEAL pre-trains ``E``; decoders start random."""
        return {k: v for k, v in _nets.unet_backbone_state(self.unet).items() if k.startswith("encoder.")}


def _views(model: IDEAL, x: Tensor) -> tuple[Tensor, Tensor, Warp, Warp]:
    cfg, gen = model.cfg, model.generator
    size = (x.shape[-2], x.shape[-1])
    wq = random_geometric(x.shape[0], size, gen, cfg.crop_area, cfg.flip_p, cfg.rotation_deg, cfg.scale)
    wk = random_geometric(x.shape[0], size, gen, cfg.crop_area, cfg.flip_p, cfg.rotation_deg, cfg.scale)
    return intensity_view(warp_image(x, wq), gen), intensity_view(warp_image(x, wk), gen), wq, wk


def ideal_pretrain_step(model: IDEAL, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One IDEAL dense step (module docstring): views, query/key branches, dense InfoNCE."""
    check_batch(batch, ("image",), "ideal")
    x = batch["image"]
    if x.dim() != 4:
        raise ValueError(f"ideal: image must be (B, C, H, W), got {tuple(x.shape)}")
    xq, xk, wq, wk = _views(model, x)
    bq = model.unet.encoder(xq, num_levels=model.level)[-1]
    r = model.head(bq)
    with torch.no_grad():
        model.key_encoder.train(model.training)
        model.key_head.train(model.training)
        bk = model.key_encoder(xk, num_levels=model.level)[-1]
        t = model.key_head(bk)
    index = None
    if model.cfg.match == "geometric":
        hw = (r.shape[-2], r.shape[-1])
        coords, valid = correspondence(Warp(wq.theta, hw), Warp(wk.theta, hw))
        index = grid_match_from_coords(coords.to(r.device), valid.to(r.device), hw)
    loss = model.loss_fn(r, t, bq=bq.detach(), bk=bk, index=index)
    model._pending_keys = t.detach()
    return {"loss": loss, "dense": loss.detach()}


class IDEALFinetuneConfig(BaseMethodConfig):
    """IDEAL two-stream fine-tuning settings (spec §3.4/§3.6; [R]).

    Attributes:
        lambda_max: cross-supervision weight λ_max (0.5; search {0.1, 0.5, 1.0}).
        ramp_fraction: ramp length as a fraction of ``total_steps`` (0.3; spec 20–40 %).
        pl_dice: add soft Dice to the pseudo-label terms (False: CE only).
        sup_loss: supervised term per stream, "dice_ce" (default) or "dice".
        include_background: Dice over all classes (True).
        upsample_1, upsample_2: decoder types ("transposed", "bilinear").
        inference: "mean" (average of the two streams) or "stream1".
        augment, elastic, elastic_sigma_px: augmentation of labelled slices (GLCL family).
        batch_size: slices per step, half labelled (24).
    """

    lambda_max: NonNegative = 0.5
    ramp_fraction: UnitInterval = 0.3
    pl_dice: bool = False
    sup_loss: Literal["dice_ce", "dice"] = "dice_ce"
    include_background: bool = True
    upsample_1: Literal["nearest", "bilinear", "transposed"] = "transposed"
    upsample_2: Literal["nearest", "bilinear", "transposed"] = "bilinear"
    inference: Literal["mean", "stream1"] = "mean"
    augment: Literal["glcl", "none"] = "glcl"
    elastic: bool = True
    elastic_sigma_px: float = 5.0
    batch_size: int = 24

    @model_validator(mode="after")
    def _different(self) -> "IDEALFinetuneConfig":
        if self.upsample_1 == self.upsample_2:
            raise ValueError(f"upsample_1 and upsample_2 must differ (two decoder architectures), "
                             f"both are {self.upsample_1!r}")
        return self


class IDEALFinetune(FinetuneStrategy):
    """Two-stream model: ``self.unet`` (encoder + decoder 1 + head 1), ``decoder2`` + ``seg_head2``.

    ``finetune_step`` returns ``{"loss", "sup", "pl", "lambda_c"}``; ``predict`` (B,K,H,W) probs.
    """

    name = "ideal"
    Config = IDEALFinetuneConfig

    def __init__(self, cfg: IDEALFinetuneConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes, upsample=cfg.upsample_1)
        self.decoder2 = UNetDecoder(tuple(cfg.widths), tuple(cfg.decoder_widths), cfg.norm, cfg.upsample_2)
        self.seg_head2 = SegHead(cfg.decoder_widths[-1], num_classes, norm=cfg.norm)

    def load_backbone(self, state: Mapping[str, Tensor], strict: bool = False) -> tuple[list[str], list[str]]:
        """Load ``encoder.*`` into the shared encoder; decoders stay random (spec §3.7 step 2).
        ``decoder.*`` entries are returned as unexpected."""
        enc = {k: v for k, v in state.items() if k.startswith("encoder.")}
        missing, unexpected = _nets.load_unet(self.unet, enc, strict=False)
        missing = [k for k in missing if k.startswith("encoder.")]
        unexpected = sorted(set(unexpected) | {k for k in state if not k.startswith("encoder.")})
        if strict and (missing or unexpected):
            raise ValueError(f"backbone state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected

    def backbone_state(self) -> dict[str, Tensor]:
        return _nets.unet_backbone_state(self.unet)

    def stream_logits(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of both streams, each (B, K, H, W), from one shared encoder pass."""
        feats = self.unet.encoder(image)
        l1 = self.unet.seg_head(self.unet.decoder(feats)[-1])
        l2 = self.seg_head2(self.decoder2(feats)[-1])
        return l1, l2

    def finetune_step(
        self, batch_l: Mapping[str, Tensor], batch_u: Mapping[str, Tensor] | None = None, step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        return ideal_finetune_step(self, batch_l, batch_u, step, total_steps)

    def predict(self, image: Tensor) -> Tensor:
        l1, l2 = self.stream_logits(image)
        if self.cfg.inference == "stream1":
            return torch.softmax(l1, 1)
        return 0.5 * (torch.softmax(l1, 1) + torch.softmax(l2, 1))


def ideal_finetune_step(
    model: IDEALFinetune, batch_l: Mapping[str, Tensor], batch_u: Mapping[str, Tensor] | None, step: int,
    total_steps: int,
) -> dict[str, Tensor]:
    """Supervised loss of both streams on labelled slices + ramped bidirectional consistency on all."""
    cfg = model.cfg
    check_batch(batch_l, ("image", "label"), "ideal fine-tuning")
    if total_steps < 1 or step < 0:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    xl, yl = augment_labelled(batch_l["image"], batch_l["label"].long(), model.generator, cfg.augment,
                              cfg.elastic, cfg.elastic_sigma_px)
    x = xl
    if batch_u is not None:
        check_batch(batch_u, ("image",), "ideal fine-tuning (unlabelled batch)")
        x = torch.cat([xl, batch_u["image"]], 0)
    l1, l2 = model.stream_logits(x)
    n = xl.shape[0]
    s1 = _nets.seg_loss(l1[:n], yl, cfg.sup_loss, cfg.include_background)["loss"]
    s2 = _nets.seg_loss(l2[:n], yl, cfg.sup_loss, cfg.include_background)["loss"]
    pl = bidirectional_consistency(l1, l2, dice=cfg.pl_dice)
    lam = consistency_weight(step, cfg.ramp_fraction * total_steps, cfg.lambda_max)
    sup = s1 + s2
    return {"loss": sup + lam * pl, "sup": sup.detach(), "pl": pl.detach(),
            "lambda_c": torch.tensor(lam, device=sup.device)}
