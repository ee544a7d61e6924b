"""Seeded, batched tensor augmentations with transform tracking.

Every random draw comes from an explicit ``torch.Generator`` (CPU), so a view is a pure function
of ``(input, generator state)``: the same seed gives the same views on CPU and GPU.

Geometric transforms are represented by a :class:`Warp`: for every output pixel it stores where
to sample in the *source* image, in the normalised coordinates of
``torch.nn.functional.grid_sample`` (``align_corners=False``; ``x`` = width axis, ``y`` = height
axis, both in ``[-1, 1]``). A warp is

.. math::

    g(p) = A \\,(p + \\delta(p)) + t ,\\qquad p \\in [-1, 1]^2

with a per-image affine ``theta = [A | t]`` of shape ``(B, 2, 3)`` and an optional dense
displacement ``delta`` of shape ``(B, H, W, 2)`` (the elastic part). The same warp is applied to
images (bilinear), to label / superpixel maps (nearest, out-of-image pixels get a fill value) and,
for purely affine warps, to point coordinates, so labels, superpixels and pixel correspondences
stay consistent across views (IDEAL, MixCL, LRC).

Families implemented (spec ``../shared/design/methods.md``):

- :func:`intensity_view`: brightness ``b ~ U(-0.3, 0.3)``, contrast ``c ~ U(0.7, 1.3)`` around the
  per-image mean, clip to ``[0, 1.5]`` (GLCL local / PLCL views, spec §1.4, §2.5).
- :func:`glcl_global_view`: 100x100 crop (for a 192x192 image, scaled proportionally otherwise)
  with its top-left corner uniform in ``[10, 70)``, resized back bilinearly, then intensity
  (GLCL global views, spec §1.4).
- :func:`random_geometric`: crop-resize, flip, rotation and scale with tracked affines
  (IDEAL, MixCL, LRC views, spec §3.4, §4.4, §5.4).
- :func:`glcl_finetune_augment`: per slice one of {rotation U(-15, 15) deg, scale U(0.95, 1.05),
  left-right flip p=0.5, rotation k*45 deg, nothing}, then an elastic warp (3x3 grid of N(0, 5 px)
  displacements, bicubically upsampled) on a random tail of the batch (spec §1.7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Warp",
    "affine_from_params",
    "apply_flips",
    "check_image_batch",
    "correspondence",
    "elastic_flow",
    "glcl_finetune_augment",
    "glcl_global_crop",
    "glcl_global_view",
    "intensity_view",
    "make_generator",
    "random_flips",
    "random_geometric",
    "warp_image",
    "warp_labels",
]


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (all draws here are made on the CPU)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def check_image_batch(x: Tensor, name: str = "image") -> None:
    """Raise ``ValueError`` unless ``x`` is a float tensor of shape (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


# --------------------------------------------------------------------------------- intensity


def intensity_view(
    x: Tensor,
    gen: torch.Generator,
    brightness: float = 0.3,
    contrast: tuple[float, float] = (0.7, 1.3),
    clip: tuple[float, float] | None = (0.0, 1.5),
) -> Tensor:
    """Per-image random brightness then contrast, then clipping.

    .. math::

        x' = \\operatorname{clip}\\big((x + b - m)\\,c + m,\\ lo,\\ hi\\big),\\quad
        b \\sim U(-\\beta, \\beta),\\ c \\sim U(c_0, c_1),\\ m = \\operatorname{mean}_{HW}(x + b)

    (TF ``random_brightness`` followed by ``random_contrast``, as in the GLCL/PLCL code, but with
    independent draws per image.) Pixel correspondence between two intensity views is the identity.

    Args:
        x: images, shape (B, C, H, W), float.
        gen: CPU generator for the draws.
        brightness: ``beta``, maximum absolute additive shift (>= 0).
        contrast: ``(c0, c1)``, range of the multiplicative contrast factor (0 < c0 <= c1).
        clip: ``(lo, hi)`` output range, or ``None`` for no clipping.

    Returns:
        Tensor of the same shape and dtype.
    """
    check_image_batch(x, "x")
    if brightness < 0:
        raise ValueError(f"brightness must be >= 0, got {brightness}")
    if not (0 < contrast[0] <= contrast[1]):
        raise ValueError(f"contrast must be (c0, c1) with 0 < c0 <= c1, got {contrast}")
    b = x.shape[0]
    shift = _uniform(b, -brightness, brightness, gen).to(x.device, x.dtype).view(b, 1, 1, 1)
    factor = _uniform(b, contrast[0], contrast[1], gen).to(x.device, x.dtype).view(b, 1, 1, 1)
    y = x + shift
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * factor + mean
    if clip is not None:
        y = y.clamp(clip[0], clip[1])
    return y


# ------------------------------------------------------------------------------------ warps


@dataclass
class Warp:
    """A tracked geometric transform for a batch (see module docstring).

    Attributes:
        theta: (B, 2, 3) affine ``[A | t]`` mapping output normalised coords to source coords.
        size: output ``(H, W)``.
        flow: optional (B, H, W, 2) displacement added to the output coordinates before ``theta``
            (normalised units, last dim = (x, y)); ``None`` for a purely affine warp.
    """

    theta: Tensor
    size: tuple[int, int]
    flow: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.theta.shape[0])

    def grid(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Sampling grid (B, H, W, 2) for ``F.grid_sample(..., align_corners=False)``."""
        device = self.theta.device if device is None else device
        theta = self.theta.to(device, dtype)
        h, w = self.size
        base = _base_grid(h, w, device, dtype).expand(theta.shape[0], h, w, 2)
        if self.flow is not None:
            base = base + self.flow.to(device, dtype)
        return torch.einsum("bhwj,bij->bhwi", base, theta[:, :, :2]) + theta[:, None, None, :, 2]

    def is_affine(self) -> bool:
        return self.flow is None

    def map_points(self, pts: Tensor) -> Tensor:
        """Source coordinates of output points: ``pts`` (B, N, 2) normalised (x, y) -> (B, N, 2).

        Only for affine warps (raises ``ValueError`` when an elastic flow is present).
        """
        if self.flow is not None:
            raise ValueError("map_points needs an affine warp (flow is None)")
        theta = self.theta.to(pts.device, pts.dtype)
        return torch.einsum("bnj,bij->bni", pts, theta[:, :, :2]) + theta[:, None, :, 2]

    def inverse_points(self, pts: Tensor) -> Tensor:
        """Output coordinates of source points: inverse of :meth:`map_points`, (B, N, 2)."""
        if self.flow is not None:
            raise ValueError("inverse_points needs an affine warp (flow is None)")
        theta = self.theta.to(pts.device, torch.float64)
        a_inv = torch.linalg.inv(theta[:, :, :2])
        out = torch.einsum("bnj,bij->bni", pts.double() - theta[:, None, :, 2], a_inv)
        return out.to(pts.dtype)


def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Identity grid (1, H, W, 2) of pixel centres in normalised coords (align_corners=False)."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def identity_warp(batch: int, size: tuple[int, int]) -> Warp:
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    return Warp(theta, size)


def affine_from_params(
    size: tuple[int, int],
    angle_deg: Tensor,
    scale: Tensor,
    flip: Tensor,
    crop_box: Tensor | None = None,
) -> Tensor:
    """Build (B, 2, 3) affines from per-image parameters.

    Output pixel ``p`` (pixel units, origin at the image centre) samples the source at
    ``C( R(angle) S(1/scale) F p )`` where ``F`` flips the x axis when ``flip``, ``S`` zooms in by
    ``scale`` (scale > 1 enlarges the content), ``R`` rotates by ``angle`` degrees and ``C`` is the crop-resize map of ``crop_box`` = (y0, x0, h, w) in source
    pixels (``None``: the whole image). Rotation is done in pixel units, so it stays a rotation
    for non-square images.

    Shapes: ``angle_deg, scale, flip`` (B,), ``crop_box`` (B, 4). Returns float64 (B, 2, 3).
    """
    h, w = size
    b = angle_deg.shape[0]
    dt = torch.float64
    half = torch.tensor([w / 2.0, h / 2.0], dtype=dt)
    to_px = torch.diag(half)  # normalised -> centred pixel units
    to_norm = torch.diag(1.0 / half)
    a = torch.deg2rad(angle_deg.to(dt))
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B,2,2)
    inv_scale = (1.0 / scale.to(dt)).view(b, 1, 1) * torch.eye(2, dtype=dt)
    fl = torch.ones(b, 2, dtype=dt)
    fl[:, 0] = torch.where(flip.bool(), -1.0, 1.0)
    flip_m = torch.diag_embed(fl)
    lin = to_norm @ rot @ inv_scale @ flip_m @ to_px  # (B,2,2) in normalised coords
    trans = torch.zeros(b, 2, dtype=dt)
    if crop_box is not None:
        cb = crop_box.to(dt)
        y0, x0, ch, cw = cb[:, 0], cb[:, 1], cb[:, 2], cb[:, 3]
        crop_lin = torch.diag_embed(torch.stack([cw / w, ch / h], -1))
        crop_t = torch.stack([(2 * x0 + cw) / w - 1, (2 * y0 + ch) / h - 1], -1)
        lin = crop_lin @ lin
        trans = crop_t
    return torch.cat([lin, trans.unsqueeze(-1)], dim=-1)


def warp_image(x: Tensor, warp: Warp, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """Resample images (B, C, H_in, W_in) on the warp's grid -> (B, C, H, W)."""
    check_image_batch(x, "x")
    if x.shape[0] != warp.batch_size:
        raise ValueError(f"x has batch {x.shape[0]} but the warp has {warp.batch_size}")
    grid = warp.grid(x.device, x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def warp_labels(lbl: Tensor, warp: Warp, fill: int = -1) -> Tensor:
    """Nearest-neighbour resampling of integer maps (B, H_in, W_in) -> (B, H, W).

    Exact for any integer dtype (indices are gathered, never interpolated). Output pixels whose
    source lies outside the input get ``fill``.
    """
    if lbl.dim() != 3:
        raise ValueError(f"lbl must have shape (B, H, W), got {tuple(lbl.shape)}")
    if lbl.shape[0] != warp.batch_size:
        raise ValueError(f"lbl has batch {lbl.shape[0]} but the warp has {warp.batch_size}")
    b, hi, wi = lbl.shape
    grid = warp.grid(lbl.device, torch.float64)
    ix = torch.floor((grid[..., 0] + 1) * wi / 2).long()  # pixel whose cell contains the point
    iy = torch.floor((grid[..., 1] + 1) * hi / 2).long()
    valid = (ix >= 0) & (ix < wi) & (iy >= 0) & (iy < hi)
    flat = (iy.clamp(0, hi - 1) * wi + ix.clamp(0, wi - 1)).view(b, -1)
    out = torch.gather(lbl.reshape(b, -1), 1, flat).view(b, *warp.size)
    return torch.where(valid, out, torch.full_like(out, fill))


def correspondence(warp_a: Warp, warp_b: Warp) -> tuple[Tensor, Tensor]:
    """Pixel correspondence between two affine views of the same source image.

    For every pixel ``u`` of view ``a`` returns the position in view ``b`` that shows the same
    source point, ``warp_b^{-1}(warp_a(u))``, and whether it lies inside both the source and
    view ``b``.

    Returns:
        coords: (B, H_a, W_a, 2) normalised (x, y) in view ``b`` (usable with ``grid_sample``),
        valid: (B, H_a, W_a) bool.
    """
    if warp_a.batch_size != warp_b.batch_size:
        raise ValueError("warp_a and warp_b must have the same batch size")
    ha, wa = warp_a.size
    src = warp_a.grid(torch.device("cpu"), torch.float64)  # (B,H,W,2)
    pts = warp_b.inverse_points(src.view(warp_a.batch_size, -1, 2)).view_as(src)
    inside_src = (src.abs() <= 1).all(-1)
    inside_b = (pts.abs() <= 1).all(-1)
    return pts.float().to(warp_a.theta.device), (inside_src & inside_b).to(warp_a.theta.device)


# ------------------------------------------------------------------------------ GLCL global


def glcl_global_crop(
    batch: int,
    size: tuple[int, int],
    gen: torch.Generator,
    crop: int = 100,
    lo: int = 10,
    hi: int = 70,
    ref: int = 192,
) -> Warp:
    """GLCL crop-resize warp: a ``crop``/``ref`` window with its top-left corner in ``[lo, hi)``.

    For a 192x192 image this is the reference 100x100 crop with the corner uniform in
    ``[10, 70)`` on both axes; other sizes scale the window and the offsets by ``H/192`` and
    ``W/192`` (integers after rounding). The window is resized back to ``size``.
    """
    h, w = size
    ch, cw = max(1, round(crop * h / ref)), max(1, round(crop * w / ref))
    y_lo, y_hi = round(lo * h / ref), max(round(lo * h / ref) + 1, round(hi * h / ref))
    x_lo, x_hi = round(lo * w / ref), max(round(lo * w / ref) + 1, round(hi * w / ref))
    y_hi, x_hi = min(y_hi, h - ch + 1), min(x_hi, w - cw + 1)
    if y_hi <= y_lo or x_hi <= x_lo:
        raise ValueError(f"image size {size} too small for the GLCL crop window")
    y0 = torch.randint(y_lo, y_hi, (batch,), generator=gen)
    x0 = torch.randint(x_lo, x_hi, (batch,), generator=gen)
    box = torch.stack([y0, x0, torch.full_like(y0, ch), torch.full_like(x0, cw)], -1)
    zeros = torch.zeros(batch, dtype=torch.float64)
    theta = affine_from_params(size, zeros, torch.ones(batch, dtype=torch.float64), zeros, box)
    return Warp(theta, size)


def glcl_global_view(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Warp]:
    """GLCL global-stage view ``t(x)``: crop-resize (bilinear) then :func:`intensity_view`.

    Args:
        x: (B, C, H, W) images. Returns the view (same shape) and its :class:`Warp`.
    """
    check_image_batch(x, "x")
    warp = glcl_global_crop(x.shape[0], (x.shape[2], x.shape[3]), gen)
    v = warp_image(x, warp)
    return intensity_view(v, gen), warp


# ------------------------------------------------------------------------------ geometric


def random_geometric(
    batch: int,
    size: tuple[int, int],
    gen: torch.Generator,
    crop_area: tuple[float, float] = (0.4, 1.0),
    flip_p: float = 0.5,
    rotation_deg: float = 15.0,
    scale: tuple[float, float] = (0.9, 1.1),
) -> Warp:
    """Random crop-resize + flip + rotation + scale, tracked as an affine :class:`Warp`.

    Crop: side fraction ``sqrt(a)`` with ``a ~ U(crop_area)`` of the image (same aspect ratio),
    placed uniformly; flip left-right with probability ``flip_p``; rotation ``U(-r, r)`` degrees;
    zoom ``U(scale)``. Used for IDEAL, MixCL and LRC views (spec §3.4 [R], §4.4 [R], §5.4 [R]).
    """
    if not (0 < crop_area[0] <= crop_area[1] <= 1):
        raise ValueError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {crop_area}")
    if not (0 <= flip_p <= 1):
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale}")
    h, w = size
    side = torch.sqrt(_uniform(batch, crop_area[0], crop_area[1], gen))
    ch, cw = side * h, side * w
    y0 = torch.rand(batch, generator=gen, dtype=torch.float64) * (h - ch)
    x0 = torch.rand(batch, generator=gen, dtype=torch.float64) * (w - cw)
    flip = torch.rand(batch, generator=gen) < flip_p
    ang = _uniform(batch, -rotation_deg, rotation_deg, gen)
    zoom = _uniform(batch, scale[0], scale[1], gen)
    theta = affine_from_params(size, ang, zoom, flip, torch.stack([y0, x0, ch, cw], -1))
    return Warp(theta, size)


# ------------------------------------------------------------------------- GLCL fine-tune


def elastic_flow(
    batch: int, size: tuple[int, int], gen: torch.Generator, sigma_px: float = 5.0, points: int = 3
) -> Tensor:
    """Elastic displacement (B, H, W, 2) in normalised units.

    A ``points x points`` grid of displacements ``N(0, sigma_px^2)`` (pixels) per axis, upsampled
    bicubically (``align_corners=True``) to (H, W), converted to normalised units (``2/W``, ``2/H``).
    """
    h, w = size
    coarse = torch.randn(batch, 2, points, points, generator=gen, dtype=torch.float32) * sigma_px
    dense = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    dense = dense * torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1, 1)
    return dense.permute(0, 2, 3, 1).contiguous()


