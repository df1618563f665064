"""The native C++ kernels (cifarkit.kernels): a max-pool with the same results as PyTorch's and
a 3x3 convolution weight gradient with the same up to summation order, used only where they
apply, and a clear fallback where they cannot be built."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from cifarkit import kernels, load_checkpoint, resolve_config, train
from cifarkit.training.prep import native_kernels as _native_kernels

CL = torch.channels_last


@pytest.fixture
def native():
    reason = kernels.load()
    if reason is not None:
        if os.environ.get("CI"):   # CI machines have g++: a failed build is a bug there
            pytest.fail(f"native kernels did not build: {reason}")
        pytest.skip(f"native kernels unavailable here: {reason}")
    return kernels


@pytest.fixture
def fresh_state():
    saved = dict(kernels._state)
    kernels._state.update(module=None, reason=None, off=0, choice=None)   # as before any load()
    yield
    kernels._state.update(saved)


def _bf16(shape, low=-3, high=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # few distinct values, so windows often hold ties: the first maximum must win, as in PyTorch
    return torch.randint(low, high, shape, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)


def _randn_bf16(gen, *shape):
    """Normal random numbers rounded to bf16, channels_last (the kernels' inputs)."""
    return torch.randn(*shape, generator=gen).to(torch.bfloat16).contiguous(memory_format=CL)


@pytest.mark.parametrize("shape", [(6, 64, 31, 31), (4, 256, 15, 15), (3, 5, 4, 4), (2, 3, 2, 3),
                                   (2, 17, 7, 6), (1, 1, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_pool_equals_max_pool2d_forward_and_backward(native, shape, dtype, monkeypatch):
    # bf16 (training under autocast) and fp32 (training on a CPU without native bf16)
    monkeypatch.setitem(native._state, "choice", None)   # not chosen: native wherever it applies
    x = _bf16(shape).to(dtype)
    pick = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    x[pick < 0.05] = float("nan")              # NaN wins its window in PyTorch: here too
    x[pick > 0.95] = float("-inf")
    n, c, h, w = shape
    g = torch.randn(n, c, h // 2, w // 2).to(dtype).contiguous(memory_format=CL)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = []
    real = native._MaxPool2x2.apply
    monkeypatch.setattr(native._MaxPool2x2, "apply", lambda t: calls.append(t.dtype) or real(t))
    ya, yb = F.max_pool2d(a, 2), native.max_pool2x2(b)
    assert calls == [dtype]                      # the native kernel ran, not PyTorch's
    assert yb.dtype == dtype
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
    # the pool alone: the native weight gradient sums in another order, and the fused batch norm
    # + GELU rounds once where PyTorch rounds twice, so both change the weights
    monkeypatch.setattr(kernels, "conv_wgrad_available", lambda: False)
    monkeypatch.setattr(kernels, "_bn_eligible", lambda *a: False)
    monkeypatch.setenv("CIFARKIT_NATIVE", "always")      # used even where PyTorch's is faster
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
    assert any("native kernels: C++ max-pool, fused batch norm + GELU and" in line for line in logs)
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
    _native_kernels(cfg, model, torch.device("cpu"), "bf16", logs.append, 10)
    assert len(logs) == 1 and "not used, CIFARKIT_NATIVE=0" in logs[0] and "--no-native-kernels" in logs[0]
    assert not kernels.loaded()
    x = _bf16((2, 4, 6, 6))
    assert torch.equal(kernels.max_pool2x2(x), F.max_pool2d(x, 2))
    # fp32 has kernels too (the max-pool and, with AVX2, the weight gradient): the same one line
    logs.clear()
    _native_kernels(cfg, model, torch.device("cpu"), "fp32", logs.append, 10)
    assert len(logs) == 1 and "not used, CIFARKIT_NATIVE=0" in logs[0]
    # nothing to say where no kernel would be used: fp16, another device, or switched off
    logs.clear()
    _native_kernels(cfg, model, torch.device("cpu"), "fp16", logs.append, 10)
    _native_kernels(cfg, model, torch.device("meta"), "bf16", logs.append, 10)
    cfg.native_kernels = False
    _native_kernels(cfg, model, torch.device("cpu"), "bf16", logs.append, 10)
    assert logs == []


def test_a_failed_build_is_a_reason_not_a_crash(fresh_state, monkeypatch, tmp_path):
    # a real compile of broken C++: one line that says so, and nothing half-written left behind
    broken = tmp_path / "native.cpp"
    broken.write_text('extern "C" int ck_has_conv3x3_wgrad() { return this is not C++; }\n')
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CIFARKIT_NATIVE", "1")
    monkeypatch.setattr(kernels, "_unavailable", lambda: None)
    reason = kernels.load()
    assert reason.startswith("building them failed (") and "error" in reason and "\n" not in reason
    assert kernels.load() == reason and not kernels.loaded()      # remembered: no second attempt
    assert [p for p in (tmp_path / "ext").rglob("*") if p.is_file()] == []


def test_the_build_is_compiled_once_and_then_loaded_from_the_cache(fresh_state, monkeypatch, tmp_path):
    if kernels._unavailable() is not None:
        pytest.skip(f"native kernels unavailable here: {kernels._unavailable()}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []
    real = kernels._compile
    monkeypatch.setattr(kernels, "_compile", lambda *a, **k: (calls.append(a), real(*a, **k)))
    assert kernels.load() is None and len(calls) == 1
    built = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert built == [f"{kernels._build_name()}.so"]              # no temporary file left
    kernels._state.update(module=None, reason=None)               # a new process, the same machine
    assert kernels.load() is None and len(calls) == 1             # loaded, not compiled again
    x = _bf16((2, 8, 4, 4))
    assert torch.equal(kernels._state["module"].pool_fwd(x, False)[0], F.max_pool2d(x, 2))


def test_the_kernels_refuse_tensors_their_loops_cannot_read(native):
    m = native._state["module"]
    x = _bf16((2, 8, 4, 4))
    with pytest.raises(RuntimeError, match="x must be a 4-D bf16 or fp32 channels_last CPU tensor"):
        m.pool_fwd(x.contiguous(), False)                              # NCHW memory: wrong strides
    with pytest.raises(RuntimeError, match="x must be a 4-D bf16 or fp32 channels_last CPU tensor"):
        m.bn_gelu_fwd(x.double().contiguous(memory_format=CL), torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(RuntimeError, match="grad must be a 4-D fp32 channels_last CPU tensor"):
        xf, v = x.float().contiguous(memory_format=CL), torch.ones(8)
        m.bn_gelu_bwd(x, xf, v, v, v, v)                               # fp32 x, bf16 gradient
    with pytest.raises(RuntimeError, match="weight must be a contiguous fp32 vector of C values"):
        m.bn_gelu_fwd(x, torch.ones(4), torch.zeros(8), 1e-5)
    with pytest.raises(RuntimeError, match="code and shapes do not match"):
        m.pool_bwd(_bf16((2, 8, 2, 2)), torch.zeros(2, 2, 2, 4, dtype=torch.uint8), 4, 4)
    if m.has_conv3x3_wgrad():
        with pytest.raises(RuntimeError, match="shapes differ"):
            m.conv3x3_wgrad(_bf16((2, 8, 4, 4)), _bf16((2, 16, 4, 3)))
    with pytest.raises(RuntimeError, match="x must be a 4-D bf16 or fp32 channels_last CPU tensor"):
        m.pool_fwd(x.double().contiguous(memory_format=CL), False)
    if m.has_conv3x3_wgrad32():
        f32 = lambda shape: _bf16(shape).float().contiguous(memory_format=CL)   # noqa: E731
        with pytest.raises(RuntimeError, match="x must be a 4-D fp32 channels_last CPU tensor"):
            m.conv3x3_wgrad32(x, f32((2, 16, 4, 4)))                    # bf16 input
        with pytest.raises(RuntimeError, match="shapes differ"):
            m.conv3x3_wgrad32(f32((2, 8, 4, 4)), f32((2, 16, 4, 3)))
        with pytest.raises(RuntimeError, match="Ci % 2 == 0"):
            m.conv3x3_wgrad32(f32((2, 7, 4, 4)), f32((2, 16, 4, 4)))


@pytest.fixture
def wgrad(native):
    if not native.conv_wgrad_available():
        pytest.skip("this CPU has no AVX-512 BF16: the native weight gradient is not built")
    return native


def _wgrad_ref(x, g):
    w = torch.zeros(g.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(g.double(), x.double(), w, None, [1, 1], [1, 1], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


@pytest.mark.parametrize("shape", [(2000 // 40, 64, 224, 7, 7), (7, 24, 64, 31, 31), (3, 12, 48, 2, 5),
                                   (5, 24, 16, 4, 3), (1, 4, 16, 1, 1), (9, 20, 80, 5, 5),
                                   (4, 8, 32, 3, 2)])
def test_native_conv_weight_gradient_is_the_exact_sum(wgrad, shape):
    # odd batches (an image paired with zeros), 16-channel remainders, 1x1, 2-column and non-square
    # inputs (the first and last columns skip the padding: a row of 1 or 2 columns is all edges)
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(n * co)
    x = _randn_bf16(gen, n, ci, h, w)
    g = _randn_bf16(gen, n, co, h, w)
    got = wgrad._state["module"].conv3x3_wgrad(x, g)
    ref = _wgrad_ref(x, g)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    # fp32 sums of exact bf16 products: each element within a few fp32 roundings (2^-24) of the
    # size of its terms (measured: at most 2.3 of them), so a dropped or doubled term, or a
    # perturbation of a millionth of the largest element on the small shapes, is seen
    size = _wgrad_ref(x.abs(), g.abs())
    assert ((got.double() - ref).abs() <= 4 * 2 ** -24 * size).all()
    assert torch.equal(got, wgrad._state["module"].conv3x3_wgrad(x, g))   # deterministic


@pytest.fixture
def wgrad32(native):
    if not native._native_wgrad(torch.float32):
        pytest.skip("this CPU has no AVX2 and FMA: the fp32 native weight gradient is not built")
    return native


@pytest.mark.parametrize("shape", [(2000 // 40, 64, 224, 7, 7), (7, 24, 64, 31, 31), (3, 12, 48, 2, 5),
                                   (5, 24, 16, 4, 3), (1, 4, 16, 1, 1), (9, 20, 80, 5, 5),
                                   (4, 8, 32, 3, 2), (2, 64, 256, 31, 31), (3, 2, 16, 1, 6)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_fp32_conv_weight_gradient_is_the_sum(wgrad32, shape, threads):
    # as the bf16 test, plus: 2 input channels (the kernel's step), a 1-pixel-high image, and
    # (2, 64, 256, 31, 31), whose image is larger than a chunk: split into blocks of rows that
    # read the rows above and below them
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(n * co + 7)
    x = torch.randn(n, ci, h, w, generator=gen).contiguous(memory_format=CL)
    g = torch.randn(n, co, h, w, generator=gen).contiguous(memory_format=CL)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = wgrad32._state["module"].conv3x3_wgrad32(x, g)
        again = wgrad32._state["module"].conv3x3_wgrad32(x, g)
    finally:
        torch.set_num_threads(saved)
    ref = _wgrad_ref(x, g)
    assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    # fp32 sums of fp32 products: each element within a few roundings per term of the size of
    # its terms; a dropped or doubled term, or a tap in the wrong place, is far outside this
    size = _wgrad_ref(x.abs(), g.abs())
    terms = n * h * w
    assert ((got.double() - ref).abs() <= 2 * terms * 2 ** -24 * size).all()
    assert ((got.double() - ref).abs() <= 1e-5 * size).all()
    assert torch.equal(got, again)                           # deterministic


@pytest.mark.parametrize("shape", [(2000 // 40, 64, 224, 7, 7), (7, 24, 64, 31, 31), (3, 12, 48, 2, 5),
                                   (5, 24, 16, 4, 3), (1, 4, 16, 1, 1), (9, 20, 80, 5, 5), (4, 3, 5, 3, 2)])
def test_matmul_weight_gradient_is_the_sum_rounded_once(shape):
    # any channel counts (3 and 5 too), 1x1, 1-pixel-high and non-square inputs
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(n * co + 1)
    x = _randn_bf16(gen, n, ci, h, w)
    g = _randn_bf16(gen, n, co, h, w)
    got = kernels.matmul_wgrad(x, g)
    ref = _wgrad_ref(x, g)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    # fp32 sums rounded once to bf16 (half a unit in the last place: at most 2^-8 of the value),
    # plus the fp32 sums' own error; a tap put in the wrong place, or a term dropped, is far
    # outside this
    size = _wgrad_ref(x.abs(), g.abs())
    assert ((got.double() - ref).abs() <= 2 ** -8 * ref.abs() + 16 * 2 ** -24 * size).all()


@pytest.mark.parametrize("shape", [(2000 // 40, 64, 224, 7, 7), (3, 12, 48, 2, 5), (5, 24, 16, 4, 3),
                                   (1, 4, 16, 1, 1), (9, 20, 80, 5, 5), (4, 3, 5, 3, 2), (6, 320, 320, 2, 2)])
def test_gemm_convolution_and_its_gradients_are_the_sums_rounded_once(shape):
    # forward, input gradient and weight gradient against float64 references, on any channel
    # counts, 1x1, 1-pixel-high and non-square inputs
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(n * co + 2)
    x = _randn_bf16(gen, n, ci, h, w)
    wt = _randn_bf16(gen, co, ci, 3, 3)
    g = _randn_bf16(gen, n, co, h, w)

    def refs(x, wt, g):
        y = F.conv2d(x.double(), wt.double(), padding=1)
        gx, gw = torch.ops.aten.convolution_backward(g.double(), x.double(), wt.double(), None, [1, 1], [1, 1],
                                                     [1, 1], False, [0, 0], 1, [True, True, False])[:2]
        return y, gx, gw
    y = kernels.gemm_conv3x3(x, wt)
    gx, gw = kernels.gemm_conv3x3_backward(x, wt, g, True, True)
    for got, ref, size in zip((y, gx, gw), refs(x, wt, g), refs(x.abs(), wt.abs(), g.abs()), strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
        # rounded once to bf16 (at most 2^-8 of the value) plus the fp32 sums' own error: a tap
        # in the wrong place, a flipped filter or a dropped term is far outside this
        assert ((got.double() - ref).abs() <= 2 ** -8 * ref.abs() + 16 * 2 ** -24 * size).all()
    assert kernels.gemm_conv3x3_backward(x, wt, g, False, False) == (None, None)


def _train_tiny_fast(folder, tmp_path, monkeypatch, precision: str):
    """The fast recipe, narrow, 8 epochs on ``folder`` in ``precision``, its choices cached in
    tmp_path: (the implementation of every _Conv3x3 call, the log lines, best val accuracy)."""
    monkeypatch.setattr(kernels, "_cache_path", lambda: tmp_path / "choices.json")
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2]) or real(*a))
    logs = []
    cfg = resolve_config("fast", overrides=dict(
        data=str(folder), val_size=24, epochs=8, batch_size=32, tensorboard=False,
        model_args={"widths": [16, 16, 32]}, deterministic=True, out=str(tmp_path / "run"),
        precision=precision))
    return calls, logs, train(cfg, progress=False, log=logs.append)["best_val_acc"]


@pytest.mark.parametrize("impl", ["matmul", "gemm"])
def test_training_with_the_matrix_product_gradient_learns(native, tmp_path, monkeypatch, impl):
    from helpers import make_folder
    tiny_folder = make_folder(tmp_path / "images", n_per_class=40, shape_only=True)
    monkeypatch.delenv("CIFARKIT_NATIVE", raising=False)
    # the chooser "measures" the matrix products (the weight gradient's, or the whole
    # convolution's) fastest on every shape (pools: PyTorch's)
    others = {"matmul": 3.0, "gemm": 3.0, impl: 1.0}
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)  # the whole convolution: timed by default
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: {"pytorch": 1.0, "native": 2.0} if spec[0] != "wgrad"
                        else {"pytorch": 2.0, "native": 3.0, **others})
    monkeypatch.setitem(kernels._state, "choice", None)     # training's choice is undone afterwards
    # the paths are bf16's; auto is fp32 on CPUs without native bf16
    calls, logs, acc = _train_tiny_fast(tiny_folder, tmp_path, monkeypatch, "bf16")
    assert calls and set(calls) == {impl}
    said = {"matmul": "weight gradient: nine matrix products on", "gemm": "the whole convolution as matrix products on"}
    assert any(said[impl] in line for line in logs), logs
    assert acc >= 0.9                                         # 3 classes: chance is 0.33


def test_conv3x3_uses_the_native_gradient_only_when_training_in_bf16(wgrad, monkeypatch):
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2:]) or real(*a))
    torch.manual_seed(0)
    conv = kernels.Conv3x3(32, 48).to(memory_format=CL)
    plain = torch.nn.Conv2d(32, 48, 3, padding=1, bias=False).to(memory_format=CL)
    plain.load_state_dict(conv.state_dict())
    assert conv.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 32, 9, 9).contiguous(memory_format=CL)
    g = torch.randn(6, 48, 9, 9).to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = conv(xa), plain(xb)
    assert calls == [("native",)]
    assert torch.equal(ya, yb)                                # the same oneDNN forward
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)                      # and the same input gradient
    # both round an fp32 sum to bf16: equal but where the summation order tips a rounding
    a, b = conv.weight.grad, plain.weight.grad
    assert a.dtype == torch.float32 and a.is_contiguous(memory_format=CL)
    assert torch.equal(a, a.to(torch.bfloat16).float())     # rounded to bf16, as PyTorch's is
    assert (a == b).float().mean() > 0.98 and (a - b).abs().max() <= 1e-2 * b.abs().max()
    ref = _wgrad_ref(x.to(torch.bfloat16), g).float()        # and both are the true sum, rounded
    assert (a - ref).abs().max() <= 2 ** -8 * ref.abs().max()
    # not in eval, fp32, with the weight frozen or the kernels switched off: plain nn.Conv2d
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv(x), plain(x))
    assert torch.equal(conv(x), plain(x))
    conv.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(xa)
    conv.weight.requires_grad_(True)
    with kernels.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(xa)
    assert len(calls) == 1
    odd = kernels.Conv3x3(32, 40)                             # 40 output channels: not a multiple of 16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        odd(xa)
    assert len(calls) == 1


def test_training_with_the_native_gradient_is_deterministic_and_learns_like_pytorch(
        wgrad, tmp_path, monkeypatch):
    from helpers import make_folder
    # classes told apart by shape only: with its convolutions frozen this network reaches 0.79
    # (on the coloured set 1.0, so that set could not tell a broken weight gradient)
    tiny_folder = make_folder(tmp_path / "images", n_per_class=40, shape_only=True)
    monkeypatch.setenv("CIFARKIT_NATIVE", "always")      # used even where PyTorch's is faster
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2:]) or real(*a))
    kw = dict(data=str(tiny_folder), val_size=24, epochs=8, batch_size=32, tensorboard=False,
              model_args={"widths": [16, 16, 32]}, deterministic=True)   # the fast recipe, smaller
    acc = {}
    for name, native_on in (("a", True), ("b", True), ("torch", False)):
        cfg = resolve_config("fast", overrides={**kw, "out": str(tmp_path / name), "native_kernels": native_on})
        acc[name] = train(cfg, progress=False, log=lambda *a: None)["best_val_acc"]
        if name == "a":
            assert calls, "the fast network's convolutions did not use the native gradient"
            used = len(calls)
    assert len(calls) == 2 * used                             # none with --no-native-kernels
    a, b = (load_checkpoint(tmp_path / n / "last.ckpt").state_dict for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)            # the same run twice: the same weights
    # The weights part from PyTorch's run (Muon amplifies a rounding tipped the other way into a
    # different trajectory), so what is compared is the learning (3 classes: chance is 0.33).
    assert acc["a"] >= 0.9 and acc["torch"] >= 0.9


def _much_slower(fn):
    """``fn`` made slower by far more than the whole step it is part of costs at these sizes
    (a few ms), so the choice does not depend on what else the machine is doing."""
    def slow(*a, **k):
        import time
        time.sleep(0.1)
        return fn(*a, **k)
    return slow


class _Slowed:
    """The built extension with chosen ops made slow (a CPU where they lose to PyTorch's)."""

    def __init__(self, module, slow=("pool_fwd", "conv3x3_wgrad", "bn_gelu_fwd")):
        self._module, self._slow = module, slow
        self.__file__ = module.__file__

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        return _much_slower(fn) if name in self._slow else fn


@pytest.fixture
def chooser(native, monkeypatch):
    monkeypatch.delenv("CIFARKIT_NATIVE", raising=False)
    saved, threads = dict(kernels._state), torch.get_num_threads()
    # one thread: on a busy machine, threads waiting for each other at every op would make the
    # tiny ops here take tens of milliseconds at random, and the timing mean nothing
    torch.set_num_threads(1)
    yield kernels
    kernels._state.update(saved)
    torch.set_num_threads(threads)


def _net():
    from cifarkit import create_model
    return create_model("fast", 10, widths=[16, 32, 32]).to(memory_format=CL)


def test_chooser_keeps_pytorch_where_the_native_op_is_slower(chooser, tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._state, "module", _Slowed(kernels._state["module"]))
    monkeypatch.setattr(kernels, "matmul_wgrad", _much_slower(kernels.matmul_wgrad))
    monkeypatch.setattr(kernels, "gemm_conv3x3", _much_slower(kernels.gemm_conv3x3))
    got = kernels.choose([_net()], [16], batch=8, repeats=3, cache=tmp_path / "c.json")
    assert got["pool"][1] == 3 and got["pool"][0] == 0                      # three pools, none native
    assert got["wgrad"][0] == 0 and got["wgrad"][1] == 5                    # five 3x3 convolutions
    assert got["bngelu"] == [0, 3]                # six batch norm + GELU pairs at 7x7, 3x3, 1x1
    assert got["wgrad_by"] == {"pytorch": 5} and got["timed"] == 3 + 5 + 3
    # and then the network runs PyTorch's ops: the slowed native ones are never called
    calls = []
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: calls.append("pool"))
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append("conv"))
    monkeypatch.setattr(kernels._BNGELU, "apply", lambda *a: calls.append("bngelu"))
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _net()(x).sum().backward()
    assert calls == []


