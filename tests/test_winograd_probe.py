"""benchmarks/winograd_probe.py computes the same convolution as PyTorch's, so its timings compare like with like."""
import pytest
import torch
import torch.nn.functional as F
from helpers import load_benchmark


@pytest.mark.parametrize("side", [5, 6, 1])   # odd sides: the last 2x2 block half outside the image
def test_winograd_forward_and_both_gradients_match_pytorchs_convolution(side):
    probe = load_benchmark("winograd_probe")
    torch.manual_seed(0)
    x = torch.randn(3, 4, side, side + 2).contiguous(memory_format=torch.channels_last)   # fp32: exact sums
    w = torch.randn(8, 4, 3, 3)
    g = torch.randn(3, 8, side, side + 2).contiguous(memory_format=torch.channels_last)
    y, v, dims = probe.conv_forward(x, w)
    gx, gw = probe.conv_backward(v, dims, w, g)
    ref_gx, ref_gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                            [0, 0], 1, [True, True, False])
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, ref_gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, ref_gw, atol=1e-4, rtol=1e-4)
