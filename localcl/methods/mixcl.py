"""MixCL: identity + label + reconstruction consistency pre-training.

Li, Quan, Zhou, *MixCL: Pixel label matters to contrastive learning (in medical image
segmentation)*, arXiv 2203.02114 (no public code). Components [P]; formulas, heads, sampling and
weights [R] (spec ``methods.md`` §4). Losses: :mod:`localcl.losses.mixcl`.

Batch (``pretrain_batch = "slices"``): ``image`` (B,1,H,W) and ``label`` (B,H,W) with -1 for
unknown pixels (unlabelled slices or structures the source dataset does not annotate). Two views
``x^v = I_v(W_v(x))`` per image with a tracked geometric warp ``W_v``
(:func:`localcl.augment.random_geometric`) and brightness/contrast ``I_v``; labels follow with
nearest warping (pixels from outside the image become -1). With ``dims=3`` the batch is 3D
patches (B,1,D,H,W) / (B,D,H,W) and the warps are random flips of the three axes.

.. math::

    \\mathcal L = \\mathcal L_{id}(z^1, z^2) + \\alpha\\,\\mathcal L_{lab}(w, y) + \\beta\\,\\mathcal L_{rec},\\qquad
    \\mathcal L_{rec} = \\operatorname{mean}_{valid} |g_{rec}(d(e(x^v))) - W_v(x)|

with ``z = g_id(e(x^v))`` (GAP → MLP C→C→128), ``w = g_lab(d(e(x^v)))`` (1×1 conv C, BN, ReLU →
1×1 conv 128), ``g_rec`` a 1×1 conv to the image channels; the reconstruction target is the clean
image in the view's geometry (intensity perturbation undone), averaged over pixels whose source
lies inside the image. Defaults: τ = 0.1, α = β = 1, N_pix = 4,096 class-balanced pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from localcl.augment import apply_flips, intensity_view, random_flips, random_geometric, warp_image, warp_labels
from localcl.losses.mixcl import mixcl_loss
from localcl.methods import _nets
from localcl.methods.base import (
    BaseMethodConfig,
    Count,
    NonNegative,
    PretrainMethod,
    Temperature,
    UnitInterval,
    check_batch,
)
from localcl.models.heads import DenseHead, GlobalHead, ReconHead

__all__ = ["MixCL", "MixCLConfig", "as_2d", "make_views", "mixcl_step"]


class MixCLConfig(BaseMethodConfig):
    """MixCL settings (spec §4.4–4.5, §7; all [R]).

    Attributes:
        tau: 0.1. alpha: label-consistency weight (1). beta: reconstruction weight (1).
        num_pixels: N_pix class-balanced labelled pixels per batch (4,096).
        proj_dim: 128. rec_kind: "l1" (default) or "mse". rec_kernel: 1 or 3.
        dims: 2 (slices, default) or 3 (patches with a 3D U-Net).
        crop_area, rotation_deg, scale, flip_p: 2D view geometry.
        gather_distributed: identity negatives from all workers.
        batch_size: slices per step (32; read by ``ray_jobs``).
        labelled_per_batch: slices of every pretraining batch drawn from the label budget
            (read by ``ray_jobs``; option, not in the spec). 0 (default): the whole batch is
            drawn uniformly from the pretraining pool, where labelled slices are as rare as the
            budget (3 labelled patients of 70: about 4 % of slices, so ``L_lab`` sees a labelled
            slice in about a third of the batches of 8).
    """

    tau: Temperature = 0.1
    alpha: NonNegative = 1.0
    beta: NonNegative = 1.0
    num_pixels: Count = 4096
    proj_dim: Count = 128
    rec_kind: Literal["l1", "mse"] = "l1"
    rec_kernel: Literal[1, 3] = 1
    dims: Literal[2, 3] = 2
    crop_area: tuple[float, float] = (0.4, 1.0)
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: UnitInterval = 0.5
    gather_distributed: bool = False
    batch_size: Count = 32
    labelled_per_batch: Annotated[int, Field(ge=0)] = 0


class MixCL(PretrainMethod):
    """MixCL pre-training (module docstring). Returns ``{"loss", "id", "lab", "rec"}``."""

    name = "mixcl"
    Config = MixCLConfig
    cfg: MixCLConfig
    pretrain_batch = "slices"
    default_finetune = "supervised"

    def __init__(self, cfg: MixCLConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes, dim=cfg.dims)
        cb, cf = cfg.widths[-1], cfg.decoder_widths[-1]
        self.g_id = GlobalHead(cb, cfg.proj_dim, hidden_dim=cb, pool="gap", bias=True)
        self.g_lab = DenseHead(cf, out_dim=cfg.proj_dim, hidden_dim=cf, layers=2, norm=cfg.norm, dim=cfg.dims)
        self.g_rec = ReconHead(cf, in_channels, kernel=cfg.rec_kernel, dim=cfg.dims)

    @classmethod
    def pretrain_reads_labels(cls, cfg: BaseMethodConfig) -> bool:
        """Always: the label-consistency term ``L_lab`` reads ``batch["label"]``."""
        return True

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)
        return mixcl_step(self, batch)


def make_views(
    x: Tensor, maps: Sequence[Tensor], gen: torch.Generator, cfg: object, dims: int = 2
) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor], list[Tensor]]:
    """Two tracked views of images ``x`` and of integer maps (labels, super-pixels).

    Args:
        x: (B, C, *S) images. maps: integer maps (B, *S), all warped with the same transform.
        cfg: provides ``crop_area``, ``flip_p``, ``rotation_deg``, ``scale`` (2D geometry).

    Returns:
        ``(views, warped_maps, clean_targets, valid_masks)``, each indexed by view (2 entries):
        the augmented view (B, C, *S); the list of maps in the view geometry (-1 outside the
        source); the clean image in the view geometry; a (B, 1, *S) bool validity mask.
        2D: random crop/flip/rotation/scale (:func:`localcl.augment.random_geometric`), then
        brightness/contrast; 3D: random flips of the three axes, then brightness/contrast.
    """
    views, vmaps, targets, valids = [], [], [], []
    for _ in range(2):
        if dims == 2:
            w = random_geometric(
                x.shape[0],
                (x.shape[-2], x.shape[-1]),
                gen,
                getattr(cfg, "crop_area"),  # noqa: B009
                getattr(cfg, "flip_p"),  # noqa: B009
                getattr(cfg, "rotation_deg"),  # noqa: B009
                getattr(cfg, "scale"),  # noqa: B009
            )
            clean = warp_image(x, w)
            ms = [warp_labels(m, w, fill=-1) for m in maps]
            ones = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device)
            valid = warp_labels(ones, w, fill=0).unsqueeze(1).bool()
        else:
            f = random_flips(x.shape[0], 3, gen)
            clean, ms = apply_flips(x, f), [apply_flips(m, f) for m in maps]
            valid = torch.ones_like(clean[:, :1], dtype=torch.bool)
        flat = clean.flatten(2).unsqueeze(-1) if dims == 3 else clean
        views.append(intensity_view(flat, gen).view_as(clean))
        vmaps.append(ms)
        targets.append(clean)
        valids.append(valid)
    return views, vmaps, targets, valids


def as_2d(t: Tensor) -> Tensor:
    """(B, C, D, H, W) -> (B, C, D*H, W) (depth folded into rows; losses sample flat indices)."""
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1]) if t.dim() == 5 else t


def mixcl_step(model: MixCL, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One MixCL step: two tracked views, ``L_id + α L_lab + β L_rec``."""
    check_batch(batch, ("image", "label"), "mixcl")
    cfg = model.cfg
    x, y = batch["image"], batch["label"].long()
    if x.dim() != cfg.dims + 2 or y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"mixcl: image must be (B, C, *S) with {cfg.dims} spatial dims and label (B, *S); "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    views, maps, targets, valids = make_views(x, [y], model.generator, cfg, cfg.dims)
    labels = [maps[0][0], maps[1][0]]
    out = model.unet(torch.cat(views, 0), taps=("bottleneck", "features"), logits=False)
    z1, z2 = model.g_id(out["bottleneck"]).chunk(2, 0)
    emb = model.g_lab(out["features"])
    rec = model.g_rec(out["features"])
    b = x.shape[0]
    e1, e2 = as_2d(emb[:b]), as_2d(emb[b:])
    lab = torch.stack([labels[0].reshape(b, *e1.shape[2:]), labels[1].reshape(b, *e1.shape[2:])], 1)
    res = mixcl_loss(
        z1,
        z2,
        torch.stack([e1, e2], 1),
        lab,
        as_2d(rec),
        as_2d(torch.cat(targets, 0)),
        alpha=cfg.alpha,
        beta=cfg.beta,
        tau=cfg.tau,
        num_pixels=cfg.num_pixels,
        rec_kind=cfg.rec_kind,
        rec_mask=as_2d(torch.cat(valids, 0)),
        gather_distributed=cfg.gather_distributed,
        generator=model.generator_for(x.device),
    )
    return {"loss": res["loss"], "id": res["id"].detach(), "lab": res["lab"].detach(), "rec": res["rec"].detach()}
