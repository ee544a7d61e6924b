"""LRC super-pixels, region point sampler and contrastive sampling loss (methods.md §5.4-5.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb

from localcl.losses.lrc import (
    LRCLoss,
    felzenszwalb_superpixels,
    lrc_loss,
    lrc_loss_from_points,
    sample_region_points,
)


def _blocks(B: int, H: int = 8, W: int = 8, side: int = 2) -> torch.Tensor:
    """(B, 2, H, W) maps of side x side blocks, ids 0..(H/side)(W/side)-1, identical in both views."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ids = (ys // side) * (W // side) + xs // side
    return ids[None, None].repeat(B, 2, 1, 1)


def _ref_loss(w: torch.Tensor, group: list[int], view: list[int], tau: float, mode: str, same_view: bool) -> float:
    n = w.shape[0]
    wn = F.normalize(w, dim=1)
    terms = []
    for a in range(n):
        P = [p for p in range(n) if p != a and group[p] == group[a] and (same_view or view[p] != view[a])]
        if not P:
            continue
        s = {k: math.exp(float(wn[a] @ wn[k]) / tau) for k in range(n) if k != a}
        den = sum(s.values())
        if mode == "summed":
            terms.append(-math.log(sum(s[p] for p in P) / den))
        else:
            terms.append(sum(-math.log(s[p] / den) for p in P) / len(P))
    return sum(terms) / len(terms)


def test_felzenszwalb_superpixels__wraps_skimage_and_respects_min_size() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((40, 40))
    img[:20] += 1.0
    seg = felzenszwalb_superpixels(img, scale=100, sigma=0.8, min_size=30)
    assert seg.dtype == np.int32 and seg.shape == (40, 40)
    np.testing.assert_array_equal(seg, felzenszwalb(img, scale=100, sigma=0.8, min_size=30))
    assert np.bincount(seg.ravel()).min() >= 30
    np.testing.assert_array_equal(seg, felzenszwalb_superpixels(torch.from_numpy(img), 100, 0.8, 30))


