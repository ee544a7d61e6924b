"""GLCL global losses G^R / G^{D-} / G^D vs a loop reference transcribed from methods.md §1.4."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

import localcl.dist as dist
from localcl.losses.glcl_global import GLCLGlobalLoss, glcl_global_loss, glcl_global_pairs


def _batch(m: int, S: int, roles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m volumes x S partitions x roles, in (role, volume, partition) order like the code's stacking."""
    vol, part, role = [], [], []
    for r in range(roles):
        for v in range(m):
            for s in range(S):
                vol.append(v)
                part.append(s)
                role.append(r)
    return torch.tensor(vol), torch.tensor(part), torch.tensor(role)


Variant = Literal["R", "D-", "D"]


def _is_pair(variant: str, vi: int, si: int, ri: int, vj: int, sj: int, rj: int) -> bool:
    """Spec §1.4 pair rules, written out case by case (volumes paired (0,1), (2,3), ...)."""
    if variant in ("R", "D-"):
        return vi == vj and si == sj and ri != rj
    if si != sj or vi // 2 != vj // 2:
        return False
    if vi == vj:
        return ri != rj  # (x_i, t(x_i)) and (x_j, t(x_j))
    return ri == rj  # (x_i, x_j) and (t(x_i), t(x_j)); (x_i, t(x_j)) is not a pair


def _reference(z: torch.Tensor, vol, part, role, variant: str, tau: float) -> float:
    zn = [F.normalize(z[i], dim=0) for i in range(z.shape[0])]
    n = len(zn)
    total = 0.0
    for a in range(n):
        for b in range(n):
            if a == b or not _is_pair(variant, vol[a], part[a], role[a], vol[b], part[b], role[b]):
                continue
            s_ab = float(zn[a] @ zn[b]) / tau
            if variant == "R":
                negs = [k for k in range(n) if k not in (a, b)]
            else:
                negs = [k for k in range(n) if part[k] != part[a]]
            den = math.exp(s_ab) + sum(math.exp(float(zn[a] @ zn[k]) / tau) for k in negs)
            total += -math.log(math.exp(s_ab) / den)
    return total / n


@pytest.mark.parametrize("variant,roles", [("R", 2), ("D-", 3), ("D", 2)])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_glcl_global__matches_loop_reference(variant: Variant, roles: int, tau: float) -> None:
    vol, part, role = _batch(4, 3, roles)
    z = torch.randn(vol.numel(), 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = glcl_global_loss(z, vol, part, role, variant, tau)
    ref = _reference(z, vol.tolist(), part.tolist(), role.tolist(), variant, tau)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_glcl_global_pairs__gd_structure_per_anchor_group() -> None:
    # one anchor group: x_0^0, x_1^0 (originals) and their views, one partition
    vol, part, role = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1])
    a, b = glcl_global_pairs(vol, part, role, "D")
    got = set(zip(a.tolist(), b.tolist()))
    # (x_i, t x_i), (x_i, x_j), (x_j, t x_j), (t x_i, t x_j), both directions; never (x_i, t x_j)
    want = {(0, 2), (2, 0), (0, 1), (1, 0), (1, 3), (3, 1), (2, 3), (3, 2)}
    assert got == want


