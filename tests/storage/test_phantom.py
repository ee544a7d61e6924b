"""Tests of the synthetic cardiac phantom (storage.phantom)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from storage.phantom import make_phantom_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("ph") / "ds", n_cases=6, seed=3)


def _load(ds: Path, case: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    image = cast(nib.Nifti1Image, nib.load(ds / "imagesTr" / f"{case}.nii.gz"))
    label = cast(nib.Nifti1Image, nib.load(ds / "labelsTr" / f"{case}.nii.gz"))
    return image, label


def _digest(ds: Path) -> dict[str, str]:
    return {
        str(p.relative_to(ds)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ds.rglob("*")) if p.is_file()
    }


def test_make_phantom_dataset__msd_layout_and_acdc_splits(phantom: Path) -> None:
    ds = json.loads((phantom / "dataset.json").read_text())
    assert ds["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    assert ds["numTraining"] == 6 == len(ds["training"])
    for entry in ds["training"]:
        assert (phantom / entry["image"]).is_file() and (phantom / entry["label"]).is_file()
    sp = json.loads((phantom / "splits.json").read_text())
    assert sp["train_patients"] == ["patient001", "patient002"]
    assert sp["val_patients"] == ["patient003"]
    assert sp["val_cases"] == ["patient003_frame01", "patient003_frame02"]
    assert set(sp["train_cases"]) | set(sp["val_cases"]) == {
        Path(e["image"]).name[: -len(".nii.gz")] for e in ds["training"]
    }
    assert sp["ssl4mis_labeled_patients"]["1"] == ["patient001"]
    assert sp["ssl4mis_unlabeled_patients"]["1"] == ["patient002"]
    assert sp["ssl4mis_unlabeled_patients"]["2"] == []


def test_make_phantom_dataset__geometry_dtype_and_affine(phantom: Path) -> None:
    img, lab = _load(phantom, "patient001_frame01")
    assert img.shape == lab.shape == (96, 96, 10)
    assert np.allclose(img.header.get_zooms(), (1.5, 1.5, 8.0))
    assert np.allclose(img.affine, lab.affine)
    assert np.allclose(np.diag(img.affine)[:3], (1.5, 1.5, 8.0))
    assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lab.dataobj))) == {0, 1, 2, 3}


@pytest.mark.parametrize("case", ["patient001_frame01", "patient002_frame02", "patient003_frame01"])
def test_make_phantom_dataset__anatomy_is_cardiac_like(phantom: Path, case: str) -> None:
    lab = np.asarray(_load(phantom, case)[1].dataobj)
    lv, myo, rv = lab == 3, lab == 2, lab == 1
    for z in range(lab.shape[2]):
        # LV is one blob, enclosed by the myocardium: dilating the LV hits only MYO
        assert ndimage.label(lv[:, :, z])[1] == 1
        ring = ndimage.binary_dilation(lv[:, :, z]) & ~lv[:, :, z]
        assert np.all(lab[:, :, z][ring] == 2)
        # the RV never touches the LV directly
        assert not np.any(ndimage.binary_dilation(rv[:, :, z]) & lv[:, :, z])
    # apex smaller than base, RV absent at the apex
    assert lv[:, :, -1].sum() < 0.5 * lv[:, :, 0].sum()
    assert rv[:, :, -1].sum() == 0 and rv[:, :, 0].sum() > 0
    assert myo.sum(axis=(0, 1)).min() > 0


def test_make_phantom_dataset__end_systole_has_smaller_cavities(phantom: Path) -> None:
    for p in ("patient001", "patient002", "patient003"):
        ed = np.asarray(_load(phantom, f"{p}_frame01")[1].dataobj)
        es = np.asarray(_load(phantom, f"{p}_frame02")[1].dataobj)
        assert (es == 3).sum() < 0.8 * (ed == 3).sum()
        assert (es == 1).sum() < 0.9 * (ed == 1).sum()
        # myocardial area is conserved up to rasterisation
        assert abs(int((es == 2).sum()) - int((ed == 2).sum())) < 0.15 * (ed == 2).sum()


def test_make_phantom_dataset__not_segmentable_by_threshold(phantom: Path) -> None:
    """The best single global intensity window per class, chosen with the labels, stays poor."""
    img, lab = _load(phantom, "patient002_frame01")
    x = img.get_fdata()
    y = np.asarray(lab.dataobj)
    qs = np.quantile(x, np.linspace(0, 1, 41))
    for k in (1, 2, 3):
        ref = y == k
        best = 0.0
        for i, lo in enumerate(qs):
            for hi in qs[i + 1 :]:
                pred = (x >= lo) & (x < hi)
                best = max(best, 2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
        assert best < 0.6, f"class {k} separable by a window (Dice {best:.2f})"


def test_make_phantom_dataset__cases_differ_in_pose_size_and_intensity(phantom: Path) -> None:
    feats = []
    for p in ("patient001", "patient002", "patient003"):
        img, lab = _load(phantom, f"{p}_frame01")
        y = np.asarray(lab.dataobj)
        feats.append((*ndimage.center_of_mass(y == 3), (y == 3).sum(), float(np.median(img.get_fdata()[y == 3]))))
    feats_a = np.array(feats)
    assert np.all(feats_a.std(axis=0) > 0)
    # intensity is not uniform within a class: bias field + noise
    img, lab = _load(phantom, "patient001_frame01")
    lv = img.get_fdata()[np.asarray(lab.dataobj) == 3]
    assert lv.std() / lv.mean() > 0.03


def test_make_phantom_dataset__deterministic_per_seed(tmp_path: Path, phantom: Path) -> None:
    again = make_phantom_dataset(tmp_path / "again", n_cases=6, seed=3)
    assert _digest(again) == _digest(phantom)
    other = make_phantom_dataset(tmp_path / "other", n_cases=6, seed=4)
    a = _load(phantom, "patient001_frame01")[0].get_fdata()
    b = _load(other, "patient001_frame01")[0].get_fdata()
    assert not np.allclose(a, b)
    # adding patients does not change the earlier ones
    more = make_phantom_dataset(tmp_path / "more", n_cases=8, seed=3)
    assert _digest(more)["labelsTr/patient002_frame02.nii.gz"] == _digest(phantom)["labelsTr/patient002_frame02.nii.gz"]


def test_make_phantom_dataset__custom_shape_and_spacing(tmp_path: Path) -> None:
    ds = make_phantom_dataset(tmp_path / "s", n_cases=4, seed=0, shape=(64, 80, 6), spacing=(1.0, 1.25, 5.0))
    img, lab = _load(ds, "patient002_frame01")
    assert img.shape == (64, 80, 6)
    assert np.allclose(img.header.get_zooms(), (1.0, 1.25, 5.0))
    y = np.asarray(lab.dataobj)
    assert set(np.unique(y)) == {0, 1, 2, 3}
    # the heart fits inside the field of view: no label on the border
    assert not y[0].any() and not y[-1].any() and not y[:, 0].any() and not y[:, -1].any()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cases": 3}, "n_cases"),
        ({"n_cases": 2}, "n_cases"),
        ({"n_cases": 5}, "n_cases"),
        ({"n_cases": 4.0}, "n_cases"),
        ({"shape": (16, 96, 10)}, "shape"),
        ({"shape": (96, 96)}, "shape"),
        ({"spacing": (1.5, 0.0, 8.0)}, "spacing"),
        ({"spacing": (1.5, float("nan"), 8.0)}, "spacing"),
    ],
)
def test_make_phantom_dataset__bad_arguments_name_the_parameter(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_phantom_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
