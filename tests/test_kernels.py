"""The native C++ max-pool (cifarkit.kernels): same results as PyTorch's, used only where it
applies, and a clear fallback where it cannot be built."""
import os

import pytest
import torch
import torch.nn.functional as F

from cifarkit import kernels, load_checkpoint, resolve_config, train
from cifarkit.train import _native_kernels

CL = torch.channels_last


@pytest.fixture
def native():
    reason = kernels.load()
    if reason is not None:
        if os.environ.get("CI"):   # CI machines have g++ and ninja: a failed build is a bug there
            pytest.fail(f"native kernels did not build: {reason}")
        pytest.skip(f"native kernels unavailable here: {reason}")
    return kernels


@pytest.fixture
def fresh_state():
    saved = dict(kernels._state)
    kernels._reset_for_tests()
    yield
    kernels._state.update(saved)


def _bf16(shape, low=-3, high=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # few distinct values, so windows often hold ties: the first maximum must win, as in PyTorch
    return torch.randint(low, high, shape, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)


@pytest.mark.parametrize("shape", [(6, 64, 31, 31), (4, 256, 15, 15), (3, 5, 4, 4), (2, 3, 2, 3),
                                   (2, 17, 7, 6), (1, 1, 5, 5)])
def test_native_pool_equals_max_pool2d_forward_and_backward(native, shape):
    x = _bf16(shape)
    pick = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    x[pick < 0.05] = float("nan")              # NaN wins its window in PyTorch: here too
    x[pick > 0.95] = float("-inf")
    n, c, h, w = shape
    g = torch.randn(n, c, h // 2, w // 2).to(torch.bfloat16).contiguous(memory_format=CL)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(a, 2), native.max_pool2x2(b)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(b.grad, a.grad)
    assert yb.is_contiguous(memory_format=CL) and b.grad.is_contiguous(memory_format=CL)
    # the gradient goes to exactly one pixel per window, and never to an odd last row/column
    assert (b.grad != 0).sum() <= g.numel()
    if h % 2:
        assert not b.grad[:, :, -1].any()


def test_native_pool_without_grad_and_with_non_contiguous_grad(native):
    x = _bf16((2, 8, 6, 6), seed=1)
    with torch.no_grad():
        assert torch.equal(native.max_pool2x2(x), F.max_pool2d(x, 2))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 8, 3, 3).to(torch.bfloat16)           # NCHW gradient from the next layer
    F.max_pool2d(a, 2).backward(g)
    native.max_pool2x2(b).backward(g)
    assert torch.equal(b.grad, a.grad)


def test_other_inputs_use_pytorch_and_never_reach_the_native_code(fresh_state):
    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"native {name} called for an input it does not handle")
    kernels._state["module"] = Boom()
    for x in (torch.randn(2, 4, 6, 6),                                       # fp32
              torch.randn(2, 4, 6, 6).to(torch.bfloat16),                    # bf16 but NCHW
              torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=CL)):
        assert torch.equal(kernels.max_pool2x2(x), F.max_pool2d(x, 2))
    x = _bf16((2, 4, 6, 6))
    with kernels.disabled():
        assert torch.equal(kernels.max_pool2x2(x), F.max_pool2d(x, 2))
    with pytest.raises(AssertionError, match="native"):
        kernels.max_pool2x2(x)                                               # eligible: native


def test_training_with_native_pool_gives_the_same_weights(native, tiny_folder, tmp_path, monkeypatch):
    calls = []
    real = kernels._MaxPool2x2.apply
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: calls.append(1) or real(x))
    kw = dict(data=str(tiny_folder), val_size=24, epochs=2, batch_size=16, model="fast",
              model_args={"widths": [8, 16, 16]}, optimizer="muon", lr=0.24, flip=True,
              tensorboard=False, precision="bf16", deterministic=True)
    logs = []
    train(resolve_config("fast", overrides={**kw, "out": str(tmp_path / "a")}), progress=False,
          log=logs.append)
    assert calls, "the fast network's pools did not use the native kernel"
    assert any("native kernels: C++ max-pool ready" in line for line in logs)
    used = len(calls)
    train(resolve_config("fast", overrides={**kw, "out": str(tmp_path / "b"), "native_kernels": False}),
          progress=False, log=lambda *a: None)
    assert len(calls) == used                   # --no-native-kernels: PyTorch's pool throughout
    a = load_checkpoint(tmp_path / "a" / "last.ckpt").state_dict
    b = load_checkpoint(tmp_path / "b" / "last.ckpt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["whiten.bias"].abs().sum() > 0     # it trained (the bias starts at zero)


def test_unavailable_kernels_say_why_in_one_line_and_training_falls_back(fresh_state, monkeypatch):
    monkeypatch.setenv("CIFARKIT_NATIVE", "0")
    from cifarkit import create_model
    model = create_model("fast", 10, widths=[8, 16, 16]).to(memory_format=CL)
    cfg = resolve_config("fast")
    logs = []
    _native_kernels(cfg, model, torch.device("cpu"), "bf16", logs.append)
    assert len(logs) == 1 and "not used, CIFARKIT_NATIVE=0" in logs[0] and "--no-native-kernels" in logs[0]
    assert not kernels.loaded()
    x = _bf16((2, 4, 6, 6))
    assert torch.equal(kernels.max_pool2x2(x), F.max_pool2d(x, 2))
    # nothing to say where the kernel would not be used: fp32, another device, or switched off
    logs.clear()
    _native_kernels(cfg, model, torch.device("cpu"), "fp32", logs.append)
    cfg.native_kernels = False
    _native_kernels(cfg, model, torch.device("cpu"), "bf16", logs.append)
    assert logs == []


def test_a_failed_build_is_a_reason_not_a_crash(fresh_state, monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("Error building extension 'x': g++: fatal error\nmore lines")
    monkeypatch.setattr(ext, "load_inline", broken)
    monkeypatch.setenv("CIFARKIT_NATIVE", "1")
    monkeypatch.setattr(kernels, "_unavailable", lambda: None)
    reason = kernels.load()
    assert reason.startswith("building them failed (Error building extension") and "\n" not in reason
    assert kernels.load() == reason and not kernels.loaded()      # remembered: no second attempt
