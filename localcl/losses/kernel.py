"""One masked InfoNCE kernel shared by every contrastive loss of the library.

Every contrastive loss of ``methods.md`` (GLCL G^R/G^{D-}/G^D and L^R/L^D, the PLCL prototype
loss, the IDEAL dense loss, the MixCL identity and label losses, the LRC point loss) is this
kernel plus a method-specific definition of positives and negatives (methods.md §6.5).

Notation. Anchors ``a_i`` (i < N), candidates ``c_j`` (j < M), logits
``s_ij = <a_i, c_j> / τ`` (after L2 normalisation when ``normalize=True``, i.e. cosine
similarity over τ). For anchor ``i``, ``P(i)`` is its positive set and ``N(i)`` its negative
set (disjoint; "self" is in neither). Per-anchor losses:

.. math::

    \\text{summed:}\\quad \\ell_i = -\\log \\frac{\\sum_{p\\in P(i)} e^{s_{ip}}}
        {\\sum_{p\\in P(i)} e^{s_{ip}} + \\sum_{n\\in N(i)} e^{s_{in}}}
        = \\operatorname{LSE}_{P\\cup N}(s_i) - \\operatorname{LSE}_{P}(s_i)

    \\text{per\\_positive (SupCon):}\\quad \\ell_i = \\frac{1}{|P(i)|}\\sum_{p\\in P(i)}
        -\\log \\frac{e^{s_{ip}}}{\\sum_{k\\in P(i)\\cup N(i)} e^{s_{ik}}}
        = \\operatorname{LSE}_{P\\cup N}(s_i) - \\operatorname{mean}_{P}(s_i)

    \\text{single:}\\quad \\text{summed with } |P(i)| = 1 \\text{ (validated)}

Anchors with no positive (``|P(i)| = 0``) contribute ``ℓ_i = 0`` and are excluded from the
mean (they are not counted in its denominator). An anchor with positives but no negatives has
``ℓ_i = 0`` in "summed"/"single" mode and counts in the mean.

Memory. Without ``chunk_size`` the (N, M) logits are one autograd graph: O(N·M) memory. With
``chunk_size = c`` a custom autograd Function processes ``c`` anchors at a time, keeps only
per-anchor log-sum-exps (O(N)) from the forward pass and recomputes each chunk's logits in the
backward pass: peak O(c·M), values and gradients identical to the naive version (the gradient
of ℓ_i w.r.t. s_ij is ``softmax_{P∪N}(s_i)_j − w_ij`` with ``w_ij = softmax_P(s_i)_j``
(summed) or ``1[j∈P(i)]/|P(i)|`` (per_positive)).

References: Oord et al. 2018 (InfoNCE, arXiv 1807.03748); Chen et al. 2020 (SimCLR NT-Xent,
arXiv 2002.05709); Khosla et al. 2020 (SupCon, arXiv 2004.11362, the "L_out" per-positive form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "check_tau", "MODES", "REDUCTIONS"]


def check_tau(tau: float) -> None:
    """Raise ``ValueError`` unless the temperature ``tau`` is a finite number > 0.

    The one temperature rule, shared by every loss and by the method configs
    (:data:`localcl.methods.base.Temperature` is the same rule as a pydantic type)."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


MODES = ("single", "summed", "per_positive")
REDUCTIONS = ("mean", "none", "sum")

MaskFn = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]


# --------------------------------------------------------------------------------------------
# validation and mask construction
# --------------------------------------------------------------------------------------------
def _check_vec(name: str, v: torch.Tensor | None, n: int, owner: str) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != n:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {n} (one per {owner}), got {shape}")


def _check_mask(name: str, m: torch.Tensor | None, n: int, mm: int) -> None:
    if m is None:
        return
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (n, mm):
        got = (tuple(m.shape), m.dtype) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a bool tensor of shape (N, M) = ({n}, {mm}), got {got}")


