"""GLCL local contrastive losses L^R and L^D on a fixed anchor grid.

Chaitanya, Erdil, Karani, Konukoglu, NeurIPS 2020, arXiv 2006.10511; original TF1 code
``krishnabits001/domain_specific_cl`` (``models.py``, ``decoder_pretrain_net``). Spec:
``methods.md`` §1.4 "Local losses", §1.5, §1.9.

Grid [C]. On a local feature map of size ``H_l x W_l`` (decoder block ``l``), with
``M' = H_l - 4`` for 3x3 regions and ``M' = H_l - 1`` for 1x1 regions (the code's two cases),
the ``A = 13`` anchors are, in units of ``M'/4`` (integer division ``(q * M') // 4``)::

    (0,0) (0,2) (0,4) (2,0) (2,2) (2,4) (4,0) (4,2) (4,4) (1,1) (1,3) (3,1) (3,3)

Negatives [C]. The reference code does **not** compute neighbour lists: it hard-codes, per
anchor, 5 negative positions (separate tables for 3x3 and 1x1 regions). They are reproduced
below (:data:`CODE_NEIGHBOURS_3x3`, :data:`CODE_NEIGHBOURS_1x1`). In the 3x3 table some
negatives are *not* anchor positions (e.g. ``(1,2)``, ``(2,1)``); their region vectors are
computed the same way, so the loss takes region vectors on the union of anchors and these
extra positions (:class:`LocalGrid.positions`, anchors first). Options:

- ``neighbours="code"`` (default, [C]);
- ``neighbours="nearest"`` (chosen, not [C]): the 5 nearest *anchors* by Euclidean distance in
  quarter units, ties broken by the lower anchor index (stable sort of the anchor list above);
- ``neighbours="all"`` (spec option, the paper-level reading): all 12 other anchors.

Region vectors: ``v(u)`` = flatten of the ``r x r`` window of ``f = g2(d_l(e(x)))`` whose
top-left corner is ``u`` (PyTorch order: channel, row, col -> ``C*r*r`` values), then a shared
linear map to 128-d (no bias) when one is given (:func:`extract_regions`).

L^R (augmentation positives, the published configuration) for anchor ``u`` in view 1:

.. math::

    \\ell(u) = -\\log \\frac{e^{s(v_1(u),v_2(u))}}{e^{s(v_1(u),v_2(u))} + \\sum_{w\\in\\Omega^-(u)}
        \\left[e^{s(v_1(u),v_1(w))} + e^{s(v_1(u),v_2(w))}\\right]},\\quad s = \\mathrm{sim}/\\tau

symmetrised (views swapped) and averaged over anchors, both directions and images. (The code
sums over images and directions and divides by ``A``; that is ``2B`` times this mean.)

L^D (domain positives): the anchor map ``f(t1(x_i^s))`` is paired with ``f(t2(x_i^s))``,
``f(t1(x_j^s))``, ``f(t1(x_k^s))`` (``j, k``: the next two volumes of the batch with the same
partition, cyclically, as the code's ``(i + S) mod B``, ``(i + 2S) mod B``); one term per pair with
the positive ``Y(u)`` and negatives = the anchor map's and ``Y``'s regions at the **first 4**
positions of ``Ω⁻(u)`` ([C], ``no_of_neg_regs_override=4``); one direction; mean over terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from localcl.losses.kernel import check_tau, info_nce

__all__ = [
    "ANCHORS_Q",
    "CODE_NEIGHBOURS_3x3",
    "CODE_NEIGHBOURS_1x1",
    "LocalGrid",
    "local_grid",
    "extract_regions",
    "glcl_local_loss",
    "glcl_local_domain_loss",
    "GLCLLocalLoss",
]

# Anchor positions in quarter units of M' [C].
ANCHORS_Q: tuple[tuple[int, int], ...] = (
    (0, 0),
    (0, 2),
    (0, 4),
    (2, 0),
    (2, 2),
    (2, 4),
    (4, 0),
    (4, 2),
    (4, 4),
    (1, 1),
    (1, 3),
    (3, 1),
    (3, 3),
)
# Per-anchor negative positions of the reference code, quarter units [C] (3x3 regions).
CODE_NEIGHBOURS_3x3: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 2), (1, 1), (1, 2), (2, 0), (2, 1)),
    ((0, 0), (0, 4), (1, 1), (1, 3), (2, 2)),
    ((0, 2), (1, 2), (1, 3), (2, 3), (2, 4)),
    ((0, 0), (1, 1), (2, 2), (4, 0), (3, 1)),
    ((1, 1), (1, 3), (3, 1), (3, 3), (2, 0)),
    ((0, 4), (2, 2), (4, 4), (1, 3), (3, 3)),
    ((2, 0), (2, 1), (4, 2), (3, 1), (3, 2)),
    ((2, 2), (4, 0), (4, 4), (3, 1), (3, 3)),
    ((2, 3), (2, 4), (4, 2), (3, 3), (3, 2)),
    ((0, 0), (0, 2), (2, 0), (2, 2), (1, 3)),
    ((0, 2), (0, 4), (1, 1), (2, 2), (2, 4)),
    ((2, 0), (2, 2), (4, 0), (4, 2), (3, 3)),
    ((2, 2), (2, 4), (4, 2), (4, 4), (3, 1)),
)
# Same for 1x1 regions [C].
CODE_NEIGHBOURS_1x1: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 2), (2, 0), (2, 2), (1, 1), (1, 3)),
    ((0, 0), (0, 4), (2, 2), (1, 1), (1, 3)),
    ((0, 2), (2, 2), (2, 4), (3, 1), (1, 3)),
    ((0, 0), (2, 2), (4, 0), (1, 1), (3, 1)),
    ((1, 1), (1, 3), (3, 1), (3, 3), (2, 0)),
    ((0, 4), (2, 2), (4, 4), (1, 3), (3, 3)),
    ((2, 0), (2, 2), (4, 2), (3, 1), (1, 1)),
    ((2, 2), (4, 0), (4, 4), (3, 1), (3, 3)),
    ((2, 2), (2, 4), (4, 2), (3, 3), (3, 1)),
    ((0, 0), (0, 2), (2, 0), (2, 2), (1, 3)),
    ((0, 2), (0, 4), (2, 2), (2, 4), (3, 3)),
    ((2, 0), (2, 2), (4, 0), (0, 2), (1, 1)),
    ((2, 2), (2, 4), (4, 2), (4, 4), (1, 3)),
)

NEIGHBOURS = ("code", "nearest", "all")


@dataclass(frozen=True)
class LocalGrid:
    """Anchor grid of the GLCL local loss.

    Attributes:
        positions: (P, 2) int64 top-left (row, col) of every region used (anchors first).
        num_anchors: A (the first A positions are the anchors).
        neg_index: (A, n_neg) int64 indices into ``positions`` of each anchor's negatives.
        region_size: 1 or 3.
        map_size: (H_l, W_l) the grid was built for.
    """

    positions: torch.Tensor
    num_anchors: int
    neg_index: torch.Tensor
    region_size: int
    map_size: tuple[int, int]


def local_grid(
    map_size: tuple[int, int],
    region_size: int = 3,
    neighbours: Literal["code", "nearest", "all"] = "code",
    num_neighbours: int = 5,
) -> LocalGrid:
    """Build the fixed 13-anchor grid and its negative lists (module docstring).

    Args:
        map_size: (H_l, W_l) of the local feature map.
        region_size: 3 (default, [C] script) or 1.
        neighbours: "code" (default), "nearest" or "all".
        num_neighbours: negatives per anchor for "nearest" (5); "code" uses the code's 5 (L^D
            uses the first 4), "all" uses 12.

    Raises:
        ValueError: region_size not in {1, 3}, unknown ``neighbours``, map too small
            (needs ``M' >= 4`` so the quarter positions are distinct).
    """
    if region_size not in (1, 3):
        raise ValueError(f"region_size must be 1 or 3, got {region_size}")
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {neighbours!r}")
    h, w = int(map_size[0]), int(map_size[1])
    sub = 4 if region_size == 3 else 1
    mx, my = h - sub, w - sub
    if mx < 4 or my < 4:
        raise ValueError(f"map_size {map_size} too small for region_size={region_size}: need H_l, W_l >= {4 + sub}")

    def pos(q: tuple[int, int]) -> tuple[int, int]:
        return ((q[0] * mx) // 4, (q[1] * my) // 4)

    A = len(ANCHORS_Q)
    qpos: list[tuple[int, int]] = list(ANCHORS_Q)
    if neighbours == "code":
        table = CODE_NEIGHBOURS_3x3 if region_size == 3 else CODE_NEIGHBOURS_1x1
        neg_q: list[list[tuple[int, int]]] = [list(t) for t in table]
        for row in neg_q:
            for q in row:
                if q not in qpos:
                    qpos.append(q)
        neg = [[qpos.index(q) for q in row] for row in neg_q]
    elif neighbours == "nearest":
        if not 1 <= num_neighbours <= A - 1:
            raise ValueError(f"num_neighbours must be in [1, {A - 1}], got {num_neighbours}")
        aq = torch.tensor(ANCHORS_Q, dtype=torch.float64)
        d = torch.cdist(aq, aq)
        d.fill_diagonal_(float("inf"))
        neg = [torch.sort(d[i], stable=True).indices[:num_neighbours].tolist() for i in range(A)]
    else:
        neg = [[j for j in range(A) if j != i] for i in range(A)]
    positions = torch.tensor([pos(q) for q in qpos], dtype=torch.long)
    return LocalGrid(positions, A, torch.tensor(neg, dtype=torch.long), region_size, (h, w))


def extract_regions(fmap: torch.Tensor, grid: LocalGrid, proj: nn.Module | None = None) -> torch.Tensor:
    """Region vectors of a feature map at the grid positions (PatchHead-like flatten).

    Args:
        fmap: (B, C, H_l, W_l) local feature map ``g2(d_l(e(x)))``.
        grid: from :func:`local_grid` with ``grid.map_size == (H_l, W_l)``.
        proj: optional shared map ``C*r*r -> D`` (e.g. ``nn.Linear(C*9, 128, bias=False)``).

    Returns:
        (B, P, C*r*r) or (B, P, D): window ``fmap[:, :, y:y+r, x:x+r]`` flattened (C, r, r).
    """
    if fmap.dim() != 4:
        raise ValueError(f"fmap must have shape (B, C, H, W), got {tuple(fmap.shape)}")
    if tuple(fmap.shape[2:]) != grid.map_size:
        raise ValueError(f"fmap spatial size {tuple(fmap.shape[2:])} != grid.map_size {grid.map_size}")
    r = grid.region_size
    off = torch.arange(r, device=fmap.device)
    ys = grid.positions[:, 0].to(fmap.device)[:, None] + off  # (P, r)
    xs = grid.positions[:, 1].to(fmap.device)[:, None] + off  # (P, r)
    win = fmap[:, :, ys[:, :, None], xs[:, None, :]]  # (B, C, P, r, r)
    v = win.permute(0, 2, 1, 3, 4).reshape(fmap.shape[0], grid.positions.shape[0], -1)
    return proj(v) if proj is not None else v


def _check_regions(regions: torch.Tensor, grid: LocalGrid) -> None:
    if regions.dim() != 4 or regions.shape[1] != 2 or regions.shape[2] != grid.positions.shape[0]:
        raise ValueError(
            f"regions must have shape (B, 2, P, D) with P={grid.positions.shape[0]} grid positions, "
            f"got {tuple(regions.shape)}"
        )


def glcl_local_loss(
    regions: torch.Tensor, grid: LocalGrid, tau: float = 0.1, chunk_size: int | None = None
) -> torch.Tensor:
    """L^R on region vectors (formula in the module docstring).

    Args:
        regions: (B, 2, P, D): region vectors of the two intensity views of each image at
            ``grid.positions`` (:func:`extract_regions` of each view).
        grid: :func:`local_grid`.
        tau: temperature > 0 (0.1, [C]).
        chunk_size: kernel chunk size (None: full; the problem is tiny).

    Returns:
        Scalar: mean of ``ℓ`` over images, both directions and the ``A`` anchors.
    """
    _check_regions(regions, grid)
    check_tau(tau)
    B, _, P, D = regions.shape
    A = grid.num_anchors
    dev = regions.device
    neg = grid.neg_index.to(dev)  # (A, n)
    cand = regions.reshape(B * 2 * P, D)
    # anchor rows (b, v, u) in flattened order; candidate index of (b, v, p) = (b*2 + v)*P + p
    b = torch.arange(B, device=dev).view(B, 1, 1)
    v = torch.arange(2, device=dev).view(1, 2, 1)
    u = torch.arange(A, device=dev).view(1, 1, A)
    rows = ((b * 2 + v) * P + u).reshape(-1)  # (B*2*A,)
    pos_col = ((b * 2 + (1 - v)) * P + u).reshape(-1)
    M = cand.shape[0]
    n_rows = rows.numel()
    pos_mask = torch.zeros(n_rows, M, dtype=torch.bool, device=dev)
    pos_mask[torch.arange(n_rows, device=dev), pos_col] = True
    neg_mask = torch.zeros_like(pos_mask)
    nb = neg.view(1, 1, A, -1)  # (1,1,A,n)
    same = ((b * 2 + v) * P).unsqueeze(-1) + nb  # (B,2,A,n) own view
    other = ((b * 2 + (1 - v)) * P).unsqueeze(-1) + nb
    r_idx = torch.arange(n_rows, device=dev).view(B, 2, A, 1).expand_as(same)
    neg_mask[r_idx.reshape(-1), same.reshape(-1)] = True
    neg_mask[r_idx.reshape(-1), other.reshape(-1)] = True
    return info_nce(
        cand[rows],
        cand,
        tau=tau,
        pos_mask=pos_mask,
        neg_mask=neg_mask,
        exclude_self=False,
        mode="single",
        chunk_size=chunk_size,
    )


def _domain_partners(volume: torch.Tensor, partition: torch.Tensor, k: int = 2) -> torch.Tensor:
    """For each row i, the next ``k`` rows (cyclically, in batch order) with the same partition
    and a different volume. Returns (B, k) int64."""
    n = volume.shape[0]
    idx = torch.arange(n, device=volume.device)
    out = torch.empty(n, k, dtype=torch.long, device=volume.device)
    for i in range(n):
        order = (idx + i + 1) % n  # i+1, i+2, ... cyclic
        ok = (partition[order] == partition[i]) & (volume[order] != volume[i])
        cand = order[ok]
        if cand.numel() < k:
            raise ValueError(
                f"L^D needs {k} other volumes with the partition of row {i} (partition "
                f"{int(partition[i])}), found {cand.numel()}"
            )
        out[i] = cand[:k]
    return out


def glcl_local_domain_loss(
    regions: torch.Tensor,
    volume: torch.Tensor,
    partition: torch.Tensor,
    grid: LocalGrid,
    tau: float = 0.1,
    num_negatives: int = 4,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """L^D on region vectors (module docstring).

    Args:
        regions: (B, 2, P, D): views t1 (index 0) and t2 (index 1) of each batch slice ``x_i^s``.
        volume, partition: (B,) int ids of each slice.
        grid: :func:`local_grid` (``"code"`` neighbours by default).
        tau: temperature > 0.
        num_negatives: negative positions per map, the first ``n`` of ``Ω⁻(u)`` (4, [C]).

    Returns:
        Scalar: mean over the ``B * A * 3`` terms.
    """
    _check_regions(regions, grid)
    check_tau(tau)
    B, _, P, D = regions.shape
    if volume.shape != (B,) or partition.shape != (B,):
        raise ValueError(f"volume and partition must have shape (B,)=({B},)")
    if not 1 <= num_negatives <= grid.neg_index.shape[1]:
        raise ValueError(f"num_negatives must be in [1, {grid.neg_index.shape[1]}], got {num_negatives}")
    A = grid.num_anchors
    dev = regions.device
    neg = grid.neg_index[:, :num_negatives].to(dev)  # (A, n)
    partners = _domain_partners(volume.long(), partition.long())  # (B, 2)
    cand = regions.reshape(B * 2 * P, D)
    b = torch.arange(B, device=dev)
    # paired map (image, view) for the 3 terms: (b, 1), (j, 0), (k, 0)
    pm = torch.stack([b * 2 + 1, partners[:, 0] * 2, partners[:, 1] * 2], 1)  # (B, 3)
    anchor_map = (b * 2).view(B, 1, 1).expand(B, 3, A)
    u = torch.arange(A, device=dev).view(1, 1, A)
    rows = (anchor_map * P + u).reshape(-1)  # (B*3*A,)
    pos_col = (pm.view(B, 3, 1) * P + u).reshape(-1)
    n_rows = rows.numel()
    ridx = torch.arange(n_rows, device=dev)
    pos_mask = torch.zeros(n_rows, cand.shape[0], dtype=torch.bool, device=dev)
    pos_mask[ridx, pos_col] = True
    neg_mask = torch.zeros_like(pos_mask)
    nb = neg.view(1, 1, A, -1)
    own = (anchor_map * P).unsqueeze(-1) + nb  # (B,3,A,n)
    paired = (pm.view(B, 3, 1, 1) * P) + nb
    r2 = ridx.view(B, 3, A, 1).expand_as(own)
    neg_mask[r2.reshape(-1), own.reshape(-1)] = True
    neg_mask[r2.reshape(-1), paired.reshape(-1)] = True
    return info_nce(
        cand[rows],
        cand,
        tau=tau,
        pos_mask=pos_mask,
        neg_mask=neg_mask,
        exclude_self=False,
        mode="single",
        chunk_size=chunk_size,
    )


class GLCLLocalLoss(nn.Module):
    """Module form of the GLCL local losses (Chaitanya et al., NeurIPS 2020; spec §1.4).

    Args:
        map_size: (H_l, W_l) of the local feature map (48x48 for 192² input, l=3).
        variant: "R" (default, L^R) or "D" (L^D).
        region_size: 3 (default) or 1.
        neighbours: "code" (default) | "nearest" | "all" (see module docstring).
        in_features, out_features: if ``in_features`` is given, a shared
            ``nn.Linear(in_features, out_features=128, bias=False)`` maps flattened windows
            (``in_features = C_l * r * r``) to region vectors [C]; otherwise windows are used raw.
        tau: temperature > 0 (0.1).
        domain_negatives: L^D only, negatives per map = the first ``n`` of each anchor's list
            (4, [C]; capped at the list length).
        chunk_size: kernel chunk size (None: full matrix; the problem is tiny).

    Shapes:
        ``forward(f1 (B, C, H_l, W_l), f2 (B, C, H_l, W_l), volume=None, partition=None) -> ()``
        (``volume``/``partition`` (B,) required for "D"), or ``forward_regions(regions (B, 2, P, D), ...)``.
    """

    def __init__(
        self,
        map_size: tuple[int, int],
        variant: Literal["R", "D"] = "R",
        region_size: int = 3,
        neighbours: Literal["code", "nearest", "all"] = "code",
        in_features: int | None = None,
        out_features: int = 128,
        tau: float = 0.1,
        chunk_size: int | None = None,
        domain_negatives: int = 4,
    ) -> None:
        super().__init__()
        if variant not in ("R", "D"):
            raise ValueError(f"variant must be 'R' or 'D', got {variant!r}")
        check_tau(tau)
        self.grid = local_grid(map_size, region_size, neighbours)
        self.variant = variant
        self.tau = float(tau)
        self.chunk_size = chunk_size
        self.proj = nn.Linear(in_features, out_features, bias=False) if in_features is not None else None
        if domain_negatives < 1:
            raise ValueError(f"domain_negatives must be >= 1, got {domain_negatives}")
        self.domain_negatives = min(int(domain_negatives), self.grid.neg_index.shape[1])

    def forward_regions(
        self, regions: torch.Tensor, volume: torch.Tensor | None = None, partition: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.variant == "R":
            return glcl_local_loss(regions, self.grid, self.tau, self.chunk_size)
        if volume is None or partition is None:
            raise ValueError("variant 'D' needs volume and partition")
        return glcl_local_domain_loss(
            regions, volume, partition, self.grid, self.tau, self.domain_negatives, self.chunk_size
        )

    def forward(
        self,
        f1: torch.Tensor,
        f2: torch.Tensor,
        volume: torch.Tensor | None = None,
        partition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if f1.shape != f2.shape:
            raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
        regions = torch.stack([extract_regions(f1, self.grid, self.proj), extract_regions(f2, self.grid, self.proj)], 1)
        return self.forward_regions(regions, volume, partition)