def test_chooser_keeps_the_native_op_where_pytorch_is_slower_and_caches_it(chooser, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_pytorch_pool", _much_slower(kernels._pytorch_pool))
    monkeypatch.setattr(kernels, "_pytorch_wgrad", _much_slower(kernels._pytorch_wgrad))
    monkeypatch.setattr(kernels, "_pytorch_bn_gelu", _much_slower(kernels._pytorch_bn_gelu))
    cache = tmp_path / "c.json"
    got = kernels.choose([_net()], [16, 32], batch=8, repeats=3, cache=cache)
    assert got["pool"] == [5, 5]        # 3 pools x 2 image sides, one shape (32x7x7) in both
    assert got["bngelu"] == [5, 5]      # 3 groups x 2 image sides, one shape (32x3x3) in both
    assert got["wgrad"][0] == got["wgrad"][1] > 0      # the native one or the matrix products
    entries = json.loads(cache.read_text())
    assert len(entries) == got["timed"]
    assert all(e[e["use"]] < e["pytorch"] and e["use"] != "pytorch" for e in entries.values())
    # a second run reads the cache: nothing is timed again, and the decisions are the same
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed again despite the cache"))
    kernels._state["choice"] = None
    again = kernels.choose([_net()], [16, 32], batch=8, cache=cache)
    assert again == {**got, "timed": 0}
    calls = []
    real = kernels._MaxPool2x2.apply
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: calls.append(1) or real(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _net()(torch.randn(2, 3, 32, 32).contiguous(memory_format=CL))
    assert len(calls) == 3
    # a shape nobody timed (another image side) gets PyTorch's op: never slower than PyTorch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _net()(torch.randn(2, 3, 24, 24).contiguous(memory_format=CL))
    assert len(calls) == 3


def test_ready_line_says_which_ops_are_native(chooser, tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._state, "module", _Slowed(kernels._state["module"], slow=("pool_fwd",)))
    monkeypatch.setattr(kernels, "_cache_path", lambda: tmp_path / "c.json")
    logs = []
    cfg = resolve_config("fast", overrides={"model_args": {"widths": [16, 32, 32]}, "batch_size": 8,
                                            "progressive": [16]})
    _native_kernels(cfg, _net(), torch.device("cpu"), "bf16", logs.append, 10)
    # the network's 5 pool shapes and the 16/64/64 proxy's 3 more (the recipe has a proxy)
    assert len(logs) == 1 and "PyTorch's max-pool, faster on this CPU (8 shapes)" in logs[0], logs
    assert "shapes timed" in logs[0]


def test_chooser_is_skipped_when_the_kernels_are_forced(chooser, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARKIT_NATIVE", "always")
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed although forced"))
    kernels._state["choice"] = {"x": False}
    assert kernels.choose([_net()], [16], batch=8, cache=tmp_path / "c.json") == {"always": True}
    assert kernels._state["choice"] is None and not (tmp_path / "c.json").exists()   # native everywhere


def test_chooser_decides_with_a_margin_and_records_batch_and_threads(chooser, tmp_path, monkeypatch):
    # native must be at least MARGIN faster: exactly at the margin it is not kept
    ms = {"pool": {"pytorch": 100.0, "native": 100.0 * (1 - kernels.MARGIN)},
          "bngelu": {"pytorch": 100.0, "native": 100.0 * (1 - kernels.MARGIN)},
          "wgrad": {"pytorch": 100.0, "native": 100.0 * (1 - kernels.MARGIN) - 0.01,
                    "matmul": 100.0 * (1 - kernels.MARGIN) - 0.02,
                    "gemm": 100.0 * (1 - kernels.MARGIN) - 0.015}}
    asked = []
    monkeypatch.setattr(kernels, "_time_op", lambda spec, batch, repeats: asked.append((batch, repeats)) or
                        dict(ms[spec[0]]))
    cache = tmp_path / "c.json"
    got = kernels.choose([_net()], [16], batch=8, repeats=4, cache=cache)
    assert got["pool"] == [0, 3] and set(asked) == {(8, 4)}
    assert got["wgrad"][0] == got["wgrad"][1] > 0 and got["wgrad_by"] == {"matmul": 5}   # the fastest
    entries = json.loads(cache.read_text())
    assert got["timed"] == len(entries) == len(asked)
    # the decisions are what the network's layers then follow
    assert kernels._state["choice"] == {k.split(", ", 2)[2]: e["use"] for k, e in entries.items()}
    prefix = f"{torch.get_num_threads()} threads, batch 8, "
    assert all(k.startswith(prefix) for k in entries) and all(e["batch"] == 8 for e in entries.values())
    # decisions made at another thread count, or timed at another batch size (a test's small
    # run deciding for a user's real one), are not reused: timed again, and kept beside them
    for other_prefix in ("99 threads, batch 8, ", f"{torch.get_num_threads()} threads, batch 32, "):
        other = {k.replace(prefix, other_prefix): {**e, "use": "native"} for k, e in entries.items()}
        cache.write_text(json.dumps(other))
        again = kernels.choose([_net()], [16], batch=8, cache=cache)
        assert again["pool"] == [0, 3] and again["timed"] == len(entries)
        assert json.loads(cache.read_text()).keys() == other.keys() | entries.keys()
    # cached decisions are used as they are, without timing again; by default the cache is beside the build
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed again despite the cache"))
    flipped = {k: {**e, "use": "native" if e["use"] == "pytorch" else "pytorch"}
               for k, e in json.loads(cache.read_text()).items()}
    monkeypatch.setattr(kernels, "_cache_path", lambda: tmp_path / "beside_build.json")
    (tmp_path / "beside_build.json").write_text(json.dumps(flipped))
    again = kernels.choose([_net()], [16], batch=8)
    assert again["pool"] == [3, 3] and again["wgrad"] == [0, 5] and again["timed"] == 0
    assert again["bngelu"] == [3, 3]
    # an older cifarkit sharing the build reads "native_faster" (matrix products: not native)
    assert all(e["native_faster"] == (e["use"] == "native") for e in entries.values())
    # a cache written before the matrix products existed (no "use", no "matmul") is timed again
    old = {k: {"pytorch": 1.0, "native": 2.0, "batch": 8, "native_faster": False} for k in entries}
    cache.write_text(json.dumps(old))
    monkeypatch.setattr(kernels, "_time_op", lambda spec, batch, repeats: dict(ms[spec[0]]))
    assert kernels.choose([_net()], [16], batch=8, cache=cache)["timed"] == len(entries)


def test_without_avx512_bf16_the_chooser_times_only_the_matrix_products(chooser, tmp_path, monkeypatch):
    class NoWgrad:
        def __init__(self, inner):
            self.inner = inner

        def has_conv3x3_wgrad(self):
            return False

        def __getattr__(self, name):
            return getattr(self.inner, name)
    monkeypatch.setitem(kernels._state, "module", NoWgrad(kernels._state["module"]))
    monkeypatch.setenv("CIFARKIT_GEMM_CONV", "0")
    timed = []
    real_time_op = kernels._time_op
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: timed.append(sorted(real_time_op(spec, b, 1)))
                        or ({"pytorch": 2.0, "native": 1.0} if spec[0] != "wgrad" else {"pytorch": 2.0, "matmul": 1.0}))
    got = kernels.choose([_net()], [16], batch=8, cache=tmp_path / "c.json")
    assert got["wgrad"] == [5, 5] and got["wgrad_by"] == {"matmul": 5} and got["pool"] == [3, 3]
    # the real timing tried the matrix products against PyTorch's, never the missing C++ one (nor,
    # with CIFARKIT_GEMM_CONV=0, the whole convolution as matrix products)
    # (3 pool and 3 batch norm + GELU shapes: native against PyTorch's)
    assert timed.count(["native", "pytorch"]) == 3 + 3 and timed.count(["matmul", "pytorch"]) == 5
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2]) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _net()(torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)).sum().backward()
    assert calls == ["matmul"] * 6                       # six convolutions, five shapes


