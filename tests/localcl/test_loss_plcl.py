"""PLCL pseudo-label local contrastive loss vs a loop reference (methods.md §2.4, §2.11.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from localcl.losses.plcl import PLCLLoss, class_prototypes, plcl_loss, sample_class_pixels


def _labels(B: int, H: int, W: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(seed))


def _reference(E, y, K, pairs, pix, tau, variant="inter", normalize="slots"):
    """Loops over pairs, directions, classes, samples; prototypes as explicit pixel means."""
    B, C, H, W = E.shape
    protos = {}
    for b in range(B):
        for c in range(1, K):
            pts = [E[b, :, i, j] for i in range(H) for j in range(W) if int(y[b, i, j]) == c]
            protos[b, c] = torch.stack(pts).mean(0) if pts else None

    def s(q, mu):
        return float(F.normalize(q, dim=0) @ F.normalize(mu, dim=0)) / tau

    total, slots, valid = 0.0, 0, 0
    for a0, b0 in pairs:
        for a, b in ((a0, b0), (b0, a0)):
            imgs = (a, b) if variant == "inter" else (a,)
            for c in range(1, K):
                for p in range(pix.shape[2]):
                    n_terms = 2 if variant == "inter" else 1
                    slots += n_terms
                    if protos[a, c] is None:
                        continue
                    flat = int(pix[a, c - 1, p])
                    q = E[a, :, flat // W, flat % W]
                    den = sum(
                        math.exp(s(q, protos[i, cc])) for i in imgs for cc in range(1, K) if protos[i, cc] is not None
                    )
                    for i in imgs:
                        if protos[i, c] is None:
                            continue  # absent positive prototype: zero term
                        total += -math.log(math.exp(s(q, protos[i, c])) / den)
                        valid += 1
    return total / (slots if normalize == "slots" else valid)


@pytest.mark.parametrize("variant", ["inter", "intra"])
@pytest.mark.parametrize("normalize", ["slots", "valid"])
def test_plcl__matches_loop_reference(variant: str, normalize: str) -> None:
    K, B = 4, 4
    y = _labels(B, 6, 6, K)
    y[1][y[1] == 2] = 0  # class 2 absent from image 1 -> zero terms
    y[2, 0, 0] = -1  # ignored pixel
    E = torch.randn(B, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pairs = torch.tensor([[0, 1], [2, 3]])
    got = plcl_loss(
        E,
        y,
        K,
        pairs,
        tau=0.1,
        per_class=3,
        variant=variant,
        normalize=normalize,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(7),
    )
    pix, _ = sample_class_pixels(y, K, 3, torch.Generator().manual_seed(7))
    ref = _reference(E, y, K, pairs.tolist(), pix, 0.1, variant, normalize)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_sample_class_pixels__inside_class_and_uniform() -> None:
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 0, :] = 1  # 4 pixels of class 1
    y[0, 3, 3] = -1
    pix, present = sample_class_pixels(y, 3, 4000, torch.Generator().manual_seed(0))
    assert present.tolist() == [[True, False]]
    assert set(pix[0, 0].tolist()) == {0, 1, 2, 3}
    freq = torch.bincount(pix[0, 0], minlength=4).double() / 4000
    assert torch.all((freq - 0.25).abs() < 0.03)


def test_class_prototypes__plain_mean_of_foreground_pixels() -> None:
    E = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = _labels(2, 5, 5, 3, seed=4)
    protos, present = class_prototypes(E, y, 3)
    for b in range(2):
        for c in (1, 2):
            m = y[b] == c
            torch.testing.assert_close(protos[b, c - 1], E[b][:, m].mean(1))
    assert present.all()


def test_plcl__zero_gradient_on_background_and_ignored_pixels() -> None:
    y = _labels(4, 8, 8, 4, seed=2)
    y[0, :2] = -1
    E = torch.randn(4, 6, 8, 8, requires_grad=True)
    plcl_loss(E, y, 4, generator=torch.Generator().manual_seed(0)).backward()
    g = E.grad.abs().sum(1)  # type: ignore[union-attr]
    assert torch.all(g[y <= 0] == 0)
    assert torch.all(g[y > 0] > 0)  # every fg pixel reaches its prototype


def test_plcl__closed_form_embeddings_equal_to_orthogonal_class_codes() -> None:
    K, tau = 4, 0.5
    y = _labels(2, 6, 6, K, seed=5)
    codes = torch.eye(K, dtype=torch.float64)
    E = codes[y].permute(0, 3, 1, 2).contiguous()  # every pixel = its class code -> sim 1 or 0
    got = plcl_loss(E, y, K, tau=tau, generator=torch.Generator().manual_seed(0))
    # D(q) = 2 e^{1/τ} + 2 (K-2) e^0; both terms equal
    want = -math.log(math.exp(1 / tau) / (2 * math.exp(1 / tau) + 2 * (K - 2)))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_plcl__absent_zero_pair_zeroes_the_whole_pair() -> None:
    y = _labels(4, 6, 6, 3, seed=9)
    y[0][y[0] == 2] = 0  # pair (0, 1) misses class 2 in image 0
    E = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    full = plcl_loss(E, y, 3, absent="zero_pair", generator=torch.Generator().manual_seed(1))
    pix, _ = sample_class_pixels(y, 3, 3, torch.Generator().manual_seed(1))
    # only pair (2, 3) has terms; the mean still runs over the slots of both pairs
    ref = _reference(E, y, 3, [[2, 3]], pix, 0.1) * 0.5
    assert full.item() == pytest.approx(ref, rel=1e-10)
    masked = plcl_loss(E, y, 3, absent="mask", generator=torch.Generator().manual_seed(1))
    assert masked.item() == pytest.approx(_reference(E, y, 3, [[0, 1], [2, 3]], pix, 0.1), rel=1e-10)


def test_plcl__chunked_equals_naive_and_gradcheck() -> None:
    y = _labels(2, 5, 5, 3, seed=3)
    E0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    res = []
    for c in (None, 4):
        E = E0.clone().requires_grad_(True)
        loss = plcl_loss(E, y, 3, generator=torch.Generator().manual_seed(0), chunk_size=c)
        loss.backward()
        res.append((loss.detach(), E.grad))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    E = E0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: plcl_loss(x, y, 3, per_class=2, generator=torch.Generator().manual_seed(0)), (E,)
    )


def test_plcl__module_matches_functional() -> None:
    y = _labels(2, 6, 6, 3)
    E = torch.randn(2, 4, 6, 6)
    mod = PLCLLoss(3, tau=0.2, per_class=2, variant="intra")
    a = mod(E, y, generator=torch.Generator().manual_seed(0))
    b = plcl_loss(E, y, 3, tau=0.2, per_class=2, variant="intra", generator=torch.Generator().manual_seed(0))
    assert a.item() == pytest.approx(b.item())


def test_plcl__bad_inputs_name_the_parameter() -> None:
    y = _labels(2, 4, 4, 3)
    E = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="tau"):
        plcl_loss(E, y, 3, tau=0)
    with pytest.raises(ValueError, match="embeddings must have shape"):
        plcl_loss(E[0], y, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        plcl_loss(E, y[:, :3], 3)
    with pytest.raises(ValueError, match="num_classes"):
        plcl_loss(E, y, 2)
    with pytest.raises(ValueError, match="per_class"):
        plcl_loss(E, y, 3, per_class=0)
    with pytest.raises(ValueError, match="variant"):
        PLCLLoss(3, variant="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairs"):
        plcl_loss(E, y, 3, pairs=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="odd"):
        plcl_loss(E[:1], y[:1], 3)
