"""PLCL: pseudo-label local contrastive loss with foreground class-mean prototypes.

Chaitanya, Erdil, Karani, Konukoglu, *Local contrastive loss with pseudo-label based
self-training for semi-supervised medical image segmentation*, arXiv 2112.09645 / Medical Image
Analysis 87 (2023) 102792; original TF1 code ``krishnabits001/pseudo_label_contrastive_training``.
Spec: ``methods.md`` §2.4 (formulas [C]), §2.5, §2.11.1 (pitfall avoided: plain mean).

For a pair of images ``(x_a, x_b)`` with label maps ``y_a, y_b`` (ground truth or pseudo-labels)
and dense embeddings ``E = h_φ(d(e(x)))`` (un-normalised), for every **foreground** class
``c ∈ {1..K-1}``:

- prototype ``μ_a^c = mean_{u: y_a(u)=c} E_a(u)`` (plain mean, un-normalised), same for ``b``;
- ``P`` anchors ``q = E_a(u)``, ``u`` uniform with replacement in ``{u: y_a(u)=c}``; same for ``b``;
- shared denominator (inter-image variant, default)

.. math::

    D(q) = \\sum_{c'=1}^{K-1}\\left[e^{\\mathrm{sim}(q,\\mu_a^{c'})/\\tau} + e^{\\mathrm{sim}(q,\\mu_b^{c'})/\\tau}\\right]

    \\ell_{intra}(q) = -\\log\\frac{e^{\\mathrm{sim}(q,\\mu_a^{c})/\\tau}}{D(q)},\\qquad
    \\ell_{inter}(q) = -\\log\\frac{e^{\\mathrm{sim}(q,\\mu_b^{c})/\\tau}}{D(q)}

and symmetrically for anchors drawn from ``x_b`` (roles of a and b swapped). The intra-only
variant uses ``D(q)`` over ``x_a``'s own prototypes and only ``ℓ_intra``. Background (class 0)
is neither an anchor class nor a prototype [C]; pixels labelled ``< 0`` are ignored.

``L_LC`` = plain mean over all term slots (pairs x 2 directions x (K-1) classes x P anchors x
terms). Absent classes ([C]: such terms are set to zero): a slot whose anchor class is absent
from the anchor image, or whose positive prototype is absent, is 0 and still counted in the mean
(``normalize="slots"``, default) or left out of it (``normalize="valid"``). Absent prototypes
are left out of ``D(q)`` (``absent="mask"``, default). ``absent="zero_pair"`` reproduces the
reference code's NaN behaviour instead: a class absent from either image makes every term of that
pair zero. Each term is one row of the shared kernel in ``"single"`` mode, with dense masks over
the (few) prototypes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from localcl.losses.kernel import check_tau, info_nce

__all__ = ["class_prototypes", "sample_class_pixels", "plcl_loss", "PLCLLoss"]


def class_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground class-mean prototypes per image.

    ``μ[b, c-1] = Σ_u 1[y_b(u)=c] E_b(u) / Σ_u 1[y_b(u)=c]`` for ``c = 1..K-1``, computed as one
    batched matmul ``onehot (B, K-1, HW) @ E (B, HW, C)`` divided by the counts.

    Args:
        embeddings: (B, C, H, W). labels: (B, H, W) int, ``< 0`` ignored, 0 background.
        num_classes: K (including background).

    Returns:
        prototypes (B, K-1, C) (zeros where absent), present (B, K-1) bool.
    """
    B, C, H, W = embeddings.shape
    fg = torch.arange(1, num_classes, device=labels.device).view(1, -1, 1)
    onehot = (labels.reshape(B, 1, H * W) == fg).to(embeddings.dtype)  # (B, K-1, HW)
    counts = onehot.sum(-1)  # (B, K-1)
    sums = torch.bmm(onehot, embeddings.reshape(B, C, H * W).transpose(1, 2))  # (B, K-1, C)
    present = counts > 0
    return sums / counts.clamp_min(1).unsqueeze(-1), present


