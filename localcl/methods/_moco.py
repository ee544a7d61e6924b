"""Momentum (EMA) key branches and FIFO key queues (MoCo / DenseCL convention; spec §3.3, §5.3, §6.6).

- :func:`ema_update`: ``θ_k ← m θ_k + (1 − m) θ_q`` for parameters; buffers (BatchNorm running
  statistics) are copied from the query branch.
- queues: :class:`localcl.losses.ideal.DenseQueue` (gathered over workers, identical on every
  rank), pushed from the method's ``on_after_step`` with the keys of the last step.
- :func:`moco_loss`: ``−log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_{n∈Q} exp(q·n/τ))`` with the positive
  in-batch key of the same image and the queue as negatives (MoCo v2, He et al. 2020), computed
  with the shared kernel.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from localcl.losses.kernel import info_nce

__all__ = ["ema_update", "make_key_copy", "moco_loss"]


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