def test_the_whole_convolution_as_matrix_products_is_timed_unless_turned_off(chooser, monkeypatch):
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)
    assert kernels._wgrad_candidates()[-1] == "gemm"
    ms = kernels._time_op(("wgrad", 32, 32, 2, 2), batch=4, repeats=1)
    assert set(ms) == {"pytorch", *kernels._wgrad_candidates()}
    monkeypatch.setenv("CIFARKIT_GEMM_CONV", "0")
    assert "gemm" not in kernels._wgrad_candidates()
    assert "gemm" not in kernels._time_op(("wgrad", 32, 32, 2, 2), batch=4, repeats=1)


def test_the_whole_convolution_as_matrix_products_is_timed_on_small_images_only(chooser, tmp_path, monkeypatch):
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)
    side = kernels.GEMM_SIDE
    assert "gemm" in kernels._time_op(("wgrad", 32, 32, side, side), batch=2, repeats=1)
    assert "gemm" not in kernels._time_op(("wgrad", 32, 32, side + 1, side), batch=2, repeats=1)
    # a cache timed that way is complete: the larger shapes are not timed again for lack of it
    shapes = []
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: shapes.append(spec) or (
        {"pytorch": 1.0, "native": 2.0} if spec[0] != "wgrad"
        else {"pytorch": 1.0, "native": 2.0, "matmul": 2.0, **({"gemm": 2.0} if spec[-1] <= side else {})}))
    cache = tmp_path / "c.json"
    kernels.choose([_net()], [32], batch=8, cache=cache)
    sides = {s[-1] for s in shapes if s[0] == "wgrad"}
    assert min(sides) <= side < max(sides)                      # shapes of both kinds were timed
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed again despite the cache"))
    assert kernels.choose([_net()], [32], batch=8, cache=cache)["timed"] == 0


