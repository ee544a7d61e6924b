"""IDEAL: dense contrastive pre-training loss and two-stream bidirectional consistency.

Basak, Chattopadhyay, Kundu, Nag, Mallipeddi, *IDEAL: Improved DEnse locAL Contrastive Learning
for Semi-Supervised Medical Image Segmentation*, ICASSP 2023, arXiv 2210.15075 (code
``hritam-98/IDEAL-ICASSP23``, notebooks not retrievable). The structure is [P]; the equations are
reconstructions in the DenseCL form (Wang et al., CVPR 2021, arXiv 2011.09157, code
``WXinlong/DenseCL``). Spec: ``methods.md`` §3.4-3.6.

Dense loss (per image, ``S² = h*w`` query cells):

.. math::

    \\mathcal L_{dense} = \\frac{1}{|V|}\\sum_{(b,s)\\in V} -\\log
        \\frac{e^{r_s\\cdot t_{s^+}/\\tau}}{e^{r_s\\cdot t_{s^+}/\\tau} + \\sum_{k\\in Q} e^{r_s\\cdot k/\\tau}}

with ``r = normalize(G_Q(E_Q(x_q)))``, ``t = normalize(G_K(E_K(x_k)))`` (keys, no gradient) and the
positive ``s⁺(s)``:

- ``"argmax"`` (default, DenseCL): ``argmax_{s'} sim(b^q_s, b^k_{s'})`` over the backbone
  features before the head, computed without gradient in chunks of query cells;
- ``"geometric"`` (option): a given index map from the tracked view transforms
  (:func:`grid_match_from_coords` turns :func:`localcl.augment.correspondence` output into it);
  query cells that fall outside the key view (index ``-1``) are left out of ``V``.

Negatives ``Q``: the FIFO :class:`DenseQueue` of globally pooled, normalised keys of past images
(``negatives="queue"``, default, DenseCL), the dense keys of the *other* images of the batch
(``negatives="batch"``), or every dense key of the batch but the positive, the other cells of the
same image included (``negatives="dense"``, option: without within-image negatives nothing stops
all cells of an image collapsing to one code). Optional global term: ``L = (1-λ) L_global + λ L_dense`` with the MoCo
loss of pooled query vs pooled key over the same queue (``λ = 1`` default, [R]).

Fine-tuning consistency (:func:`bidirectional_consistency`):
``L_pl = CE(p1, sg(argmax p2)) + CE(p2, sg(argmax p1))`` (optionally + soft Dice of each stream
against the other's hard label; binary path: a single logit channel thresholded at 0.5 with BCE),
weighted by the ramp :func:`consistency_weight`
``λ_c(t) = λ_max exp(-5 (1 - t/t_ramp)²)`` for ``t < t_ramp``, else ``λ_max``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import localcl.dist as dist
from localcl.losses.kernel import check_tau, info_nce

__all__ = [
    "DenseQueue",
    "argmax_correspondence",
    "grid_match_from_coords",
    "pool_keys",
    "ideal_dense_loss",
    "IDEALDenseLoss",
    "bidirectional_consistency",
    "consistency_weight",
]


class DenseQueue(nn.Module):
    """FIFO queue of normalised keys (DenseCL/MoCo negatives), kept as a buffer.

    ``push(keys)`` gathers the keys of all workers (:func:`localcl.dist.gather_nograd`, rank
    order) and writes them at the pointer, wrapping around, so every worker holds the same queue.

    Args:
        size: number of keys ``|Q|`` (16,384 default, [R]; DenseCL 65,536).
        dim: key dimension (128).
        init: ``"empty"`` (default): the queue starts empty and :meth:`negatives` returns only
            the rows written so far; ``"random"`` (MoCo/DenseCL initialisation): it starts full
            of random unit vectors drawn from ``seed`` (identical on every worker).
        seed: seed of the random initial keys.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(
        self, size: int = 16384, dim: int = 128, init: Literal["empty", "random"] = "empty", seed: int = 0
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        if init == "random":
            q = F.normalize(torch.randn(size, dim, generator=torch.Generator().manual_seed(seed)), dim=1)
        else:
            q = torch.zeros(size, dim)
        self.register_buffer("queue", q)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.tensor(size if init == "random" else 0, dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue (n, dim) keys (normalised here) from this worker, gathered over workers."""
        if keys.dim() != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must have shape (n, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        k = F.normalize(dist.gather_nograd(keys).to(self.queue.dtype), dim=1)
        size = self.queue.shape[0]
        if k.shape[0] > size:
            k = k[-size:]
        n = k.shape[0]
        p = int(self.ptr)
        idx = (torch.arange(n, device=self.queue.device) + p) % size
        self.queue[idx] = k.to(self.queue.device)
        self.ptr.fill_((p + n) % size)
        self.filled.fill_(min(size, int(self.filled) + n))

    def negatives(self) -> torch.Tensor:
        """(n_filled, dim) detached keys currently in the queue."""
        return self.queue[: int(self.filled)].detach()


@torch.no_grad()
def argmax_correspondence(bq: torch.Tensor, bk: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """DenseCL matching: for each query cell the key cell of highest backbone cosine similarity.

    Args:
        bq: (B, C, h, w) query-view backbone features. bk: (B, C, h', w') key-view features.
        chunk_size: query cells per chunk (bounds memory to chunk * h'w' per image).

    Returns:
        (B, h*w) int64 index into the key grid (row-major ``y * w' + x``).
    """
    if bq.dim() != 4 or bk.dim() != 4 or bq.shape[:2] != bk.shape[:2]:
        raise ValueError(f"bq and bk must be (B, C, h, w) with equal B and C, got {tuple(bq.shape)}, {tuple(bk.shape)}")
    B, C = bq.shape[:2]
    q = F.normalize(bq.reshape(B, C, -1), dim=1).transpose(1, 2)  # (B, Sq, C)
    k = F.normalize(bk.reshape(B, C, -1), dim=1)  # (B, C, Sk)
    out = torch.empty(B, q.shape[1], dtype=torch.long, device=bq.device)
    for i0 in range(0, q.shape[1], chunk_size):
        out[:, i0 : i0 + chunk_size] = torch.bmm(q[:, i0 : i0 + chunk_size], k).argmax(-1)
    return out


def grid_match_from_coords(coords: torch.Tensor, valid: torch.Tensor, key_hw: tuple[int, int]) -> torch.Tensor:
    """Turn a tracked correspondence into a key-grid index map (geometric matching).

    Args:
        coords: (B, h, w, 2) normalised ``(x, y)`` in ``[-1, 1]`` (``grid_sample`` convention,
            ``align_corners=False``) of each query cell's point in the key view, e.g. from
            :func:`localcl.augment.correspondence` at the dense-grid resolution.
        valid: (B, h, w) bool, the point lies inside the key view.
        key_hw: (h', w') of the key grid.

    Returns:
        (B, h*w) int64: nearest key cell ``y * w' + x``, ``-1`` where invalid.
    """
    if coords.dim() != 4 or coords.shape[-1] != 2 or valid.shape != coords.shape[:3]:
        raise ValueError(
            f"coords must be (B, h, w, 2) and valid (B, h, w), got {tuple(coords.shape)}, {tuple(valid.shape)}"
        )
    hk, wk = key_hw
    x = torch.floor((coords[..., 0] + 1) * wk / 2).long().clamp(0, wk - 1)
    y = torch.floor((coords[..., 1] + 1) * hk / 2).long().clamp(0, hk - 1)
    idx = y * wk + x
    return torch.where(valid, idx, torch.full_like(idx, -1)).reshape(coords.shape[0], -1)


def pool_keys(t: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled, normalised keys for the queue: (B, D, h, w) -> (B, D)."""
    if t.dim() != 4:
        raise ValueError(f"t must have shape (B, D, h, w), got {tuple(t.shape)}")
    return F.normalize(t.detach().mean(dim=(2, 3)), dim=1)


def ideal_dense_loss(
    r: torch.Tensor,
    t: torch.Tensor,
    match: Literal["argmax", "geometric"] = "argmax",
    bq: torch.Tensor | None = None,
    bk: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    negatives: Literal["queue", "batch", "dense"] = "queue",
    queue: torch.Tensor | DenseQueue | None = None,
    tau: float = 0.2,
    lam: float = 1.0,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """IDEAL dense contrastive loss (module docstring).

    Args:
        r: (B, D, h, w) query dense projections (gradient flows here).
        t: (B, D, h', w') key dense projections (momentum branch; used detached).
        match: "argmax" (needs ``bq``, ``bk``) or "geometric" (needs ``index``).
        bq, bk: (B, C, h, w), (B, C, h', w') backbone features for the argmax matching.
        index: (B, h*w) int64 key-cell index per query cell, ``-1`` = no correspondence.
        negatives: "queue" (default; needs ``queue``), "batch" (other images' dense keys) or
            "dense" (every key cell of the batch but the positive, same image included).
        queue: (|Q|, D) keys or a :class:`DenseQueue`.
        tau: temperature > 0 (0.2, DenseCL; [R]).
        lam: weight λ ∈ [0, 1] of the dense term; ``λ < 1`` adds ``(1-λ)`` x the global MoCo
            term (pooled query vs pooled key, same negatives).
        chunk_size: kernel chunk size (None = naive full logits matrix).

    Returns:
        Scalar loss.
    """
    check_tau(tau)
    if r.dim() != 4 or t.dim() != 4 or r.shape[:2] != t.shape[:2]:
        raise ValueError(f"r and t must be (B, D, h, w) with equal B and D, got {tuple(r.shape)}, {tuple(t.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if negatives not in ("queue", "batch", "dense"):
        raise ValueError(f"negatives must be 'queue', 'batch' or 'dense', got {negatives!r}")
    B, D, h, w = r.shape
    Sq, Sk = h * w, t.shape[2] * t.shape[3]
    dev = r.device
    if match == "argmax":
        if bq is None or bk is None:
            raise ValueError("match='argmax' needs the backbone features bq and bk")
        if bq.shape[0] != B or bq.shape[2:] != r.shape[2:] or bk.shape[2:] != t.shape[2:]:
            raise ValueError("bq/bk must have the batch size and grids of r/t")
        idx = argmax_correspondence(bq, bk)
    elif match == "geometric":
        if index is None:
            raise ValueError("match='geometric' needs index (B, h*w)")
        if index.shape != (B, Sq):
            raise ValueError(f"index must have shape (B, h*w)=({B}, {Sq}), got {tuple(index.shape)}")
        idx = index.long()
        if int(idx.max()) >= Sk:
            raise ValueError(f"index holds {int(idx.max())} >= number of key cells {Sk}")
    else:
        raise ValueError(f"match must be 'argmax' or 'geometric', got {match!r}")

    anchors = r.reshape(B, D, Sq).transpose(1, 2).reshape(B * Sq, D)
    keys = t.detach().reshape(B, D, Sk).transpose(1, 2).reshape(B * Sk, D)
    img_q = torch.arange(B, device=dev).repeat_interleave(Sq)
    img_k = torch.arange(B, device=dev).repeat_interleave(Sk)
    pos = torch.where(idx >= 0, idx + torch.arange(B, device=dev).view(B, 1) * Sk, torch.full_like(idx, -1)).reshape(-1)
    if negatives == "queue":
        if queue is None:
            raise ValueError("negatives='queue' needs queue (a DenseQueue or a (|Q|, D) tensor)")
        qk = queue.negatives() if isinstance(queue, DenseQueue) else queue.detach()
        if qk.dim() != 2 or qk.shape[1] != D:
            raise ValueError(f"queue must have shape (|Q|, D={D}), got {tuple(qk.shape)}")
        cand = torch.cat([keys, qk.to(keys.dtype)], 0)
        cand_ids = torch.cat([torch.arange(B * Sk, device=dev), torch.full((qk.shape[0],), -2, device=dev)])
        # keys are never negatives (group 0 like the anchors); queue rows are (group 1)
        a_grp: torch.Tensor | None = torch.zeros(B * Sq, dtype=torch.long, device=dev)
        c_grp = torch.cat(
            [torch.zeros(B * Sk, dtype=torch.long, device=dev), torch.ones(qk.shape[0], dtype=torch.long, device=dev)]
        )
    elif negatives == "batch":
        qk = None
        cand, cand_ids = keys, torch.arange(B * Sk, device=dev)
        a_grp, c_grp = img_q, img_k  # negatives: keys of other images
    else:  # "dense": every key cell but the positive
        qk = None
        cand, cand_ids = keys, torch.arange(B * Sk, device=dev)
        a_grp = c_grp = None
    dense = info_nce(
        anchors,
        cand,
        tau=tau,
        anchor_ids=pos,
        candidate_ids=cand_ids,
        neg_anchor_groups=a_grp,
        neg_candidate_groups=c_grp,
        exclude_self=False,
        mode="single",
        chunk_size=chunk_size,
    )
    if lam >= 1.0:
        return dense
    gq = r.mean(dim=(2, 3))
    gk = pool_keys(t)
    if negatives == "queue":  # MoCo: negatives are the queue only
        assert qk is not None
        gc = torch.cat([gk, qk.to(gk.dtype)], 0)
        ids_c = torch.cat([torch.arange(B, device=dev), torch.full((qk.shape[0],), -2, device=dev)])
        ga = torch.zeros(B, dtype=torch.long, device=dev)
        gcg = torch.cat([ga, torch.ones(qk.shape[0], dtype=torch.long, device=dev)])
    else:  # "batch" / "dense": the other images' pooled keys
        gc, ids_c = gk, torch.arange(B, device=dev)
        ga = gcg = torch.arange(B, device=dev)
    glob = info_nce(
        gq,
        gc,
        tau=tau,
        anchor_ids=torch.arange(B, device=dev),
        candidate_ids=ids_c,
        neg_anchor_groups=ga,
        neg_candidate_groups=gcg,
        exclude_self=False,
        mode="single",
    )
    return (1.0 - lam) * glob + lam * dense


class IDEALDenseLoss(nn.Module):
    """Module form of :func:`ideal_dense_loss` that owns its :class:`DenseQueue`.

    Args:
        tau: 0.2. lam: 1.0. match: "argmax" | "geometric". negatives: "queue" | "batch" | "dense".
        queue_size: 16384. dim: 128. chunk_size: 256.
        queue_init: ``"warm"`` (default): the queue starts empty and the first forward pushes
            that batch's pooled keys before computing the loss (so step 0 has negatives);
            ``"random"``: DenseCL's initialisation, a full queue of random unit keys.

    ``forward(r, t, bq=None, bk=None, index=None) -> ()``; call :meth:`enqueue` (or the method's
    ``on_after_step``) with the key map ``t`` after the optimiser step to push its pooled keys.

    """

    def __init__(
        self,
        tau: float = 0.2,
        lam: float = 1.0,
        match: Literal["argmax", "geometric"] = "argmax",
        negatives: Literal["queue", "batch", "dense"] = "queue",
        queue_size: int = 16384,
        dim: int = 128,
        chunk_size: int | None = 256,
        queue_init: Literal["warm", "random"] = "warm",
    ) -> None:
        super().__init__()
        check_tau(tau)
        if queue_init not in ("warm", "random"):
            raise ValueError(f"queue_init must be 'warm' or 'random', got {queue_init!r}")
        if match not in ("argmax", "geometric"):
            raise ValueError(f"match must be 'argmax' or 'geometric', got {match!r}")
        if negatives not in ("queue", "batch", "dense"):
            raise ValueError(f"negatives must be 'queue', 'batch' or 'dense', got {negatives!r}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.tau, self.lam, self.match, self.negatives, self.chunk_size = (
            float(tau),
            float(lam),
            match,
            negatives,
            chunk_size,
        )
        init: Literal["empty", "random"] = "random" if queue_init == "random" else "empty"
        self.queue = DenseQueue(queue_size, dim, init=init) if negatives == "queue" else None

    def forward(
        self,
        r: torch.Tensor,
        t: torch.Tensor,
        bq: torch.Tensor | None = None,
        bk: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.queue is not None and int(self.queue.filled) == 0:
            self.queue.push(pool_keys(t))  # "warm": step 0 uses this batch's pooled keys
        return ideal_dense_loss(
            r, t, self.match, bq, bk, index, self.negatives, self.queue, self.tau, self.lam, self.chunk_size
        )

    @torch.no_grad()
    def enqueue(self, t: torch.Tensor) -> None:
        if self.queue is not None:
            self.queue.push(pool_keys(t))


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    inter = (probs * onehot).sum(dim=(2, 3))
    den = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    return 1.0 - (2 * inter / (den + eps)).mean()


def bidirectional_consistency(
    p1_logits: torch.Tensor,
    p2_logits: torch.Tensor,
    dice: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional hard pseudo-label cross supervision ``CE(p1, sg(y2)) + CE(p2, sg(y1))``.

    Multi-class (``K >= 2`` channels): ``y_k = argmax p_k``, CE on the logits. Binary (1 channel):
    ``y_k = 1[σ(logit) > 0.5]``, binary CE with logits. ``dice=True`` adds the soft Dice loss
    ``1 - mean_{b,k} 2Σ p y / (Σ p + Σ y + ε)`` of each stream against the other's hard label.

    Args:
        p1_logits, p2_logits: (B, K, H, W) logits of the two decoders.
        dice: add the Dice terms.
        mask: optional (B, H, W) bool of pixels to use (others get zero gradient).

    Returns:
        Scalar (mean over used pixels, summed over the two directions).
    """
    if p1_logits.dim() != 4 or p1_logits.shape != p2_logits.shape:
        raise ValueError(
            f"p1_logits and p2_logits must both be (B, K, H, W), got {tuple(p1_logits.shape)}, {tuple(p2_logits.shape)}"
        )
    B, K, H, W = p1_logits.shape
    m = torch.ones(B, H, W, dtype=torch.bool, device=p1_logits.device) if mask is None else mask.bool()
    if m.shape != (B, H, W):
        raise ValueError(f"mask must have shape (B, H, W)=({B}, {H}, {W}), got {tuple(m.shape)}")
    mf = m.to(p1_logits.dtype)
    n = mf.sum().clamp_min(1.0)

    def one_dir(src: torch.Tensor, tgt_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if K == 1:
                y = (torch.sigmoid(tgt_logits) > 0.5).to(src.dtype)  # (B,1,H,W)
            else:
                y = tgt_logits.argmax(1)  # (B,H,W)
        if K == 1:
            ce = F.binary_cross_entropy_with_logits(src, y, reduction="none")[:, 0]
            probs, onehot = torch.sigmoid(src), y
        else:
            ce = F.cross_entropy(src, y, reduction="none")
            probs, onehot = src.softmax(1), F.one_hot(y, K).permute(0, 3, 1, 2).to(src.dtype)
        loss = (ce * mf).sum() / n
        if dice:
            loss = loss + _soft_dice(probs * mf[:, None], onehot * mf[:, None])
        return loss

    return one_dir(p1_logits, p2_logits) + one_dir(p2_logits, p1_logits)


def consistency_weight(step: float, ramp_steps: float, lam_max: float = 1.0) -> float:
    """Ramp ``λ_c(t) = λ_max exp(-5 (1 - t/t_ramp)²)`` for ``t < t_ramp``, else ``λ_max``.

    Raises:
        ValueError: ``ramp_steps < 0``, ``lam_max < 0`` or ``step < 0``.
    """
    if ramp_steps < 0 or lam_max < 0 or step < 0:
        raise ValueError(f"need step, ramp_steps, lam_max >= 0, got {step}, {ramp_steps}, {lam_max}")
    if ramp_steps == 0 or step >= ramp_steps:
        return float(lam_max)
    return float(lam_max * math.exp(-5.0 * (1.0 - step / ramp_steps) ** 2))
