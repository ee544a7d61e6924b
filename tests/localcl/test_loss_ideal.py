"""IDEAL dense loss, queue and bidirectional consistency vs loop references (methods.md §3.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import localcl.dist as dist
from localcl.losses.ideal import (
    DenseQueue,
    IDEALDenseLoss,
    argmax_correspondence,
    bidirectional_consistency,
    consistency_weight,
    grid_match_from_coords,
    ideal_dense_loss,
    pool_keys,
)


def _n(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=0)


def _ref_match(bq: torch.Tensor, bk: torch.Tensor) -> list[list[int]]:
    B, C, h, w = bq.shape
    out = []
    for b in range(B):
        row = []
        for s in range(h * w):
            q = _n(bq[b, :, s // w, s % w])
            sims = [
                float(q @ _n(bk[b, :, k // bk.shape[3], k % bk.shape[3]])) for k in range(bk.shape[2] * bk.shape[3])
            ]
            row.append(max(range(len(sims)), key=lambda k: sims[k]))
        out.append(row)
    return out


def _ref_dense(r, t, match, negatives, queue, tau):
    B, D, h, w = r.shape
    wk = t.shape[3]
    terms = []
    for b in range(B):
        for s in range(h * w):
            m = match[b][s]
            if m < 0:
                continue
            q = _n(r[b, :, s // w, s % w])
            pos = math.exp(float(q @ _n(t[b, :, m // wk, m % wk])) / tau)
            if negatives == "queue":
                negs = [_n(k) for k in queue]
            elif negatives == "dense":  # every key cell of the batch but the positive
                negs = [
                    _n(t[o, :, k // wk, k % wk]) for o in range(B) for k in range(t.shape[2] * wk) if (o, k) != (b, m)
                ]
            else:
                negs = [_n(t[o, :, k // wk, k % wk]) for o in range(B) if o != b for k in range(t.shape[2] * wk)]
            den = pos + sum(math.exp(float(q @ k) / tau) for k in negs)
            terms.append(-math.log(pos / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("negatives", ["queue", "batch", "dense"])
def test_ideal_dense__argmax_matching_matches_loop_reference(negatives: str) -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    bq = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=g)
    bk = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=g)
    queue = torch.randn(7, 4, dtype=torch.float64, generator=g)
    got = ideal_dense_loss(r, t, "argmax", bq, bk, negatives=negatives, queue=queue, tau=0.2)  # type: ignore[arg-type]
    ref = _ref_dense(r, t, _ref_match(bq, bk), negatives, queue, 0.2)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_ideal_dense__geometric_index_skips_unmatched_cells_with_zero_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    queue = torch.randn(5, 4, dtype=torch.float64, generator=g)
    index = torch.randint(0, 9, (2, 9), generator=g)
    index[0, :4] = -1
    loss = ideal_dense_loss(r, t, "geometric", index=index, queue=queue)
    assert loss.item() == pytest.approx(
        _ref_dense(r.detach(), t.detach(), index.tolist(), "queue", queue, 0.2), rel=1e-10
    )
    loss.backward()
    gq = r.grad.abs().sum(1).reshape(2, 9)  # type: ignore[union-attr]
    assert torch.all(gq[0, :4] == 0) and torch.all(gq[index >= 0] > 0)
    assert t.grad is None  # keys are used detached (momentum branch)


def test_ideal_dense__global_term_weight_lambda() -> None:
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    t = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    queue = torch.randn(6, 4, dtype=torch.float64, generator=g)
    idx = torch.arange(4).repeat(3, 1)
    dense = ideal_dense_loss(r, t, "geometric", index=idx, queue=queue, lam=1.0)
    mixed = ideal_dense_loss(r, t, "geometric", index=idx, queue=queue, lam=0.5)
    gq, gk = r.mean(dim=(2, 3)), t.mean(dim=(2, 3))
    glob = 0.0
    for b in range(3):
        q = _n(gq[b])
        pos = math.exp(float(q @ _n(gk[b])) / 0.2)
        glob += -math.log(pos / (pos + sum(math.exp(float(q @ _n(k)) / 0.2) for k in queue)))
    assert mixed.item() == pytest.approx(0.5 * glob / 3 + 0.5 * dense.item(), rel=1e-10)


def test_ideal_dense__closed_form_aligned_keys_orthogonal_queue() -> None:
    D, tau = 6, 0.2
    e = torch.eye(D, dtype=torch.float64)
    r = e[:4].T.reshape(1, D, 2, 2)  # 4 cells, orthonormal codes
    queue = e[4:]  # orthogonal to every query
    loss = ideal_dense_loss(r, r.clone(), "geometric", index=torch.arange(4)[None], queue=queue, tau=tau)
    assert loss.item() == pytest.approx(-math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2)), rel=1e-12)


def test_ideal_dense__chunked_equals_naive_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    r0 = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    q = torch.randn(5, 3, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 9, (2, 9), generator=g)
    res = []
    for c in (None, 4):
        r = r0.clone().requires_grad_(True)
        loss = ideal_dense_loss(r, t, "geometric", index=idx, queue=q, chunk_size=c)
        loss.backward()
        res.append((loss.detach(), r.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    r = r0[:1, :, :2, :2].clone().requires_grad_(True)
    t1, i1 = t[:1, :, :2, :2], torch.tensor([[3, 0, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda x: ideal_dense_loss(x, t1, "geometric", index=i1, queue=q, tau=0.5, chunk_size=None), (r,)
    )


def test_argmax_correspondence__chunks_match_reference() -> None:
    bq, bk = torch.randn(2, 4, 3, 4, dtype=torch.float64), torch.randn(2, 4, 2, 3, dtype=torch.float64)
    assert argmax_correspondence(bq, bk, chunk_size=5).tolist() == _ref_match(bq, bk)


def test_grid_match_from_coords__identity_coords_give_identity_index() -> None:
    h = w = 4
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], -1)[None].double()
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[0, 0, 0] = False
    idx = grid_match_from_coords(coords, valid, (h, w))
    assert idx[0, 0] == -1 and idx[0, 1:].tolist() == list(range(1, h * w))


def test_dense_queue__fifo_wraparound_and_filled() -> None:
    q = DenseQueue(5, 2, init="empty")
    assert q.negatives().shape == (0, 2)
    k = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    q.push(k)
    assert int(q.filled) == 3 and int(q.ptr) == 3
    q.push(torch.tensor([[2.0, 0], [0, 3], [3, 0]]))  # wraps: rows 3, 4, 0
    assert int(q.filled) == 5 and int(q.ptr) == 1
    torch.testing.assert_close(q.queue[0], torch.tensor([1.0, 0]))
    torch.testing.assert_close(q.queue[1], F.normalize(k[1], dim=0))
    with pytest.raises(ValueError, match="keys must have shape"):
        q.push(torch.randn(2, 3))


def test_ideal_dense__ddp_mocked_queue_push_and_loss_match_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    W, B = 2, 2
    g = torch.Generator().manual_seed(4)
    r = torch.randn(W * B, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(W * B, 3, 2, 2, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 4, (W * B, 4), generator=g)
    # queue push: every rank gathers all ranks' pooled keys -> identical queues
    all_keys = pool_keys(t)
    monkeypatch.setattr(dist, "world_size", lambda: W)
    monkeypatch.setattr(dist, "gather_nograd", lambda x: all_keys)
    queues = [DenseQueue(8, 3, init="empty").double() for _ in range(W)]
    for r_ in range(W):
        queues[r_].push(all_keys[r_ * B : (r_ + 1) * B])
    torch.testing.assert_close(queues[0].queue, queues[1].queue)
    losses = [
        ideal_dense_loss(
            r[i * B : (i + 1) * B], t[i * B : (i + 1) * B], "geometric", index=idx[i * B : (i + 1) * B], queue=queues[i]
        )
        for i in range(W)
    ]
    ddp = torch.stack(losses).mean()
    (g_ddp,) = torch.autograd.grad(ddp, r)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    ref = ideal_dense_loss(r, t, "geometric", index=idx, queue=queues[0])
    (g_ref,) = torch.autograd.grad(ref, r)
    assert ddp.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ddp, g_ref)


def test_dense_queue__random_init_is_full_unit_norm_and_seeded() -> None:
    a, b = DenseQueue(6, 4, init="random", seed=3), DenseQueue(6, 4, init="random", seed=3)
    assert int(a.filled) == 6 and a.negatives().shape == (6, 4)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(a.queue, b.queue)
    with pytest.raises(ValueError, match="init"):
        DenseQueue(4, 2, init="zeros")  # type: ignore[arg-type]


def test_ideal_dense_module__queue_init_warm_and_random() -> None:
    r, t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    idx = torch.arange(4).repeat(2, 1)
    warm = IDEALDenseLoss(match="geometric", queue_size=10, dim=3)
    got = warm(r, t, index=idx)  # step 0: the queue is warmed with this batch's pooled keys
    assert warm.queue is not None and int(warm.queue.filled) == 2
    assert got.item() == pytest.approx(
        ideal_dense_loss(r, t, "geometric", index=idx, queue=pool_keys(t)).item(), rel=1e-6
    )
    warm.enqueue(t)
    assert int(warm.queue.filled) == 4 and int(warm.queue.ptr) == 4
    rnd = IDEALDenseLoss(match="geometric", queue_size=10, dim=3, queue_init="random")
    assert rnd.queue is not None and int(rnd.queue.filled) == 10
    want = ideal_dense_loss(r, t, "geometric", index=idx, queue=rnd.queue.queue.clone())
    assert rnd(r, t, index=idx).item() == pytest.approx(want.item(), rel=1e-6)


def test_bidirectional_consistency__multiclass_ce_with_stop_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    p1 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    p2 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    loss = bidirectional_consistency(p1, p2)
    want = F.cross_entropy(p1, p2.argmax(1)) + F.cross_entropy(p2, p1.argmax(1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    (g1,) = torch.autograd.grad(loss, p1)
    (g1_ref,) = torch.autograd.grad(F.cross_entropy(p1, p2.argmax(1).detach()), p1)
    torch.testing.assert_close(g1, g1_ref)  # no gradient through the argmax targets


def test_bidirectional_consistency__binary_threshold_dice_and_mask() -> None:
    g = torch.Generator().manual_seed(6)
    p1 = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    p2 = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g)
    y2 = (torch.sigmoid(p2) > 0.5).double()
    y1 = (torch.sigmoid(p1) > 0.5).double()
    want = F.binary_cross_entropy_with_logits(p1, y2) + F.binary_cross_entropy_with_logits(p2, y1)
    assert bidirectional_consistency(p1, p2).item() == pytest.approx(want.item(), rel=1e-12)
    s1 = torch.sigmoid(p1)
    dice1 = 1 - 2 * (s1 * y2).sum() / (s1.sum() + y2.sum() + 1e-5)
    s2 = torch.sigmoid(p2)
    dice2 = 1 - 2 * (s2 * y1).sum() / (s2.sum() + y1.sum() + 1e-5)
    got = bidirectional_consistency(p1, p2, dice=True)
    assert got.item() == pytest.approx((want + dice1 + dice2).item(), rel=1e-10)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0] = True
    (gm,) = torch.autograd.grad(bidirectional_consistency(p1, p2, mask=mask), p1)
    assert torch.all(gm[0, 0, 1:] == 0) and torch.all(gm[0, 0, 0] != 0)


def test_consistency_weight__ramp_shape() -> None:
    assert consistency_weight(0, 100, 0.5) == pytest.approx(0.5 * math.exp(-5))
    assert consistency_weight(50, 100, 0.5) == pytest.approx(0.5 * math.exp(-5 * 0.25))
    assert consistency_weight(100, 100, 0.5) == 0.5 and consistency_weight(500, 100, 0.5) == 0.5
    vals = [consistency_weight(s, 100) for s in range(0, 101, 10)]
    assert vals == sorted(vals)
    with pytest.raises(ValueError, match="ramp_steps"):
        consistency_weight(1, -1)


def test_ideal__bad_inputs_name_the_parameter() -> None:
    r = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="tau"):
        ideal_dense_loss(r, r, "geometric", index=torch.zeros(1, 4, dtype=torch.long), queue=torch.randn(2, 3), tau=0)
    with pytest.raises(ValueError, match="bq and bk"):
        ideal_dense_loss(r, r, "argmax", queue=torch.randn(2, 3))
    with pytest.raises(ValueError, match="index must have shape"):
        ideal_dense_loss(r, r, "geometric", index=torch.zeros(1, 3, dtype=torch.long), queue=torch.randn(2, 3))
    with pytest.raises(ValueError, match="queue"):
        ideal_dense_loss(r, r, "geometric", index=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lam"):
        IDEALDenseLoss(lam=1.5)
    with pytest.raises(ValueError, match="match"):
        IDEALDenseLoss(match="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p1_logits and p2_logits"):
        bidirectional_consistency(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3))