def test_timing_inputs_are_slices_of_one_block_freed_after_choosing(chooser, tmp_path):
    x, w, g = kernels._normal((2, 8, 3, 5), (16, 8, 3, 3), (2, 16, 3, 5), dtype=torch.bfloat16)
    assert [tuple(t.shape) for t in (x, w, g)] == [(2, 8, 3, 5), (16, 8, 3, 3), (2, 16, 3, 5)]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous(memory_format=CL) for t in (x, w, g))
    mem = [t.permute(0, 2, 3, 1).flatten()[:16] for t in (x, g)]          # in memory order
    assert not torch.equal(*mem)                                          # not the same values twice
    assert 0.5 < float(torch.cat([x.flatten(), w.flatten(), g.flatten()]).float().std()) < 1.5
    kernels.choose([_net()], [16], batch=4, repeats=1, cache=tmp_path / "c.json")
    assert kernels._state["noise"] is None


def test_a_cached_gemm_choice_is_not_used_once_the_option_is_off(chooser, tmp_path, monkeypatch):
    # timed by default: the whole convolution as matrix products won every shape
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)
    fake = {"pytorch": 10.0, "native": 8.0, "matmul": 6.0, "gemm": 1.0}
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: (
        {k: v for k, v in fake.items() if k != "gemm" or spec[-1] <= kernels.GEMM_SIDE} if spec[0] == "wgrad"
        else {"pytorch": 1.0, "native": 2.0}))
    cache = tmp_path / "c.json"
    # (not a candidate on the larger images: GEMM_SIDE)
    assert kernels.choose([_net()], [16], batch=8, cache=cache)["wgrad_by"] == {"gemm": 2, "matmul": 3}
    # turned off, the same cache gives the fastest of the others, and nothing is re-timed
    monkeypatch.setenv("CIFARKIT_GEMM_CONV", "0")
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed again despite the cache"))
    got = kernels.choose([_net()], [16], batch=8, cache=cache)
    assert got["wgrad_by"] == {"matmul": 5} and got["timed"] == 0
    assert "gemm" not in kernels._state["choice"].values()


