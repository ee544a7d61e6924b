"""LRC: Felzenszwalb super-pixels, region point sampler and the contrastive sampling loss.

Spec: ``methods.md`` §5.4-5.5 (LRC, Yan et al., *Localized Region Contrast for Enhancing
Self-Supervised Learning in Medical Image Segmentation*, MICCAI 2023, arXiv 2304.03406), with
the point-level principle of PLRC (Bai et al., *Point-Level Region Contrast for Object
Detection Pre-Training*, arXiv 2202.04639). No original LRC code is public: the loss formula,
the sampling and every default below are reconstructions ([R] in the spec); the use of
Felzenszwalb's graph-based segmentation and of a "contrastive sampling loss" is [P].

Pieces (each usable on its own):

- :func:`felzenszwalb_superpixels` -- one 2D slice -> int32 region map (scikit-image), computed
  once per un-augmented slice so that ``storage`` can cache it as a derived array;
- :func:`sample_region_points` -- picks ``K_r`` regions present in both views of every image and
  ``P_r`` points per region per view (vectorised: one sort of all pixel keys, no Python loop over
  pixels), seeded by a ``torch.Generator``;
- :func:`lrc_loss` / :class:`LRCLoss` -- the multi-positive InfoNCE over the sampled points,
  computed by the shared memory-bounded kernel :func:`localcl.losses.kernel.info_nce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from localcl.losses.kernel import check_tau, info_nce

__all__ = [
    "felzenszwalb_superpixels",
    "RegionPoints",
    "sample_region_points",
    "gather_point_embeddings",
    "lrc_loss",
    "lrc_loss_from_points",
    "LRCLoss",
]


def felzenszwalb_superpixels(
    slice2d: np.ndarray | torch.Tensor,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 50,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph-based super-pixels of one 2D slice (spec §5.4, [P]).

    Thin, validated wrapper around :func:`skimage.segmentation.felzenszwalb` (no hand-written
    segmentation). It is a pure function of the un-augmented slice, so it is computed once per
    slice and cached by ``storage`` (``st.put_derived(case, "superpixels", ...)``); views get the
    map warped with the view's geometric transform (nearest interpolation).

    Args:
        slice2d: Shape (H, W), real-valued, finite; intensity-normalised (e.g. ``(x-p1)/(p99-p1)``)
            so that ``scale`` has a stable meaning across volumes.
        scale: Larger values give larger regions (default 100, [R]; search 50-500).
        sigma: Gaussian pre-smoothing width in pixels (default 0.8, [R]; search 0.5-1.0).
        min_size: Minimum region size in pixels, enforced by post-merging (default 50, [R]).

    Returns:
        int32 array (H, W) of region ids ``0..R-1`` (every pixel belongs to a region).

    Raises:
        ValueError: ``slice2d`` not 2D or not finite, ``scale <= 0``, ``sigma < 0``, ``min_size < 1``.
    """
    from skimage.segmentation import felzenszwalb

    arr = slice2d.detach().cpu().numpy() if isinstance(slice2d, torch.Tensor) else np.asarray(slice2d)
    if arr.ndim != 2:
        raise ValueError(f"slice2d must be 2D (H, W), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("slice2d is empty")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("slice2d contains NaN or inf")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if int(min_size) < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    seg = felzenszwalb(arr, scale=float(scale), sigma=float(sigma), min_size=int(min_size), channel_axis=None)
    labels: np.ndarray = seg.astype(np.int32, copy=False)
    return labels


@dataclass
class RegionPoints:
    """Points sampled by :func:`sample_region_points`, flattened over the batch.

    Attributes:
        image: (N,) int64 image index ``b`` of each point.
        view: (N,) int64 view index ``v`` in {0, 1}.
        region: (N,) int64 super-pixel id (as in the input maps) of each point.
        y, x: (N,) int64 pixel coordinates in the super-pixel map grid (H, W).
        group: (N,) int64 dense id of the (image, region) pair, ``0..G-1``: equal groups are
            positives of each other.
    """

    image: torch.Tensor
    view: torch.Tensor
    region: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    group: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.numel())


