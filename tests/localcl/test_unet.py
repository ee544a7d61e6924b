"""U-Net backbones: shapes of every tap, separable parts, configurable depth, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localcl.models import UNet2D, UNet3D, UNetDecoder, UNetEncoder


def _small2d(**kw):
    return UNet2D(1, 3, widths=(4, 8, 8), decoder_widths=(8, 4), **kw)


def test_unet2d__reference_config_tap_shapes_for_192():
    # methods.md §1.3: bottleneck 6x6x128 for 192x192; decoder block 3 at stride 4 is 48x48x64
    m = UNet2D(1, 4).eval()
    taps = ("bottleneck", "features") + tuple(f"enc{i}" for i in range(1, 7)) + tuple(f"dec{i}" for i in range(1, 6))
    with torch.no_grad():
        out = m(torch.randn(1, 1, 192, 192), taps=taps)
    assert out["logits"].shape == (1, 4, 192, 192)
    assert out["bottleneck"].shape == (1, 128, 6, 6)
    assert out["dec3"].shape == (1, 64, 48, 48)
    assert out["features"].shape == (1, 16, 192, 192)
    for i, (c, s) in enumerate(zip((16, 32, 64, 128, 128, 128), (192, 96, 48, 24, 12, 6)), start=1):
        assert out[f"enc{i}"].shape == (1, c, s, s)
    for i, (c, s) in enumerate(zip((128, 128, 64, 32, 16), (12, 24, 48, 96, 192)), start=1):
        assert out[f"dec{i}"].shape == (1, c, s, s)
    assert out["enc6"] is out["bottleneck"] and out["dec5"] is out["features"]


def test_unet2d__reference_layer_structure():
    m = UNet2D(1, 4)
    convs3 = [mod for mod in m.encoder.levels[0].modules() if isinstance(mod, nn.Conv2d)]
    assert [c.kernel_size for c in convs3] == [(3, 3), (3, 3)]
    # decoder: 2 3x3 convs per block, the last block has one; each block starts with a 2x2 conv
    n_convs = [
        sum(isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3) for x in b.convs.modules()) for b in m.decoder.blocks
    ]
    assert n_convs == [2, 2, 2, 2, 1]
    assert all(
        any(isinstance(x, nn.Conv2d) and x.kernel_size == (2, 2) for x in b.up.modules()) for b in m.decoder.blocks
    )
    head = [x for x in m.seg_head.modules() if isinstance(x, nn.Conv2d)]
    assert [(h.out_channels, h.kernel_size) for h in head] == [(16, (3, 3)), (16, (3, 3)), (4, (3, 3))]
    assert head[-1].bias is not None


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "transposed"])
@pytest.mark.parametrize("hw", [(16, 16), (24, 40)])
def test_unet2d__any_size_divisible_by_stride(upsample, hw):
    m = _small2d(upsample=upsample)
    out = m(torch.randn(2, 1, *hw), taps=("dec1", "features"))
    assert out["logits"].shape == (2, 3, *hw)
    assert out["dec1"].shape == (2, 8, hw[0] // 2, hw[1] // 2)


def test_unet2d__parts_usable_separately_match_forward():
    m = _small2d().eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        full = m(x, taps=("features", "bottleneck"))
        feats = m.encoder(x)
        decs = m.decoder(feats)
        logits = m.seg_head(decs[-1])
    torch.testing.assert_close(full["bottleneck"], feats[-1])
    torch.testing.assert_close(full["features"], decs[-1])
    torch.testing.assert_close(full["logits"], logits)


def test_unet2d__logits_false_runs_only_needed_layers():
    m = _small2d().eval()
    x = torch.randn(1, 1, 16, 16)
    calls = []
    m.decoder.register_forward_hook(lambda *a: calls.append("dec"))
    m.seg_head.register_forward_hook(lambda *a: calls.append("head"))
    out = m(x, taps=("bottleneck",), logits=False)
    assert set(out) == {"bottleneck"} and calls == []
    with torch.no_grad():
        out = m(x, taps=("dec1",), logits=False)
        ref = m(x, taps=("dec1",))
    assert calls == ["dec", "dec"] + ["head"]
    torch.testing.assert_close(out["dec1"], ref["dec1"])


def test_unet2d__gradients_reach_every_parameter():
    m = _small2d(upsample="transposed")
    out = m(torch.randn(2, 1, 16, 16))
    out["logits"].square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_unet2d__norm_options(norm):
    m = _small2d(norm=norm)
    assert m(torch.randn(1, 1, 8, 8))["logits"].shape == (1, 3, 8, 8)


def test_unet2d__configurable_depth():
    m = UNet2D(2, 5, widths=(8, 16), decoder_widths=(8,))
    assert m(torch.randn(1, 2, 6, 10))["logits"].shape == (1, 5, 6, 10)


def test_unet3d__shapes_and_taps():
    m = UNet3D(1, 2, widths=(4, 8, 8), decoder_widths=(8, 4), upsample="bilinear")
    out = m(torch.randn(1, 1, 8, 12, 16), taps=("bottleneck", "dec2", "enc2"))
    assert out["logits"].shape == (1, 2, 8, 12, 16)
    assert out["bottleneck"].shape == (1, 8, 2, 3, 4)
    assert out["enc2"].shape == (1, 8, 4, 6, 8)
    assert out["dec2"].shape == (1, 4, 8, 12, 16)
    assert UNet3D(1, 2, upsample="transposed").eval()(torch.randn(1, 1, 8, 8, 8))["logits"].shape == (1, 2, 8, 8, 8)


def test_unet2d__bad_input_raises_naming_parameter():
    m = _small2d()
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 10, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        m(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="in_channels=1"):
        m(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="unknown taps"):
        m(torch.randn(1, 1, 16, 16), taps=("dec9",))
    with pytest.raises(ValueError, match="decoder_widths"):
        UNet2D(1, 3, widths=(4, 8, 8), decoder_widths=(8,))
    with pytest.raises(ValueError, match="upsample"):
        _small2d(upsample="pixelshuffle")
    with pytest.raises(ValueError, match="norm"):
        _small2d(norm="layer")
    with pytest.raises(ValueError, match="widths"):
        UNet2D(1, 3, widths=(), decoder_widths=())
    with pytest.raises(ValueError, match="num_classes"):
        UNet2D(1, 0)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        UNet3D(1, 2)(torch.randn(1, 1, 16, 16))


def test_unet_parts__standalone_construction():
    enc = UNetEncoder(1, (4, 8), norm="batch", dim=2)
    dec = UNetDecoder((4, 8), (4,), upsample="nearest", dim=2)
    feats = enc(torch.randn(1, 1, 8, 8))
    assert [f.shape[1] for f in feats] == [4, 8] and enc.stride == 2
    assert dec(feats)[-1].shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="feats"):
        dec(feats[:1])
