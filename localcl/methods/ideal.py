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

from collections.abc import Mapping
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from localcl.augment import Warp, correspondence, glcl_finetune_augment, intensity_view, random_geometric, warp_image
from localcl.losses.ideal import IDEALDenseLoss, bidirectional_consistency, consistency_weight, grid_match_from_coords
from localcl.methods import _nets
from localcl.methods._moco import ema_update, grouped_forward, make_key_copy, momentum_at
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

__all__ = [
    "IDEAL",
    "IDEALConfig",
    "IDEALFinetune",
    "IDEALFinetuneConfig",
    "combine_streams",
    "cutmix_box",
    "ideal_finetune_step",
    "ideal_pretrain_step",
]


class IDEALConfig(BaseMethodConfig):
    """IDEAL pre-training settings (spec §3.6; all [R]).

    Attributes:
        tau: 0.2 (DenseCL). lam: dense weight λ (1.0: dense only; < 1 adds the global term).
        momentum: EMA momentum of the key branch (0.999). queue_size: 16,384. proj_dim: 128.
        momentum_schedule: "constant" (spec) or "cosine": ``m`` rises from ``momentum`` to 1
            over the stage (BYOL / MoCo v3), so short runs still move the key branch early.
        shuffle_bn_groups: 1 (spec: off) or G > 1: shuffle-BN on one worker, queries and keys
            normalised in G sub-batches, the keys' drawn from a random permutation
            (:func:`localcl.methods._moco.grouped_forward`), so BatchNorm statistics cannot
            mark a positive key as coming from the current batch rather than the queue.
        head_layers: 2 (1×1 conv stack, default) or 1 (single 1×1 conv).
        feature_level: encoder level of the dense grid, 1..L (None = bottleneck).
        match: "argmax" (DenseCL backbone similarity) or "geometric" (tracked transforms).
        negatives: "queue" (default), "batch" (other images' dense keys) or "dense" (every key
            cell of the batch but the positive, the same image's other cells included).
        crop_area, rotation_deg, scale, flip_p: view geometry (random_geometric).
        batch_size: slices per step (32; read by ``ray_jobs``). optimizer lr: 1e-3 (Adam).
    """

    tau: Temperature = 0.2
    lam: UnitInterval = 1.0
    momentum: UnitInterval = 0.999
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    shuffle_bn_groups: Count = 1
    queue_size: Count = 16384
    proj_dim: Count = 128
    head_layers: Literal[1, 2] = 2
    feature_level: int | None = None
    match: Literal["argmax", "geometric"] = "argmax"
    negatives: Literal["queue", "batch", "dense"] = "queue"
    crop_area: tuple[float, float] = (0.4, 1.0)
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: UnitInterval = 0.5
    batch_size: Count = 32

    @model_validator(mode="after")
    def _level(self) -> IDEALConfig:
        if self.feature_level is not None and not 1 <= self.feature_level <= len(self.widths):
            raise ValueError(f"feature_level must be in [1, {len(self.widths)}] or None, got {self.feature_level}")
        return self