def sample_region_points(
    regions: torch.Tensor,
    num_regions: int = 16,
    points_per_region: int = 8,
    min_pix: int = 1,
    generator: torch.Generator | None = None,
    allow_fewer: bool = False,
) -> RegionPoints:
    """Region point sampler of LRC (spec §5.4, [R]).

    For each image ``b``: the eligible regions are the ids ``r >= 0`` with at least ``min_pix``
    pixels in **both** views (regions cropped out of a view, or shrunk below ``min_pix`` by the
    warp, are dropped); ``K_r = num_regions`` of them are drawn uniformly without replacement;
    in each view ``P_r = points_per_region`` pixels of the region are drawn uniformly with
    replacement, independently per view (the points of two views need not coincide).

    Vectorised: pixels are sorted once by the key ``((b*2 + v) * R + r)``; a draw inside a region
    is ``start[key] + floor(u * count[key])`` with ``u ~ U[0, 1)`` from ``generator``.

    Args:
        regions: Shape (B, 2, H, W), integer super-pixel ids of each view (same id = same tissue
            in both views); negative ids mark pixels to ignore (padding / outside the view).
        num_regions: ``K_r`` regions per image (default 16).
        points_per_region: ``P_r`` points per region per view (default 8).
        min_pix: Minimum pixel count of a region in each view to be eligible (>= 1).
        generator: Seeded ``torch.Generator`` on the device of ``regions`` (CPU generator for CPU).
        allow_fewer: If False (default) an image with fewer than ``K_r`` eligible regions raises;
            if True that image contributes all its eligible regions.

    Returns:
        :class:`RegionPoints` with ``N = sum_b K_b * 2 * P_r`` points, ordered by
        (image, region slot, view, point).

    Raises:
        ValueError: bad shape/dtype, non-positive counts, or too few eligible regions.
    """
    if regions.dim() != 4 or regions.shape[1] != 2:
        raise ValueError(f"regions must have shape (B, 2, H, W), got {tuple(regions.shape)}")
    if regions.dtype.is_floating_point or regions.dtype == torch.bool:
        raise ValueError(f"regions must be an integer tensor, got {regions.dtype}")
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    if points_per_region < 1:
        raise ValueError(f"points_per_region must be >= 1, got {points_per_region}")
    if min_pix < 1:
        raise ValueError(f"min_pix must be >= 1, got {min_pix}")
    B, _, H, W = regions.shape
    dev = regions.device
    reg = regions.long()
    R = int(reg.max().item()) + 1 if reg.numel() else 0
    if R <= 0:
        raise ValueError("regions holds no valid (>= 0) region id")

    valid = reg >= 0
    bv = torch.arange(2 * B, device=dev).view(B, 2, 1, 1).expand(B, 2, H, W)
    key = torch.where(valid, bv * R + reg.clamp_min(0), torch.full_like(reg, 2 * B * R))
    flat_key = key.reshape(-1)
    counts = torch.bincount(flat_key, minlength=2 * B * R + 1)[: 2 * B * R]  # (2BR,)
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat_key, stable=True)  # pixel indices (into B*2*H*W) grouped by key

    cnt = counts.view(B, 2, R)
    eligible = (cnt[:, 0] >= min_pix) & (cnt[:, 1] >= min_pix)  # (B, R)
    n_elig = eligible.sum(1)
    short = (n_elig < num_regions).nonzero().flatten()
    if short.numel() and not allow_fewer:
        b0 = int(short[0])
        raise ValueError(
            f"num_regions={num_regions} exceeds the regions available in both views of image {b0} "
            f"({int(n_elig[b0])} regions with >= min_pix={min_pix} pixels); lower num_regions or "
            "min_pix, or pass allow_fewer=True"
        )
    k = min(num_regions, R)
    score = torch.rand((B, R), generator=generator, device=dev)
    score = torch.where(eligible, score, torch.full_like(score, -1.0))
    top_score, chosen = torch.topk(score, k, dim=1)  # (B, k)
    slot_ok = top_score >= 0  # (B, k) slot holds an eligible region
    b_idx = torch.arange(B, device=dev).view(B, 1).expand(B, k)[slot_ok]  # (G,)
    r_idx = chosen[slot_ok]  # (G,)
    G = b_idx.numel()
    P = points_per_region
    # keys (G, 2): region r of image b in view v
    v_idx = torch.arange(2, device=dev).view(1, 2)
    gkey = (b_idx.view(G, 1) * 2 + v_idx) * R + r_idx.view(G, 1)
    u = torch.rand((G, 2, P), generator=generator, device=dev)
    c = counts[gkey].unsqueeze(-1)  # (G, 2, 1), >= min_pix >= 1
    pos = starts[gkey].unsqueeze(-1) + torch.clamp((u * c).long(), max=c - 1)  # (G, 2, P)
    pix = order[pos.reshape(-1)]  # flat indices into (B, 2, H, W)
    hw = pix % (H * W)
    return RegionPoints(
        image=b_idx.view(G, 1, 1).expand(G, 2, P).reshape(-1),
        view=v_idx.view(1, 2, 1).expand(G, 2, P).reshape(-1),
        region=r_idx.view(G, 1, 1).expand(G, 2, P).reshape(-1),
        y=hw // W,
        x=hw % W,
        group=torch.arange(G, device=dev).view(G, 1, 1).expand(G, 2, P).reshape(-1),
    )


