"""Short-schedule options of the MoCo-style methods and of IDEAL's two-stream fine-tuning:
key-momentum schedule, shuffle-BN, stream combination, CPS + CutMix, pseudo-label threshold.

Each option defaults to the specification's behaviour; the tests pin both the default (bit for
bit) and what the option changes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from localcl.methods import FINETUNE, METHODS
from localcl.methods._moco import grouped_forward, momentum_at
from localcl.methods.ideal import combine_streams, cutmix_box

SMALL = {"widths": (8, 16, 16), "decoder_widths": (16, 8)}


def _batch(b: int = 8, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "label": torch.randint(0, 4, (b, size, size), generator=g),
    }


# ------------------------------------------------------------------ momentum schedule
def test_momentum_at__constant_and_cosine_end_points() -> None:
    assert momentum_at(0, 100, 0.99, "constant") == 0.99
    assert momentum_at(77, 100, 0.99, "constant") == 0.99
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    assert momentum_at(10, None, 0.99, "cosine") == 0.99  # unknown length: constant
    with pytest.raises(ValueError, match="momentum schedule"):
        momentum_at(0, 10, 0.99, "linear")


def test_momentum_at__cosine_is_monotone_and_matches_the_formula() -> None:
    vals = [momentum_at(t, 40, 0.9, "cosine") for t in range(41)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    for t in (3, 17, 29):
        assert vals[t] == pytest.approx(1 - 0.1 * (math.cos(math.pi * t / 40) + 1) / 2)


@pytest.mark.parametrize("name", ["ideal", "lrc"])
def test_key_momentum__schedule_drives_the_ema_update(name: str) -> None:
    extra = {"queue_size": 64} if name == "ideal" else {"queue_size": 64, "num_regions": 4, "points_per_region": 2}
    cls = METHODS[name]
    m = cls(cls.Config(**SMALL, **extra, momentum=0.9, momentum_schedule="cosine"), 1, 4)
    m.set_total_steps(10)
    m._step = 5  # the step the last pretrain_step saw
    key_before = copy.deepcopy(m.key_encoder)
    with torch.no_grad():
        for p in m.unet.encoder.parameters():
            p.add_(1.0)
    m.on_after_step()
    want = momentum_at(5, 10, 0.9, "cosine")
    for pk0, pk, pq in zip(key_before.parameters(), m.key_encoder.parameters(), m.unet.encoder.parameters()):
        torch.testing.assert_close(pk, want * pk0 + (1 - want) * pq)


def test_set_total_steps__rejects_zero() -> None:
    m = METHODS["ideal"](METHODS["ideal"].Config(**SMALL, queue_size=64), 1, 4)
    assert m.total_steps is None
    with pytest.raises(ValueError, match="total_steps"):
        m.set_total_steps(0)


# ------------------------------------------------------------------ shuffle-BN
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def test_grouped_forward__one_group_is_the_plain_forward() -> None:
    net, x = _bn_net(), torch.randn(8, 1, 6, 6)
    torch.testing.assert_close(grouped_forward(net, x, 1), net(x))


def test_grouped_forward__eval_mode_is_invariant_to_groups_and_shuffle() -> None:
    net, x = _bn_net().eval(), torch.randn(8, 1, 6, 6)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(grouped_forward(net, x, 4, g), net(x))


def test_grouped_forward__train_mode_normalises_each_shuffled_group_on_its_own() -> None:
    """Reference: permute with the same draw, run each chunk alone, un-permute."""
    x = torch.randn(8, 1, 6, 6)
    net = _bn_net()
    out = grouped_forward(net, x, 2, torch.Generator().manual_seed(5))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    ref_net = _bn_net()
    chunks = [ref_net(c) for c in x[perm].chunk(2)]
    ref = torch.cat(chunks)[torch.argsort(perm)]
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, _bn_net()(x))  # statistics differ from the whole batch's


def test_ideal_shuffle_bn__default_off_and_changes_the_loss_when_on() -> None:
    cls = METHODS["ideal"]
    b = _batch()
    losses = {}
    for groups in (1, 2):
        torch.manual_seed(0)
        m = cls(cls.Config(**SMALL, queue_size=64, shuffle_bn_groups=groups, negatives="batch"), 1, 4)
        losses[groups] = float(m.pretrain_step(b, 0)["loss"].detach())
    assert cls.Config().shuffle_bn_groups == 1
    assert math.isfinite(losses[2]) and losses[1] != losses[2]


def test_ideal_shuffle_bn__gradients_reach_the_query_encoder_only() -> None:
    cls = METHODS["ideal"]
    m = cls(cls.Config(**SMALL, queue_size=64, shuffle_bn_groups=4, negatives="batch"), 1, 4)
    m.pretrain_step(_batch(), 0)["loss"].backward()
    assert all(p.grad is not None for p in m.unet.encoder.parameters())
    assert all(p.grad is None for p in m.key_encoder.parameters())


# ------------------------------------------------------------------ two-stream fine-tuning
def test_combine_streams__formulas() -> None:
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    torch.testing.assert_close(combine_streams(l1, l2, "mean"), 0.5 * (l1.softmax(1) + l2.softmax(1)))
    torch.testing.assert_close(combine_streams(l1, l2, "logits"), (0.5 * (l1 + l2)).softmax(1))
    torch.testing.assert_close(combine_streams(l1, l2, "stream1"), l1.softmax(1))
    torch.testing.assert_close(combine_streams(l1, l2, "stream2"), l2.softmax(1))
    with pytest.raises(ValueError, match="inference"):
        combine_streams(l1, l2, "max")


def test_combine_streams__every_rule_returns_distributions() -> None:
    l1, l2 = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    for rule in ("mean", "logits", "stream1", "stream2"):
        p = combine_streams(l1, l2, rule)
        assert p.shape == l1.shape and bool((p >= 0).all())
        torch.testing.assert_close(p.sum(1), torch.ones(3, 6, 6))


def test_cutmix_box__area_and_shape() -> None:
    box = cutmix_box(64, (32, 32), torch.Generator().manual_seed(0), area=(0.25, 0.5))
    assert box.shape == (64, 32, 32) and box.dtype == torch.bool
    frac = box.float().mean(dim=(1, 2))
    assert float(frac.min()) >= 0.2 and float(frac.max()) <= 0.56
    for b in box:  # one axis-aligned rectangle: rows and columns of the box are contiguous
        rows = torch.nonzero(b.any(1)).flatten()
        cols = torch.nonzero(b.any(0)).flatten()
        assert int(b.sum()) == rows.numel() * cols.numel()


def _ft(**kw: object) -> nn.Module:
    cls = FINETUNE["ideal"]
    torch.manual_seed(0)
    return cls(cls.Config(**SMALL, **kw), 1, 4)


def test_ideal_finetune__spec_defaults_unchanged() -> None:
    cfg = FINETUNE["ideal"].Config()
    assert (cfg.inference, cfg.unlabelled_augment, cfg.cutmix, cfg.pl_threshold) == ("mean", "none", False, 0.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"cutmix": True},
        {"pl_threshold": 0.6},
        {"unlabelled_augment": "glcl"},
        {"cutmix": True, "pl_threshold": 0.5, "unlabelled_augment": "glcl"},
    ],
)
def test_ideal_finetune__options_train_and_loss_falls(kw: dict) -> None:
    m = _ft(**kw, augment="none", lambda_max=1.0, ramp_fraction=0.0)
    bl, bu = _batch(4, 32, 0), {"image": _batch(4, 32, 1)["image"]}
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        m.reseed(0)
        out = m.finetune_step(bl, bu, 5, 10)
        assert math.isfinite(float(out["loss"])) and float(out["pl"]) >= 0
        first = float(out["loss"]) if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"]) < first


def test_ideal_finetune__threshold_one_minus_eps_ignores_every_pixel() -> None:
    m = _ft(pl_threshold=0.999, augment="none")
    out = m.finetune_step(_batch(4, 32), {"image": _batch(4, 32, 1)["image"]}, 5, 10)
    assert float(out["pl"]) == 0.0  # a random network is never 99.9 % sure


def test_ideal_finetune__pl_dice_only_on_the_spec_path() -> None:
    with pytest.raises(ValueError, match="pl_dice"):
        FINETUNE["ideal"].Config(pl_dice=True, cutmix=True)