def test_glcl_global__closed_form_identical_views_orthogonal_images() -> None:
    B, tau = 4, 0.2
    e = torch.eye(8, dtype=torch.float64)[:B]
    z = torch.cat([e, e])  # view 0 rows then view 1 rows, identical
    vol, part, role = (
        torch.arange(B).repeat(2),
        torch.zeros(2 * B, dtype=torch.long),
        torch.arange(2).repeat_interleave(B),
    )
    got = glcl_global_loss(z, vol, part, role, "R", tau)
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (2 * B - 2)))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_glcl_global__symmetric_under_batch_permutation() -> None:
    vol, part, role = _batch(2, 4, 2)
    z = torch.randn(vol.numel(), 5, dtype=torch.float64)
    perm = torch.randperm(vol.numel(), generator=torch.Generator().manual_seed(3))
    a = glcl_global_loss(z, vol, part, role, "D")
    b = glcl_global_loss(z[perm], vol[perm], part[perm], role[perm], "D", pair_ids=(vol[perm] // 2))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("variant", ["R", "D"])
def test_glcl_global__chunked_equals_naive_values_and_grads(variant: Variant) -> None:
    vol, part, role = _batch(4, 4, 2)
    z0 = torch.randn(vol.numel(), 7, dtype=torch.float64)
    outs = []
    for chunk in (None, 5):
        z = z0.clone().requires_grad_(True)
        loss = glcl_global_loss(z, vol, part, role, variant, chunk_size=chunk)
        loss.backward()
        outs.append((loss.detach(), z.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_glcl_global__gradcheck_float64() -> None:
    vol, part, role = _batch(2, 2, 2)
    z = torch.randn(vol.numel(), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: glcl_global_loss(x, vol, part, role, "D", 0.3), (z,))


@pytest.mark.parametrize("variant", ["R", "D"])
def test_glcl_global__ddp_mocked_ranks_match_global_batch(variant: Variant, monkeypatch: pytest.MonkeyPatch) -> None:
    W, m, S = 2, 2, 3
    vol1, part1, role1 = _batch(m, S, 2)
    n = vol1.numel()
    z_all = torch.randn(W * n, 5, dtype=torch.float64, requires_grad=True)
    vols = [vol1 + m * r for r in range(W)]  # distinct volume ids per rank
    monkeypatch.setattr(dist, "world_size", lambda: W)
    losses = []
    for r in range(W):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        mine = z_all[r * n : (r + 1) * n]
        monkeypatch.setattr(
            dist, "gather", lambda x, r=r: torch.cat([x if i == r else z_all[i * n : (i + 1) * n] for i in range(W)])
        )
        monkeypatch.setattr(dist, "gather_nograd", lambda x: torch.cat([x] * W))  # partitions equal on all ranks
        losses.append(glcl_global_loss(mine, vols[r], part1, role1, variant, gather_distributed=True))
    ddp = torch.stack(losses).mean()
    (g_ddp,) = torch.autograd.grad(ddp, z_all)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    z1 = z_all.detach().clone().requires_grad_(True)
    ref = glcl_global_loss(z1, torch.cat(vols), part1.repeat(W), role1.repeat(W), variant)
    (g_ref,) = torch.autograd.grad(ref, z1)
    assert ddp.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ddp, g_ref)


def test_glcl_global__module_matches_functional() -> None:
    vol, part, role = _batch(2, 4, 2)
    z = torch.randn(vol.numel(), 4)
    mod = GLCLGlobalLoss("D-", tau=0.3)
    assert mod(z, vol, part, role).item() == pytest.approx(glcl_global_loss(z, vol, part, role, "D-", 0.3).item())


def test_glcl_global__bad_inputs_name_the_parameter() -> None:
    vol, part, role = _batch(2, 2, 2)
    z = torch.randn(vol.numel(), 4)
    with pytest.raises(ValueError, match="tau"):
        glcl_global_loss(z, vol, part, role, "D", tau=0.0)
    with pytest.raises(ValueError, match="variant"):
        GLCLGlobalLoss("X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z must have shape"):
        glcl_global_loss(z[0], vol, part, role)
    with pytest.raises(ValueError, match="partition"):
        glcl_global_loss(z, vol, part[:-1], role)
    with pytest.raises(ValueError, match="odd"):
        v3, p3, r3 = _batch(3, 2, 2)
        glcl_global_loss(torch.randn(v3.numel(), 4), v3, p3, r3, "D")
    with pytest.raises(ValueError, match="uniquely"):
        glcl_global_loss(z, torch.zeros_like(vol), part, role)
