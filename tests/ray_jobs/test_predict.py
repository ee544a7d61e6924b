"""Tests of slice-wise inference (ray_jobs.evaluation.inference) and ``localcl predict``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from ray_jobs.errors import UserError
from ray_jobs.evaluation.inference import predict_volume, preprocessing_from_spec


class IntensityOracle(nn.Module):
    """A "perfect model" for images whose grey level encodes the class: ``I = 100 k + 50``.

    With ``intensity_range=(0, 400)`` the normalised value of class ``k`` is
    ``c_k = (100 k + 50) / 400``; logits ``-(50 (x - c_k))^2`` make the arg-max the nearest
    ``c_k``, i.e. the model returns the reference exactly on the training grid.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([(100 * k + 50) / 400 for k in range(num_classes)]))
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, K, H, W)
        return -(((x - self.centres.view(1, -1, 1, 1)) * self.scale) ** 2)


class ProbOracle(IntensityOracle):
    """Same, exposing ``predict`` -> probabilities like the fine-tuning strategies."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=1)


def _reference(shape: tuple[int, int, int] = (70, 53, 5)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    yy, xx = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
    for z in range(shape[2]):
        r = 14 - z
        d = np.hypot(xx - 33, yy - 25)
        lab[:, :, z][d < r + 6] = 1
        lab[:, :, z][d < r + 2] = 2
        lab[:, :, z][d < r] = 3
    return lab


def _image(lab: np.ndarray) -> np.ndarray:
    return lab.astype(np.float32) * 100 + 50


@pytest.mark.parametrize("size", [(64, 64), (80, 48), (51, 80), (70, 53)])
@pytest.mark.parametrize("model_cls", [IntensityOracle, ProbOracle])
def test_predict_volume__perfect_model_round_trip_is_exact(size: tuple[int, int], model_cls: type) -> None:
    """Crop in one axis, pad in the other, odd and even margins: the inverse map is exact."""
    lab = _reference()
    spec = {"size": list(size), "spacing_mm": None}
    pred = predict_volume(model_cls(), spec, _image(lab), (1.3, 0.9, 8.0), intensity_range=(0, 400), batch_size=2)
    assert pred.dtype == np.uint8 and pred.shape == lab.shape
    np.testing.assert_array_equal(pred, lab)


def test_predict_volume__matching_spacing_skips_resampling() -> None:
    """Perfect model, spacing equal to the training spacing, crop + pad: Dice 1, HD95 = ASD = 0."""
    from localcl.metrics import evaluate_case

    lab = _reference()
    spec = {"size": [64, 64], "spacing_mm": [1.25, 1.25]}
    pred = predict_volume(IntensityOracle(), spec, _image(lab), (1.25, 1.25, 10.0), intensity_range=(0, 400))
    np.testing.assert_array_equal(pred, lab)
    res = evaluate_case(pred, lab, (1.25, 1.25, 10.0), [1, 2, 3])
    assert all(r == {"dice": 1.0, "hd95": 0.0, "asd": 0.0} for r in res.values())


@pytest.mark.parametrize("spacing", [(1.6, 1.6), (0.8, 1.1), (1.37, 0.93)])
def test_predict_volume__resampled_round_trip_matches_reference(spacing: tuple[float, float]) -> None:
    """Through a resampling, a perfect model gives Dice ~ 1 and boundary errors under a voxel."""
    from localcl.metrics import evaluate_case

    lab = _reference((90, 77, 4))
    spec = {"size": [128, 128], "spacing_mm": 1.0}
    sp = (*spacing, 6.0)
    pred = predict_volume(IntensityOracle(), spec, _image(lab), sp, intensity_range=(0, 400))
    res = evaluate_case(pred.astype(np.int64), lab.astype(np.int64), sp, [1, 2, 3])
    for k in (1, 2, 3):
        assert res[k]["dice"] > 0.95
        assert res[k]["hd95"] <= max(spacing) + 1e-6


def test_predict_volume__batch_size_does_not_change_the_result() -> None:
    lab = _reference()
    spec = {"size": [64, 64], "spacing_mm": 1.1}
    img = _image(lab) + np.random.default_rng(0).normal(0, 20, lab.shape).astype(np.float32)
    a = predict_volume(IntensityOracle(), spec, img, (1.3, 0.9, 8.0), batch_size=1)
    b = predict_volume(IntensityOracle(), spec, img, (1.3, 0.9, 8.0), batch_size=4)
    np.testing.assert_array_equal(a, b)


def test_predict_volume__normalises_with_the_volume_percentiles() -> None:
    """Without ``intensity_range`` the scan's own p1/p99 are used: gain/offset invariant."""
    lab = _reference()
    img = _image(lab) + np.random.default_rng(1).normal(0, 5, lab.shape).astype(np.float32)
    spec = {"size": [64, 64], "spacing_mm": None}
    a = predict_volume(IntensityOracle(), spec, img, (1.0, 1.0, 1.0))
    b = predict_volume(IntensityOracle(), spec, img * 7.5 - 300.0, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(a, b)


def test_predict_volume__cropped_away_voxels_are_background() -> None:
    lab = np.zeros((60, 40, 2), np.uint8)
    lab[:5] = 3  # a structure in the first 5 rows, outside a 40-row centre crop
    pred = predict_volume(IntensityOracle(), {"size": [40, 40]}, _image(lab), (1, 1, 1), intensity_range=(0, 400))
    assert not pred[:10].any()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"size": [64]}, "size"),
        ({"size": [64, 0]}, "size"),
        ({"size": [64, 64], "spacing_mm": [1.0, 2.0]}, "spacing_mm"),
        ({"size": [64, 64], "spacing_mm": -1.0}, "spacing_mm"),
        ({"size": [64, 64], "normalisation": {"low_percentile": 99, "high_percentile": 1}}, "normalisation"),
    ],
)
def test_preprocessing_from_spec__bad_spec_names_the_key(spec: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        preprocessing_from_spec(spec)


def test_predict_volume__bad_inputs_raise_user_errors() -> None:
    spec = {"size": [32, 32]}
    with pytest.raises(UserError, match="3D"):
        predict_volume(IntensityOracle(), spec, np.zeros((32, 32), np.float32), (1, 1, 1))
    with pytest.raises(UserError, match="spacing"):
        predict_volume(IntensityOracle(), spec, np.zeros((32, 32, 2), np.float32), (0.0, 1, 1))

    class Wrong(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, ::2]

    with pytest.raises(UserError, match="model returned shape"):
        predict_volume(Wrong(), spec, np.zeros((32, 32, 2), np.float32), (1, 1, 1))


# --------------------------------------------------------------------------- localcl predict
from ray_jobs.cli import main  # noqa: E402

from evalpredict_helpers import make_phantom_store, make_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return make_phantom_store(tmp_path_factory.mktemp("predstore"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("predrun"))


def _scaled_rotated_copy(src: Path, dst: Path) -> nib.Nifti1Image:
    """The scan as int16 with scl_slope (like ACDC's uint16 + slope), an oblique affine and
    non-default qform/sform codes: everything a viewer needs to overlay the label map."""
    img = nib.load(src)
    data = img.get_fdata()
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(img.header.get_zooms()[:3])
    aff[:3, 3] = [12.5, -40.0, 7.0]
    out = nib.Nifti1Image(np.round(data * 10).astype(np.int16), aff)
    out.header.set_slope_inter(0.1, 0.0)
    out.set_qform(aff, code=1)
    out.set_sform(aff, code=2)
    out.header["descrip"] = b"oblique test scan"
    nib.save(out, str(dst))
    return cast(nib.Nifti1Image, nib.load(dst))


def test_predict_cli__nifti_folder_keeps_shape_affine_and_header(
    phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ray_jobs.train.checkpoint import load_model

    src = phantom[0] / "imagesTr"
    inp = tmp_path / "in"
    inp.mkdir()
    scans = {
        "oblique": _scaled_rotated_copy(src / "patient001_frame01.nii.gz", inp / "oblique.nii.gz"),
        "plain": nib.load(src / "patient002_frame02.nii.gz"),
    }
    nib.save(scans["plain"], str(inp / "plain.nii"))  # uncompressed input too
    scans["plain"] = nib.load(inp / "plain.nii")
    rc = main(["predict", "--checkpoint", str(tiny_run), str(inp), str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "predicted 2 scan(s)" in capsys.readouterr().out
    model, spec = load_model(str(tiny_run / "finetune" / "model"))
    for name, scan in scans.items():
        lab = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert lab.shape == scan.shape
        assert lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(lab.affine, scan.affine, atol=1e-5)
        np.testing.assert_allclose(lab.header.get_zooms(), scan.header.get_zooms(), atol=1e-6)
        assert int(lab.header["qform_code"]) == int(scan.header["qform_code"])
        assert int(lab.header["sform_code"]) == int(scan.header["sform_code"])
        assert lab.header["descrip"] == scan.header["descrip"]
        data = np.asarray(lab.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2, 3}
        # the file holds exactly what predict_volume gives for that scan (no scaling applied)
        want = predict_volume(model, spec, scan.get_fdata(dtype=np.float32), scan.header.get_zooms())
        np.testing.assert_array_equal(data, want)


def test_predict_cli__store_input_matches_nifti_input(
    phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path
) -> None:
    """A store and its source NIfTI folder (MSD root -> imagesTr) give the same label maps."""
    src, uri = phantom
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tiny_run),
                uri,
                str(tmp_path / "from_store"),
                "--cases",
                "patient001_frame01",
                "patient003_frame02",
            ]
        )
        == 0
    )
    assert (
        main(["predict", "--checkpoint", str(tiny_run / "finetune" / "model"), str(src), str(tmp_path / "from_nifti")])
        == 0
    )
    made = sorted(p.name for p in (tmp_path / "from_store").iterdir())
    assert made == ["patient001_frame01.nii.gz", "patient003_frame02.nii.gz"]
    assert len(list((tmp_path / "from_nifti").iterdir())) == 6
    for name in made:
        a = nib.load(tmp_path / "from_store" / name)
        b = nib.load(tmp_path / "from_nifti" / name)
        ref = nib.load(src / "imagesTr" / name)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, ref.affine, atol=1e-6)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("localcl: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_predict_cli__bad_inputs_give_one_line_errors(
    phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, uri = phantom
    out = str(tmp_path / "out")
    err = _cli_error(["predict", "--checkpoint", str(tmp_path / "missing"), str(src), out], capsys)
    assert "missing" in err and "no such directory" in err
    empty = tmp_path / "empty-ckpt"
    empty.mkdir()
    assert "no model.json" in _cli_error(["predict", "--checkpoint", str(empty), str(src), out], capsys)
    pre = make_tiny_run(tmp_path, stage="pretrain")
    err = _cli_error(["predict", "--checkpoint", str(pre / "pretrain" / "model"), str(src), out], capsys)
    assert "no segmentation head" in err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "scan.dcm").write_bytes(b"DICM")
    assert "scan.dcm: not a NIfTI file" in _cli_error(
        ["predict", "--checkpoint", str(tiny_run), str(junk), out], capsys
    )
    assert "no such file" in _cli_error(["predict", "--checkpoint", str(tiny_run), str(tmp_path / "nope"), out], capsys)
    err = _cli_error(["predict", "--checkpoint", str(tiny_run), uri, out, "--cases", "patient042_frame01"], capsys)
    assert "patient042_frame01" in err
    fourd = tmp_path / "fourd"
    fourd.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.float32), np.eye(4)), str(fourd / "t.nii.gz"))
    assert "expected a 3D volume" in _cli_error(["predict", "--checkpoint", str(tiny_run), str(fourd), out], capsys)
    err = _cli_error(["predict", "--checkpoint", str(tiny_run), str(src / "imagesTr"), str(src / "imagesTr")], capsys)
    assert "overwrite the scans" in err
    if not torch.cuda.is_available():
        err = _cli_error(["predict", "--checkpoint", str(tiny_run), str(src), out, "--device", "cuda"], capsys)
        assert "CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_predict_cli__real_acdc_scan_keeps_geometry(acdc_dir: Path, tiny_run: Path, tmp_path: Path) -> None:
    """A real ACDC scan (uint16 on disk, 154 x 224 x 16): the label map overlays it."""
    case = "patient099_frame01"
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(acdc_dir / "imagesTr" / f"{case}.nii.gz", inp)
    assert main(["predict", "--checkpoint", str(tiny_run), str(inp), str(tmp_path / "pred")]) == 0
    scan = nib.load(inp / f"{case}.nii.gz")
    lab = nib.load(tmp_path / "pred" / f"{case}.nii.gz")
    assert lab.shape == scan.shape == (154, 224, 16)
    np.testing.assert_allclose(lab.affine, scan.affine)
    np.testing.assert_allclose(lab.header.get_zooms(), scan.header.get_zooms())
    assert lab.get_data_dtype() == np.uint8
    # the model sees a 48 x 48 centre crop (its training size at native spacing): outside it,
    # everything is background
    data = np.asarray(lab.dataobj)
    x0, y0 = (154 - 48) // 2, (224 - 48) // 2
    outside = data.copy()
    outside[x0 : x0 + 48, y0 : y0 + 48] = 0
    assert not outside.any()


@pytest.mark.parametrize(("qcode", "scode"), [(0, 2), (1, 0), (2, 4)])
def test_label_nifti_bytes__keeps_the_source_orientation_codes(qcode: int, scode: int) -> None:
    import gzip

    from storage.nifti import label_nifti_bytes

    aff = np.diag([1.5, 1.5, 8.0, 1.0])
    aff[:3, 3] = [-10, 20, 5]
    src = nib.Nifti1Image(np.zeros((6, 5, 3), np.int16), aff)
    src.set_qform(aff, code=qcode)
    src.set_sform(aff, code=scode)
    src.header.set_slope_inter(0.5, 3.0)
    labels = np.arange(90, dtype=np.uint8).reshape(6, 5, 3) % 4
    out = nib.Nifti1Image.from_bytes(gzip.decompress(label_nifti_bytes(labels, aff, src.header)))
    assert int(out.header["qform_code"]) == qcode and int(out.header["sform_code"]) == scode
    np.testing.assert_allclose(out.affine, aff)
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)  # no slope/intercept applied
    assert out.get_data_dtype() == np.uint8
