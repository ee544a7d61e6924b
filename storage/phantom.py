"""A synthetic, cardiac-like MSD dataset: the embedded default of ``localcl demo``.

Each *patient* gets two frames, end-diastole (``frame01``) and end-systole (``frame02``), written
as ``imagesTr/<patientNNN_frameNN>.nii.gz`` (float32 intensities) and
``labelsTr/<case>.nii.gz`` (uint8, 0 background, 1 RV, 2 MYO, 3 LV), plus ``dataset.json`` and a
``splits.json`` in the ACDC format of ``../shared/data/acdc`` (``train_patients``,
``val_patients``, ``train_cases``, ``val_cases``, ``ssl4mis_labeled_patients[str(n)]``,
``ssl4mis_unlabeled_patients[str(n)]``), so every tool that reads ACDC reads the phantom.

Anatomy of one short-axis slice (all lengths in mm, so the anatomy keeps its physical size
when ``spacing`` changes; it shrinks only when the field of view is smaller than 150 mm):

- LV blood pool: an ellipse of mean radius ``r_lv(t)`` around the heart centre ``c(t)``;
- myocardium: the ring between the LV and the epicardium, ``r_epi = sqrt(r_lv^2 + A_myo/pi)``
  (myocardial area ``A_myo`` is kept between ED and ES, so the wall thickens in systole);
- RV: a crescent, the part of an ellipse shifted from ``c`` along the direction ``u(phi)``
  that lies outside the epicardium;

where ``t = z / (Z - 1)`` runs from the base (``t = 0``) to the apex (``t = 1``): the LV
radius shrinks as ``1 - 0.6 t^1.5``, the RV as ``(1 - t)^0.6`` (absent at the apex), and the
centre drifts along a random long-axis tilt. Per case: random position, rotation ``phi``,
size, ellipticity and ES contraction.

Image formation (so that a threshold does not segment it): a chest-shaped body of textured
soft tissue (multiplicative smooth noise), a bright subcutaneous and pericardial fat layer,
dark lungs, a liver, bright vessels of blood-like intensity (aorta, descending aorta, liver
vessels), a spine; partial-volume blur; a smooth multiplicative bias field
``exp(sum_ij a_ij x^i y^j)`` with random coefficients; Rician noise
``|I + n_1 + i n_2|`` with ``n_1, n_2 ~ N(0, sigma^2)``; a random global gain.

Deterministic: the same ``seed`` gives byte-identical files (nibabel writes gzip with
``mtime = 0``). Case ``k`` draws from ``numpy.random.default_rng([seed, k])``, so adding
cases does not change the earlier ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
_REFERENCE_FOV_MM = 150.0  # anatomy below is sized for a field of view of this width


@dataclass(frozen=True)
class _Heart:
    """Per-patient geometry (mm, radians); ``es_*`` are the end-systolic factors."""

    centre: tuple[float, float]
    tilt: tuple[float, float]  # centre drift from base to apex
    phi: float  # direction from the LV centre to the RV
    r_lv: float  # LV blood-pool radius at the base, ED
    wall: float  # myocardial wall thickness at the base, ED
    ecc: float  # LV ellipticity, semi-axes r (1 +- ecc)
    rv_width: float  # RV cavity width beyond the epicardium, ED
    rv_span: float  # RV half-extent across ``u`` relative to r_epi
    es_lv: float
    es_rv: float


def make_phantom_dataset(
    out_dir: str | Path,
    n_cases: int = 12,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 10),
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
) -> Path:
    """Write the phantom dataset into ``out_dir`` and return its path.

    Args:
        out_dir: folder to create (may exist; its phantom files are overwritten).
        n_cases: number of volumes, an even number >= 4 (two frames per patient, at least one
            training and one validation patient).
        seed: the dataset seed; equal seeds give byte-identical files.
        shape: ``(X, Y, Z)`` voxels of every volume, ``X, Y >= 32``, ``Z >= 2``.
        spacing: ``(sx, sy, sz)`` voxel size in mm (anisotropic like cine MRI by default).

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: naming the parameter when ``n_cases``, ``shape`` or ``spacing`` is invalid.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)):
        raise ValueError(f"n_cases must be an int, got {n_cases!r}")
    if n_cases < 4 or n_cases % 2:
        raise ValueError(f"n_cases must be an even number >= 4 (ED+ES per patient), got {n_cases}")
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or shape_t[0] < 32 or shape_t[1] < 32 or shape_t[2] < 2:
        raise ValueError(f"shape must be (X>=32, Y>=32, Z>=2), got {tuple(shape)}")
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm), got {tuple(spacing)}")

    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    n_patients = n_cases // 2
    patients = [f"patient{p + 1:03d}" for p in range(n_patients)]
    affine = _affine(shape_t, spacing_t)
    training = []
    for p, patient in enumerate(patients):
        rng = np.random.default_rng([int(seed), p])
        heart = _draw_heart(rng, shape_t, spacing_t)
        for frame, systole in (("frame01", False), ("frame02", True)):
            case = f"{patient}_{frame}"
            image, label = _render_case(rng, heart, shape_t, spacing_t, systole)
            _save(image, affine, spacing_t, out / "imagesTr" / f"{case}.nii.gz", "phantom image")
            _save(label, affine, spacing_t, out / "labelsTr" / f"{case}.nii.gz", "phantom label")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})

    dataset = {
        "name": "localcl-phantom",
        "description": "Synthetic cardiac-like short-axis cine MRI phantom (ED/ES frames, "
        "RV/MYO/LV), generated by storage.phantom.make_phantom_dataset.",
        "reference": "synthetic; no patient data",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "synthetic-cine-MRI"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "phantom": {"seed": int(seed), "shape": list(shape_t), "spacing": list(spacing_t)},
    }
    _write_json(out / "dataset.json", dataset)
    _write_json(out / "splits.json", _splits(patients))
    return out


