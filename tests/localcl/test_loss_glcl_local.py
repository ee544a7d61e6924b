"""GLCL local losses L^R / L^D vs loop references (methods.md §1.4 "Local losses")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from localcl.losses.glcl_local import (
    GLCLLocalLoss,
    extract_regions,
    glcl_local_domain_loss,
    glcl_local_loss,
    local_grid,
)


def _sim(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(F.normalize(u, dim=0) @ F.normalize(v, dim=0))


def _ref_lr(regions: torch.Tensor, anchors: int, neg: list[list[int]], tau: float) -> float:
    B = regions.shape[0]
    terms = []
    for b in range(B):
        for v in range(2):
            o = 1 - v
            for u in range(anchors):
                a = regions[b, v, u]
                num = math.exp(_sim(a, regions[b, o, u]) / tau)
                den = num + sum(
                    math.exp(_sim(a, regions[b, v, w]) / tau) + math.exp(_sim(a, regions[b, o, w]) / tau)
                    for w in neg[u]
                )
                terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("region_size", [3, 1])
@pytest.mark.parametrize("neighbours", ["code", "nearest", "all"])
def test_glcl_local__lr_matches_loop_reference(region_size: int, neighbours: str) -> None:
    grid = local_grid((12, 12), region_size, neighbours)  # type: ignore[arg-type]
    P = grid.positions.shape[0]
    regions = torch.randn(2, 2, P, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = glcl_local_loss(regions, grid, tau=0.1)
    ref = _ref_lr(regions, grid.num_anchors, grid.neg_index.tolist(), 0.1)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_local_grid__code_positions_for_48_map() -> None:
    g = local_grid((48, 48), 3, "code")  # M' = 44
    pos = [tuple(p) for p in g.positions.tolist()]
    assert pos[:13] == [
        (0, 0),
        (0, 22),
        (0, 44),
        (22, 0),
        (22, 22),
        (22, 44),
        (44, 0),
        (44, 22),
        (44, 44),
        (11, 11),
        (11, 33),
        (33, 11),
        (33, 33),
    ]
    # anchor (0,0): code negatives (0,M'/2), (M'/4,M'/4), (M'/4,M'/2), (M'/2,0), (M'/2,M'/4)
    assert [pos[i] for i in g.neg_index[0].tolist()] == [(0, 22), (11, 11), (11, 22), (22, 0), (22, 11)]
    g1 = local_grid((48, 48), 1, "code")  # M' = 47 for 1x1 regions
    assert tuple(g1.positions[2].tolist()) == (0, 47) and tuple(g1.positions[12].tolist()) == (35, 35)


def test_local_grid__nearest_tie_rule_lower_anchor_index() -> None:
    g = local_grid((48, 48), 3, "nearest")
    # anchor 0 (0,0): (1,1) idx 9, then (0,2) idx 1 and (2,0) idx 3, (2,2) idx 4; (1,3) idx 10 and
    # (3,1) idx 11 tie at distance sqrt(10) quarters -> the lower index 10 wins
    assert g.neg_index[0].tolist() == [9, 1, 3, 4, 10]


def test_extract_regions__window_flatten_and_linear_map() -> None:
    grid = local_grid((10, 10), 3, "code")
    f = torch.randn(2, 3, 10, 10)
    v = extract_regions(f, grid)
    y, x = grid.positions[5].tolist()
    torch.testing.assert_close(v[1, 5], f[1, :, y : y + 3, x : x + 3].reshape(-1))
    lin = torch.nn.Linear(27, 4, bias=False)
    torch.testing.assert_close(extract_regions(f, grid, lin), lin(v))


def test_glcl_local__zero_gradient_outside_regions() -> None:
    grid = local_grid((16, 16), 3, "code")
    f1 = torch.randn(2, 4, 16, 16, requires_grad=True)
    f2 = torch.randn(2, 4, 16, 16, requires_grad=True)
    mod = GLCLLocalLoss((16, 16), in_features=36, out_features=8)
    mod(f1, f2).backward()
    used = torch.zeros(16, 16, dtype=torch.bool)
    for y, x in grid.positions.tolist():
        used[y : y + 3, x : x + 3] = True
    for f in (f1, f2):
        assert f.grad is not None
        assert torch.all(f.grad[:, :, ~used] == 0)
        assert f.grad[:, :, used].abs().sum() > 0


def test_glcl_local__closed_form_identical_views_orthogonal_regions() -> None:
    grid = local_grid((12, 12), 1, "all")  # 13 anchor positions, all other anchors negatives
    e = torch.eye(13, dtype=torch.float64)
    regions = torch.stack([e, e])[None]  # (1, 2, 13, 13): views identical, regions orthogonal
    tau = 0.25
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * 12))
    assert glcl_local_loss(regions, grid, tau).item() == pytest.approx(want, rel=1e-12)


def test_glcl_local__symmetric_in_the_two_views() -> None:
    grid = local_grid((12, 12))
    regions = torch.randn(3, 2, grid.positions.shape[0], 6, dtype=torch.float64)
    a = glcl_local_loss(regions, grid)
    b = glcl_local_loss(regions.flip(1), grid)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_glcl_local__gradcheck_float64() -> None:
    grid = local_grid((8, 8), 1, "code")
    r = torch.randn(1, 2, grid.positions.shape[0], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: glcl_local_loss(x, grid, 0.5), (r,))


def _ref_ld(regions, vol, part, neg, anchors, tau, n_neg=4):
    B = regions.shape[0]
    terms = []
    for i in range(B):
        others = [(i + d) % B for d in range(1, B)]
        js = [j for j in others if part[j] == part[i] and vol[j] != vol[i]][:2]
        pairs = [(i, 1), (js[0], 0), (js[1], 0)]
        for u in range(anchors):
            a = regions[i, 0, u]
            for pi, pv in pairs:
                num = math.exp(_sim(a, regions[pi, pv, u]) / tau)
                den = num + sum(
                    math.exp(_sim(a, regions[i, 0, w]) / tau) + math.exp(_sim(a, regions[pi, pv, w]) / tau)
                    for w in neg[u][:n_neg]
                )
                terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


def test_glcl_local__ld_matches_loop_reference() -> None:
    grid = local_grid((12, 12), 3, "code")
    vol = torch.tensor([0, 1, 2, 0, 1, 2])
    part = torch.tensor([0, 0, 0, 1, 1, 1])
    regions = torch.randn(6, 2, grid.positions.shape[0], 4, dtype=torch.float64)
    got = glcl_local_domain_loss(regions, vol, part, grid, tau=0.2)
    ref = _ref_ld(regions, vol.tolist(), part.tolist(), grid.neg_index.tolist(), 13, 0.2)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_glcl_local__chunked_equals_naive() -> None:
    grid = local_grid((12, 12))
    r0 = torch.randn(2, 2, grid.positions.shape[0], 6, dtype=torch.float64)
    res = []
    for c in (None, 7):
        r = r0.clone().requires_grad_(True)
        loss = glcl_local_loss(r, grid, chunk_size=c)
        loss.backward()
        res.append((loss.detach(), r.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])


def test_glcl_local__bad_inputs_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="region_size"):
        local_grid((48, 48), 2)
    with pytest.raises(ValueError, match="neighbours"):
        local_grid((48, 48), 3, "far")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        local_grid((6, 6), 3)
    grid = local_grid((12, 12))
    with pytest.raises(ValueError, match="regions must have shape"):
        glcl_local_loss(torch.randn(2, 2, 5, 4), grid)
    with pytest.raises(ValueError, match="tau"):
        glcl_local_loss(torch.randn(2, 2, grid.positions.shape[0], 4), grid, tau=-1.0)
    with pytest.raises(ValueError, match="fmap spatial size"):
        extract_regions(torch.randn(1, 2, 10, 10), grid)
    with pytest.raises(ValueError, match="other volumes"):
        glcl_local_domain_loss(
            torch.randn(2, 2, grid.positions.shape[0], 4), torch.tensor([0, 1]), torch.tensor([0, 0]), grid
        )


def test_glcl_local_module__domain_variant_matches_functional() -> None:
    mod = GLCLLocalLoss((12, 12), variant="D", in_features=2 * 9, out_features=5, domain_negatives=3)
    f1, f2 = torch.randn(6, 2, 12, 12), torch.randn(6, 2, 12, 12)
    vol, part = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    regions = torch.stack([extract_regions(f1, mod.grid, mod.proj), extract_regions(f2, mod.grid, mod.proj)], 1)
    want = glcl_local_domain_loss(regions, vol, part, mod.grid, 0.1, num_negatives=3)
    assert mod(f1, f2, vol, part).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="volume and partition"):
        mod(f1, f2)