def test_best_ms_is_the_fastest_run_in_milliseconds():
    import time
    runs = iter([0.06, 0.01, 0.12])    # a warm-up, then 10 ms, 120 ms and 60 ms
    got = kernels._best_ms({"a": lambda: time.sleep(next(runs, 0.06))}, repeats=3)
    assert 9 < got["a"] < 50           # the 10 ms run, in ms (the median would be 60)


# ----------------------------------------------------------------------------- batch norm + GELU

def _bn_gelu_grads(fn, x, w, b, gy):
    """(y, dx, dw, db) of fn(x, w, b) for output gradient gy, in float64."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y.double(), *(g.double() for g in torch.autograd.grad(y, (x, w, b), gy.to(y.dtype))))


@pytest.mark.parametrize("shape", [(64, 64, 16, 16), (50, 224, 8, 8), (33, 320, 3, 3), (40, 24, 7, 5),
                                   (300, 16, 1, 1), (3, 5, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_bn_gelu_is_as_exact_as_pytorchs_two_ops(native, shape, dtype):
    g = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    # a mean far from 0 against the spread: the variance must not come from a cancelling sum
    x = (torch.randn(shape, generator=g) * 3 + 20).to(dtype).contiguous(memory_format=CL)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    gy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=CL)
    # bf16: both round to bf16 (2^-9 relative); fp32: erf and exp approximated to about 2e-7
    floor = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -19

    def pytorch(x, w, b):
        return F.gelu(F.batch_norm(x, None, None, w, b, True, 0.4, 1e-12))
    exact = _bn_gelu_grads(pytorch, x.double(), w.double(), b.double(), gy)
    theirs = _bn_gelu_grads(pytorch, x, w, b, gy)
    ours = _bn_gelu_grads(lambda x, w, b: native._BNGELU.apply(x, w, b, 1e-12)[0], x, w, b, gy)
    for name, e, t, o in zip(("y", "dx", "dweight", "dbias"), exact, theirs, ours):
        scale = e.abs().max()
        err_theirs, err_ours = (t - e).abs().max() / scale, (o - e).abs().max() / scale
        # ours at most a little further off than PyTorch's
        assert err_ours <= max(1.5 * err_theirs, floor), (name, float(err_ours), float(err_theirs))
    _, mean, var = native._BNGELU.apply(x, w, b, 1e-12)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.4, None])
def test_fused_bn_gelu_updates_the_running_statistics_as_batchnorm_does(native, momentum):
    torch.manual_seed(0)
    ours = torch.nn.BatchNorm2d(32, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(32, momentum=momentum)
    act = torch.nn.GELU()
    calls = []
    real = native._BNGELU.apply
    for step in range(3):
        x = (torch.randn(16, 32, 5, 5) * (step + 1) + step).to(torch.bfloat16).contiguous(memory_format=CL)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(native._BNGELU, "apply", lambda *a: calls.append(1) or real(*a))
            y = native.bn_gelu(ours, act, x)
        torch.testing.assert_close(y.float(), act(theirs(x)).float(), rtol=2 ** -7, atol=2 ** -7)
    assert len(calls) == 3
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-6)


def test_fused_bn_gelu_is_used_only_where_it_applies(fresh_state, monkeypatch):
    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"native {name} called for an input it does not handle")
    kernels._state["module"] = Boom()
    torch.manual_seed(0)
    bn, act = torch.nn.BatchNorm2d(8), torch.nn.GELU()
    x = torch.randn(4, 8, 5, 5).to(torch.bfloat16).contiguous(memory_format=CL)

    def same(bn, act, x):
        assert torch.equal(kernels.bn_gelu(bn, act, x), act(bn(x)))
    same(bn.eval(), act, x)                                                     # running statistics
    bn.train()
    same(bn, act, x.half())                                                     # fp16
    same(bn, act, x.contiguous())                                               # bf16 but NCHW
    same(bn, torch.nn.GELU(approximate="tanh"), x)                              # another GELU
    same(bn, torch.nn.ReLU(), x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):     # PyTorch's own error
        kernels.bn_gelu(bn, act, x[:1, :, :1, :1].contiguous(memory_format=CL))
    with kernels.disabled():
        same(bn, act, x)
    handle = act.register_forward_hook(lambda *a: None)                         # a hook sees its module
    same(bn, act, x)
    handle.remove()
    with pytest.raises(AssertionError, match="native"):
        kernels.bn_gelu(bn, act, x)                                             # eligible: native
    with pytest.raises(AssertionError, match="native"):
        kernels.bn_gelu(bn, act, x.float())                                     # fp32 too


def test_fast_network_trains_the_same_with_the_fused_bn_gelu(native, monkeypatch):
    monkeypatch.setitem(kernels._state, "choice", None)       # native wherever it applies
    calls = []
    real = kernels._BNGELU.apply
    monkeypatch.setattr(kernels._BNGELU, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    fused = _net()
    plain = _net()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(32, 3, 16, 16).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (32,))
    grads = []
    for net, ctx in ((fused, torch.enable_grad()), (plain, kernels.disabled())):
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert len(calls) == 6                                    # 3 groups x 2 batch norm + GELU pairs
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    for (k, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        if "running" in k:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_ready_line_names_the_fused_batch_norm_and_gelu():
    from cifarkit.training.prep import native_line
    some = native_line({"pool": [3, 3], "bngelu": [4, 6], "wgrad": [0, 5], "wgrad_by": {"pytorch": 5}})
    assert "fused batch norm + GELU on 4 of 6 shapes" in some
    none = native_line({"pool": [3, 3], "bngelu": [0, 6], "wgrad": [0, 5], "wgrad_by": {"pytorch": 5}})
    assert "PyTorch's batch norm and GELU, faster on this CPU (6 shapes)" in none


# ----------------------------------------------------------------------------- fp32 (CPUs without bf16)
@pytest.fixture
def fp32_chooser(fresh_state, monkeypatch):
    """No build (fp32 needs none), one thread (see `chooser`), the choice undone afterwards."""
    monkeypatch.delenv("CIFARKIT_NATIVE", raising=False)
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield kernels
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(6, 320, 320, 1, 1), (3, 12, 48, 2, 5), (4, 3, 5, 3, 2), (5, 24, 16, 1, 1)])
def test_gemm_convolution_in_fp32_is_the_convolution(shape):
    # fp32 in, fp32 out; 1x1 images take the centre tap alone (the other eight meet only padding)
    n, ci, co, h, w = shape
    gen = torch.Generator().manual_seed(n * co + 3)
    x = torch.randn(n, ci, h, w, generator=gen).contiguous(memory_format=CL)
    wt = torch.randn(co, ci, 3, 3, generator=gen)
    g = torch.randn(n, co, h, w, generator=gen).contiguous(memory_format=CL)
    xr, wr = x.double().requires_grad_(), wt.double().requires_grad_()
    F.conv2d(xr, wr, padding=1).backward(g.double())
    y = kernels.gemm_conv3x3(x, wt)
    gx, gw = kernels.gemm_conv3x3_backward(x, wt, g, True, True)
    for got, ref in ((y, F.conv2d(x.double(), wt.double(), padding=1)), (gx, xr.grad), (gw, wr.grad)):
        assert got.dtype == torch.float32 and got.shape == ref.shape and got.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert gw.shape[2:] == (3, 3)
    if h == w == 1:   # a gradient on an outer tap of a 1x1 image would be a bug, not rounding
        assert torch.count_nonzero(gw[:, :, [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]]) == 0


def _fp32_step_matches_pytorchs():
    """One fp32 backward of `_net()` with what is chosen, against the same network's with PyTorch's
    ops alone: every parameter's gradient equal up to summation order. Returns (net, its input)."""
    torch.manual_seed(0)
    net, plain = _net(), _net()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    net(x).square().sum().backward()
    with kernels.disabled():
        plain(x).square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), plain.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * b.grad.abs().max().item(),
                                       msg=name)
    return net, x


