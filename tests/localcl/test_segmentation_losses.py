"""Segmentation losses vs float64 loop references, closed forms, ignored-pixel gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localcl.losses.segmentation import CELoss, DiceCELoss, DiceLoss, cross_entropy_loss, dice_ce_loss, dice_loss


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _ref_dice(logits, target, include_background=True, eps=1e-5, ignore=-1, per_image=True):
    """methods.md §0 Dice, pixel loops."""
    lg, tg = logits.numpy(), target.numpy()
    b, k = lg.shape[:2]
    inter = np.zeros((b, k))
    den = np.zeros((b, k))
    for i in range(b):
        for idx in np.ndindex(*tg.shape[1:]):
            t = tg[(i,) + idx]
            if t == ignore:
                continue
            p = _softmax(lg[(i, slice(None)) + idx])
            for c in range(k):
                y = 1.0 if t == c else 0.0
                inter[i, c] += p[c] * y
                den[i, c] += p[c] + y
    if not per_image:
        inter, den = inter.sum(0, keepdims=True), den.sum(0, keepdims=True)
    d = 2 * inter / (den + eps)
    if not include_background:
        d = d[:, 1:]
    return 1 - d.mean()


def _ref_ce(logits, target, ignore=-1, weight=None):
    lg, tg = logits.numpy(), target.numpy()
    num = den = 0.0
    for i in range(lg.shape[0]):
        for idx in np.ndindex(*tg.shape[1:]):
            t = tg[(i,) + idx]
            if t == ignore:
                continue
            w = 1.0 if weight is None else float(weight[t])
            num += -w * math.log(_softmax(lg[(i, slice(None)) + idx])[t])
            den += w
    return num / den if den else 0.0


def _case(shape=(2, 4, 5, 6), seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    target[torch.rand(target.shape, generator=g) < ignore_frac] = -1
    return logits, target


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (1, 3, 3, 4, 2)])
def test_dice_loss__matches_loop_reference(include_background, per_image, shape):
    logits, target = _case(shape)
    got = dice_loss(logits, target, include_background=include_background, per_image=per_image)
    ref = _ref_dice(logits, target, include_background, per_image=per_image)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    mod = DiceLoss(include_background=include_background, per_image=per_image)
    assert mod(logits, target).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy__matches_loop_reference_and_torch(weighted):
    logits, target = _case()
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    got = cross_entropy_loss(logits, target, weight=w)
    assert got.item() == pytest.approx(_ref_ce(logits, target, weight=w), rel=1e-10)
    torch_ref = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=-1)
    torch.testing.assert_close(got, torch_ref)
    assert CELoss(weight=w)(logits, target).item() == pytest.approx(got.item())


def test_dice_ce__is_weighted_sum():
    logits, target = _case(seed=3)
    got = dice_ce_loss(logits, target, dice_weight=0.3, ce_weight=2.0, include_background=False)
    ref = 0.3 * _ref_dice(logits, target, False) + 2.0 * _ref_ce(logits, target)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    assert DiceCELoss(0.3, 2.0, include_background=False)(logits, target).item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize(
    "fn",
    [dice_loss, cross_entropy_loss, dice_ce_loss, lambda logits, t: dice_loss(logits, t, include_background=False)],
)
def test_seg_losses__ignored_pixels_get_exactly_zero_gradient(fn):
    logits, target = _case(seed=5, ignore_frac=0.4)
    logits.requires_grad_(True)
    fn(logits, target).backward()
    ignored = (target == -1).unsqueeze(1).expand_as(logits)
    assert torch.equal(logits.grad[ignored], torch.zeros(int(ignored.sum()), dtype=torch.float64))
    assert logits.grad[~ignored].abs().sum() > 0
    # and the value does not depend on the logits at ignored pixels
    changed = logits.detach().clone()
    changed[ignored] = 1e3
    torch.testing.assert_close(fn(changed, target), fn(logits.detach(), target))


def test_seg_losses__perfect_prediction_is_near_zero():
    target = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(0))
    target[0, 0, 0], target[0, 0, 1], target[0, 0, 2] = 0, 1, 2  # every class present in image 0
    target[1, 0, 0], target[1, 0, 1], target[1, 0, 2] = 0, 1, 2
    logits = 50.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).double()
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert cross_entropy_loss(logits, target).item() == pytest.approx(0.0, abs=1e-10)


def test_dice_loss__closed_form_uniform_prediction():
    # p = 1/K everywhere, one class per image covering all n pixels: D_c = 2(n/K)/(n/K + n) for
    # that class, D_k = 2*0/(n/K) = 0 for the others
    k, n = 4, 16
    logits = torch.zeros(1, k, 4, 4, dtype=torch.float64)
    target = torch.full((1, 4, 4), 2)
    d_c = 2 * (n / k) / (n / k + n + 1e-5)
    assert dice_loss(logits, target).item() == pytest.approx(1 - d_c / k, rel=1e-12)


def test_seg_losses__soft_targets_equal_hard_one_hot():
    logits, target = _case(ignore_frac=0.0, seed=7)
    soft = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).double()
    torch.testing.assert_close(dice_loss(logits, soft), dice_loss(logits, target))
    torch.testing.assert_close(cross_entropy_loss(logits, soft), cross_entropy_loss(logits, target))


def test_seg_losses__all_ignored_gives_zero_ce_and_finite_dice():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((1, 4, 4), -1)
    ce = cross_entropy_loss(logits, target)
    assert ce.item() == 0.0
    d = dice_loss(logits, target)
    (ce + d).backward()
    assert torch.isfinite(d) and torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_loss__reduction_none_shape():
    logits, target = _case()
    assert dice_loss(logits, target, reduction="none").shape == (2, 4)
    assert dice_loss(logits, target, reduction="none", include_background=False, per_image=False).shape == (3,)


def test_seg_losses__bad_input_raises_naming_parameter():
    logits, target = _case()
    with pytest.raises(ValueError, match="target must have shape"):
        dice_loss(logits, target[:, :4])
    with pytest.raises(ValueError, match="target values"):
        dice_loss(logits, torch.full_like(target, 4))
    with pytest.raises(ValueError, match="target values"):
        cross_entropy_loss(logits, torch.full_like(target, -3))
    with pytest.raises(ValueError, match="logits"):
        dice_loss(torch.randn(4, 5), target)
    with pytest.raises(ValueError, match="soft target"):
        dice_loss(logits, torch.rand(2, 3, 5, 6))
    with pytest.raises(ValueError, match="weight"):
        cross_entropy_loss(logits, target, weight=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        dice_loss(logits, target, reduction="sum")
    with pytest.raises(ValueError, match="include_background"):
        dice_loss(torch.randn(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), include_background=False)
