"""Tests of slice-wise inference (ray_jobs.inference) and ``localcl predict``."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from ray_jobs.errors import UserError
from ray_jobs.inference import predict_volume, preprocessing_from_spec


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
        return -((x - self.centres.view(1, -1, 1, 1)) * self.scale) ** 2


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
    lab = _reference()
    spec = {"size": [64, 64], "spacing_mm": [1.25, 1.25]}
    pred = predict_volume(IntensityOracle(), spec, _image(lab), (1.25, 1.25, 10.0), intensity_range=(0, 400))
    np.testing.assert_array_equal(pred, lab)


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