def sample_class_pixels(
    labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``P = per_class`` pixels uniformly with replacement per image and foreground class.

    Vectorised: pixels sorted by the key ``b * K + y``; a draw is ``start + floor(u * count)``.

    Args:
        labels: (B, H, W) int (``< 0`` ignored). num_classes: K. per_class: P >= 1.
        generator: seeded ``torch.Generator`` (device of ``labels``).

    Returns:
        pixel (B, K-1, P) int64 flat pixel index ``y * W + x`` (0 where the class is absent),
        present (B, K-1) bool.
    """
    B, H, W = labels.shape
    K = num_classes
    dev = labels.device
    lab = labels.long()
    valid = (lab >= 0) & (lab < K)
    key = torch.where(valid, torch.arange(B, device=dev).view(B, 1, 1) * K + lab, torch.full_like(lab, B * K))
    flat = key.reshape(-1)
    all_counts = torch.bincount(flat, minlength=B * K + 1)
    counts = all_counts[: B * K].view(B, K)[:, 1:]  # (B, K-1)
    starts = (torch.cumsum(all_counts, 0) - all_counts)[: B * K].view(B, K)[:, 1:]
    order = torch.argsort(flat, stable=True)
    u = torch.rand((B, K - 1, per_class), generator=generator, device=dev)
    c = counts.unsqueeze(-1)
    pos = starts.unsqueeze(-1) + torch.minimum((u * c).long(), (c - 1).clamp_min(0))
    pix = order[pos.clamp(max=flat.numel() - 1)] % (H * W)
    present = counts > 0
    return torch.where(present.unsqueeze(-1), pix, torch.zeros_like(pix)), present


def plcl_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    pairs: torch.Tensor | None = None,
    tau: float = 0.1,
    per_class: int = 3,
    variant: Literal["inter", "intra"] = "inter",
    normalize: Literal["slots", "valid"] = "slots",
    absent: Literal["mask", "zero_pair"] = "mask",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """PLCL local contrastive loss ``L_LC`` (formulas in the module docstring).

    Args:
        embeddings: (B, C, H, W) contrastive-head embeddings ``h_φ(d(e(x)))`` (16-d in PLCL).
        labels: (B, H, W) int (pseudo-)labels, 0 = background, ``< 0`` = ignore.
        num_classes: K including background (>= 2).
        pairs: (N_pairs, 2) int rows ``(a, b)`` of batch indices, ``a != b`` (the spec's
            ``(L0, L0)`` pairs are two augmentations of one slice stored as two rows); default:
            ``(0,1), (2,3), ...``.
        tau: temperature > 0 (0.1, [C]).
        per_class: ``P`` sampled anchors per class per image (3, [C]).
        variant: "inter" (default, both terms) or "intra" (intra-only option).
        normalize: "slots" (default) or "valid" (see module docstring).
        absent: "mask" (default) or "zero_pair".
        generator: seeded generator for the pixel sampling.
        chunk_size: kernel chunk size.

    Returns:
        Scalar loss. Gradient reaches only foreground pixels: the sampled anchors and, through the
        prototypes, every pixel of a present foreground class; background and ignored pixels get
        exactly zero gradient.
    """
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must have shape (B, C, H, W), got {tuple(embeddings.shape)}")
    B, C, H, W = embeddings.shape
    if labels.shape != (B, H, W):
        raise ValueError(f"labels must have shape (B, H, W)=({B}, {H}, {W}), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + >= 1 foreground), got {num_classes}")
    if int(labels.max()) >= num_classes:
        raise ValueError(f"labels hold class {int(labels.max())} >= num_classes={num_classes}")
    check_tau(tau)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if variant not in ("inter", "intra"):
        raise ValueError(f"variant must be 'inter' or 'intra', got {variant!r}")
    if normalize not in ("slots", "valid"):
        raise ValueError(f"normalize must be 'slots' or 'valid', got {normalize!r}")
    if absent not in ("mask", "zero_pair"):
        raise ValueError(f"absent must be 'mask' or 'zero_pair', got {absent!r}")
    dev = embeddings.device
    if pairs is None:
        if B % 2:
            raise ValueError(f"pairs=None pairs consecutive images but B={B} is odd; pass pairs")
        pairs = torch.arange(B, device=dev).view(-1, 2)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point:
        raise ValueError(f"pairs must be an integer tensor of shape (N_pairs, 2), got {tuple(pairs.shape)}")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= B):
        raise ValueError(f"pairs indices must lie in [0, B={B})")
    if pairs.numel() and bool((pairs[:, 0] == pairs[:, 1]).any()):
        raise ValueError("pairs must join two different batch rows (store two augmentations of one slice as two rows)")
    pairs = pairs.long().to(dev)
    Kf = num_classes - 1
    P = per_class

    protos, present = class_prototypes(embeddings, labels, num_classes)  # (B, Kf, C), (B, Kf)
    pix, _ = sample_class_pixels(labels, num_classes, P, generator)  # (B, Kf, P)
    flat_e = embeddings.reshape(B, C, H * W)
    anchors_img = flat_e.gather(2, pix.reshape(B, 1, Kf * P).expand(B, C, Kf * P))  # (B, C, Kf*P)
    anchors_img = anchors_img.transpose(1, 2).reshape(B, Kf, P, C)

    # directions: (anchor image, other image) for each pair, both ways -> (2*Np, 2), Np pairs
    dirs = torch.cat([pairs, pairs.flip(1)], 0)
    ia, ib = dirs[:, 0], dirs[:, 1]
    nd = dirs.shape[0]
    q = anchors_img[ia]  # (nd, Kf, P, C)
    # candidates: all prototypes of the batch, index b * Kf + c
    cand = protos.reshape(B * Kf, C)
    M = cand.shape[0]
    cls = torch.arange(Kf, device=dev)
    terms = ("intra", "inter") if variant == "inter" else ("intra",)
    nt = len(terms)
    # row layout (nd, Kf, P, nt)
    pos_img = torch.stack([ia, ib], 1)[:, :nt]  # (nd, nt): positive prototype's image per term
    pos_col = (pos_img.view(nd, 1, 1, nt) * Kf + cls.view(1, Kf, 1, 1)).expand(nd, Kf, P, nt)
    anchor_ok = present[ia].view(nd, Kf, 1, 1)
    pos_ok = present[pos_img.view(nd, 1, nt).expand(nd, Kf, nt), cls.view(1, Kf, 1).expand(nd, Kf, nt)]
    slot_ok = (anchor_ok & pos_ok.view(nd, Kf, 1, nt)).expand(nd, Kf, P, nt)
    if absent == "zero_pair":
        full = present[ia].all(1) & present[ib].all(1)  # (nd,)
        slot_ok = slot_ok & full.view(nd, 1, 1, 1)
    n_rows = nd * Kf * P * nt
    # denominator prototypes per direction: present prototypes of a (and b for "inter")
    den = torch.zeros(nd, M, dtype=torch.bool, device=dev)
    ar = torch.arange(nd, device=dev).view(nd, 1)
    den[ar.expand(nd, Kf), (ia.view(nd, 1) * Kf + cls)] = present[ia]
    if variant == "inter":
        den[ar.expand(nd, Kf), (ib.view(nd, 1) * Kf + cls)] |= present[ib]
    den_rows = den.view(nd, 1, 1, 1, M).expand(nd, Kf, P, nt, M).reshape(n_rows, M)
    pos_mask = torch.zeros(n_rows, M, dtype=torch.bool, device=dev)
    rows_ok = slot_ok.reshape(-1)
    ridx = torch.arange(n_rows, device=dev)
    pos_mask[ridx[rows_ok], pos_col.reshape(-1)[rows_ok]] = True
    neg_mask = den_rows & ~pos_mask
    anchors = q.unsqueeze(3).expand(nd, Kf, P, nt, C).reshape(n_rows, C)
    total = info_nce(
        anchors,
        cand,
        tau=tau,
        pos_mask=pos_mask,
        neg_mask=neg_mask,
        exclude_self=False,
        mode="single",
        chunk_size=chunk_size,
        reduction="sum",
    )
    count = n_rows if normalize == "slots" else int(rows_ok.sum())
    if count == 0:
        return total * 0.0
    return total / count


class PLCLLoss(nn.Module):
    """Module form of :func:`plcl_loss` (Chaitanya et al., arXiv 2112.09645; spec §2.4).

    Args:
        num_classes: K including background. tau: 0.1. per_class: P = 3.
        variant: "inter" | "intra". normalize: "slots" | "valid". absent: "mask" | "zero_pair".
        chunk_size: kernel chunk size.

    Shapes: ``forward(embeddings (B, C, H, W), labels (B, H, W), pairs=None (N_pairs, 2), generator=None) -> ()``.
    """

    def __init__(
        self,
        num_classes: int,
        tau: float = 0.1,
        per_class: int = 3,
        variant: Literal["inter", "intra"] = "inter",
        normalize: Literal["slots", "valid"] = "slots",
        absent: Literal["mask", "zero_pair"] = "mask",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        check_tau(tau)
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if variant not in ("inter", "intra"):
            raise ValueError(f"variant must be 'inter' or 'intra', got {variant!r}")
        self.num_classes, self.tau, self.per_class = num_classes, float(tau), per_class
        self.variant, self.normalize, self.absent, self.chunk_size = variant, normalize, absent, chunk_size

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        pairs: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return plcl_loss(
            embeddings,
            labels,
            self.num_classes,
            pairs,
            self.tau,
            self.per_class,
            self.variant,
            self.normalize,
            self.absent,
            generator,
            self.chunk_size,
        )
