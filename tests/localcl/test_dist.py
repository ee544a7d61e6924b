"""localcl.dist: single-process behaviour, mocked ranks, and one real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from localcl import dist
from localcl.losses.kernel import info_nce

N_LOCAL, DIM, WS = 4, 5, 2


def _global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(WS*N_LOCAL, DIM) float64 embeddings; ids give each sample exactly one positive on the
    other rank (sample i <-> i + N_LOCAL), so every rank has the same number of valid anchors."""
    x = torch.randn(WS * N_LOCAL, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ids = torch.arange(WS * N_LOCAL) % N_LOCAL
    return x, ids


def _rank_loss(local: torch.Tensor, ids: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The way a loss is meant to use the module: local anchors vs. gathered candidates."""
    n = local.shape[0]
    cands = dist.gather(local)
    off = dist.rank_offset(n)
    return info_nce(
        local,
        cands,
        tau=0.2,
        anchor_ids=ids[off : off + n],
        candidate_ids=ids,
        self_offset=off,
        mode="single",
        chunk_size=chunk,
    )


# ------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------
def test_dist__single_process_defaults():
    assert not dist.is_dist()
    assert dist.rank() == 0 and dist.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.gather(x) is x
    g = dist.gather_nograd(x)
    assert not g.requires_grad and torch.equal(g, x.detach())
    assert dist.rank_offset(7) == 0
    assert torch.equal(dist.eye_rank(3), torch.eye(3, dtype=torch.bool))


def test_dist__single_process_loss_equals_plain_self_contrast():
    x, _ = _global_batch()
    ids = torch.arange(x.shape[0]) % N_LOCAL
    torch.testing.assert_close(_rank_loss(x, ids, chunk=None), info_nce(x, tau=0.2, anchor_ids=ids, mode="single"))


def test_dist__bad_n_raises():
    with pytest.raises(ValueError, match="n must be"):
        dist.rank_offset(-1)
    with pytest.raises(ValueError, match="n must be"):
        dist.eye_rank(-2)


# ------------------------------------------------------------------------------------------
# mocked ranks
# ------------------------------------------------------------------------------------------
def test_dist__eye_rank_with_mocked_rank(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    m = dist.eye_rank(2)
    assert m.shape == (2, 6)
    assert m.nonzero().tolist() == [[0, 2], [1, 3]]
    assert dist.rank_offset(2) == 2


@pytest.mark.parametrize("chunk", [None, 3])
def test_dist__mocked_ranks_average_equals_global_loss_and_grad(monkeypatch, chunk):
    x, ids = _global_batch(1)
    x_global = x.clone().requires_grad_(True)
    ref = info_nce(x_global, tau=0.2, anchor_ids=ids, mode="single", chunk_size=chunk)
    ref.backward()

    x_sim = x.clone().requires_grad_(True)
    monkeypatch.setattr(dist, "world_size", lambda: WS)
    total = 0.0
    for r in range(WS):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        # gather returns the global batch (with graph into every rank's rows, as all_gather +
        # the SUM all_reduce of the backward pass would produce)
        monkeypatch.setattr(dist, "gather", lambda t: x_sim)
        local = x_sim[r * N_LOCAL : (r + 1) * N_LOCAL]
        total = total + _rank_loss(local, ids, chunk)
    (total / WS).backward()  # DDP averages gradients over ranks
    torch.testing.assert_close(total / WS, ref)
    torch.testing.assert_close(x_sim.grad, x_global.grad)


# ------------------------------------------------------------------------------------------
# real 2-process gloo group on loopback
# ------------------------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, ids = _global_batch(2)
        local = x[rank * N_LOCAL : (rank + 1) * N_LOCAL].clone().requires_grad_(True)
        loss = _rank_loss(local, ids, chunk=3)
        loss.backward()
        # variable row counts per rank: rank r holds r + 2 rows
        y = torch.full((rank + 2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
        gy = dist.gather(y)
        weights = torch.arange(gy.numel(), dtype=torch.float64).reshape(gy.shape)
        (gy * weights).sum().backward()
        torch.save(
            {
                "loss": loss.detach(),
                "grad": local.grad,
                "gy": gy.detach(),
                "y_grad": y.grad,
                "weights": weights,
                "nograd": dist.gather_nograd(y),
                "eye": dist.eye_rank(N_LOCAL),
                "rank": dist.rank(),
                "world": dist.world_size(),
                "is_dist": dist.is_dist(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_dist__real_gloo_group_matches_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_gloo_worker, args=(WS, _free_port(), str(tmp_path)), nprocs=WS, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WS)]

    x, ids = _global_batch(2)
    xg = x.clone().requires_grad_(True)
    ref = info_nce(xg, tau=0.2, anchor_ids=ids, mode="single")
    ref.backward()
    for r, out in enumerate(res):
        assert out["rank"] == r and out["world"] == WS and out["is_dist"]
        # x_r.grad = d(sum_r' L_r')/dx_r = WS * d(global mean)/dx_r
        torch.testing.assert_close(out["grad"], WS * xg.grad[r * N_LOCAL : (r + 1) * N_LOCAL])
        expected_eye = torch.zeros(N_LOCAL, WS * N_LOCAL, dtype=torch.bool)
        expected_eye[torch.arange(N_LOCAL), torch.arange(N_LOCAL) + r * N_LOCAL] = True
        assert torch.equal(out["eye"], expected_eye)
    torch.testing.assert_close(sum(o["loss"] for o in res) / WS, ref.detach())

    # variable-size gather: rows [1,1] x2 then [2,2] x3, identical on both ranks
    expected_gy = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)]).double()
    for r, out in enumerate(res):
        torch.testing.assert_close(out["gy"], expected_gy)
        torch.testing.assert_close(out["nograd"], expected_gy)
        # every rank's loss is sum(gy * w): the grad of rank r's rows sums over both ranks
        sl = slice(0, 2) if r == 0 else slice(2, 5)
        torch.testing.assert_close(out["y_grad"], WS * out["weights"][sl])