def glcl_finetune_augment(
    image: Tensor,
    label: Tensor | None,
    gen: torch.Generator,
    elastic: bool = True,
    sigma_px: float = 5.0,
    label_fill: int = 0,
) -> tuple[Tensor, Tensor | None, Warp]:
    """GLCL/PLCL fine-tuning augmentation (spec §1.7).

    Per slice one op drawn uniformly from {rotation ``U(-15, 15)`` deg, scale ``U(0.95, 1.05)``,
    left-right flip with p = 0.5, rotation by ``k*45`` deg with ``k ~ U{0..7}``, nothing}. Then an
    elastic warp (:func:`elastic_flow`) is applied to a random tail of the batch: the first
    ``n_keep ~ U{1, .., max(1, B-2)}`` slices stay un-warped (for B = 20: 1 to 18, as in the
    reference). Images are resampled bilinearly with zero padding, labels by nearest neighbour
    with ``label_fill`` outside the image (0 = background, as the reference's zero padding).

    Args:
        image: (B, C, H, W) float. label: (B, H, W) int or ``None``.

    Returns:
        ``(image', label', warp)``, shapes unchanged.
    """
    check_image_batch(image, "image")
    b, _, h, w = image.shape
    if label is not None and (label.dim() != 3 or label.shape[0] != b or label.shape[1:] != (h, w)):
        raise ValueError(f"label must have shape {(b, h, w)}, got {tuple(label.shape)}")
    op = torch.randint(0, 5, (b,), generator=gen)
    rot_small = _uniform(b, -15.0, 15.0, gen)
    zoom = _uniform(b, 0.95, 1.05, gen)
    flip = torch.rand(b, generator=gen) < 0.5
    k45 = torch.randint(0, 8, (b,), generator=gen).double() * 45.0
    angle = torch.where(op == 0, rot_small, torch.where(op == 3, k45, torch.zeros(b, dtype=torch.float64)))
    scale = torch.where(op == 1, zoom, torch.ones(b, dtype=torch.float64))
    do_flip = (op == 2) & flip
    theta = affine_from_params((h, w), angle, scale, do_flip)
    flow = None
    if elastic:
        n_keep = int(torch.randint(1, max(1, b - 2) + 1, (1,), generator=gen))
        flow = elastic_flow(b, (h, w), gen, sigma_px)
        flow[:n_keep] = 0
    warp = Warp(theta, (h, w), flow)
    img = warp_image(image, warp)
    lbl = warp_labels(label, warp, fill=label_fill) if label is not None else None
    return img, lbl, warp


# ------------------------------------------------------------------------------ 3D patches


def random_flips(batch: int, ndim: int, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Per-image flip flags (B, ndim) bool for the trailing ``ndim`` spatial axes (3D patch views).

    Flips are exact permutations, so labels / superpixels follow with :func:`apply_flips` and the
    pixel correspondence between two views is known exactly (MixCL/LRC 3D option, spec §4.3/§5.2 [R]).
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return torch.rand(batch, ndim, generator=gen) < p


def apply_flips(x: Tensor, flips: Tensor) -> Tensor:
    """Flip each item of ``x`` (B, ..., *S) along its last ``flips.shape[1]`` axes where flagged."""
    if flips.dim() != 2 or flips.shape[0] != x.shape[0]:
        raise ValueError(f"flips must have shape (B={x.shape[0]}, ndim), got {tuple(flips.shape)}")
    nd = flips.shape[1]
    flags = flips.to(x.device).view(x.shape[0], nd, *([1] * (x.dim() - 1)))
    for a in range(nd):  # one batched flip per axis instead of a Python loop over items
        x = torch.where(flags[:, a], x.flip(x.dim() - nd + a), x)
    return x