def test_fp32_chooser_needs_no_build_and_times_only_the_convolutions(fp32_chooser, tmp_path, monkeypatch):
    assert kernels._state["module"] is None                  # nothing built, nothing to build
    monkeypatch.setattr(kernels, "GEMM_SIDE", 99)            # a candidate on every image here
    timed = []
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: timed.append(spec[0]) or
                        {"pytorch": 2.0, "matmul": 3.0, "gemm": 1.0})
    cache = tmp_path / "new" / "c.json"                       # its folder is made
    got = kernels.choose([_net()], [16], batch=8, cache=cache, precision="fp32")
    # five 3x3 convolution shapes, no pools or batch norms (their C++ kernels need the build)
    assert timed == ["conv32"] * 5 and got["wgrad_by"] == {"gemm": 5} and got["fp32"] is True
    assert got["pool"] == [0, 0] and got["bngelu"] == [0, 0]
    assert all(k.split(", ", 2)[2].startswith("fp32 conv ") for k in json.loads(cache.read_text()))
    # training in fp32 then runs them as matrix products, with the gradients of nn.Conv2d
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2]) or real(*a))
    net, x = _fp32_step_matches_pytorchs()
    assert calls == ["gemm"] * 6                               # six convolutions, five shapes
    # bf16 training is not steered by fp32 decisions: its shapes were never chosen
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).sum().backward()
    assert calls == []