def test_felzenszwalb_superpixels__bad_inputs_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="2D"):
        felzenszwalb_superpixels(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb_superpixels(np.zeros((4, 4)), scale=0)
    with pytest.raises(ValueError, match="min_size"):
        felzenszwalb_superpixels(np.zeros((4, 4)), min_size=0)
    with pytest.raises(ValueError, match="NaN"):
        felzenszwalb_superpixels(np.full((4, 4), np.nan))


def test_sample_region_points__points_inside_eligible_regions() -> None:
    reg = _blocks(2)
    reg[0, 1][reg[0, 1] == 5] = -1  # region 5 cropped out of view 1 of image 0
    reg[1, 0, 0, 0] = -1  # region 0 of image 1 shrinks to 3 px in view 0
    pts = sample_region_points(
        reg, num_regions=14, points_per_region=5, min_pix=4, generator=torch.Generator().manual_seed(0)
    )
    assert len(pts) == 2 * 14 * 2 * 5
    assert torch.equal(reg[pts.image, pts.view, pts.y, pts.x], pts.region)
    chosen0 = set(pts.region[pts.image == 0].tolist())
    chosen1 = set(pts.region[pts.image == 1].tolist())
    assert 5 not in chosen0 and len(chosen0) == 14
    assert 0 not in chosen1 and len(chosen1) == 14
    for g in pts.group.unique():
        sel = pts.group == g
        assert pts.image[sel].unique().numel() == 1 and pts.region[sel].unique().numel() == 1
        assert (pts.view[sel] == 0).sum() == 5 and (pts.view[sel] == 1).sum() == 5


def test_sample_region_points__uniform_inside_region_and_seeded() -> None:
    reg = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    pts = sample_region_points(reg, 1, 4000, generator=torch.Generator().manual_seed(1))
    cells = (pts.y * 2 + pts.x)[pts.view == 0]
    freq = torch.bincount(cells, minlength=4).double() / 4000
    assert torch.all((freq - 0.25).abs() < 0.03)
    again = sample_region_points(reg, 1, 4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pts.y, again.y) and torch.equal(pts.x, again.x)


def test_sample_region_points__too_few_regions_raises_or_allows_fewer() -> None:
    reg = _blocks(1, 4, 4, 2)  # 4 regions
    with pytest.raises(ValueError, match="num_regions=5"):
        sample_region_points(reg, 5, 2)
    pts = sample_region_points(reg, 5, 2, allow_fewer=True)
    assert pts.region.unique().numel() == 4 and len(pts) == 4 * 2 * 2
    with pytest.raises(ValueError, match=r"regions must have shape \(B, 2, H, W\)"):
        sample_region_points(reg[:, :1], 1, 1)
    with pytest.raises(ValueError, match="points_per_region"):
        sample_region_points(reg, 1, 0)


@pytest.mark.parametrize("mode", ["summed", "per_positive"])
@pytest.mark.parametrize("same_view", [False, True])
def test_lrc_loss__matches_loop_reference(mode: str, same_view: bool) -> None:
    reg = _blocks(2)
    emb = torch.randn(2, 2, 5, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = lrc_loss(
        emb,
        reg,
        tau=0.3,
        num_regions=3,
        points_per_region=2,
        mode=mode,  # type: ignore[arg-type]
        same_view_positives=same_view,
        generator=torch.Generator().manual_seed(3),
    )
    pts = sample_region_points(reg, 3, 2, generator=torch.Generator().manual_seed(3))
    w = emb[pts.image, pts.view, :, pts.y, pts.x]
    ref = _ref_loss(w, pts.group.tolist(), pts.view.tolist(), 0.3, mode, same_view)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_lrc_loss__closed_form_region_codes() -> None:
    tau, Kr, Pr = 0.2, 4, 3
    reg = _blocks(1, 4, 4, 2)  # 4 regions
    codes = torch.eye(4, dtype=torch.float64)
    emb = codes[reg[0, 0]].permute(2, 0, 1)[None, None].repeat(1, 2, 1, 1, 1)  # (1, 2, 4, 4, 4)
    got = lrc_loss(emb, reg, tau, Kr, Pr, generator=torch.Generator().manual_seed(0))
    N = Kr * 2 * Pr
    e = math.exp(1 / tau)
    want = -math.log(Pr * e / ((2 * Pr - 1) * e + N - 2 * Pr))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_lrc_loss__zero_gradient_for_unsampled_pixels() -> None:
    reg = _blocks(1)
    emb = torch.randn(1, 2, 4, 8, 8, requires_grad=True)
    lrc_loss(emb, reg, num_regions=3, points_per_region=2, generator=torch.Generator().manual_seed(4)).backward()
    pts = sample_region_points(reg, 3, 2, generator=torch.Generator().manual_seed(4))
    used = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    used[pts.image, pts.view, pts.y, pts.x] = True
    g = emb.grad.abs().sum(2)  # type: ignore[union-attr]
    assert torch.all(g[~used] == 0) and torch.all(g[used] > 0)


def test_lrc_loss__lower_resolution_embeddings_use_nearest_lookup() -> None:
    reg = _blocks(1, 8, 8, 2)
    emb = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    got = lrc_loss(emb, reg, 0.5, 4, 2, generator=torch.Generator().manual_seed(5))
    pts = sample_region_points(reg, 4, 2, generator=torch.Generator().manual_seed(5))
    w = emb[pts.image, pts.view, :, pts.y // 2, pts.x // 2]
    assert got.item() == pytest.approx(
        _ref_loss(w, pts.group.tolist(), pts.view.tolist(), 0.5, "summed", False), rel=1e-10
    )


def test_lrc_loss__chunked_equals_naive_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(24, 4, dtype=torch.float64, generator=g)
    group = torch.arange(6).repeat_interleave(4)
    view = torch.tensor([0, 0, 1, 1]).repeat(6)
    res = []
    for c in (None, 5):
        w = w0.clone().requires_grad_(True)
        loss = lrc_loss_from_points(w, group, view, 0.2, chunk_size=c)
        loss.backward()
        res.append((loss.detach(), w.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    w = w0[:8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lrc_loss_from_points(x, group[:8], view[:8], 0.5, chunk_size=None), (w,))


def test_lrc__module_and_bad_inputs() -> None:
    reg = _blocks(1)
    emb = torch.randn(1, 2, 4, 8, 8)
    mod = LRCLoss(tau=0.2, num_regions=3, points_per_region=2, mode="per_positive")
    a = mod(emb, reg, torch.Generator().manual_seed(0))
    b = lrc_loss(emb, reg, 0.2, 3, 2, mode="per_positive", generator=torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError, match="tau"):
        LRCLoss(tau=0)
    with pytest.raises(ValueError, match="mode"):
        LRCLoss(mode="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embeddings must have shape"):
        lrc_loss(emb[0], reg)
    with pytest.raises(ValueError, match="regions must have shape"):
        lrc_loss(emb, reg[:, :, :, :, None])