class IDEAL(PretrainMethod):
    """IDEAL dense pre-training of the encoder (module docstring). Returns ``{"loss", "dense"}``."""

    name = "ideal"
    Config = IDEALConfig
    cfg: IDEALConfig
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
        self.loss_fn = IDEALDenseLoss(
            tau=cfg.tau,
            lam=cfg.lam,
            match=cfg.match,
            negatives=cfg.negatives,
            queue_size=cfg.queue_size,
            dim=cfg.proj_dim,
        )
        self._pending_keys: Tensor | None = None
        self._step = 0

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        self._stage(stage)
        return [*self.unet.encoder.parameters(), *self.head.parameters()]

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)
        self._step = int(step)
        return ideal_pretrain_step(self, batch)

    def key_momentum(self) -> float:
        """Momentum of the EMA update after the current step (``momentum_schedule``)."""
        return momentum_at(self._step, self.total_steps, self.cfg.momentum, self.cfg.momentum_schedule)

    def on_after_step(self) -> None:
        m = self.key_momentum()
        ema_update(self.key_encoder, self.unet.encoder, m)
        ema_update(self.key_head, self.head, m)
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
    groups = model.cfg.shuffle_bn_groups
    bq = grouped_forward(lambda v: model.unet.encoder(v, num_levels=model.level)[-1], xq, groups)
    r = grouped_forward(model.head, bq, groups)
    with torch.no_grad():
        model.key_encoder.train(model.training)
        model.key_head.train(model.training)

        def key_branch(v: Tensor) -> Tensor:
            b = model.key_encoder(v, num_levels=model.level)[-1]
            return torch.cat([b, model.key_head(b)], 1)

        bt = grouped_forward(key_branch, xk, groups, model.generator if groups > 1 else None)
        bk, t = bt[:, : bq.shape[1]], bt[:, bq.shape[1] :]
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
        inference: how the two streams make one prediction: "mean" (spec: mean of the two
            softmaxes), "logits" (softmax of the mean logits), "stream1" or "stream2" (one stream).
        augment, elastic, elastic_sigma_px: augmentation of labelled slices (GLCL family).
        unlabelled_augment: "none" (spec) or "glcl": the unlabelled slices get the labelled
            slices' augmentation family too (the same augmented input goes to both streams).
        cutmix: False (spec) or True: cross pseudo supervision with CutMix (French et al. 2020,
            CPS): pairs of unlabelled slices are mixed by a random box; each stream is trained on
            the mixed slice against the other stream's pseudo-label of the two unmixed slices,
            mixed by the same box (one extra no-gradient forward of the unlabelled batch).
        pl_threshold: pseudo-label confidence threshold in [0, 1): pixels whose target
            stream's max softmax probability is below it are left out of the consistency term
            (0: every pixel, spec).
        batch_size: slices per step, half labelled (24).
    """

    lambda_max: NonNegative = 0.5
    ramp_fraction: UnitInterval = 0.3
    pl_dice: bool = False
    sup_loss: Literal["dice_ce", "dice"] = "dice_ce"
    include_background: bool = True
    upsample_1: Literal["nearest", "bilinear", "transposed"] = "transposed"
    upsample_2: Literal["nearest", "bilinear", "transposed"] = "bilinear"
    inference: Literal["mean", "logits", "stream1", "stream2"] = "mean"
    augment: Literal["glcl", "none"] = "glcl"
    unlabelled_augment: Literal["glcl", "none"] = "none"
    cutmix: bool = False
    pl_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0
    elastic: bool = True
    elastic_sigma_px: float = 5.0
    batch_size: int = 24

    @model_validator(mode="after")
    def _pl_dice_spec_path(self) -> IDEALFinetuneConfig:
        if self.pl_dice and (self.cutmix or self.pl_threshold > 0):
            raise ValueError("pl_dice works with the spec's consistency only (cutmix: false, pl_threshold: 0)")
        return self

    @model_validator(mode="after")
    def _different(self) -> IDEALFinetuneConfig:
        if self.upsample_1 == self.upsample_2:
            raise ValueError(
                f"upsample_1 and upsample_2 must differ (two decoder architectures), both are {self.upsample_1!r}"
            )
        return self


class IDEALFinetune(FinetuneStrategy):
    """Two-stream model: ``self.unet`` (encoder + decoder 1 + head 1), ``decoder2`` + ``seg_head2``.

    ``finetune_step`` returns ``{"loss", "sup", "pl", "lambda_c"}``; ``predict`` (B,K,H,W) probs.
    """

    name = "ideal"
    Config = IDEALFinetuneConfig
    cfg: IDEALFinetuneConfig

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
        self,
        batch_l: Mapping[str, Tensor],
        batch_u: Mapping[str, Tensor] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        return ideal_finetune_step(self, batch_l, batch_u, step, total_steps)

    def predict(self, image: Tensor) -> Tensor:
        return combine_streams(*self.stream_logits(image), self.cfg.inference)

    streams = ("stream1", "stream2")

    def predict_stream(self, image: Tensor, name: str) -> Tensor:
        """Softmax of one decoder stream alone (``stream1``: the U-Net's, ``stream2``: the second)."""
        if name not in self.streams:
            return super().predict_stream(image, name)
        return combine_streams(*self.stream_logits(image), name)


def combine_streams(l1: Tensor, l2: Tensor, inference: str) -> Tensor:
    """Class probabilities (B, K, H, W) of the two streams' logits ``l1, l2`` (B, K, H, W):
    "mean" ``(softmax(l1) + softmax(l2)) / 2``, "logits" ``softmax((l1 + l2) / 2)``, "stream1"
    ``softmax(l1)``, "stream2" ``softmax(l2)``."""
    if inference == "stream1":
        return torch.softmax(l1, 1)
    if inference == "stream2":
        return torch.softmax(l2, 1)
    if inference == "logits":
        return torch.softmax(0.5 * (l1 + l2), 1)
    if inference == "mean":
        return 0.5 * (torch.softmax(l1, 1) + torch.softmax(l2, 1))
    raise ValueError(f"inference must be 'mean', 'logits', 'stream1' or 'stream2', got {inference!r}")


def _hard_targets(logits: Tensor, threshold: float) -> Tensor:
    """argmax pseudo-labels (B, H, W) of ``logits`` (B, K, H, W); -1 where max prob < threshold."""
    with torch.no_grad():
        conf, y = logits.float().softmax(1).max(1)
        return y.masked_fill(conf < threshold, -1) if threshold > 0 else y


def _pseudo_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean CE over pixels with ``target >= 0`` (0 with a zero gradient when there are none);
    no host sync: the count stays on the device."""
    total = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
    return total / (target >= 0).sum().clamp_min(1)


def cutmix_box(
    batch: int, size: tuple[int, int], gen: torch.Generator, area: tuple[float, float] = (0.25, 0.5)
) -> Tensor:
    """CutMix masks (B, H, W) bool: one axis-aligned box per image of area fraction ``U(area)``
    and the image's aspect ratio, placed uniformly (CPS's box mask)."""
    h, w = size
    frac = torch.empty(batch, dtype=torch.float64).uniform_(area[0], area[1], generator=gen)
    bh = (frac.sqrt() * h).round().long().clamp(1, h)
    bw = (frac.sqrt() * w).round().long().clamp(1, w)
    y0 = (torch.rand(batch, generator=gen, dtype=torch.float64) * (h - bh + 1)).long()
    x0 = (torch.rand(batch, generator=gen, dtype=torch.float64) * (w - bw + 1)).long()
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    return (
        (ys >= y0[:, None, None])
        & (ys < (y0 + bh)[:, None, None])
        & (xs >= x0[:, None, None])
        & (xs < (x0 + bw)[:, None, None])
    )


def ideal_finetune_step(
    model: IDEALFinetune,
    batch_l: Mapping[str, Tensor],
    batch_u: Mapping[str, Tensor] | None,
    step: int,
    total_steps: int,
) -> dict[str, Tensor]:
    """Supervised loss of both streams on labelled slices + ramped bidirectional consistency on all."""
    cfg = model.cfg
    check_batch(batch_l, ("image", "label"), "ideal fine-tuning")
    if total_steps < 1 or step < 0:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    xl, yl = augment_labelled(
        batch_l["image"], batch_l["label"].long(), model.generator, cfg.augment, cfg.elastic, cfg.elastic_sigma_px
    )
    x = xl
    mixed: tuple[Tensor, Tensor] | None = None
    if batch_u is not None:
        check_batch(batch_u, ("image",), "ideal fine-tuning (unlabelled batch)")
        xu = batch_u["image"]
        if cfg.unlabelled_augment == "glcl":
            xu = glcl_finetune_augment(xu, None, model.generator, elastic=cfg.elastic, sigma_px=cfg.elastic_sigma_px)[0]
        if cfg.cutmix:
            # pseudo-labels of the unmixed slices (no gradient), then mix slices and targets alike
            with torch.no_grad():
                u1, u2 = model.stream_logits(xu)
            t1, t2 = _hard_targets(u1, cfg.pl_threshold), _hard_targets(u2, cfg.pl_threshold)
            box = cutmix_box(xu.shape[0], (xu.shape[-2], xu.shape[-1]), model.generator).to(xu.device)
            perm = torch.roll(torch.arange(xu.shape[0], device=xu.device), 1)
            xu = torch.where(box[:, None], xu[perm], xu)
            mixed = (torch.where(box, t1[perm], t1), torch.where(box, t2[perm], t2))
        x = torch.cat([xl, xu], 0)
    l1, l2 = model.stream_logits(x)
    n = xl.shape[0]
    s1 = _nets.seg_loss(l1[:n], yl, cfg.sup_loss, cfg.include_background)["loss"]
    s2 = _nets.seg_loss(l2[:n], yl, cfg.sup_loss, cfg.include_background)["loss"]
    if mixed is not None:  # CPS + CutMix: labelled slices cross-supervised directly, mixed ones by mixed targets
        tl1, tl2 = _hard_targets(l1[:n], cfg.pl_threshold), _hard_targets(l2[:n], cfg.pl_threshold)
        t1 = torch.cat([tl1, mixed[0]], 0)
        t2 = torch.cat([tl2, mixed[1]], 0)
        pl = _pseudo_ce(l1, t2) + _pseudo_ce(l2, t1)
    elif cfg.pl_threshold > 0:
        pl = _pseudo_ce(l1, _hard_targets(l2, cfg.pl_threshold)) + _pseudo_ce(l2, _hard_targets(l1, cfg.pl_threshold))
    else:
        pl = bidirectional_consistency(l1, l2, dice=cfg.pl_dice)
    lam = consistency_weight(step, cfg.ramp_fraction * total_steps, cfg.lambda_max)
    sup = s1 + s2
    return {
        "loss": sup + lam * pl,
        "sup": sup.detach(),
        "pl": pl.detach(),
        "lambda_c": torch.tensor(lam, device=sup.device),
    }