def test_fp32_chooser_keeps_pytorch_where_the_matrix_products_are_slower(fp32_chooser, tmp_path, monkeypatch):
    fast = {name: getattr(kernels, name) for name in ("matmul_wgrad", "gemm_conv3x3")}
    for name, fn in fast.items():
        monkeypatch.setattr(kernels, name, _much_slower(fn))
    got = kernels.choose([_net()], [16], batch=8, repeats=3, cache=tmp_path / "c.json", precision="fp32")
    assert got["wgrad"] == [0, 5] and got["wgrad_by"] == {"pytorch": 5} and got["timed"] == 5
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append("conv"))
    _net()(torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)).sum().backward()
    assert calls == []
    monkeypatch.setattr(kernels._Conv3x3, "apply", real)
    # and where PyTorch's is the slow one, the matrix products are kept (really timed)
    for name, fn in fast.items():
        monkeypatch.setattr(kernels, name, fn)
    monkeypatch.setattr(kernels, "_pytorch_wgrad", _much_slower(kernels._pytorch_wgrad))
    got = kernels.choose([_net()], [16], batch=8, repeats=3, cache=tmp_path / "d.json", precision="fp32")
    assert got["wgrad"] == [5, 5] and set(got["wgrad_by"]) <= {"matmul", "gemm"}


def test_fp32_chooser_is_off_with_native_kernels_off(fp32_chooser, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFARKIT_NATIVE", "0")
    monkeypatch.setattr(kernels, "_time_op", lambda *a: pytest.fail("timed although switched off"))
    assert kernels.choose([_net()], [16], batch=8, cache=tmp_path / "c.json", precision="fp32") == {}
    logs = []
    cfg = resolve_config("fast", overrides={"model_args": {"widths": [16, 32, 32]}, "batch_size": 8})
    _native_kernels(cfg, _net(), torch.device("cpu"), "fp32", logs.append, 10)
    assert len(logs) == 1 and logs[0].startswith("native kernels: not used, CIFARKIT_NATIVE=0;"), logs
    assert kernels._state["choice"] is None


def test_fp32_training_with_the_matrix_product_convolution_learns(fp32_chooser, tmp_path, monkeypatch):
    from helpers import make_folder
    tiny_folder = make_folder(tmp_path / "images", n_per_class=40, shape_only=True)
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: {"pytorch": 2.0, "matmul": 3.0, "gemm": 1.0})
    # no C++ compiler: the matrix products need none, so they are still timed and used
    monkeypatch.setattr(kernels, "load", lambda *a: "no C++ compiler (install g++, or set CXX)")
    calls, logs, acc = _train_tiny_fast(tiny_folder, tmp_path, monkeypatch, "fp32")
    assert calls and set(calls) == {"gemm"}
    assert any(line.startswith("native kernels: not used, no C++ compiler") for line in logs), logs
    assert any(line.startswith("kernels: 3x3 convolution in fp32: the whole convolution as matrix products on")
               for line in logs), logs
    assert acc >= 0.9                                         # 3 classes: chance is 0.33


def _sleeper(calls, name, seconds):
    import time

    def fn():
        calls[name] = calls.get(name, 0) + 1
        time.sleep(seconds)
    return fn


def test_best_ms_stops_timing_what_is_far_slower_after_the_first_round():
    calls = {}
    got = kernels._best_ms({name: _sleeper(calls, name, s) for name, s in
                            (("fast", 0.01), ("slow", 0.025), ("far", 0.05), ("close", 0.012))}, repeats=4)
    # a warm-up and 4 timed runs each, except "slow" (2.5x the fastest after its first timed run:
    # warm-up and one timed run) and "far" (5x from its warm-up on: the warm-up alone)
    assert calls == {"fast": 5, "slow": 2, "far": 1, "close": 5}
    assert got["slow"] > kernels.DROP * got["fast"] and got["far"] > kernels.SCREEN * got["fast"]
    assert got["fast"] < got["close"] < got["slow"] < got["far"]