def _mask_builder(
    n: int,
    m: int,
    device: torch.device,
    pos_mask: torch.Tensor | None,
    neg_mask: torch.Tensor | None,
    anchor_ids: torch.Tensor | None,
    candidate_ids: torch.Tensor | None,
    neg_anchor_groups: torch.Tensor | None,
    neg_candidate_groups: torch.Tensor | None,
    self_offset: int | None,
) -> MaskFn:
    """Return ``f(i0, i1) -> (pos, neg)``, bool (i1-i0, M) masks for anchors i0..i1-1."""
    cols = torch.arange(m, device=device)

    def build(i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        if pos_mask is not None:
            pos = pos_mask[i0:i1]
        else:
            assert anchor_ids is not None and candidate_ids is not None
            pos = anchor_ids[i0:i1, None] == candidate_ids[None, :]
        not_self = None
        if self_offset is not None:
            rows = torch.arange(i0, i1, device=device) + self_offset
            not_self = rows[:, None] != cols[None, :]
            pos = pos & not_self
        neg = ~pos if neg_mask is None else neg_mask[i0:i1] & ~pos
        if not_self is not None:
            neg = neg & not_self
        if neg_anchor_groups is not None:
            assert neg_candidate_groups is not None
            neg = neg & (neg_anchor_groups[i0:i1, None] != neg_candidate_groups[None, :])
        return pos, neg

    return build


# --------------------------------------------------------------------------------------------
# per-row terms (shared by the naive path and the chunked Function)
# --------------------------------------------------------------------------------------------
def _row_losses(
    logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-anchor loss of a block of rows.

    Args:
        logits: (c, M) s_ij. pos, neg: (c, M) bool, disjoint.
    Returns:
        loss (c,) (0 where no positive), npos (c,) long, lse_all (c,), pos_term (c,)
        where pos_term is LSE_P (summed/single) or mean_P (per_positive).
    Rows without a positive get a dummy all-True mask so no -inf - (-inf) appears (keeps
    autograd free of NaN); their loss is then replaced by 0.
    """
    npos = pos.sum(dim=1)
    invalid = (npos == 0)[:, None]
    neg_inf = float("-inf")
    all_m = pos | neg | invalid
    lse_all = torch.logsumexp(logits.masked_fill(~all_m, neg_inf), dim=1)
    if mode == "per_positive":
        pos_term = (logits * pos).sum(dim=1) / npos.clamp_min(1)
    else:
        pos_term = torch.logsumexp(logits.masked_fill(~(pos | invalid), neg_inf), dim=1)
    loss = torch.where(npos > 0, lse_all - pos_term, torch.zeros_like(lse_all))
    return loss, npos, lse_all, pos_term


class _ChunkedInfoNCE(torch.autograd.Function):
    """Per-anchor InfoNCE with O(chunk * M) memory; see the module docstring for the gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: torch.Tensor,
        c: torch.Tensor,
        tau: float,
        mode: str,
        chunk: int,
        build: MaskFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = a.shape[0]
        loss = a.new_zeros(n)
        npos = torch.zeros(n, dtype=torch.long, device=a.device)
        lse_all = a.new_zeros(n)
        pos_term = a.new_zeros(n)
        for i0 in range(0, n, chunk):
            i1 = min(n, i0 + chunk)
            pos, neg = build(i0, i1)
            logits = (a[i0:i1] @ c.T) / tau
            loss[i0:i1], npos[i0:i1], lse_all[i0:i1], pos_term[i0:i1] = _row_losses(logits, pos, neg, mode)
        ctx.save_for_backward(a, c, npos, lse_all, pos_term)
        ctx.tau, ctx.mode, ctx.chunk, ctx.build = tau, mode, chunk, build
        ctx.mark_non_differentiable(npos)
        return loss, npos

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_loss: torch.Tensor, _g_npos: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        a, c, npos, lse_all, pos_term = ctx.saved_tensors
        tau, mode, chunk, build = ctx.tau, ctx.mode, ctx.chunk, ctx.build
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a = torch.zeros_like(a) if need_a else None
        grad_c = torch.zeros_like(c) if need_c else None
        g = torch.where(npos > 0, g_loss, torch.zeros_like(g_loss))
        for i0 in range(0, a.shape[0], chunk):
            i1 = min(a.shape[0], i0 + chunk)
            pos, neg = build(i0, i1)
            logits = (a[i0:i1] @ c.T).div_(tau)
            # d l_i / d s_ij = softmax over P∪N minus the positive weights; in place so that a
            # chunk holds two (c, M) float buffers plus the bool masks.
            gs = logits.masked_fill(~(pos | neg), float("-inf"))
            gs.sub_(lse_all[i0:i1, None]).exp_()
            if mode == "per_positive":
                gs.sub_(pos.to(logits.dtype).div_(npos[i0:i1, None].clamp_min(1)))
            else:
                w = logits.masked_fill_(~pos, float("-inf"))
                gs.sub_(w.sub_(pos_term[i0:i1, None]).exp_())
            gs.mul_(g[i0:i1, None] / tau)  # (c, M) = dL/d(a_i·c_j)
            if grad_a is not None:
                grad_a[i0:i1] = gs @ c
            if grad_c is not None:
                grad_c += gs.T @ a[i0:i1]
        return grad_a, grad_c, None, None, None, None


# --------------------------------------------------------------------------------------------
# public routine
# --------------------------------------------------------------------------------------------
def info_nce(
    anchors: torch.Tensor,
    candidates: torch.Tensor | None = None,
    *,
    tau: float,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    anchor_ids: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    neg_anchor_groups: torch.Tensor | None = None,
    neg_candidate_groups: torch.Tensor | None = None,
    exclude_self: bool = True,
    self_offset: int | None = None,
    mode: str = "single",
    chunk_size: int | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    anchor_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked InfoNCE of anchors against candidates (formulas in the module docstring).

    Args:
        anchors: (N, D) embeddings.
        candidates: (M, D) embeddings, or None to contrast the anchors with themselves
            (M = N, gradients flow through both roles).
        tau: temperature τ > 0.
        pos_mask: (N, M) bool, True where c_j is a positive of a_i. Small problems only: the
            mask itself is O(N·M). Exclusive with ``anchor_ids``.
        neg_mask: (N, M) bool, True where c_j is a negative of a_i (default: every candidate
            that is not a positive). A pair marked positive is never a negative.
        anchor_ids, candidate_ids: (N,), (M,) integer ids; c_j is a positive of a_i iff
            ``anchor_ids[i] == candidate_ids[j]``. Masks are then built per chunk, so memory
            stays O(chunk·M). ``candidate_ids`` defaults to ``anchor_ids`` when
            ``candidates`` is None.
        neg_anchor_groups, neg_candidate_groups: (N,), (M,) integer groups; c_j can only be a
            negative of a_i if their groups differ (e.g. GLCL G^D: partition index).
            ``neg_candidate_groups`` defaults to ``neg_anchor_groups`` when candidates is None.
        exclude_self: remove "self" pairs from positives and negatives. Self is ``j == i``
            when ``candidates`` is None, or ``j == i + self_offset`` when ``self_offset`` is
            given (e.g. candidates gathered over ranks: ``self_offset = dist.rank_offset(N)``).
            With explicit candidates and no ``self_offset`` there is no self pair.
        self_offset: see ``exclude_self``.
        mode: "single" | "summed" | "per_positive".
        chunk_size: anchors per chunk for the memory-bounded path (None: naive full matrix).
        normalize: L2-normalise anchors and candidates (cosine similarity).
        reduction: "mean" (weighted mean over anchors with ≥ 1 positive), "sum" or "none"
            (per-anchor (N,) losses, 0 for anchors without positive).
        anchor_weight: optional (N,) non-negative weights w_i:
            mean = Σ w_i ℓ_i / Σ_{i: |P(i)|>0} w_i; sum = Σ w_i ℓ_i; none = w_i ℓ_i.

    Returns:
        Scalar tensor (mean/sum) or (N,) tensor (none). Mean over zero valid anchors is 0.

    Raises:
        ValueError: naming the offending parameter (tau <= 0, wrong ranks or shapes, embedding
            dim mismatch, no positive definition, unknown mode/reduction, bad chunk_size,
            more than one positive per anchor in mode "single").
    """
    # ---- validation --------------------------------------------------------------------
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2:
        got = tuple(anchors.shape) if isinstance(anchors, torch.Tensor) else type(anchors).__name__
        raise ValueError(f"anchors must have shape (N, D), got {got}")
    if candidates is not None:
        if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2:
            got = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
            raise ValueError(f"candidates must have shape (M, D) or be None, got {got}")
        if candidates.shape[1] != anchors.shape[1]:
            raise ValueError(
                f"candidates embedding dim D={candidates.shape[1]} does not match anchors D={anchors.shape[1]}"
            )
    check_tau(tau)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if (pos_mask is None) == (anchor_ids is None):
        raise ValueError("give exactly one of pos_mask or anchor_ids to define positives")

    n = anchors.shape[0]
    cand_is_anchors = candidates is None
    m = n if cand_is_anchors else candidates.shape[0]  # type: ignore[union-attr]
    if cand_is_anchors:
        candidate_ids = anchor_ids if candidate_ids is None else candidate_ids
        neg_candidate_groups = neg_anchor_groups if neg_candidate_groups is None else neg_candidate_groups
    _check_mask("pos_mask", pos_mask, n, m)
    _check_mask("neg_mask", neg_mask, n, m)
    _check_vec("anchor_ids", anchor_ids, n, "anchor")
    if anchor_ids is not None and candidate_ids is None:
        raise ValueError("candidate_ids is required with anchor_ids when candidates are given")
    _check_vec("candidate_ids", candidate_ids, m, "candidate")
    if (neg_anchor_groups is None) != (neg_candidate_groups is None):
        raise ValueError("give both neg_anchor_groups and neg_candidate_groups, or neither")
    _check_vec("neg_anchor_groups", neg_anchor_groups, n, "anchor")
    _check_vec("neg_candidate_groups", neg_candidate_groups, m, "candidate")
    _check_vec("anchor_weight", anchor_weight, n, "anchor")
    if self_offset is not None and not isinstance(self_offset, int):
        raise ValueError(f"self_offset must be an int or None, got {self_offset!r}")
    offset: int | None = None
    if exclude_self:
        offset = 0 if (cand_is_anchors and self_offset is None) else self_offset

    # ---- embeddings ----------------------------------------------------------------------
    a = F.normalize(anchors, dim=1) if normalize else anchors
    if cand_is_anchors:
        c = a
    else:
        assert candidates is not None  # not cand_is_anchors
        c = F.normalize(candidates, dim=1) if normalize else candidates
        if c.dtype != a.dtype:
            raise ValueError(f"candidates dtype {c.dtype} differs from anchors dtype {a.dtype}")

    build = _mask_builder(
        n,
        m,
        a.device,
        pos_mask,
        neg_mask,
        anchor_ids,
        candidate_ids,
        neg_anchor_groups,
        neg_candidate_groups,
        offset,
    )

    # ---- per-anchor losses -----------------------------------------------------------------
    if chunk_size is None:
        pos, neg = build(0, n)
        loss, npos, _, _ = _row_losses((a @ c.T) / tau, pos, neg, mode)
    else:
        loss, npos = _ChunkedInfoNCE.apply(a, c, float(tau), mode, chunk_size, build)

    if mode == "single" and n > 0:
        worst = int(npos.max())
        if worst > 1:
            raise ValueError(
                f"mode='single' requires at most one positive per anchor, an anchor has {worst}; "
                "use mode='summed' or 'per_positive'"
            )

    # ---- reduction ---------------------------------------------------------------------------
    w = anchor_weight.to(loss.dtype) if anchor_weight is not None else None
    weighted = loss * w if w is not None else loss
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    valid = (npos > 0).to(loss.dtype)
    den = (valid * w).sum() if w is not None else valid.sum()
    den = torch.where(den > 0, den, torch.ones_like(den))
    return weighted.sum() / den
