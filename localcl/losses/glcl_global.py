"""GLCL global contrastive losses G^R, G^{D-} and G^D on partition-structured batches.

Chaitanya, Erdil, Karani, Konukoglu, *Contrastive learning of global and local features for
medical image segmentation with limited annotations*, NeurIPS 2020, arXiv 2006.10511; original
TF1 code ``krishnabits001/domain_specific_cl`` (``models.py``, ``encoder_pretrain_net``).
Spec: ``methods.md`` §1.4 (all details [C]).

Every variant is the shared kernel :func:`localcl.losses.kernel.info_nce` in ``"single"`` mode,
run on one row per ordered positive pair ``(a, b)``:

.. math::

    \\ell(a,b) = -\\log\\frac{e^{\\mathrm{sim}(z_a,z_b)/\\tau}}
        {e^{\\mathrm{sim}(z_a,z_b)/\\tau} + \\sum_{n\\in\\Lambda^-(a)} e^{\\mathrm{sim}(z_a,z_n)/\\tau}}
    ,\\qquad \\mathcal L = \\frac{1}{|\\text{batch}|}\\sum_{(a,b)\\in\\text{pairs}} \\ell(a,b)

(sum of all pair terms divided by the number of images in the batch, [C]). An image is
identified by ``(volume, partition)`` and its role/view ``r`` (0 = original un-augmented slice,
1, 2 = augmented views). The variants differ only in pairs and negatives:

- ``"R"`` (G^R, SimCLR): pairs = the other views of the same image; ``Λ⁻(a)`` = every other
  embedding of the batch (the positive itself is also in the denominator, as in NT-Xent and the
  reference code).
- ``"D-"`` (G^{D-}): pairs = all ordered pairs inside each ``(volume, partition)`` group
  (the triplet ``{x, t1(x), t2(x)}`` gives 6 pairs); ``Λ⁻(a)`` = embeddings whose partition
  differs from ``a``'s (same-partition images of any volume are not negatives).
- ``"D"`` (G^D, default): pairs = same volume & different role (``x_i^s, t(x_i^s)``) and
  paired volume & same role (``x_i^s, x_j^s`` and ``t(x_i^s), t(x_j^s)``), both directions;
  ``(x_i^s, t(x_j^s))`` is neither positive nor negative; ``Λ⁻(a)`` = different partition.

Volume pairing for G^D: ``pair_ids`` gives each row the id of its volume pair; by default the
distinct volume ids are paired consecutively in order of first appearance ((v0, v1), (v2, v3),
...), matching batches of ``m`` volumes x ``S`` partitions x {original, augmented} with volumes
paired ``(i, j)`` (spec §1.10 pitfall 1: no blank slots).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

import localcl.dist as dist
from localcl.losses.kernel import check_tau, info_nce

__all__ = ["glcl_global_pairs", "glcl_global_loss", "GLCLGlobalLoss", "VARIANTS"]

VARIANTS = ("R", "D-", "D")


def _dense_ids(x: torch.Tensor) -> torch.Tensor:
    """Map values to 0..U-1 in order of first appearance."""
    uniq, inv = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, torch.arange(x.numel(), device=x.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel(), device=x.device)
    return rank[inv]


def glcl_global_pairs(
    volume: torch.Tensor,
    partition: torch.Tensor,
    role: torch.Tensor,
    variant: Literal["R", "D-", "D"] = "D",
    pair_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered positive pairs ``(a, b)`` of a partition-structured batch (see module docstring).

    Args:
        volume: (B,) int volume id of each embedding.
        partition: (B,) int partition index ``s``.
        role: (B,) int: 0 = original slice, 1, 2, ... = augmented views of it.
        variant: "R", "D-" or "D".
        pair_ids: (B,) int volume-pair id (G^D only); default: consecutive pairing of volumes.

    Returns:
        ``(a, b)``: two (P,) int64 index tensors, row-major order of the (B, B) pair mask.

    Raises:
        ValueError: bad shapes/variant, duplicate (volume, partition, role) rows, or (G^D) a
            volume pair that does not hold exactly two volumes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n = volume.shape[0] if volume.dim() == 1 else -1
    for name, t in (("volume", volume), ("partition", partition), ("role", role)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be a 1-D tensor of length B={n}, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    vol, part, rol = volume.long(), partition.long(), role.long()
    key = torch.stack([vol, part, rol], 1)
    if torch.unique(key, dim=0).shape[0] != n:
        raise ValueError("(volume, partition, role) must identify each row uniquely")
    same_img = (vol[:, None] == vol[None, :]) & (part[:, None] == part[None, :])
    diff_role = rol[:, None] != rol[None, :]
    if variant in ("R", "D-"):
        mask = same_img & diff_role
    else:
        if pair_ids is None:
            vr = _dense_ids(vol)
            pair = vr // 2
            n_vol = int(vr.max()) + 1 if n else 0
            if n_vol % 2:
                raise ValueError(
                    f"G^D pairs volumes consecutively but the batch holds {n_vol} distinct volumes (odd); pass pair_ids"
                )
        else:
            if pair_ids.shape != (n,):
                raise ValueError(f"pair_ids must have shape (B,)=({n},), got {tuple(pair_ids.shape)}")
            pair = pair_ids.long()
            for p in torch.unique(pair):
                k = torch.unique(vol[pair == p]).numel()
                if k != 2:
                    raise ValueError(f"pair_ids: pair {int(p)} holds {k} distinct volumes, expected 2")
        same_part = part[:, None] == part[None, :]
        same_pair = pair[:, None] == pair[None, :]
        same_vol = vol[:, None] == vol[None, :]
        mask = same_part & same_pair & ((same_vol & diff_role) | (~same_vol & ~diff_role))
    a, b = mask.nonzero(as_tuple=True)
    return a, b


def glcl_global_loss(
    z: torch.Tensor,
    volume: torch.Tensor,
    partition: torch.Tensor,
    role: torch.Tensor,
    variant: Literal["R", "D-", "D"] = "D",
    tau: float = 0.1,
    pair_ids: torch.Tensor | None = None,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """GLCL global loss (G^R / G^{D-} / G^D); formula in the module docstring.

    Args:
        z: (B, D) global embeddings ``g1(e(x))`` (normalised inside; B = batch of this worker).
        volume, partition, role: (B,) int ids (see :func:`glcl_global_pairs`).
        variant: "R", "D-" or "D" (default, the paper's proposed loss).
        tau: temperature > 0 (0.1, [C]).
        pair_ids: optional (B,) volume-pair ids for G^D.
        gather_distributed: also use the embeddings of the other workers as negatives (gathered
            with gradient via :func:`localcl.dist.gather`). Positives always stay inside a worker's
            batch (spec §6.10); every worker must hold the same B. For G^{D-}/G^D a gathered row is
            a negative iff its partition differs from the anchor's.
        chunk_size: kernel chunk size (None: full matrix; B <= 48 here, so None is fine).

    Returns:
        Scalar: ``Σ_pairs ℓ(a, b) / B``.
    """
    if z.dim() != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    if z.shape[0] != volume.shape[0]:
        raise ValueError(f"z has B={z.shape[0]} rows but volume has {volume.shape[0]}")
    a, b = glcl_global_pairs(volume, partition, role, variant, pair_ids)
    n = z.shape[0]
    part = partition.long()
    if gather_distributed and dist.world_size() > 1:
        cand = dist.gather(z)
        cand_part = dist.gather_nograd(part)
        off = dist.rank_offset(n)
    else:
        cand, cand_part, off = z, part, 0
    m = cand.shape[0]
    if variant == "R":
        # negatives: every candidate except the anchor itself
        neg_a, neg_c = a + off, torch.arange(m, device=z.device)
    else:
        neg_a, neg_c = part[a], cand_part
    terms = info_nce(
        z[a],
        cand,
        tau=tau,
        anchor_ids=b + off,
        candidate_ids=torch.arange(m, device=z.device),
        neg_anchor_groups=neg_a,
        neg_candidate_groups=neg_c,
        exclude_self=False,
        mode="single",
        chunk_size=chunk_size,
        reduction="sum",
    )
    return terms / n


class GLCLGlobalLoss(nn.Module):
    """Module form of :func:`glcl_global_loss` (Chaitanya et al., NeurIPS 2020; spec §1.4).

    Args:
        variant: "R" | "D-" | "D" (default "D").
        tau: temperature > 0 (0.1).
        gather_distributed: extra negatives from other workers (requires torch.distributed
            when enabled and a process group exists).
        chunk_size: kernel chunk size.

    Shapes: ``forward(z (B, D), volume (B,), partition (B,), role (B,), pair_ids=None) -> ()``.
    """

    def __init__(
        self,
        variant: Literal["R", "D-", "D"] = "D",
        tau: float = 0.1,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        check_tau(tau)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True but torch.distributed is not available")
        self.variant = variant
        self.tau = float(tau)
        self.gather_distributed = gather_distributed
        self.chunk_size = chunk_size

    def forward(
        self,
        z: torch.Tensor,
        volume: torch.Tensor,
        partition: torch.Tensor,
        role: torch.Tensor,
        pair_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return glcl_global_loss(
            z, volume, partition, role, self.variant, self.tau, pair_ids, self.gather_distributed, self.chunk_size
        )
