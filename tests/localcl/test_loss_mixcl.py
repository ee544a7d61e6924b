"""MixCL identity / label / reconstruction consistency vs loop references (methods.md §4.4-4.5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import localcl.dist as dist
from localcl.losses.mixcl import (
    MixCLLoss,
    identity_loss,
    label_consistency_loss,
    mixcl_loss,
    reconstruction_loss,
    sample_balanced_pixels,
)


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(F.normalize(u, dim=0) @ F.normalize(v, dim=0))


def _ref_identity(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = torch.cat([z1, z2])
    B = z1.shape[0]
    tot = 0.0
    for a in range(2 * B):
        p = (a + B) % (2 * B)
        den = sum(math.exp(_cos(z[a], z[k]) / tau) for k in range(2 * B) if k != a)
        tot += -math.log(math.exp(_cos(z[a], z[p]) / tau) / den)
    return tot / (2 * B)


def _ref_label(w: torch.Tensor, cls: list[int], tau: float) -> float:
    n = w.shape[0]
    terms = []
    for a in range(n):
        P = [p for p in range(n) if p != a and cls[p] == cls[a]]
        if not P:
            continue
        den = sum(math.exp(_cos(w[a], w[k]) / tau) for k in range(n) if k != a)
        terms.append(sum(-math.log(math.exp(_cos(w[a], w[p]) / tau) / den) for p in P) / len(P))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_identity_loss__matches_loop_reference(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert identity_loss(z1, z2, tau).item() == pytest.approx(_ref_identity(z1, z2, tau), rel=1e-10)


def test_identity_loss__closed_form_and_view_symmetry() -> None:
    B, tau = 3, 0.2
    e = torch.eye(B, dtype=torch.float64)
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * B - 2))
    assert identity_loss(e, e.clone(), tau).item() == pytest.approx(want, rel=1e-12)
    z1, z2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert identity_loss(z1, z2).item() == pytest.approx(identity_loss(z2, z1).item(), rel=1e-12)


def test_identity_loss__ddp_mocked_ranks_match_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    W, B = 2, 3
    z1 = torch.randn(W * B, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(W * B, 4, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(dist, "world_size", lambda: W)
    locals_ = [torch.cat([z1[r * B : (r + 1) * B], z2[r * B : (r + 1) * B]]) for r in range(W)]
    losses = []
    for r in range(W):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "gather", lambda x, r=r: torch.cat([x if i == r else locals_[i] for i in range(W)]))
        monkeypatch.setattr(
            dist, "gather_nograd", lambda x: torch.cat([torch.arange(B).repeat(2) + i * B for i in range(W)])
        )
        losses.append(identity_loss(z1[r * B : (r + 1) * B], z2[r * B : (r + 1) * B], 0.3, gather_distributed=True))
    ddp = torch.stack(losses).mean()
    g_ddp = torch.autograd.grad(ddp, (z1, z2))
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    ref = identity_loss(z1, z2, 0.3)
    g_ref = torch.autograd.grad(ref, (z1, z2))
    assert ddp.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(g_ddp, g_ref):
        torch.testing.assert_close(a, b)


def test_label_consistency__matches_loop_reference_on_sampled_pixels() -> None:
    B, V, D, H, W = 2, 2, 5, 6, 6
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B, V, D, H, W, dtype=torch.float64, generator=g)
    lab = torch.randint(-1, 3, (B, V, H, W), generator=g)
    got = label_consistency_loss(emb, lab, num_pixels=30, tau=0.2, generator=torch.Generator().manual_seed(5))
    idx, cls = sample_balanced_pixels(lab, 30, torch.Generator().manual_seed(5))
    w = emb.permute(0, 1, 3, 4, 2).reshape(-1, D)[idx]
    assert got.item() == pytest.approx(_ref_label(w, cls.tolist(), 0.2), rel=1e-10)


def test_sample_balanced_pixels__quota_unknown_never_sampled_no_duplicates() -> None:
    lab = torch.full((2, 2, 8, 8), -1)
    lab[0, 0, :4] = 0  # 32 px of class 0
    lab[1, 1, :1, :3] = 2  # 3 px of class 2
    lab[0, 1, 5:] = 1  # 24 px of class 1
    idx, cls = sample_balanced_pixels(lab, 30, torch.Generator().manual_seed(0))
    flat = lab.reshape(-1)
    assert torch.all(flat[idx] >= 0) and torch.equal(flat[idx], cls)
    assert idx.unique().numel() == idx.numel()
    assert torch.bincount(cls, minlength=3).tolist() == [10, 10, 3]  # quota 30 // 3, class 2 has only 3
    with pytest.raises(ValueError, match="num_pixels"):
        sample_balanced_pixels(lab, 2)


def test_label_consistency__zero_gradient_for_unsampled_and_unknown_pixels() -> None:
    emb = torch.randn(1, 2, 4, 6, 6, requires_grad=True)
    lab = torch.randint(0, 3, (1, 2, 6, 6))
    lab[0, 0, :3] = -1
    loss = label_consistency_loss(emb, lab, num_pixels=12, generator=torch.Generator().manual_seed(0))
    loss.backward()
    idx, _ = sample_balanced_pixels(lab, 12, torch.Generator().manual_seed(0))
    g = emb.grad.abs().sum(2).reshape(-1)  # type: ignore[union-attr]
    sampled = torch.zeros_like(g, dtype=torch.bool)
    sampled[idx] = True
    assert torch.all(g[~sampled] == 0)
    assert torch.all(g[lab.reshape(-1) < 0] == 0)


def test_label_consistency__chunked_equals_naive_and_gradcheck() -> None:
    lab = torch.randint(0, 3, (1, 2, 5, 5), generator=torch.Generator().manual_seed(2))
    e0 = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64)
    res = []
    for c in (None, 6):
        e = e0.clone().requires_grad_(True)
        loss = label_consistency_loss(e, lab, 24, generator=torch.Generator().manual_seed(0), chunk_size=c)
        loss.backward()
        res.append((loss.detach(), e.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    e = e0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: label_consistency_loss(x, lab, 9, 0.5, torch.Generator().manual_seed(0), chunk_size=None), (e,)
    )


def test_reconstruction_loss__l1_mse_and_mask() -> None:
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert reconstruction_loss(x, y).item() == pytest.approx((x - y).abs().mean().item())
    assert reconstruction_loss(x, y, "mse").item() == pytest.approx(((x - y) ** 2).mean().item())
    m = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    m[:, :, :2] = True
    assert reconstruction_loss(x, y, mask=m).item() == pytest.approx((x - y)[:, :, :2].abs().mean().item())


def test_mixcl_loss__total_is_weighted_sum_and_module_agrees() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    emb = torch.randn(3, 2, 4, 5, 5, generator=g)
    lab = torch.randint(0, 3, (3, 2, 5, 5), generator=g)
    rec, tgt = torch.randn(3, 1, 5, 5, generator=g), torch.randn(3, 1, 5, 5, generator=g)
    out = mixcl_loss(
        z1, z2, emb, lab, rec, tgt, alpha=0.5, beta=2.0, num_pixels=30, generator=torch.Generator().manual_seed(1)
    )
    assert out["loss"].item() == pytest.approx((out["id"] + 0.5 * out["lab"] + 2.0 * out["rec"]).item(), rel=1e-6)
    mod = MixCLLoss(alpha=0.5, beta=2.0, num_pixels=30)
    out2 = mod(z1, z2, emb, lab, rec, tgt, generator=torch.Generator().manual_seed(1))
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_mixcl__bad_inputs_name_the_parameter() -> None:
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="tau"):
        identity_loss(z, z, tau=0)
    with pytest.raises(ValueError, match="z1 and z2"):
        identity_loss(z, z[:2])
    with pytest.raises(ValueError, match="embeddings must have shape"):
        label_consistency_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        label_consistency_loss(torch.randn(2, 1, 3, 4, 4), torch.zeros(2, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(z, z, "huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        MixCLLoss(alpha=-1)
    with pytest.raises(ValueError, match="num_pixels"):
        MixCLLoss(num_pixels=0)
