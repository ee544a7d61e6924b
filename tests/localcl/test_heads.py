"""Projection heads: reference sizes, equivalences with loop references, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localcl.models import DenseHead, GlobalHead, PatchHead, ReconHead, SegHead


def test_global_head__glcl_flatten_4608_1024_128_no_bias():
    h = GlobalHead(128, spatial_size=(6, 6))
    lin = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in lin] == [(4608, 1024, None), (1024, 128, None)]
    x = torch.randn(3, 128, 6, 6)
    z = h(x)
    assert z.shape == (3, 128)
    torch.testing.assert_close(z, torch.relu(x.flatten(1) @ lin[0].weight.T) @ lin[1].weight.T)


def test_global_head__gap_mode_2d_and_3d_average_space():
    h = GlobalHead(8, out_dim=16, hidden_dim=8, pool="gap", bias=True, hidden_norm=True).eval()
    x = torch.randn(4, 8, 3, 5)
    torch.testing.assert_close(h(x), h.mlp(x.mean(dim=(2, 3))))
    assert h(torch.randn(2, 8, 2, 3, 4)).shape == (2, 16)


def test_global_head__bad_input():
    with pytest.raises(ValueError, match="spatial_size"):
        GlobalHead(8)
    with pytest.raises(ValueError, match="pool"):
        GlobalHead(8, pool="max")
    with pytest.raises(ValueError, match="spatial_size"):
        GlobalHead(8, spatial_size=(2, 2))(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, 8"):
        GlobalHead(8, pool="gap")(torch.randn(1, 4, 3, 3))


@pytest.mark.parametrize("dim", [2, 3])
def test_dense_head__two_layer_is_pointwise_mlp(dim):
    h = DenseHead(6, out_dim=5, dim=dim).eval()
    x = torch.randn(2, 6, *([3] * dim))
    y = h(x)
    assert y.shape == (2, 5, *([3] * dim))
    # apply per position by hand: W2 relu(BN(W1 f))
    w1 = h.net[0].weight.flatten(1)
    bn = h.net[1]
    w2 = h.net[3].weight.flatten(1)
    f = x.movedim(1, -1)
    hid = (f @ w1.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y, (torch.relu(hid) @ w2.T).movedim(-1, 1), rtol=1e-5, atol=1e-5)


def test_dense_head__single_conv_option_and_errors():
    h = DenseHead(4, out_dim=3, layers=1)
    assert len(h.net) == 1 and h.net[0].kernel_size == (1, 1) and h.net[0].bias is None
    x = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(h(x), torch.einsum("oc,bchw->bohw", h.net[0].weight.flatten(1), x))
    with pytest.raises(ValueError, match="layers"):
        DenseHead(4, layers=3)
    with pytest.raises(ValueError, match="dim"):
        DenseHead(4, dim=1)


def test_patch_head__positions_match_loop_and_full_map():
    torch.manual_seed(0)
    h = PatchHead(5, kernel=3, out_dim=7).double()
    f = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 0], [3, 2], [6, 5], [4, 0]])
    got = h(f, pos)
    assert got.shape == (2, 4, 7)
    for b in range(2):
        for a, (r, c) in enumerate(pos.tolist()):
            ref = h.linear.weight @ f[b, :, r : r + 3, c : c + 3].reshape(-1)
            torch.testing.assert_close(got[b, a], ref)
    full = h(f)
    assert full.shape == (2, 7, 7, 6)
    torch.testing.assert_close(full[:, :, pos[:, 0], pos[:, 1]].permute(0, 2, 1), got)


def test_patch_head__bad_input():
    h = PatchHead(4, kernel=3)
    with pytest.raises(ValueError, match="positions"):
        h(torch.randn(1, 4, 5, 5), torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match="positions"):
        h(torch.randn(1, 4, 5, 5), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="kernel"):
        h(torch.randn(1, 4, 2, 5))
    with pytest.raises(ValueError, match=r"f must have shape"):
        h(torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize("kernel", [1, 3])
def test_recon_head__shape_2d_3d(kernel):
    assert ReconHead(8, 1, kernel=kernel)(torch.randn(2, 8, 6, 6)).shape == (2, 1, 6, 6)
    assert ReconHead(8, 2, kernel=kernel, dim=3)(torch.randn(1, 8, 4, 4, 4)).shape == (1, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="kernel"):
        ReconHead(8, kernel=5)


def test_seg_head__shape_and_bad_classes():
    assert SegHead(16, 4)(torch.randn(2, 16, 8, 8)).shape == (2, 4, 8, 8)
    assert SegHead(16, 4, dim=3)(torch.randn(1, 16, 4, 4, 4)).shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="num_classes"):
        SegHead(16, 0)
