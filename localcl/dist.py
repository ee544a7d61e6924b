"""Distributed primitives in one place; every function degrades to the single-process case.

Losses never call ``torch.distributed`` directly: they call :func:`gather` (differentiable),
:func:`gather_nograd` (keys, queues), :func:`rank_offset` and :func:`eye_rank`, so tests can
mock ``rank``/``world_size``/``gather`` of this module to simulate several workers in one process.

Gradient convention of :func:`gather` (SimCLR/lightly style). On rank ``r`` the loss ``L_r``
uses the global tensor ``X = concat_r' x_r'``. The backward pass all-reduces (SUM) the gradient
``dL_r'/dX`` over ranks and keeps the slice of rank ``r``, so that

    x_r.grad = d(Σ_r' L_r') / d x_r .

With DistributedDataParallel averaging the parameter gradients over ``W`` ranks, the update is
the gradient of ``(1/W) Σ_r' L_r'``, i.e. exactly the single-process loss on the global batch
when each ``L_r`` is a mean over equally many local anchors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

__all__ = [
    "is_dist",
    "rank",
    "world_size",
    "gather",
    "gather_nograd",
    "rank_offset",
    "eye_rank",
]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """Rank of this process in the default group (0 without a process group)."""
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return tdist.get_world_size() if is_dist() else 1


def _all_sizes(n: int, device: torch.device) -> list[int]:
    """First-dimension sizes of the tensors of all ranks (one tiny all_gather)."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _padded_all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of tensors whose first dimensions may differ (padded to the largest)."""
    n_max = max(sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        pad = x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    out = [torch.empty_like(x) for _ in sizes]
    tdist.all_gather(out, x)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: all_reduce(SUM) of the gradient, own slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = _all_sizes(x.shape[0], x.device)
        r = tdist.get_rank()
        ctx.start = sum(sizes[:r])
        ctx.stop = ctx.start + sizes[r]
        return _padded_all_gather(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, keeping gradients.

    Args:
        x: Shape (n_r, ...); ``n_r`` may differ between ranks, the trailing shape may not.

    Returns:
        Shape (Σ_r n_r, ...), rank order. Without a process group (or with one rank) this is
        ``x`` itself (same autograd graph).
    """
    if not is_dist() or world_size() == 1:
        return x
    gathered: torch.Tensor = _GatherWithGrad.apply(x)
    return gathered


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather` but detached (momentum keys, queues, pseudo-label statistics).

    Shape (n_r, ...) -> (Σ_r n_r, ...).
    """
    if not is_dist() or world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _padded_all_gather(x.detach(), _all_sizes(x.shape[0], x.device))


def rank_offset(n: int) -> int:
    """Index of this rank's first row in a gathered tensor when every rank holds ``n`` rows:
    ``rank() * n``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return rank() * n


def eye_rank(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rank-offset identity: bool mask of shape (n, n * world_size()) with
    ``mask[i, rank() * n + i] = True`` and False elsewhere.

    Row ``i`` is local sample ``i``; column ``j`` indexes the gathered batch, so the mask marks
    each local sample's own position (its positive in instance discrimination, or its "self"
    to exclude). With one process it is ``torch.eye(n, dtype=bool)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = torch.arange(n, device=device)
    mask = torch.zeros((n, n * world_size()), dtype=torch.bool, device=device)
    mask[rows, rows + rank_offset(n)] = True
    return mask