# ---------------------------------------------------------------- splits


def _splits(patients: list[str]) -> dict:
    """ACDC-format splits: the last third of the patients (at least one) are validation."""
    n_val = max(1, round(len(patients) / 3))
    train, val = patients[:-n_val], patients[-n_val:]
    frames = ("frame01", "frame02")
    labelled = {str(n): train[:n] for n in range(1, len(train) + 1)}
    return {
        "note": "synthetic phantom; case id = patientNNN_frameNN; frame01 = ED, frame02 = ES. "
        "ssl4mis_labeled_patients[n] = first n train patients (the labelled budget), "
        "ssl4mis_unlabeled_patients[n] = the rest.",
        "train_patients": train,
        "val_patients": val,
        "train_cases": [f"{p}_{f}" for p in train for f in frames],
        "val_cases": [f"{p}_{f}" for p in val for f in frames],
        "ssl4mis_labeled_patients": labelled,
        "ssl4mis_unlabeled_patients": {n: train[int(n) :] for n in labelled},
    }


# ---------------------------------------------------------------- geometry


def _draw_heart(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]) -> _Heart:
    fov = min(shape[0] * spacing[0], shape[1] * spacing[1])
    k = min(1.0, fov / _REFERENCE_FOV_MM)  # shrink the anatomy for small fields of view
    return _Heart(
        centre=(float(rng.uniform(-10, 10) * k), float(rng.uniform(-10, 10) * k)),
        tilt=(float(rng.uniform(-6, 6) * k), float(rng.uniform(-6, 6) * k)),
        phi=float(math.pi + rng.uniform(-0.6, 0.6)),
        r_lv=float(rng.uniform(16, 22) * k),
        wall=float(rng.uniform(6, 9) * k),
        ecc=float(rng.uniform(0.0, 0.12)),
        rv_width=float(rng.uniform(8, 14) * k),
        rv_span=float(rng.uniform(1.2, 1.5)),
        es_lv=float(rng.uniform(0.6, 0.78)),
        es_rv=float(rng.uniform(0.55, 0.75)),
    )


