"""Tests of localcl.augment: determinism per seed, exact label/coordinate warping, spec ranges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from localcl import augment as A


def _ramp(b: int, h: int, w: int) -> torch.Tensor:
    return torch.arange(b * h * w, dtype=torch.float64).view(b, 1, h, w) / (b * h * w)


# ------------------------------------------------------------------------------ intensity


def test_intensity_view__deterministic_per_seed_and_differs_across_seeds() -> None:
    x = torch.rand(4, 1, 16, 16)
    a = A.intensity_view(x, A.make_generator(3))
    b = A.intensity_view(x, A.make_generator(3))
    c = A.intensity_view(x, A.make_generator(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_intensity_view__matches_formula_with_drawn_parameters() -> None:
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.5
    gen = A.make_generator(11)
    out = A.intensity_view(x, gen, clip=None)
    # replay the draws in the documented order: brightness then contrast, one per image
    g2 = A.make_generator(11)
    shift = -0.3 + 0.6 * torch.rand(3, generator=g2, dtype=torch.float64)
    fac = 0.7 + 0.6 * torch.rand(3, generator=g2, dtype=torch.float64)
    for i in range(3):
        y = x[i] + shift[i]
        ref = (y - y.mean()) * fac[i] + y.mean()
        torch.testing.assert_close(out[i], ref)
    assert shift.abs().max() <= 0.3 and fac.min() >= 0.7 and fac.max() <= 1.3


def test_intensity_view__clips_to_range() -> None:
    x = torch.rand(8, 1, 8, 8) * 3 - 1
    out = A.intensity_view(x, A.make_generator(0))
    assert out.min() >= 0.0 and out.max() <= 1.5


@pytest.mark.parametrize(
    "kwargs, match",
    [({"brightness": -0.1}, "brightness"), ({"contrast": (1.2, 0.8)}, "contrast")],
)
def test_intensity_view__bad_parameters_name_them(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        A.intensity_view(torch.rand(2, 1, 4, 4), A.make_generator(0), **kwargs)


def test_intensity_view__bad_rank_names_argument() -> None:
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        A.intensity_view(torch.rand(4, 4), A.make_generator(0))


# ------------------------------------------------------------------------------ GLCL global


def test_glcl_global_crop__window_and_offsets_match_spec_at_192() -> None:
    warp = A.glcl_global_crop(200, (192, 192), A.make_generator(0))
    th = warp.theta
    side = th[:, 0, 0] * 192
    torch.testing.assert_close(side, torch.full_like(side, 100.0))
    x0 = (th[:, 0, 2] + 1) * 96 - 50
    y0 = (th[:, 1, 2] + 1) * 96 - 50
    for off in (x0, y0):
        torch.testing.assert_close(off, off.round())
        assert off.min() >= 10 and off.max() <= 69
        assert len(set(off.round().long().tolist())) > 30  # actually random over [10, 70)


def test_glcl_global_crop__scales_proportionally_for_other_sizes() -> None:
    warp = A.glcl_global_crop(50, (96, 96), A.make_generator(0))
    side = warp.theta[:, 0, 0] * 96
    torch.testing.assert_close(side, torch.full_like(side, 50.0))
    x0 = (warp.theta[:, 0, 2] + 1) * 48 - 25
    assert x0.min() >= 5 and x0.max() <= 34


def test_glcl_global_view__equals_crop_then_bilinear_resize_in_the_interior() -> None:
    x = torch.rand(3, 1, 192, 192, dtype=torch.float64)
    warp = A.glcl_global_crop(3, (192, 192), A.make_generator(5))
    v = A.warp_image(x, warp)
    for i in range(3):
        x0 = int(round(((warp.theta[i, 0, 2] + 1) * 96 - 50).item()))
        y0 = int(round(((warp.theta[i, 1, 2] + 1) * 96 - 50).item()))
        ref = F.interpolate(
            x[i : i + 1, :, y0 : y0 + 100, x0 : x0 + 100], size=(192, 192), mode="bilinear", align_corners=False
        )
        # the outermost output pixels see real neighbours instead of the crop's edge replica
        torch.testing.assert_close(v[i : i + 1, :, 2:-2, 2:-2], ref[:, :, 2:-2, 2:-2])


def test_glcl_global_view__deterministic_per_seed() -> None:
    x = torch.rand(4, 1, 64, 64)
    a, wa = A.glcl_global_view(x, A.make_generator(1))
    b, wb = A.glcl_global_view(x, A.make_generator(1))
    assert torch.equal(a, b) and torch.equal(wa.theta, wb.theta)


# ------------------------------------------------------------------------------ warps


def test_warp_labels__identity_and_flip_are_exact_permutations() -> None:
    lbl = torch.arange(2 * 12 * 10).view(2, 12, 10)
    ident = A.identity_warp(2, (12, 10))
    assert torch.equal(A.warp_labels(lbl, ident), lbl)
    theta = A.affine_from_params((12, 10), torch.zeros(2), torch.ones(2), torch.tensor([True, False]))
    out = A.warp_labels(lbl, A.Warp(theta, (12, 10)))
    assert torch.equal(out[0], lbl[0].flip(-1)) and torch.equal(out[1], lbl[1])


def test_warp_labels__rotation_by_90_degrees_is_rot90_for_square_images() -> None:
    lbl = torch.randint(0, 50, (1, 9, 9))
    theta = A.affine_from_params((9, 9), torch.tensor([90.0]), torch.ones(1), torch.zeros(1))
    out = A.warp_labels(lbl, A.Warp(theta, (9, 9)))
    assert torch.equal(out[0], torch.rot90(lbl[0], 1, dims=(0, 1))) or torch.equal(
        out[0], torch.rot90(lbl[0], -1, dims=(0, 1))
    )


def test_warp_labels__nearest_keeps_label_set_and_fills_outside() -> None:
    lbl = torch.randint(0, 4, (4, 32, 32))
    warp = A.Warp(
        A.affine_from_params((32, 32), torch.full((4,), 30.0), torch.full((4,), 0.8), torch.zeros(4)), (32, 32)
    )
    out = A.warp_labels(lbl, warp, fill=-1)
    assert set(out.unique().tolist()) <= {-1, 0, 1, 2, 3}
    assert (out == -1).any()  # rotated + zoomed out: corners come from outside the image


def test_warp_image_and_labels__consistent_on_piecewise_constant_image() -> None:
    # an image that equals its label map: nearest-warped labels == image warped with nearest
    lbl = torch.randint(0, 5, (3, 40, 40))
    warp = A.random_geometric(3, (40, 40), A.make_generator(2))
    img = A.warp_image(lbl[:, None].double(), warp, mode="nearest")
    out = A.warp_labels(lbl, warp, fill=0)
    agree = (img[:, 0].long() == out).double().mean()
    assert agree > 0.995  # may differ only on exact pixel-boundary ties


def test_correspondence__maps_view_a_pixels_onto_same_source_point_in_view_b() -> None:
    size = (48, 40)
    gen = A.make_generator(7)
    wa = A.random_geometric(2, size, gen)
    wb = A.random_geometric(2, size, gen)
    coords, valid = A.correspondence(wa, wb)
    assert valid.float().mean() > 0.2
    src_a = wa.grid(dtype=torch.float64)
    src_b_at = wb.map_points(coords.double().view(2, -1, 2)).view_as(src_a)
    torch.testing.assert_close(src_b_at[valid], src_a[valid], atol=1e-5, rtol=0)


def test_correspondence__smooth_image_values_agree_across_views() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    x = (torch.sin(3 * xx) + torch.cos(2 * yy))[None, None].repeat(2, 1, 1, 1).double()
    gen = A.make_generator(3)
    wa, wb = A.random_geometric(2, (64, 64), gen), A.random_geometric(2, (64, 64), gen)
    va, vb = A.warp_image(x, wa), A.warp_image(x, wb)
    coords, valid = A.correspondence(wa, wb)
    vb_at = F.grid_sample(vb, coords.double(), align_corners=False)
    inner = valid & (coords.abs() < 0.9).all(-1)
    err = (va[:, 0] - vb_at[:, 0]).abs()[inner]
    assert err.max() < 0.05


def test_warp__inverse_points_inverts_map_points() -> None:
    w = A.random_geometric(4, (30, 50), A.make_generator(0))
    pts = torch.rand(4, 20, 2, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(w.inverse_points(w.map_points(pts)), pts)


def test_affine_from_params__rotation_is_rigid_in_pixel_units_for_non_square_images() -> None:
    size = (20, 60)
    theta = A.affine_from_params(size, torch.tensor([37.0]), torch.ones(1), torch.zeros(1))
    w = A.Warp(theta, size)
    p = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    q = w.map_points(p)[0]
    half = torch.tensor([30.0, 10.0], dtype=torch.float64)
    dx, dy = (q[1] - q[0]) * half, (q[2] - q[0]) * half
    assert math.isclose(dx.norm().item(), 30.0, rel_tol=1e-9)
    assert math.isclose(dy.norm().item(), 10.0, rel_tol=1e-9)
    assert abs(torch.dot(dx, dy).item()) < 1e-9


def test_random_geometric__bad_parameters_name_them() -> None:
    with pytest.raises(ValueError, match="crop_area"):
        A.random_geometric(2, (8, 8), A.make_generator(0), crop_area=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_p"):
        A.random_geometric(2, (8, 8), A.make_generator(0), flip_p=2.0)


def test_map_points__refuses_elastic_warps() -> None:
    w = A.Warp(A.identity_warp(1, (8, 8)).theta, (8, 8), torch.zeros(1, 8, 8, 2))
    with pytest.raises(ValueError, match="affine"):
        w.map_points(torch.zeros(1, 1, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------ fine-tune


def test_glcl_finetune_augment__deterministic_and_labels_follow_image() -> None:
    lbl = torch.zeros(20, 48, 48, dtype=torch.long)
    lbl[:, 10:30, 15:35] = 2
    img = lbl[:, None].double()  # image == label: warped image and warped label must agree
    a = A.glcl_finetune_augment(img, lbl, A.make_generator(9))
    b = A.glcl_finetune_augment(img, lbl, A.make_generator(9))
    assert a[1] is not None and b[1] is not None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    out_img, out_lbl, warp = a
    agree = ((out_img[:, 0] > 1.0) == (out_lbl == 2)).double().mean()
    assert agree > 0.98
    assert set(out_lbl.unique().tolist()) <= {0, 2}


def test_glcl_finetune_augment__elastic_applies_to_a_tail_of_1_to_b_minus_2_slices() -> None:
    counts = set()
    for seed in range(40):
        _, _, warp = A.glcl_finetune_augment(torch.rand(20, 1, 24, 24), None, A.make_generator(seed))
        moved = warp.flow.abs().amax(dim=(1, 2, 3)) > 0
        n_keep = int((~moved).sum())
        assert not moved[:n_keep].any() and moved[n_keep:].all()  # a tail is warped
        counts.add(n_keep)
    assert min(counts) >= 1 and max(counts) <= 18 and len(counts) > 5


def test_elastic_flow__coarse_displacement_std_is_sigma_pixels() -> None:
    flow = A.elastic_flow(400, (33, 33), A.make_generator(0), sigma_px=5.0, points=3)
    # align_corners=True bicubic: the 3x3 control points are reproduced at pixels 0, 16, 32
    ctrl = flow[:, ::16, ::16, 0] * 33 / 2  # back to pixels along x
    assert abs(ctrl.std().item() - 5.0) < 0.3


def test_glcl_finetune_augment__bad_label_shape_names_label() -> None:
    with pytest.raises(ValueError, match="label must have shape"):
        A.glcl_finetune_augment(torch.rand(2, 1, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long), A.make_generator(0))


# ------------------------------------------------------------------------------ 3D flips


def test_apply_flips__flags_flip_exactly_the_marked_axes_of_images_and_maps() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 1, 3, 4, 5)
    lbl = x[:, 0].long()
    flags = torch.tensor([[True, False, True], [False, True, False]])
    fx, fl = A.apply_flips(x, flags), A.apply_flips(lbl, flags)
    assert torch.equal(fx[0, 0], x[0, 0].flip(0).flip(2)) and torch.equal(fx[1, 0], x[1, 0].flip(1))
    assert torch.equal(fl, fx[:, 0].long())  # maps follow the image exactly
    assert torch.equal(A.apply_flips(fx, flags), x)  # involution


def test_random_flips__deterministic_and_probability_checked() -> None:
    a = A.random_flips(64, 3, A.make_generator(2))
    assert torch.equal(a, A.random_flips(64, 3, A.make_generator(2)))
    assert 0.3 < a.float().mean() < 0.7
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        A.random_flips(2, 3, A.make_generator(0), p=1.5)
    with pytest.raises(ValueError, match="flips must have shape"):
        A.apply_flips(torch.zeros(2, 4, 4), torch.zeros(3, 2, dtype=torch.bool))
