"""Metrics vs hand-computed cases (incl. anisotropic spacing) and a KD-tree brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from localcl.metrics import dice_score, evaluate_case, mean_over_classes, surface_metrics, volume_from_slices


def _ref_surface(a, b, spacing):
    """Independent reference: border voxels by 6-connected erosion, distances by KD-tree."""

    def border(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.asarray(spacing)

    pa, pb = border(a), border(b)
    dab = cKDTree(pb).query(pa)[0]
    dba = cKDTree(pa).query(pb)[0]
    hd95 = max(np.percentile(dab, 95), np.percentile(dba, 95))
    asd = (dab.sum() + dba.sum()) / (len(dab) + len(dba))
    return hd95, asd


def test_dice_score__hand_computed():
    a = np.zeros((4, 4, 2), bool)
    b = np.zeros((4, 4, 2), bool)
    a[0, 0:4, 0] = True  # 4 voxels
    b[0, 1:4, 0] = True  # 6 voxels, 3 shared
    b[1, 0:3, 1] = True
    assert dice_score(a, b) == pytest.approx(2 * 3 / 10)
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0
    assert dice_score(torch.ones(3), torch.zeros(3)) == 0.0


def test_surface_metrics__single_voxels_anisotropic():
    a = np.zeros((4, 3, 5), bool)
    b = np.zeros((4, 3, 5), bool)
    a[1, 1, 1] = True
    b[2, 1, 3] = True
    hd, asd = surface_metrics(a, b, (0.5, 1.0, 3.0))
    expected = math.sqrt(0.5**2 + (2 * 3.0) ** 2)
    assert hd == pytest.approx(expected, rel=1e-6)
    assert asd == pytest.approx(expected, rel=1e-6)


def test_surface_metrics__shifted_lines_hand_computed():
    # pred: x = 0..4 at (y=0, z=0); ref: x = 1..5 at (y=0, z=2); spacing (1, 1, 2.5)
    a = np.zeros((6, 2, 3), bool)
    b = np.zeros((6, 2, 3), bool)
    a[0:5, 0, 0] = True
    b[1:6, 0, 2] = True
    hd, asd = surface_metrics(a, b, (1.0, 1.0, 2.5))
    far = math.sqrt(1 + 5.0**2)  # the unmatched end point of each line
    # each direction: distances [5, 5, 5, 5, far]; numpy P95 interpolates at rank 3.8
    assert hd == pytest.approx(5 + 0.8 * (far - 5), rel=1e-6)
    assert asd == pytest.approx((2 * far + 8 * 5.0) / 10, rel=1e-6)
    # isotropic spacing gives different numbers: the spacing is really used
    hd_iso, _ = surface_metrics(a, b, (1.0, 1.0, 1.0))
    assert hd_iso == pytest.approx(2 + 0.8 * (math.sqrt(5) - 2), rel=1e-6)


def test_surface_metrics__identical_masks_are_zero():
    a = np.zeros((8, 8, 4), bool)
    a[2:6, 1:7, 1:3] = True
    assert surface_metrics(a, a, (1.5, 1.5, 10.0)) == (0.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_metrics__random_blobs_match_kdtree_reference(seed):
    rng = np.random.default_rng(seed)
    a = ndimage.binary_dilation(rng.random((20, 18, 7)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((20, 18, 7)) > 0.97, iterations=2)
    spacing = (1.25, 0.8, 6.0)
    hd, asd = surface_metrics(a, b, spacing)
    rhd, rasd = _ref_surface(a, b, spacing)
    assert hd == pytest.approx(rhd, rel=1e-5)
    assert asd == pytest.approx(rasd, rel=1e-5)


def test_surface_metrics__empty_mask_conventions():
    a = np.zeros((5, 5, 3), bool)
    b = a.copy()
    b[2, 2, 1] = True
    assert surface_metrics(a, a, (1, 1, 1)) == (0.0, 0.0)
    hd, asd = surface_metrics(a, b, (1, 1, 1))
    assert math.isnan(hd) and math.isnan(asd)
    hd, asd = surface_metrics(b, a, (1, 1, 1))
    assert math.isnan(hd) and math.isnan(asd)


def test_evaluate_case__per_class_and_empty_classes():
    ref = np.zeros((6, 6, 3), np.int64)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3, 1] = 1
    pred[1:3, 1:3, 1] = 1  # class 1 perfect
    ref[4, 4, 0] = 2  # class 2 missed entirely
    pred[0, 5, 2] = 3  # class 3 false positive only
    res = evaluate_case(pred, ref, (1.0, 1.0, 2.0), labels={1: "RV", 2: "MYO", 3: "LV", 4: "none"})
    assert res[1] == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}
    assert res[2]["dice"] == 0.0 and math.isnan(res[2]["hd95"]) and math.isnan(res[2]["asd"])
    assert res[3]["dice"] == 0.0 and math.isnan(res[3]["hd95"])
    assert res[4] == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}
    assert sorted(evaluate_case(pred, ref, (1, 1, 2))) == [1, 2, 3]
    mean = mean_over_classes({k: res[k] for k in (1, 2, 3)})
    assert mean["dice"] == pytest.approx(1 / 3) and mean["hd95"] == 0.0
    assert math.isnan(mean_over_classes({2: res[2]})["asd"])


def test_evaluate_case__real_acdc_label_against_reference(acdc_dir):
    import nibabel as nib

    img = nib.load(acdc_dir / "labelsTr" / "patient002_frame01.nii.gz")
    ref = np.asarray(img.dataobj).astype(np.int64)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    pred = np.roll(ref, shift=(2, -1, 1), axis=(0, 1, 2))  # a misregistered "prediction"
    pred[ref == 3] = np.where(ndimage.binary_erosion(ref == 3)[ref == 3], 3, 2)  # LV shrunk
    res = evaluate_case(pred, ref, spacing, labels=(1, 2, 3))
    for lab in (1, 2, 3):
        rhd, rasd = _ref_surface(pred == lab, ref == lab, spacing)
        assert res[lab]["hd95"] == pytest.approx(rhd, rel=1e-5)
        assert res[lab]["asd"] == pytest.approx(rasd, rel=1e-5)
        assert res[lab]["dice"] == pytest.approx(dice_score(pred == lab, ref == lab))
        assert 0 < res[lab]["dice"] < 1 and res[lab]["hd95"] > 0


def test_volume_from_slices__labels_probs_and_order():
    z, x, y = 4, 3, 5
    vol = np.random.default_rng(0).integers(0, 3, (x, y, z))
    slices = np.moveaxis(vol, -1, 0)
    np.testing.assert_array_equal(volume_from_slices(slices), vol)
    probs = torch.nn.functional.one_hot(torch.from_numpy(slices), 3).permute(0, 3, 1, 2).float()
    np.testing.assert_array_equal(volume_from_slices(probs), vol)
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_array_equal(volume_from_slices(slices[perm], slice_indices=perm), vol)


def test_metrics__bad_input_raises_naming_parameter():
    a = np.zeros((4, 4, 2), bool)
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a.astype(int), a.astype(int), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="ref shape"):
        evaluate_case(a.astype(int), a[:3].astype(int), (1, 1, 1))
    with pytest.raises(ValueError, match="pred"):
        evaluate_case([[0]], a, (1, 1, 1))
    with pytest.raises(ValueError, match="slice_indices"):
        volume_from_slices(np.zeros((3, 2, 2), int), slice_indices=[0, 0, 2])
    with pytest.raises(ValueError, match="slices must have shape"):
        volume_from_slices(np.zeros((2, 2), int))