def _render_case(
    rng: np.random.Generator,
    h: _Heart,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    systole: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame: ``image`` float32 (X, Y, Z) and ``label`` uint8 (X, Y, Z)."""
    nx, ny, nz = shape
    sx, sy, _ = spacing
    fov = min(nx * sx, ny * sy)
    k = min(1.0, fov / _REFERENCE_FOV_MM)
    # in-plane coordinates in mm relative to the image centre, shape (X, Y, 1)
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    t = (np.arange(nz) / max(nz - 1, 1))[None, None, :]  # 0 base .. 1 apex, shape (1, 1, Z)

    # ---- heart geometry per slice
    cx = h.centre[0] + h.tilt[0] * t
    cy = h.centre[1] + h.tilt[1] * t
    lv_scale = 1.0 - 0.6 * t**1.5
    r_lv_ed = h.r_lv * lv_scale
    myo_area = math.pi * ((h.r_lv + h.wall) ** 2 - h.r_lv**2) * lv_scale**2
    r_lv = r_lv_ed * (h.es_lv if systole else 1.0)
    r_epi = np.sqrt(r_lv**2 + myo_area / math.pi)
    ux, uy = math.cos(h.phi), math.sin(h.phi)
    dx, dy = x - cx, y - cy
    a = dx * ux + dy * uy  # along u (towards the RV)
    b = -dx * uy + dy * ux  # across u
    # LV: ellipse with semi-axes r (1 + ecc) along u and r (1 - ecc) across
    rho_lv = np.sqrt((a / (1 + h.ecc)) ** 2 + (b / (1 - h.ecc)) ** 2)
    rho_epi = rho_lv  # same shape for the epicardium
    lv = rho_lv <= r_lv
    myo = (rho_epi <= r_epi) & ~lv
    rv_w = h.rv_width * (1.0 - t) ** 0.6 * (h.es_rv if systole else 1.0)
    shift = 0.5 * r_epi
    ax_u = r_epi - shift + rv_w + r_epi * 0.1
    ax_v = r_epi * h.rv_span
    rv_ell = ((a - shift) / np.maximum(ax_u, 1e-6)) ** 2 + (b / np.maximum(ax_v, 1e-6)) ** 2 <= 1.0
    rv = rv_ell & (rho_epi > r_epi) & (rv_w > 0.5)

    label = np.zeros(shape, np.uint8)
    label[rv] = 1
    label[myo] = 2
    label[lv] = 3

    # ---- background anatomy (independent of z apart from slow drift)
    img = np.zeros(shape, np.float64)
    bx, by = 0.46 * nx * sx, 0.40 * ny * sy  # body semi-axes
    body_r = np.broadcast_to(np.sqrt((x / bx) ** 2 + (y / by) ** 2), shape)
    body = body_r <= 1.0
    fat = body & (body_r > 1.0 - 6.0 / min(bx, by))
    tissue_tex = _smooth_noise(rng, shape, sigma=(3.0 / sx, 3.0 / sy, 0.6), amp=0.18)
    img[body] = (0.42 * (1 + tissue_tex))[body]
    # lungs: two dark ellipses beside the heart, following its drift
    for side in (-1.0, 1.0):
        lx = cx + side * 38 * k
        ly = cy - 8 * k
        lung = ((x - lx) / (20 * k)) ** 2 + ((y - ly) / (34 * k)) ** 2 <= 1.0
        lung &= body & ~(rho_epi <= r_epi + 4 * k) & ~rv
        img[lung] = 0.05 + 0.03 * tissue_tex[lung]
    # liver: medium intensity, lower part of the chest, with bright vessels
    liver = body & (y > cy + r_epi + 12 * k) & (x > -0.1 * bx)
    img[liver] = (0.36 * (1 + 0.5 * tissue_tex))[liver]
    # spine: bright ring with dark centre at the back of the body
    spx, spy = 0.0, -0.78 * by
    rs = np.broadcast_to(np.sqrt((x - spx) ** 2 + (y - spy) ** 2), shape)
    img[(rs <= 10 * k) & body] = 0.7
    img[(rs <= 6 * k) & body] = 0.15
    # subcutaneous fat and pericardial fat (bright, partial ring outside the epicardium)
    img[fat] = 0.92
    peri = (rho_epi > r_epi + 1.5 * k) & (rho_epi <= r_epi + 4.5 * k) & ~rv
    peri &= np.cos(np.arctan2(b, a) - rng.uniform(0, 2 * math.pi)) > 0.2
    img[peri] = 0.85
    # vessels with blood-like intensity: ascending aorta near the base, descending aorta by the
    # spine, a few liver vessels
    ao_c = (cx - (r_epi.max() + 8 * k) * uy, cy + (r_epi.max() + 8 * k) * ux)
    ao = (np.sqrt((x - ao_c[0]) ** 2 + (y - ao_c[1]) ** 2) <= 11 * k) & (t < 0.35) & body & (label == 0)
    img[ao] = 0.97
    dao = (np.sqrt((x - 14 * k) ** 2 + (y - (spy + 16 * k)) ** 2) <= 8 * k) & body & (label == 0)
    img[dao] = 0.95
    for _ in range(3):
        vx = rng.uniform(-0.1 * bx, 0.6 * bx)
        vy = rng.uniform(0.3, 0.9) * by
        ves = (np.sqrt((x - vx) ** 2 + (y - vy) ** 2) <= rng.uniform(3, 6) * k) & liver & (label == 0)
        img[ves] = 0.9

    # ---- the heart itself
    blood = 0.95 + 0.05 * _smooth_noise(rng, shape, sigma=(2.0 / sx, 2.0 / sy, 0.5), amp=1.0)
    img[lv] = blood[lv]
    img[rv] = 0.9 * blood[rv]
    img[myo] = (0.3 * (1 + 0.6 * tissue_tex))[myo]
    # papillary muscles: two dark dots inside the LV blood pool (still labelled LV, as in ACDC)
    for ang in (0.6, -0.9):
        px_ = cx + 0.55 * r_lv * math.cos(h.phi + math.pi + ang)
        py_ = cy + 0.55 * r_lv * math.sin(h.phi + math.pi + ang)
        pap = (np.sqrt((x - px_) ** 2 + (y - py_) ** 2) <= 0.22 * r_lv) & lv
        img[pap] = 0.35

    # ---- acquisition: partial volume blur, bias field, Rician noise, gain
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0.0))
    xn, yn = x / (nx * sx / 2), y / (ny * sy / 2)
    c = rng.normal(0.0, 0.18, size=5)
    bias = np.exp(c[0] * xn + c[1] * yn + c[2] * xn * yn + c[3] * xn**2 + c[4] * yn**2)
    sigma = rng.uniform(0.035, 0.06)
    clean = img * bias
    noisy = np.sqrt((clean + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    gain = rng.uniform(300.0, 1500.0)
    return (noisy * gain).astype(np.float32), label


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, float, float], amp: float
) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to standard deviation ``amp``."""
    n: np.ndarray = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return n * (amp / max(float(n.std()), 1e-12))


# ---------------------------------------------------------------- I/O


def _affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Diagonal RAS affine with the volume centred on the scanner origin."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    return aff


def _save(arr: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...], path: Path, descrip: str) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(spacing)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode()
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
