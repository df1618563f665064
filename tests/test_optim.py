"""Muon's orthogonalisation (cifarkit.optim): the Newton-Schulz iterations run in bf16 only where
bf16 matrix products are fast, else in fp32."""
import pytest
import torch

from cifarkit import optim


def _reference(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """The same iterations in float64: what the fp32 path must reproduce to fp32 rounding."""
    a, b, c = optim._NS_COEFFS
    x = g.double() / (g.double().norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(64, 576), (320, 64)])   # wide and tall filter banks
def test_orthogonalize_runs_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = _reference(g)
    monkeypatch.setattr(optim, "_CPU_BF16", {"fast": False})
    fp32 = optim.orthogonalize(g)
    assert optim._ns_dtype(torch.device("cpu")) == torch.float32
    assert fp32.dtype == torch.float32
    assert (fp32.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    # where bf16 is fast it is used: the result carries bf16's rounding (about 2^-8), far above fp32's
    monkeypatch.setattr(optim, "_CPU_BF16", {"fast": True})
    bf16 = optim.orthogonalize(g)
    assert optim._ns_dtype(torch.device("cpu")) == torch.bfloat16 and bf16.dtype == torch.float32
    assert (bf16.double() - ref).abs().max() > 1e-3 * ref.abs().max()
    # and the result is what Muon needs either way: singular values pushed towards 1
    for out in (fp32, bf16):
        sv = torch.linalg.svdvals(out.double())
        assert 0.5 < sv.min() and sv.max() < 1.5


def test_the_cpu_is_asked_once(monkeypatch):
    import cifarkit.device
    asked = []
    monkeypatch.setattr(cifarkit.device, "cpu_has_fast_bf16", lambda: asked.append(1) or False)
    monkeypatch.setattr(optim, "_CPU_BF16", {})
    for _ in range(3):
        optim.orthogonalize(torch.randn(8, 16))
    assert asked == [1]
