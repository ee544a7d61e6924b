"""Momentum (EMA) key branches and FIFO key queues (MoCo / DenseCL convention; spec §3.3, §5.3, §6.6).

- :func:`ema_update`: ``θ_k ← m θ_k + (1 − m) θ_q`` for parameters; buffers (BatchNorm running
  statistics) are copied from the query branch.
- queues: :class:`localcl.losses.ideal.DenseQueue` (gathered over workers, identical on every
  rank), pushed from the method's ``on_after_step`` with the keys of the last step.
- :func:`momentum_at`: the key momentum at step ``t`` of ``T``: ``"constant"`` keeps ``m0``;
  ``"cosine"`` (BYOL, MoCo v3) raises it from ``m0`` to 1,
  ``m(t) = 1 - (1 - m0) (cos(pi t / T) + 1) / 2``.
- :func:`grouped_forward`: "shuffle-BN" on one worker. MoCo computes the keys on a batch shuffled
  across GPUs, so a positive key's BatchNorm statistics come from other images than its query's
  and cannot tell the current batch apart from the queue. Here the batch is split into ``G``
  groups, each normalised on its own: queries in contiguous groups, keys in groups of a random
  permutation (then un-permuted). With ``G = 1`` and no permutation it is the plain forward; in
  eval mode (running statistics) it equals the plain forward for any ``G``.
- :func:`moco_loss`: ``−log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_{n∈Q} exp(q·n/τ))`` with the positive
  in-batch key of the same image and the queue as negatives (MoCo v2, He et al. 2020), computed
  with the shared kernel.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from localcl.losses.kernel import info_nce

__all__ = ["ema_update", "grouped_forward", "make_key_copy", "moco_loss", "momentum_at"]


def make_key_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with gradients disabled (the momentum key branch)."""
    key = copy.deepcopy(module)
    for p in key.parameters():
        p.requires_grad_(False)
    return key


@torch.no_grad()
def ema_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """``θ_k ← m θ_k + (1 − m) θ_q`` on parameters; buffers copied from ``query``."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)
    for bk, bq in zip(key.buffers(), query.buffers()):
        bk.copy_(bq)


def momentum_at(step: int, total_steps: int | None, base: float, schedule: str = "constant") -> float:
    """Key momentum at optimiser step ``step`` (0-based) of ``total_steps`` (module docstring).

    ``total_steps`` None (unknown) or ``schedule == "constant"``: ``base``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"momentum schedule must be 'constant' or 'cosine', got {schedule!r}")
    if schedule == "constant" or not total_steps:
        return float(base)
    t = min(max(step / total_steps, 0.0), 1.0)
    return float(1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0)


def grouped_forward(
    fn: Callable[[Tensor], Tensor], x: Tensor, groups: int, generator: torch.Generator | None = None
) -> Tensor:
    """``fn`` applied to ``groups`` sub-batches of ``x`` (B, ...), results re-assembled in input order.

    With ``generator`` the sub-batches are drawn from a random permutation of the batch (the key
    branch of shuffle-BN); without it they are contiguous (the query branch). ``groups`` is
    clipped to ``[1, B]``.
    """
    n = x.shape[0]
    g = max(1, min(int(groups), n))
    if g == 1 and generator is None:
        return fn(x)
    if generator is None:
        return torch.cat([fn(c) for c in x.chunk(g)])
    perm = torch.randperm(n, generator=generator).to(x.device)
    out = torch.cat([fn(c) for c in x[perm].chunk(g)])
    return out[torch.argsort(perm)]


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """MoCo InfoNCE. Shapes: ``q, k`` (N, D) (row i of ``k`` is the positive of row i of
    ``q``), ``queue`` (L, D) negatives. Returns the mean over the N anchors."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    n = q.shape[0]
    cand = torch.cat([k.detach(), queue.detach().to(q.dtype)], dim=0)
    ids = torch.arange(n, device=q.device)
    cand_ids = torch.cat([ids, torch.full((queue.shape[0],), -1, device=q.device, dtype=torch.long)])
    return info_nce(q, cand, tau=tau, anchor_ids=ids, candidate_ids=cand_ids, exclude_self=False, mode="single")
