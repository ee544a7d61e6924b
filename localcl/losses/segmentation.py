"""Segmentation losses: soft Dice (with / without background), cross-entropy, Dice + CE.

Shapes: logits (B, K, *S) (S = (H, W) or (D, H, W)); target either integer labels (B, *S)
with values in [0, K) or ``ignore_index`` (default -1, the storage convention for "unknown"),
or soft / one-hot targets (B, K, *S) float (no ignored pixels then).

Soft Dice (methods.md §0, GLCL/PLCL reference, [C]): with p = softmax(logits) and y the one-hot
target, for image b and class k, over the non-ignored pixels Ω_b,

.. math::

    D_{b,k} = \\frac{2 \\sum_{u \\in Ω_b} p_{b,k,u} y_{b,k,u}}
                   {\\sum_{u \\in Ω_b} p_{b,k,u} + \\sum_{u \\in Ω_b} y_{b,k,u} + ε},
    \\qquad L_{Dice} = 1 - \\operatorname{mean}_{b,\\, k \\in \\mathcal{K}} D_{b,k}

with 𝒦 = {0..K-1} (``include_background=True``, the reference) or {1..K-1}. ``per_image=False``
pools the sums over the whole batch first (one D_k per class, "batch Dice").

Cross-entropy: mean of −log p_{y_u}(u) over the non-ignored pixels of the batch (0 when every
pixel is ignored). Ignored pixels receive exactly zero gradient in every loss here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "dice_loss",
    "cross_entropy_loss",
    "dice_ce_loss",
    "DiceLoss",
    "CELoss",
    "DiceCELoss",
]


def _prepare(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return (one-hot/soft target (B,K,*S) float, valid mask (B,1,*S) float)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 3:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B, K, *spatial), got {got}")
    k = logits.shape[1]
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return target.to(logits.dtype), torch.ones_like(logits[:, :1])
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must have shape (B, *spatial) = {tuple(logits.shape[:1] + logits.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    valid = target != ignore_index
    if valid.any():
        tv = target[valid]
        lo, hi = int(tv.min()), int(tv.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"target values must be in [0, {k}) or ignore_index={ignore_index}, found [{lo}, {hi}]")
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(safe, k).movedim(-1, 1).to(logits.dtype)
    vmask = valid.unsqueeze(1).to(logits.dtype)
    return onehot * vmask, vmask


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    eps: float = 1e-5,
    ignore_index: int = -1,
    per_image: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft Dice loss (formula in the module docstring).

    Args:
        logits: (B, K, *S) raw scores (softmax is applied here).
        target: (B, *S) int labels (``ignore_index`` = unknown) or (B, K, *S) soft targets.
        include_background: average over classes 0..K-1 (reference) or 1..K-1.
        eps: ε in the denominator.
        per_image: one Dice per (image, class) (reference) or per class over the batch.
        reduction: "mean" -> scalar 1 − mean D; "none" -> 1 − D of shape (B, |𝒦|)
            (or (|𝒦|,) when ``per_image=False``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    y, vmask = _prepare(logits, target, ignore_index)
    if not include_background and logits.shape[1] < 2:
        raise ValueError("include_background=False needs at least 2 classes (K >= 2)")
    p = torch.softmax(logits, dim=1) * vmask
    dims = tuple(range(2, logits.dim()))
    inter = (p * y).sum(dims)  # (B, K)
    den = p.sum(dims) + y.sum(dims)
    if not per_image:
        inter, den = inter.sum(0), den.sum(0)
    d = 2 * inter / (den + eps)
    if not include_background:
        d = d[..., 1:]
    loss = 1 - d
    return loss.mean() if reduction == "mean" else loss


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over non-ignored pixels.

    Hard labels (B, *S): ``−Σ_u w_{y_u} log p_{y_u}(u) / Σ_u w_{y_u}`` over non-ignored u
    (plain mean without ``weight``). Soft targets (B, K, *S): ``−mean_u Σ_k y_k(u) log p_k(u)``
    (``weight`` scales class k's term). Returns 0 (with a graph) when every pixel is ignored.
    """
    y, vmask = _prepare(logits, target, ignore_index)
    k = logits.shape[1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != k):
        raise ValueError(f"weight must have shape (K,) = ({k},), got {tuple(weight.shape)}")
    logp = torch.log_softmax(logits, dim=1)
    wk = torch.ones(k, dtype=logits.dtype, device=logits.device) if weight is None else weight.to(logits.dtype)
    wk = wk.view(1, k, *([1] * (logits.dim() - 2)))
    num = -(y * wk * logp).sum()
    if target.is_floating_point():
        den = torch.tensor(float(vmask.numel()), dtype=logits.dtype, device=logits.device)
    else:
        den = (y * wk).sum()
    return num / torch.where(den > 0, den, torch.ones_like(den))


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    include_background: bool = True,
    eps: float = 1e-5,
    ignore_index: int = -1,
    per_image: bool = True,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dice_weight · L_Dice + ce_weight · L_CE`` (IDEAL's L_sup [R])."""
    return dice_weight * dice_loss(
        logits,
        target,
        include_background=include_background,
        eps=eps,
        ignore_index=ignore_index,
        per_image=per_image,
    ) + ce_weight * cross_entropy_loss(logits, target, ignore_index=ignore_index, weight=class_weight)


class DiceLoss(nn.Module):
    """Module form of :func:`dice_loss`; ``forward(logits (B,K,*S), target) -> scalar``."""

    def __init__(
        self, include_background: bool = True, eps: float = 1e-5, ignore_index: int = -1, per_image: bool = True
    ) -> None:
        super().__init__()
        self.include_background, self.eps = include_background, eps
        self.ignore_index, self.per_image = ignore_index, per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(
            logits,
            target,
            include_background=self.include_background,
            eps=self.eps,
            ignore_index=self.ignore_index,
            per_image=self.per_image,
        )


class CELoss(nn.Module):
    """Module form of :func:`cross_entropy_loss` (optional class weights (K,))."""

    weight: torch.Tensor | None

    def __init__(self, ignore_index: int = -1, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight if weight is None else weight.clone(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(logits, target, ignore_index=self.ignore_index, weight=self.weight)


class DiceCELoss(nn.Module):
    """Module form of :func:`dice_ce_loss`."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = True,
        eps: float = 1e-5,
        ignore_index: int = -1,
        per_image: bool = True,
        class_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background, eps, ignore_index, per_image)
        self.ce = CELoss(ignore_index, class_weight)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)
        return loss