def gather_point_embeddings(embeddings: torch.Tensor, points: RegionPoints, map_hw: tuple[int, int]) -> torch.Tensor:
    """Read the dense embeddings at sampled points (nearest lookup).

    Args:
        embeddings: Shape (B, 2, D, h, w), dense embeddings of both views.
        points: From :func:`sample_region_points` on maps of size ``map_hw = (H, W)``.
        map_hw: Size of the super-pixel maps; a point ``(y, x)`` reads cell
            ``(floor(y*h/H), floor(x*w/W))`` (identity when the sizes are equal).

    Returns:
        Shape (N, D), in the order of ``points``.
    """
    B, V, D, h, w = embeddings.shape
    H, W = map_hw
    yy = (points.y * h) // H
    xx = (points.x * w) // W
    return embeddings[points.image, points.view, :, yy, xx]


def lrc_loss(
    embeddings: torch.Tensor,
    regions: torch.Tensor,
    tau: float = 0.1,
    num_regions: int = 16,
    points_per_region: int = 8,
    min_pix: int = 1,
    mode: Literal["summed", "per_positive"] = "summed",
    same_view_positives: bool = False,
    generator: torch.Generator | None = None,
    allow_fewer: bool = False,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    r"""LRC localized contrastive sampling loss (spec §5.4, [R]).

    .. math::

        \mathcal L_{LRC} = \frac{1}{|A|}\sum_{a\in A} -\log
            \frac{\sum_{p\in P(a)} \exp(\mathrm{sim}(w_a,w_p)/\tau)}
                 {\sum_{k\in A,\,k\neq a} \exp(\mathrm{sim}(w_a,w_k)/\tau)},
        \qquad P(a)=\{p\in A: \mathrm{id}(p)=\mathrm{id}(a),\ \mathrm{view}(p)\neq\mathrm{view}(a)\}

    with ``id = (image, region)``, ``A`` the points of :func:`sample_region_points` (both views,
    all images; ``|A| = B * 2 * K_r * P_r``). Negatives are all other points: other regions of
    the same image and every point of other images. ``mode="per_positive"`` (SupCon form)
    averages ``-log(exp(s_ap/τ) / Σ_{k≠a} exp(s_ak/τ))`` over ``p ∈ P(a)`` instead;
    ``same_view_positives=True`` adds the other points of the same region in the same view to
    ``P(a)``. ``sim`` is cosine similarity (L2 normalisation inside the kernel).

    Args:
        embeddings: Shape (B, 2, D, h, w), dense local embeddings ``g_loc(d(e(x^v)))`` of both views.
        regions: Shape (B, 2, H, W), integer super-pixel maps warped into each view (-1 = ignore).
        tau: Temperature > 0 (default 0.1, [R]).
        num_regions, points_per_region, min_pix, generator, allow_fewer: see
            :func:`sample_region_points`.
        mode: ``"summed"`` (default) or ``"per_positive"``.
        same_view_positives: Also count same-view points of the region as positives.
        chunk_size: Anchor rows per chunk in the kernel (``None`` = naive full matrix).

    Returns:
        Scalar loss. Only the embeddings at sampled points receive gradient.
    """
    check_tau(tau)
    if mode not in ("summed", "per_positive"):
        raise ValueError(f"mode must be 'summed' or 'per_positive', got {mode!r}")
    if embeddings.dim() != 5 or embeddings.shape[1] != 2:
        raise ValueError(f"embeddings must have shape (B, 2, D, h, w), got {tuple(embeddings.shape)}")
    if regions.dim() != 4 or regions.shape[:2] != embeddings.shape[:2]:
        raise ValueError(
            f"regions must have shape (B, 2, H, W) with B={embeddings.shape[0]}, got {tuple(regions.shape)}"
        )
    pts = sample_region_points(regions, num_regions, points_per_region, min_pix, generator, allow_fewer)
    w = gather_point_embeddings(embeddings, pts, (regions.shape[2], regions.shape[3]))
    return lrc_loss_from_points(w, pts.group, pts.view, tau, mode, same_view_positives, chunk_size)


def lrc_loss_from_points(
    w: torch.Tensor,
    group: torch.Tensor,
    view: torch.Tensor,
    tau: float = 0.1,
    mode: Literal["summed", "per_positive"] = "summed",
    same_view_positives: bool = False,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """The LRC point loss on already-sampled points (see :func:`lrc_loss` for the formula).

    Args:
        w: Shape (N, D) point embeddings.
        group: Shape (N,) int, (image, region) id of each point.
        view: Shape (N,) int, view of each point.

    Returns:
        Scalar: mean over the anchors ``a`` with a non-empty ``P(a)``.
    """
    check_tau(tau)
    if w.dim() != 2 or group.shape != (w.shape[0],) or view.shape != (w.shape[0],):
        raise ValueError(
            f"w must be (N, D) and group/view (N,), got {tuple(w.shape)}, {tuple(group.shape)}, {tuple(view.shape)}"
        )
    g, v = group.long(), view.long()
    if same_view_positives:
        a_ids, c_ids = g, g
    else:
        # id equality <=> same (image, region) and different view: anchor 2g + v, candidate 2g + (1 - v)
        a_ids, c_ids = 2 * g + v, 2 * g + (1 - v)
    return info_nce(
        w, None, tau=tau, anchor_ids=a_ids, candidate_ids=c_ids, exclude_self=True, mode=mode, chunk_size=chunk_size
    )


class LRCLoss(nn.Module):
    """Module form of :func:`lrc_loss` (Yan et al., MICCAI 2023, arXiv 2304.03406; spec §5.4).

    Args:
        tau: Temperature > 0 (0.1).
        num_regions: ``K_r`` (16). points_per_region: ``P_r`` (8). min_pix: (1).
        mode: ``"summed"`` (default) or ``"per_positive"``.
        same_view_positives: Include same-view points of the region in ``P(a)`` (False).
        allow_fewer: Tolerate images with fewer than ``K_r`` eligible regions (False).
        chunk_size: Kernel chunk size (256; ``None`` = naive).

    Shapes: ``forward(embeddings (B, 2, D, h, w), regions (B, 2, H, W), generator=None) -> ()``.
    """

    def __init__(
        self,
        tau: float = 0.1,
        num_regions: int = 16,
        points_per_region: int = 8,
        min_pix: int = 1,
        mode: Literal["summed", "per_positive"] = "summed",
        same_view_positives: bool = False,
        allow_fewer: bool = False,
        chunk_size: int | None = 256,
    ) -> None:
        super().__init__()
        check_tau(tau)
        if mode not in ("summed", "per_positive"):
            raise ValueError(f"mode must be 'summed' or 'per_positive', got {mode!r}")
        for name, val in (("num_regions", num_regions), ("points_per_region", points_per_region), ("min_pix", min_pix)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.tau = float(tau)
        self.num_regions = int(num_regions)
        self.points_per_region = int(points_per_region)
        self.min_pix = int(min_pix)
        self.mode = mode
        self.same_view_positives = bool(same_view_positives)
        self.allow_fewer = bool(allow_fewer)
        self.chunk_size = chunk_size

    def forward(
        self, embeddings: torch.Tensor, regions: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return lrc_loss(
            embeddings,
            regions,
            tau=self.tau,
            num_regions=self.num_regions,
            points_per_region=self.points_per_region,
            min_pix=self.min_pix,
            mode=self.mode,
            same_view_positives=self.same_view_positives,
            generator=generator,
            allow_fewer=self.allow_fewer,
            chunk_size=self.chunk_size,
        )
