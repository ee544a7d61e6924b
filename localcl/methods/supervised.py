"""Supervised baseline: no pre-training, and the plain supervised fine-tuning strategy.

``METHODS["supervised"]`` (:class:`Supervised`) has no pre-training stage (``pretrain_batch is
None``): its :meth:`backbone_state` is the randomly initialised U-Net, i.e. the
random-initialisation baseline of every table in the specification.

``FINETUNE["supervised"]`` (:class:`SupervisedFinetune`) trains U-Net + segmentation head on
labelled slices (spec §1.7 stage 3, GLCL/PLCL; §4.6 MixCL; §5.6 LRC):

.. math::

    \\mathcal L = \\mathcal L_{Dice}(p, y) \\quad (\\texttt{loss="dice"}, GLCL/PLCL [C]) \\qquad
    \\mathcal L = \\mathcal L_{Dice}(p, y) + \\mathcal L_{CE}(p, y) \\quad (\\texttt{loss="dice_ce"})

with softmax ``p`` and the soft Dice over all classes including background by default
(``1 - mean_{images, k} 2 Σ p_k y_k / (Σ p_k + Σ y_k + eps)``, spec §0). Pixels labelled -1
(unknown) are ignored by both terms. Augmentation: the GLCL fine-tuning family
(:func:`localcl.augment.glcl_finetune_augment`), or none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor

from localcl.augment import glcl_finetune_augment
from localcl.methods import _nets
from localcl.methods.base import BaseMethodConfig, FinetuneStrategy, PretrainMethod, check_batch

__all__ = ["Supervised", "SupervisedConfig", "SupervisedFinetune", "SupervisedFinetuneConfig", "supervised_step"]


class SupervisedConfig(BaseMethodConfig):
    """Config of the random-initialisation baseline (only the backbone shape)."""


class Supervised(PretrainMethod):
    """Random-initialisation baseline: a U-Net and nothing to pre-train."""

    name = "supervised"
    Config = SupervisedConfig
    cfg: SupervisedConfig
    pretrain_batch = None
    stages: ClassVar[tuple[str, ...]] = ()
    default_finetune = "supervised"

    def __init__(self, cfg: SupervisedConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)

    def backbone_state(self) -> dict[str, Tensor]:
        return _nets.unet_backbone_state(self.unet)

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)  # raises: no pre-training stage
        raise AssertionError("unreachable")


class SupervisedFinetuneConfig(BaseMethodConfig):
    """Config of :class:`SupervisedFinetune`.

    Attributes:
        loss: "dice" (soft Dice; GLCL/PLCL default [C]) or "dice_ce" (Dice + cross-entropy;
            MixCL/LRC/IDEAL supervised term [R]).
        include_background: Dice over classes 0..K-1 (True, [C]) or 1..K-1.
        augment: "glcl" (spec §1.7 family) or "none".
        elastic: apply the elastic warp of the GLCL family (True).
        elastic_sigma_px: std of the 3x3 control displacements in pixels (5).
        batch_size: labelled slices per step (20, [C]); read by ``ray_jobs``.
        iterations: fine-tuning iterations (10,001 GLCL, 5,001 PLCL baseline; [C]).
        val_every: validation period in iterations (50, [C]).
    """

    loss: Literal["dice", "dice_ce"] = "dice"
    include_background: bool = True
    augment: Literal["glcl", "none"] = "glcl"
    elastic: bool = True
    elastic_sigma_px: float = 5.0
    batch_size: int = 20
    iterations: int = 10001
    val_every: int = 50


def augment_labelled(
    image: Tensor, label: Tensor, gen: torch.Generator, augment: str, elastic: bool, sigma: float
) -> tuple[Tensor, Tensor]:
    """GLCL fine-tuning augmentation of a labelled batch (labels outside the image -> 0)."""
    if augment == "none":
        return image, label
    # unknown pixels (-1) must stay unknown: warp (label + 1) with fill 1 -> background
    img, lbl, _ = glcl_finetune_augment(image, label + 1, gen, elastic=elastic, sigma_px=sigma, label_fill=1)
    assert lbl is not None  # a label map went in
    return img, lbl - 1


def supervised_step(model: SupervisedFinetune, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One supervised step: augment, forward, Dice (+ CE). Returns ``{"loss", "dice", ["ce"]}``."""
    check_batch(batch, ("image", "label"), "supervised")
    cfg = model.cfg
    img, lbl = augment_labelled(
        batch["image"], batch["label"].long(), model.generator, cfg.augment, cfg.elastic, cfg.elastic_sigma_px
    )
    logits = model.logits(img)
    return _nets.seg_loss(logits, lbl, cfg.loss, cfg.include_background)


class SupervisedFinetune(FinetuneStrategy):
    """U-Net + segmentation head trained on labelled slices (formula in the module docstring).

    Shapes: ``finetune_step({"image": (B,1,H,W), "label": (B,H,W) int, -1 = unknown}, None, step,
    total_steps)``; ``predict((B,1,H,W)) -> (B,K,H,W)`` softmax probabilities.
    """

    name = "supervised"
    Config = SupervisedFinetuneConfig
    cfg: SupervisedFinetuneConfig

    def __init__(self, cfg: SupervisedFinetuneConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)  # includes the seg head

    def load_backbone(self, state: Mapping[str, Tensor], strict: bool = False) -> tuple[list[str], list[str]]:
        return _nets.load_unet(self.unet, state, strict)

    def backbone_state(self) -> dict[str, Tensor]:
        return _nets.unet_backbone_state(self.unet)

    def logits(self, image: Tensor) -> Tensor:
        logits: Tensor = self.unet(image)["logits"]
        return logits

    def finetune_step(
        self,
        batch_l: Mapping[str, Tensor],
        batch_u: Mapping[str, Tensor] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        return supervised_step(self, batch_l)

    def predict(self, image: Tensor) -> Tensor:
        return torch.softmax(self.logits(image), dim=1)