def test_best_ms_always_times_pytorchs_own_op():
    calls = {}
    got = kernels._best_ms({"pytorch": _sleeper(calls, "pytorch", 0.05), "native": _sleeper(calls, "native", 0.01)},
                           repeats=3)
    # 5x slower, but what is kept must never be slower than PyTorch's: its time is a real run's
    assert calls == {"pytorch": 2, "native": 4} and got["pytorch"] > got["native"]


def test_best_ms_adds_the_common_work_to_those_that_share_it():
    calls = {}
    got = kernels._best_ms({"a": _sleeper(calls, "a", 0.01), "b": _sleeper(calls, "b", 0.025)}, repeats=3,
                           common=_sleeper(calls, "common", 0.02), using=("a",))
    # "a" (10 ms + 20 ms shared) against "b" (25 ms on its own): neither dropped, and the shared
    # work is timed every round while it decides between them
    assert calls == {"a": 4, "b": 4, "common": 4}
    assert 29 < got["a"] < 40 and 24 < got["b"] < got["a"]
    # once only those that share it are left, it is not timed again; and a rival is screened
    # against the whole ("g": 2x "pytorch" with the shared work, 10x without: kept for one round)
    calls.clear()
    got = kernels._best_ms({"pytorch": _sleeper(calls, "pytorch", 0.005), "g": _sleeper(calls, "g", 0.05)},
                           repeats=3, common=_sleeper(calls, "common", 0.02), using=("pytorch",))
    assert calls == {"pytorch": 4, "g": 2, "common": 2}
    assert 24 < got["pytorch"] < got["g"]


@pytest.fixture
def fp32_native(native, monkeypatch):
    """The built kernels, one thread (see `chooser`), the choice undone afterwards."""
    monkeypatch.delenv("CIFARKIT_NATIVE", raising=False)
    monkeypatch.delenv("CIFARKIT_GEMM_CONV", raising=False)
    saved, threads = dict(kernels._state), torch.get_num_threads()
    torch.set_num_threads(1)
    yield kernels
    kernels._state.update(saved)
    torch.set_num_threads(threads)


def test_fp32_chooser_with_the_kernels_times_the_pools_and_the_cpp_gradient(fp32_native, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "GEMM_SIDE", 0)             # the whole convolution: not a candidate here
    wgrad32 = kernels._native_wgrad(torch.float32)
    timed = []
    monkeypatch.setattr(kernels, "_time_op", lambda spec, b, r: timed.append(spec[0]) or
                        ({"pytorch": 2.0, "native": 1.0} if spec[0] in ("pool32", "bngelu32") else
                         {"pytorch": 2.0, "matmul": 3.0, **({"native": 1.0} if wgrad32 else {})}))
    got = kernels.choose([_net()], [16], batch=8, cache=tmp_path / "c.json", precision="fp32")
    # three pools, three batch norm + GELU shapes and five convolutions, in fp32
    assert sorted(timed) == ["bngelu32"] * 3 + ["conv32"] * 5 + ["pool32"] * 3 and got["fp32"] is True
    assert got["pool"] == [3, 3] and got["bngelu"] == [3, 3]
    assert got["wgrad_by"] == ({"native": 5} if wgrad32 else {"pytorch": 5})
    keys = [k.split(", ", 2)[2] for k in json.loads((tmp_path / "c.json").read_text())]
    assert sorted(k.split(" ")[1] for k in keys) == ["bngelu"] * 3 + ["conv"] * 5 + ["pool"] * 3
    assert all(k.startswith("fp32 ") for k in keys)
    # the fp32 training step then runs them, with the gradients of PyTorch's own ops
    pools, convs, bns = [], [], []
    real_pool, real_conv, real_bn = kernels._MaxPool2x2.apply, kernels._Conv3x3.apply, kernels._BNGELU.apply
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: pools.append(x.dtype) or real_pool(x))
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: convs.append(a[2]) or real_conv(*a))
    monkeypatch.setattr(kernels._BNGELU, "apply", lambda *a: bns.append(a[0].dtype) or real_bn(*a))
    net, x = _fp32_step_matches_pytorchs()
    assert pools == [torch.float32] * 3 and convs == (["native"] * 6 if wgrad32 else [])
    assert bns == [torch.float32] * 6                         # 3 groups x 2 pairs
    # bf16 training is not steered by the fp32 decisions
    pools.clear()
    bns.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).sum().backward()
    assert pools == [] and bns == []


def test_fp32_chooser_keeps_pytorch_where_the_cpp_kernels_are_slower(fp32_native, tmp_path, monkeypatch):
    monkeypatch.setitem(kernels._state, "module",
                        _Slowed(kernels._state["module"], slow=("pool_fwd", "conv3x3_wgrad32", "bn_gelu_fwd")))
    for name in ("matmul_wgrad", "gemm_conv3x3"):
        monkeypatch.setattr(kernels, name, _much_slower(getattr(kernels, name)))
    got = kernels.choose([_net()], [16], batch=8, repeats=3, cache=tmp_path / "c.json", precision="fp32")
    assert got["pool"] == [0, 3] and got["wgrad"] == [0, 5] and got["wgrad_by"] == {"pytorch": 5}
    assert got["bngelu"] == [0, 3]
    calls = []
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: calls.append("pool"))
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append("conv"))
    monkeypatch.setattr(kernels._BNGELU, "apply", lambda *a: calls.append("bngelu"))
    _net()(torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)).sum().backward()
    assert calls == []


def test_fp32_training_with_the_cpp_kernels_is_deterministic_and_learns(wgrad32, tmp_path, monkeypatch):
    from helpers import make_folder
    tiny_folder = make_folder(tmp_path / "images", n_per_class=40, shape_only=True)   # see the bf16 test
    monkeypatch.setenv("CIFARKIT_NATIVE", "always")      # used even where PyTorch's is faster
    saved = dict(kernels._state)
    calls = []
    real = kernels._Conv3x3.apply
    monkeypatch.setattr(kernels._Conv3x3, "apply", lambda *a: calls.append(a[2]) or real(*a))
    kw = dict(data=str(tiny_folder), val_size=24, epochs=8, batch_size=32, tensorboard=False,
              model_args={"widths": [16, 16, 32]}, deterministic=True, precision="fp32")
    acc = {}
    try:
        for name in ("a", "b"):
            cfg = resolve_config("fast", overrides={**kw, "out": str(tmp_path / name)})
            acc[name] = train(cfg, progress=False, log=lambda *a: None)["best_val_acc"]
    finally:
        kernels._state.update(saved)
    assert calls and set(calls) == {"native"}
    a, b = (load_checkpoint(tmp_path / n / "last.ckpt").state_dict for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)            # the same run twice: the same weights
    assert acc["a"] >= 0.9                                    # 3 classes: chance is 0.33
