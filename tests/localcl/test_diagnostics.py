"""localcl.diagnostics: linear probe and encoder health, against constructed encoders whose
answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from localcl.diagnostics import encoder_health, hypercolumn, linear_probe, mean_foreground_dice
from localcl.models.unet import UNetEncoder


class _OneHotEncoder(nn.Module):
    """Two 'levels': level 1 = the one-hot of a hidden label map (full size), level 2 = noise at
    half size. A linear probe on it can reach Dice 1."""

    def __init__(self, labels: torch.Tensor, k: int) -> None:
        super().__init__()
        self.labels, self.k = labels, k
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        idx = x[:, 0, 0, 0].round().long()  # the image carries its index in pixel (0, 0)
        oh = torch.nn.functional.one_hot(self.labels[idx], self.k).permute(0, 3, 1, 2).float()
        return [oh * self.w, torch.randn(x.shape[0], 2, x.shape[2] // 2, x.shape[3] // 2)]


def _labels(n: int = 12, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lab = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r = int(torch.randint(2, 6, (1,), generator=g))
        lab[i, 8 - r : 8 + r, 8 - r : 8 + r] = 1 + i % 3
        lab[i, 8 - r // 2 : 8 + r // 2, 8 - r // 2 : 8 + r // 2] = 3 - i % 3 if i % 3 != 2 else 2
    return lab


def _images(n: int, size: int = 16) -> torch.Tensor:
    x = torch.rand(n, 1, size, size)
    x[:, 0, 0, 0] = torch.arange(n).float()
    return x


def test_mean_foreground_dice__hand_values_and_ignore() -> None:
    ref = torch.tensor([[0, 1, 1, 2], [0, 0, 2, -1]])
    pred = torch.tensor([[0, 1, 0, 2], [0, 0, 2, 1]])
    # class 1: |P|=1 (the pixel at -1 is ignored), |R|=2, overlap 1 -> 2/3; class 2: 1
    assert mean_foreground_dice(pred, ref, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    assert mean_foreground_dice(torch.zeros(2, 2), torch.zeros(2, 2), 3) == 1.0


def test_linear_probe__decodable_features_reach_dice_one() -> None:
    lab = _labels()
    enc = _OneHotEncoder(lab, 4)
    x = _images(12)
    out = linear_probe(enc, x[:8], lab[:8], x[8:], lab[8:], num_classes=4, steps=200, lr=0.1)
    assert out["dice"] > 0.99 and out["feature_dim"] == 6


def test_linear_probe__uninformative_features_do_not() -> None:
    lab = _labels()

    class Noise(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.randn(x.shape[0], 4, *x.shape[2:])]

    x = _images(12)
    out = linear_probe(Noise(), x[:8], lab[:8], x[8:], lab[8:], num_classes=4, steps=100)
    assert out["dice"] < 0.6


def test_linear_probe__encoder_frozen_and_mode_restored() -> None:
    enc = UNetEncoder(1, (4, 8))
    enc.train()
    before = [p.detach().clone() for p in enc.parameters()]
    bn_before = [b.clone() for b in enc.buffers()]
    lab = _labels(6)
    x = torch.rand(6, 1, 16, 16)
    linear_probe(enc, x[:4], lab[:4], x[4:], lab[4:], num_classes=4, steps=5, group=torch.tensor([0, 1]))
    assert enc.training
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bn_before, enc.buffers()))  # eval mode: stats untouched


def test_hypercolumn__concatenates_every_level_at_input_size() -> None:
    enc = UNetEncoder(1, (4, 8, 16))
    z = hypercolumn(enc, torch.rand(2, 1, 16, 16))
    assert z.shape == (2, 28, 16, 16)


def test_encoder_health__rows_per_conv_and_known_values() -> None:
    torch.manual_seed(0)
    enc = UNetEncoder(1, (4, 8))
    x = torch.randn(16, 1, 16, 16)
    rows = encoder_health(enc, x)
    convs = [n for n, m in enc.named_modules() if isinstance(m, nn.Conv2d)]
    assert [r["layer"] for r in rows] == convs
    first = dict(enc.named_modules())[convs[0]]
    assert rows[0]["weight_norm"] == pytest.approx(float(first.weight.detach().norm()))
    # fresh BatchNorm (running mean 0, var 1) against the batch's own statistics
    bn = next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    h = first(x)
    mu, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    assert rows[0]["bn_dmean"] == pytest.approx(float((bn.running_mean - mu).norm() / 2), rel=1e-4)
    assert rows[0]["bn_dlogvar"] == pytest.approx(
        float((torch.log(bn.running_var + 1e-5) - torch.log(var + 1e-5)).norm() / 2), rel=1e-4
    )
    assert all(0.0 <= r["dead_frac"] <= 1.0 and math.isfinite(r["act_std"]) for r in rows)


def test_encoder_health__dead_units_are_counted() -> None:
    enc = UNetEncoder(1, (4, 8))
    bn = next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.bias[:2] = -1e4  # two of the four channels never fire
    rows = encoder_health(enc, torch.randn(8, 1, 16, 16))
    assert rows[0]["dead_frac"] == pytest.approx(0.5)
