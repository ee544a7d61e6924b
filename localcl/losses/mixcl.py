"""MixCL: identity, label and reconstruction consistency.

Li, Quan, Zhou, *MixCL: Pixel label matters to contrastive learning (in medical image
segmentation)*, arXiv 2203.02114. No original code is public: the three consistencies are [P]
(abstract), their formulas, sampling and weights are reconstructions (spec ``methods.md`` §4.4-4.5,
all [R]).

- Identity consistency (NT-Xent over the ``2B`` global embeddings of two views, SimCLR form):

  .. math::

      \\mathcal L_{id} = \\frac{1}{2B}\\sum_i\\left[\\ell(z_i^1; z_i^2) + \\ell(z_i^2; z_i^1)\\right],\\quad
      \\ell(a;p) = -\\log\\frac{e^{\\mathrm{sim}(a,p)/\\tau}}{\\sum_{k\\neq a} e^{\\mathrm{sim}(a,k)/\\tau}}

  (``k`` over all ``2B`` embeddings, or over all workers' embeddings with
  ``gather_distributed=True``, gathered with gradient).
- Label consistency (SupCon per-positive over ``A``, sampled labelled pixels of both views and
  all images):

  .. math::

      \\mathcal L_{lab} = \\frac{1}{|A'|}\\sum_{a\\in A'}\\frac{1}{|P(a)|}\\sum_{p\\in P(a)} -\\log
          \\frac{e^{\\mathrm{sim}(w_a,w_p)/\\tau}}{\\sum_{k\\in A,k\\neq a} e^{\\mathrm{sim}(w_a,w_k)/\\tau}}

  with ``P(a) = {p ∈ A, p ≠ a: class(p) = class(a)}`` and ``A' ⊆ A`` the anchors with
  ``|P(a)| > 0`` (SupCon convention). Unknown pixels (label ``-1``) are never sampled. Sampling
  (:func:`sample_balanced_pixels`): up to ``N_pix`` pixels, an equal quota
  ``floor(N_pix / #present classes)`` per class present in the batch, drawn uniformly without
  replacement (a class with fewer pixels than its quota gives all of them).
- Reconstruction consistency: ``L_rec = mean |g_rec(d(e(x̃))) - x|`` (L1, default) or mean
  squared error, optionally over a validity mask (pixels where the warp back is defined).
- Total: ``L = L_id + α L_lab + β L_rec`` (α = β = 1, [R]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

import localcl.dist as dist
from localcl.losses.kernel import check_tau, info_nce

__all__ = [
    "identity_loss",
    "sample_balanced_pixels",
    "label_consistency_loss",
    "reconstruction_loss",
    "mixcl_loss",
    "MixCLLoss",
]


def identity_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    tau: float = 0.1,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Identity consistency ``L_id`` (NT-Xent over 2B; module docstring).

    Args:
        z1, z2: (B, D) global embeddings ``g_id(e(x))`` of the two views (row i = image i).
        tau: temperature > 0.
        gather_distributed: negatives from every worker, gathered with gradient
            (:func:`localcl.dist.gather`); every worker must hold the same B.
        chunk_size: kernel chunk size.

    Returns:
        Scalar, mean over the 2B local anchors.
    """
    check_tau(tau)
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both have shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    B = z1.shape[0]
    z = torch.cat([z1, z2], 0)  # (2B, D): rows i and B+i are the same image
    ids = torch.arange(B, device=z.device).repeat(2)
    if gather_distributed and dist.world_size() > 1:
        cand = dist.gather(z)
        off = dist.rank_offset(2 * B)
        ids = ids + dist.rank_offset(B)
        cand_ids = dist.gather_nograd(ids)
        return info_nce(
            z,
            cand,
            tau=tau,
            anchor_ids=ids,
            candidate_ids=cand_ids,
            exclude_self=True,
            self_offset=off,
            mode="single",
            chunk_size=chunk_size,
        )
    return info_nce(z, None, tau=tau, anchor_ids=ids, exclude_self=True, mode="single", chunk_size=chunk_size)


