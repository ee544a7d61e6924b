"""GLCL: global (domain-aware) + local contrastive pre-training of a 2D U-Net.

Chaitanya, Erdil, Karani, Konukoglu, *Contrastive learning of global and local features for
medical image segmentation with limited annotations*, NeurIPS 2020, arXiv 2006.10511; TF1 code
``krishnabits001/domain_specific_cl``. Spec ``methods.md`` §1 (all [C]).

Two pre-training stages, run in order (``stages = ("global", "local")``):

1. ``"global"`` — encoder ``e`` + ``g1`` (flatten → 1024 → 128) trained with G^D (default), G^{D−}
   or G^R (:func:`localcl.losses.glcl_global.glcl_global_loss`) on a partition batch of
   ``N = m·S`` slices ``x_i^s`` (keys ``image`` (N,1,H,W), ``volume`` (N,), ``partition`` (N,)):

   - G^D: embeddings of ``{x_i^s}`` (role 0, un-augmented) and ``{t(x_i^s)}`` (role 1);
   - G^{D−}: ``{x_i^s, t1(x_i^s), t2(x_i^s)}`` (roles 0, 1, 2);
   - G^R: ``{t1(x), t2(x)}`` (roles 1, 2),

   with ``t`` = :func:`localcl.augment.glcl_global_view` (100/192 crop, offset U[10, 70),
   bilinear resize, brightness/contrast, clip [0, 1.5]). Volumes are paired (v0, v1), (v2, v3), ...
   in order of appearance (clean batches, pitfall §1.10.1).
2. ``"local"`` — ``e`` frozen **and in eval mode** (pitfall §1.10.2; ``local_encoder="frozen"``,
   the spec) or trained with the local loss too (``local_encoder="trained"``, an option), decoder blocks
   ``d_1..d_l`` + ``g2`` (1×1 conv C_l, BN, ReLU → 1×1 conv C_l) + the shared 3×3-region linear
   map (9·C_l → 128) trained with L^R (default) or L^D
   (:class:`localcl.losses.glcl_local.GLCLLocalLoss`) on two intensity-only views
   (:func:`localcl.augment.intensity_view`) of each slice.

Both stages consume ``"partition"`` batches (L^D needs the partition structure; L^R only uses
``image``). :meth:`GLCL.backbone_state` returns ``e`` and ``d_1..d_l`` only: the remaining decoder
blocks and the segmentation head are freshly initialised for fine-tuning (§1.7 stage 3), which
uses ``FINETUNE["supervised"]`` with soft Dice including background.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import model_validator
from torch import Tensor, nn

from localcl.augment import glcl_global_view, intensity_view
from localcl.losses.glcl_global import glcl_global_loss
from localcl.losses.glcl_local import GLCLLocalLoss
from localcl.methods import _nets
from localcl.methods.base import BaseMethodConfig, Count, PretrainMethod, Temperature, check_batch
from localcl.models.heads import DenseHead, GlobalHead

__all__ = ["GLCL", "GLCLConfig", "glcl_global_step", "glcl_local_step"]


class GLCLConfig(BaseMethodConfig):
    """GLCL settings (spec §1.6; every default [C]).

    Attributes:
        input_size: side of the square training slices (192 for ACDC); fixes g1's input
            ``C_L · (input_size / 2^(L-1))^2`` (4608 for 192 and the reference widths).
        global_loss: "D" (G^D, default), "D-" (G^{D−}) or "R" (G^R).
        local_loss: "R" (L^R, default, the published script) or "D" (L^D).
        tau_global, tau_local: temperatures (0.1).
        partitions: S, partitions per volume (4); read by the sampler in ``ray_jobs``.
        volumes_per_batch: m volumes per global batch (12: 48 = 4 × 12 slots in the reference).
        global_hidden, global_dim: g1 widths (1024, 128).
        local_depth: l, decoder blocks used by the local loss (3 → stride 4).
        region_size: 3 (3×3 regions, default) or 1.
        negatives: "code" (the reference's 5 neighbours, default), "nearest" or "all" (all
            other anchors, the paper's wording; option).
        local_dim: output of the shared region map (128).
        local_batch: slices per local-stage step (12); read by ``ray_jobs``.
        iterations_global, iterations_local: 10,001 each.
        gather_distributed: G^R/G^D negatives from all workers (positives stay local).
        local_encoder: "frozen" (the spec: stage 2 trains ``d_1..d_l``, ``g2`` and the region map
            on a frozen, eval-mode encoder) or "trained" (option: the encoder is trained by the
            local loss too, in train mode, so that stage 2 can restore the per-location
            information the global loss does not need).
    """

    input_size: Count = 192
    global_loss: Literal["D", "D-", "R"] = "D"
    local_loss: Literal["R", "D"] = "R"
    tau_global: Temperature = 0.1
    tau_local: Temperature = 0.1
    partitions: Count = 4
    volumes_per_batch: Count = 12
    global_hidden: Count = 1024
    global_dim: Count = 128
    local_depth: int = 3
    region_size: Literal[1, 3] = 3
    negatives: Literal["code", "nearest", "all"] = "code"
    local_dim: Count = 128
    local_batch: Count = 12
    iterations_global: Count = 10001
    iterations_local: Count = 10001
    gather_distributed: bool = False
    local_encoder: Literal["frozen", "trained"] = "frozen"

    @model_validator(mode="after")
    def _geometry(self) -> GLCLConfig:
        levels = len(self.widths)
        if not 1 <= self.local_depth <= levels - 1:
            raise ValueError(f"local_depth must be in [1, {levels - 1}] (decoder blocks), got {self.local_depth}")
        stride = 2 ** (levels - 1)
        if self.input_size % stride:
            raise ValueError(f"input_size must be divisible by 2^(len(widths)-1) = {stride}, got {self.input_size}")
        if self.global_loss == "D" and self.volumes_per_batch % 2:
            raise ValueError(
                f"volumes_per_batch must be even for global_loss 'D' (volumes are paired), got {self.volumes_per_batch}"
            )
        return self


class GLCL(PretrainMethod):
    """GLCL two-stage pre-training (see module docstring).

    ``pretrain_step(batch, step, stage="global"|"local")`` returns ``{"loss", "global"}`` or
    ``{"loss", "local"}``. Optimise :meth:`stage_parameters` of the current stage only.
    """

    name = "glcl"
    Config = GLCLConfig
    cfg: GLCLConfig
    pretrain_batch = "partition"
    stages = ("global", "local")
    default_finetune = "supervised"

    def __init__(self, cfg: GLCLConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)
        levels = len(cfg.widths)
        bott = cfg.input_size // 2 ** (levels - 1)
        self.g1 = GlobalHead(
            cfg.widths[-1], cfg.global_dim, cfg.global_hidden, pool="flatten", spatial_size=(bott, bott), bias=False
        )
        c_l = cfg.decoder_widths[cfg.local_depth - 1]
        self.g2 = DenseHead(c_l, out_dim=c_l, hidden_dim=c_l, layers=2, norm=cfg.norm, bias=False)
        map_side = cfg.input_size // 2 ** (levels - 1 - cfg.local_depth)
        self.local_loss = GLCLLocalLoss(
            (map_side, map_side),
            variant=cfg.local_loss,
            region_size=cfg.region_size,
            neighbours=cfg.negatives,
            in_features=c_l * cfg.region_size**2,
            out_features=cfg.local_dim,
            tau=cfg.tau_local,
        )

    # ---------------------------------------------------------------------------- stages
    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        stage = self._stage(stage)
        if stage == "global":
            mods: list[nn.Module] = [self.unet.encoder, self.g1]
        else:
            mods = [*self.unet.decoder.blocks[: self.cfg.local_depth], self.g2, self.local_loss]
            if self.cfg.local_encoder == "trained":
                mods.insert(0, self.unet.encoder)
        return [p for m in mods for p in m.parameters()]

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        stage = self._stage(stage)
        if stage == "global":
            return glcl_global_step(self, batch)
        return glcl_local_step(self, batch)

    def backbone_state(self) -> dict[str, Tensor]:
        """Encoder + decoder blocks ``d_1..d_l`` (the pre-trained part; spec §1.7 stage 3)."""
        return _nets.unet_backbone_state(self.unet, decoder_blocks=self.cfg.local_depth)


def glcl_global_step(model: GLCL, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Stage-1 step: views, ``z = g1(e(·))``, G^D / G^{D−} / G^R. Returns ``{"loss", "global"}``."""
    check_batch(batch, ("image", "volume", "partition"), "glcl global stage")
    cfg = model.cfg
    x = batch["image"]
    n = x.shape[0]
    if x.shape[-2:] != (cfg.input_size, cfg.input_size):
        raise ValueError(f"glcl: image size {tuple(x.shape[-2:])} != input_size {cfg.input_size}")
    vol, part = batch["volume"].long().view(-1), batch["partition"].long().view(-1)
    if vol.numel() != n or part.numel() != n:
        raise ValueError(f"glcl: volume/partition must have {n} entries (one per image)")
    gen = model.generator
    if cfg.global_loss == "D":
        views, roles = [x, glcl_global_view(x, gen)[0]], [0, 1]
    elif cfg.global_loss == "D-":
        views, roles = [x, glcl_global_view(x, gen)[0], glcl_global_view(x, gen)[0]], [0, 1, 2]
    else:
        views, roles = [glcl_global_view(x, gen)[0], glcl_global_view(x, gen)[0]], [1, 2]
    allx = torch.cat(views, 0)
    feats = model.unet(allx, taps=("bottleneck",), logits=False)["bottleneck"]
    z = model.g1(feats)
    k = len(views)
    role = torch.tensor(roles, device=x.device).repeat_interleave(n)
    loss = glcl_global_loss(
        z,
        vol.repeat(k),
        part.repeat(k),
        role,
        variant=cfg.global_loss,
        tau=cfg.tau_global,
        gather_distributed=cfg.gather_distributed,
    )
    return {"loss": loss, "global": loss.detach()}


def glcl_local_step(model: GLCL, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Stage-2 step: frozen eval-mode encoder (or a trained one), two intensity views, L^R / L^D.

    Returns ``{"loss", "local"}``.
    """
    check_batch(batch, ("image",), "glcl local stage")
    cfg = model.cfg
    x = batch["image"]
    gen = model.generator
    v1, v2 = intensity_view(x, gen), intensity_view(x, gen)
    if cfg.local_encoder == "trained":
        enc = model.unet.encoder(torch.cat([v1, v2], 0))
    else:
        model.unet.encoder.eval()  # frozen: no running-statistics updates either (pitfall §1.10.2)
        with torch.no_grad():
            enc = [e.detach() for e in model.unet.encoder(torch.cat([v1, v2], 0))]
    decs = model.unet.decoder(enc, num_blocks=cfg.local_depth)
    f = model.g2(decs[-1])
    f1, f2 = f.chunk(2, 0)
    if cfg.local_loss == "D":
        check_batch(batch, ("volume", "partition"), "glcl local stage (L^D)")
        loss = model.local_loss(f1, f2, batch["volume"].long().view(-1), batch["partition"].long().view(-1))
    else:
        loss = model.local_loss(f1, f2)
    return {"loss": loss, "local": loss.detach()}