def sample_balanced_pixels(
    labels: torch.Tensor, num_pixels: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced sampling of labelled pixels (spec §4.5, [R]).

    Each class ``c >= 0`` present in ``labels`` gets the quota ``floor(num_pixels / n_present)``;
    ``min(quota, count_c)`` of its pixels are drawn uniformly without replacement (random keys,
    one sort: a pixel is kept when its rank inside its class is below the quota). Labels ``< 0``
    (unknown) are never drawn.

    Args:
        labels: int tensor of any shape (e.g. (B, 2, H, W)); ``-1`` = unknown.
        num_pixels: ``N_pix`` >= 1 (upper bound on the sample size).
        generator: seeded generator.

    Returns:
        index (N,) int64 flat indices into ``labels.reshape(-1)`` (sorted by class), and
        their classes (N,). ``N <= num_pixels``; N = 0 when no pixel is labelled.
    """
    if num_pixels < 1:
        raise ValueError(f"num_pixels must be >= 1, got {num_pixels}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    flat = labels.reshape(-1).long()
    dev = flat.device
    known = (flat >= 0).nonzero().flatten()
    if known.numel() == 0:
        return known, known
    cls = flat[known]
    uniq, inv = torch.unique(cls, return_inverse=True)
    quota = num_pixels // uniq.numel()
    if quota == 0:
        raise ValueError(
            f"num_pixels={num_pixels} is smaller than the {uniq.numel()} classes present; "
            f"need at least one pixel per class"
        )
    r = torch.rand(known.numel(), generator=generator, device=dev)
    order = torch.argsort(inv.to(torch.float64) + r.to(torch.float64))  # by class, random inside
    counts = torch.bincount(inv, minlength=uniq.numel())
    starts = torch.cumsum(counts, 0) - counts
    inv_sorted = inv[order]
    rank_in_class = torch.arange(order.numel(), device=dev) - starts[inv_sorted]
    keep = order[rank_in_class < quota]
    return known[keep], cls[keep]


def label_consistency_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_pixels: int = 4096,
    tau: float = 0.1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """Label consistency ``L_lab`` (SupCon per-positive over sampled pixels; module docstring).

    Args:
        embeddings: (B, V, D, H, W) dense embeddings ``g_lab(d(e(x^v)))`` of V views.
        labels: (B, V, H, W) int labels warped into each view, ``-1`` = unknown.
        num_pixels: ``N_pix`` (4096, [R]).
        tau: temperature > 0.
        generator: seeded generator for the sampling.
        chunk_size: kernel chunk size (None = naive ``N_pix x N_pix`` logits).

    Returns:
        Scalar (0 with no sampled pixel or no anchor with a positive). Unsampled pixels get
        exactly zero gradient.
    """
    check_tau(tau)
    if embeddings.dim() != 5:
        raise ValueError(f"embeddings must have shape (B, V, D, H, W), got {tuple(embeddings.shape)}")
    B, V, D, H, W = embeddings.shape
    if labels.shape != (B, V, H, W):
        raise ValueError(f"labels must have shape (B, V, H, W)=({B}, {V}, {H}, {W}), got {tuple(labels.shape)}")
    idx, cls = sample_balanced_pixels(labels, num_pixels, generator)
    if idx.numel() == 0:
        return embeddings.sum() * 0.0
    bv, hw = idx // (H * W), idx % (H * W)
    w = embeddings.reshape(B * V, D, H * W)[bv, :, hw]  # (N, D)
    return info_nce(w, None, tau=tau, anchor_ids=cls, exclude_self=True, mode="per_positive", chunk_size=chunk_size)


def reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    kind: Literal["l1", "mse"] = "l1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruction consistency ``L_rec``: mean ``|recon - target|`` (L1) or squared error.

    Args:
        recon: (B, C, H, W) ``g_rec(d(e(x̃)))``. target: same shape, the clean image.
        kind: "l1" (default) or "mse".
        mask: optional (B, 1 or C, H, W) bool/0-1 validity; the mean is over valid elements.
    """
    if kind not in ("l1", "mse"):
        raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
    if recon.shape != target.shape:
        raise ValueError(
            f"recon and target must have the same shape, got {tuple(recon.shape)} and {tuple(target.shape)}"
        )
    err = (recon - target).abs() if kind == "l1" else (recon - target) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def mixcl_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    recon: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    tau: float = 0.1,
    num_pixels: int = 4096,
    rec_kind: Literal["l1", "mse"] = "l1",
    rec_mask: torch.Tensor | None = None,
    gather_distributed: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
) -> dict[str, torch.Tensor]:
    """Total MixCL loss ``L = L_id + α L_lab + β L_rec``.

    Returns:
        dict with ``"loss"`` (total), ``"id"``, ``"lab"``, ``"rec"``.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    l_id = identity_loss(z1, z2, tau, gather_distributed, chunk_size)
    l_lab = label_consistency_loss(embeddings, labels, num_pixels, tau, generator, chunk_size)
    l_rec = reconstruction_loss(recon, target, rec_kind, rec_mask)
    return {"loss": l_id + alpha * l_lab + beta * l_rec, "id": l_id, "lab": l_lab, "rec": l_rec}


class MixCLLoss(nn.Module):
    """Module form of :func:`mixcl_loss` (Li, Quan, Zhou, arXiv 2203.02114; spec §4.4).

    Args:
        alpha, beta: weights of ``L_lab`` and ``L_rec`` (1, 1). tau: 0.1. num_pixels: 4096.
        rec_kind: "l1" | "mse". gather_distributed: global identity negatives. chunk_size: 256.

    Shapes: ``forward(z1 (B, D), z2 (B, D), embeddings (B, V, D', H, W), labels (B, V, H, W),
    recon (B, C, H, W), target (B, C, H, W), rec_mask=None, generator=None) -> dict``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        tau: float = 0.1,
        num_pixels: int = 4096,
        rec_kind: Literal["l1", "mse"] = "l1",
        gather_distributed: bool = False,
        chunk_size: int | None = 256,
    ) -> None:
        super().__init__()
        check_tau(tau)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if num_pixels < 1:
            raise ValueError(f"num_pixels must be >= 1, got {num_pixels}")
        if rec_kind not in ("l1", "mse"):
            raise ValueError(f"rec_kind must be 'l1' or 'mse', got {rec_kind!r}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True but torch.distributed is not available")
        self.alpha, self.beta, self.tau, self.num_pixels = float(alpha), float(beta), float(tau), int(num_pixels)
        self.rec_kind, self.gather_distributed, self.chunk_size = rec_kind, gather_distributed, chunk_size

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        recon: torch.Tensor,
        target: torch.Tensor,
        rec_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        return mixcl_loss(
            z1,
            z2,
            embeddings,
            labels,
            recon,
            target,
            self.alpha,
            self.beta,
            self.tau,
            self.num_pixels,
            self.rec_kind,
            rec_mask,
            self.gather_distributed,
            generator,
            self.chunk_size,
        )
