"""Optional native CPU kernels, built once with the machine's C++ compiler.

Three of the fast network's training ops, where PyTorch's CPU kernels fall short:

* The 2x2, stride-2 max-pool of a bf16 channels_last tensor. PyTorch's stores the argmax as int64
  indices (four times the size of the bf16 output) and its backward zero-fills the whole input
  gradient before scattering into it. The kernel here keeps a 1-byte code (which of the 4 pixels
  won) and writes every input-gradient element exactly once. Outputs and gradients are
  bit-identical to ``F.max_pool2d`` (the first maximum wins, as in PyTorch); on the fast network
  its three pools take 41 instead of 132 ms per batch-2000 step (``benchmarks/pool_kernel.py``).
* The weight gradient of a 3x3, stride-1, padding-1 convolution in bf16 (:class:`Conv3x3`), on
  CPUs with AVX-512 BF16. On the AMD Zen 5 it was tuned on, oneDNN's runs at about two thirds of
  the bf16 peak (under half for 3x3-pixel inputs) while its forward and input-gradient
  convolutions run near the peak; this one sums bf16 products in fp32 with ``vdpbf16ps`` at about
  0.9 of the peak and, like PyTorch's, rounds the sums to bf16: the same gradient up to the order
  of summation (``benchmarks/step_variants.py --layers`` and ``--native``).

* A training-mode batch norm followed by an exact GELU (:func:`bn_gelu`), fused. PyTorch runs
  them as two ops whose four kernels each read and write a whole activation tensor; on a CPU those
  passes are bound by memory and took about a fifth of a fast-recipe step (45 % of its proxy
  network's). The fused op reads x twice and writes once forward, and reads and writes twice
  backward, never storing the batch norm's output; it rounds to bf16 once where PyTorch rounds
  twice (the test holds it to PyTorch's own error against float64). 1.4-2.0x PyTorch's two ops
  forward + backward on the recipe's shapes at batch 1000 on an Intel Xeon with AMX
  (``benchmarks/bn_gelu_kernel.py``).

None is always faster: on CPUs with AMX, oneDNN's convolutions use the matrix units and beat
the weight-gradient kernel. :func:`choose` times each op against PyTorch's on the shapes the
networks use and keeps the faster, shape by shape (cached beside the build). For the weight
gradient it also times a third way written with PyTorch's ops, :func:`matmul_wgrad` (nine matrix
products, one per kernel tap): where the matrix units are fast and the image is small (6x6 pixels
and less), oneDNN's own weight gradient uses them poorly and the products win (1.2-2.1x on an
Intel Xeon with AMX at batch 256; docs/benchmarks.md section 5).

In fp32 (a CPU without native bf16, where training runs in fp32) all three have fp32 forms:
the max-pool and the fused batch norm + GELU (the same code on floats, nothing rounded; the
fused op 1.76x PyTorch's two fp32 ops on a Zen 2 at batch 1000, ``benchmarks/bn_gelu_kernel.py
--dtype fp32``) and the weight gradient with AVX2 and FMA (12 256-bit accumulators; on a Zen 2
0.69-0.90 of oneDNN's time on seven of the fast network's eight 3x3 layers and 1.02 on the
eighth, where oneDNN ran its fp32 weight gradient at 0.5-0.75 of its forward's rate;
``benchmarks/step_variants.py --layers --layers-dtype fp32``; since each chunk of images is
packed so that its tiles read memory in order, 0.74 of that kernel's time and 0.59 of oneDNN's
on the six 32 px layer shapes on a Zen 3, bit for bit the same sums, ``benchmarks/wgrad32_ab.py``).
The matrix-product convolutions
apply too, and need no build: ``choose(precision="fp32")`` times all of them against oneDNN's
fp32 convolution and PyTorch's ops shape by shape. A 1x1 image (the last group at 16 px) is
convolved by the centre tap alone, exactly: the other eight taps only ever meet the zero padding.

Nothing here is required: :func:`load` compiles ``csrc/native.cpp`` into a shared library (about
2 s the first time, then cached in ``$TORCH_EXTENSIONS_DIR/cifarkit`` or
~/.cache/torch_extensions/cifarkit) and returns a reason instead when there is no C++ compiler;
until it has succeeded, :func:`max_pool2x2` is ``F.max_pool2d``, :class:`Conv3x3` is
``nn.Conv2d`` and :func:`bn_gelu` is the two modules.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Hand-written rather than composed from tensor ops: the four strided maxima plus a torch.where
# backward, and torch.compile of the same, were both slower than max_pool2d here (see
# docs/benchmarks.md); only a loop that reads the input once and writes each output once wins.
# The weight gradient likewise: as im2col + matmul, or as nine shifted matmuls, it was slower than
# oneDNN's on the Zen 5 (the copies, and matmuls whose long side is the summed one); with AMX the
# nine matmuls win on small images, so they are one of the candidates `choose` times.
# The C++ is a real file shipped with the package, so compiler messages point at its own lines.
# It is compiled by the compiler directly and called through ctypes, not built as a PyTorch
# extension (torch.utils.cpp_extension): its loops need raw pointers only, and without PyTorch's
# headers a build from scratch took 1.6-1.9 s instead of 15.8-18.6 on a Zen 4, a wait every new
# machine's first training run had (docs/benchmarks.md section 7).
SOURCE = Path(__file__).with_name("csrc") / "native.cpp"

# module: the built kernels (a _Native); reason: why it is not used; off: depth of `disabled()` blocks;
# choice: {shape key: the implementation to use ("pytorch", "native", or for the weight gradient
# "matmul")} measured by `choose`, or None (not measured: native wherever it applies, as in the
# tests of the kernels themselves).
# record: while `_shapes` runs the networks, the fused batch norm + GELU shapes seen ({key: spec}).
# noise: while `choose` times, the block of random values its inputs are cut from (_normal).
_state: dict = {"module": None, "reason": None, "off": 0, "choice": None, "record": None, "noise": None}


def _build_name() -> str:
    """The library's cache name: new source or another CPU (it is built for this one) rebuilds;
    another torch or Python gets its own name too, since the timing choices cached beside the
    library depend on PyTorch's own ops."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    key = "\n".join([cpu, platform.machine(), torch.__version__, torch.__file__, sys.version,
                     " ".join(CXXFLAGS)]).encode()
    return "cifarkit_native_" + hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:12]


def _build_dir() -> Path:
    """Where PyTorch builds its extensions ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions),
    in a folder of cifarkit's own."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "cifarkit"


# -fno-trapping-math: GCC 12 left the fused batch norm + GELU's loops scalar on AVX2 without it
# (their selects "could trap"; with AVX-512 it can use masked instructions), and in fp32 the fused op
# then took 1.9-4.6x PyTorch's two ops on a Zen 2 (docs/benchmarks.md section 6). It changes no
# result: nothing here reads the floating-point exception flags, and it allows no reassociation.
CXXFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


def _compile(target: Path, verbose: bool = False) -> None:
    """Compile SOURCE into the shared library ``target``: to a temporary name first, then moved
    in place, so that a process loading it never sees half a file (two building at once is safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    cmd = [os.environ.get("CXX", "c++"), *CXXFLAGS, str(SOURCE), "-o", str(tmp)]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if "error" in line]
            raise RuntimeError(f"{cmd[0]} exited with {done.returncode}: "
                               + (lines[0] if lines else (done.stderr or "no message").strip()))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class _Native:
    """The compiled kernels with tensors in and out: the checks and output allocation are here,
    the loops in C++ (csrc/native.cpp). Inputs must be as the C++ expects: `max_pool2x2`,
    `bn_gelu` and `Conv3x3` only call it with such tensors; the checks stop anything else from
    reaching raw-pointer code."""

    def __init__(self, path: Path):
        self.__file__ = str(path)
        lib = ctypes.CDLL(str(path))   # after torch's import: its libgomp.so.1 is the one used
        p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        for name, args in (("pool_fwd", [p, p, p] + [i64] * 4 + [i32]),
                           ("pool_bwd", [p, p, p] + [i64] * 4 + [i32]),
                           ("pool_fwd32", [p, p, p] + [i64] * 4 + [i32]),
                           ("pool_bwd32", [p, p, p] + [i64] * 4 + [i32]),
                           ("conv3x3_wgrad", [p, p, p] + [i64] * 5 + [i32]),
                           ("conv3x3_wgrad32", [p, p, p] + [i64] * 5 + [i32]),
                           ("bn_gelu_fwd", [p, p, p, f64, p, p, p, p, i64, i64, i32]),
                           ("bn_gelu_bwd", [p] * 9 + [i64, i64, i32]),
                           ("bn_gelu_fwd32", [p, p, p, f64, p, p, p, p, i64, i64, i32]),
                           ("bn_gelu_bwd32", [p] * 9 + [i64, i64, i32]),
                           ("has_conv3x3_wgrad", []), ("has_conv3x3_wgrad32", [])):
            fn = getattr(lib, "ck_" + name)
            fn.argtypes, fn.restype = args, (i32 if name.startswith("has_") else None)
            setattr(self, "_" + name, fn)
        self._lib = lib

    @staticmethod
    def _check(t: torch.Tensor, name: str, dtypes: tuple = (torch.bfloat16,)) -> None:
        if not _channels_last(t, dtypes):
            kinds = " or ".join({torch.bfloat16: "bf16", torch.float32: "fp32"}[d] for d in dtypes)
            raise RuntimeError(f"{name} must be a 4-D {kinds} channels_last CPU tensor")

    @staticmethod
    def _check_vec(x: torch.Tensor, v: torch.Tensor, name: str) -> None:
        if not (v.device.type == "cpu" and v.dtype == torch.float32 and v.dim() == 1
                and v.shape[0] == x.shape[1] and v.is_contiguous()):
            raise RuntimeError(f"{name} must be a contiguous fp32 vector of C values")

    def has_conv3x3_wgrad(self) -> bool:
        return bool(self._has_conv3x3_wgrad())

    def has_conv3x3_wgrad32(self) -> bool:
        return bool(self._has_conv3x3_wgrad32())

    def pool_fwd(self, x: torch.Tensor, want_code: bool) -> tuple:
        """2x2 max-pool (bf16 or fp32): (output, 1-byte code of the winning pixel, empty unless
        want_code)."""
        self._check(x, "x", _ELEMENT_DTYPES)
        n, c, h, w = x.shape
        if h < 2 or w < 2:
            raise RuntimeError("x must be at least 2x2")
        out = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, memory_format=torch.channels_last)
        code = torch.empty(n if want_code else 0, h // 2, w // 2, c, dtype=torch.uint8)
        fn = self._pool_fwd32 if x.dtype == torch.float32 else self._pool_fwd
        fn(x.data_ptr(), out.data_ptr(), code.data_ptr() if want_code else None, n, c, h, w,
           torch.get_num_threads())
        return out, code

    def pool_bwd(self, g: torch.Tensor, code: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Its backward: every input-gradient element written once."""
        self._check(g, "grad", _ELEMENT_DTYPES)
        n, c, hh, ww = g.shape
        if not (code.dtype == torch.uint8 and code.is_contiguous() and tuple(code.shape) == (n, hh, ww, c)
                and h // 2 == hh and w // 2 == ww):
            raise RuntimeError("pool_bwd: code and shapes do not match the forward")
        gi = torch.empty(n, c, h, w, dtype=g.dtype, memory_format=torch.channels_last)
        fn = self._pool_bwd32 if g.dtype == torch.float32 else self._pool_bwd
        fn(g.data_ptr(), code.data_ptr(), gi.data_ptr(), n, c, h, w, torch.get_num_threads())
        return gi

    def conv3x3_wgrad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """3x3 stride-1 padding-1 convolution weight gradient: fp32 sums, channels_last."""
        if not self.has_conv3x3_wgrad():
            raise RuntimeError("conv3x3_wgrad: built without AVX-512 BF16")
        return self._wgrad("conv3x3_wgrad", self._conv3x3_wgrad, x, g, torch.bfloat16, ci_step=4)

    def conv3x3_wgrad32(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The same weight gradient in fp32 (AVX2 and FMA): fp32 in and out, channels_last."""
        if not self.has_conv3x3_wgrad32():
            raise RuntimeError("conv3x3_wgrad32: built without AVX2 and FMA")
        return self._wgrad("conv3x3_wgrad32", self._conv3x3_wgrad32, x, g, torch.float32, ci_step=2)

    def _wgrad(self, name: str, fn, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, ci_step: int):
        """Check the inputs of a weight-gradient kernel (its tiles take 16 output channels and
        ``ci_step`` input channels at a time) and call it into a new fp32 channels_last dW."""
        self._check(x, "x", (dtype,))
        self._check(g, "grad", (dtype,))
        n, ci, h, w = x.shape
        co = g.shape[1]
        if (g.shape[0], g.shape[2], g.shape[3]) != (n, h, w):
            raise RuntimeError(f"{name}: shapes differ")
        if co % 16 or ci % ci_step:
            raise RuntimeError(f"{name}: needs Co % 16 == 0 and Ci % {ci_step} == 0")
        out = torch.empty(co, ci, 3, 3, dtype=torch.float32, memory_format=torch.channels_last)
        fn(x.data_ptr(), g.data_ptr(), out.data_ptr(), n, ci, co, h, w, torch.get_num_threads())
        return out

    def bn_gelu_fwd(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple:
        """Training batch norm + exact GELU, fused (bf16 or fp32): (y, batch mean, biased
        variance, 1/std)."""
        self._check(x, "x", _ELEMENT_DTYPES)
        self._check_vec(x, weight, "weight")
        self._check_vec(x, bias, "bias")
        c = x.shape[1]
        if x.numel() == 0:
            raise RuntimeError("bn_gelu_fwd: empty input")
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, var, rstd = (torch.empty(c, dtype=torch.float32) for _ in range(3))
        fn = self._bn_gelu_fwd32 if x.dtype == torch.float32 else self._bn_gelu_fwd
        fn(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps, y.data_ptr(),
           mean.data_ptr(), var.data_ptr(), rstd.data_ptr(), x.numel() // c, c, torch.get_num_threads())
        return y, mean, var, rstd

    def bn_gelu_bwd(self, dy, x, mean, rstd, weight, bias) -> tuple:
        """Its backward: (dx, dweight, dbias)."""
        self._check(x, "x", _ELEMENT_DTYPES)
        self._check(dy, "grad", (x.dtype,))
        if dy.shape != x.shape:
            raise RuntimeError("bn_gelu_bwd: grad and x differ in shape")
        for v, name in ((mean, "mean"), (rstd, "rstd"), (weight, "weight"), (bias, "bias")):
            self._check_vec(x, v, name)
        c = x.shape[1]
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        gw, gb = torch.empty(c, dtype=torch.float32), torch.empty(c, dtype=torch.float32)
        fn = self._bn_gelu_bwd32 if x.dtype == torch.float32 else self._bn_gelu_bwd
        fn(dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.data_ptr(), bias.data_ptr(),
           dx.data_ptr(), gw.data_ptr(), gb.data_ptr(), x.numel() // c, c, torch.get_num_threads())
        return dx, gw, gb


def load(verbose: bool = False) -> str | None:
    """Build (or load from the cache) the native kernels; ``None`` on success, else the reason.

    Safe to call many times: the first outcome is remembered. Set ``CIFARKIT_NATIVE=0`` to skip
    them, ``CIFARKIT_NATIVE=always`` to use them wherever they apply, faster or not (see choose).
    """
    if _state["module"] is not None or _state["reason"] is not None:
        return _state["reason"]
    reason = _unavailable()
    if reason is None:
        name = _build_name()
        target = _build_dir() / name / f"{name}.so"
        try:
            if not target.exists():
                _compile(target, verbose)
            _state["module"] = _Native(target)
        except Exception as exc:  # noqa: BLE001 - any build failure means: use PyTorch's kernels
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"building them failed ({first[:200]})"
    _state["reason"] = reason
    return reason


def _unavailable() -> str | None:
    if os.environ.get("CIFARKIT_NATIVE", "1") == "0":
        return "CIFARKIT_NATIVE=0"
    if platform.system() != "Linux":
        return f"only built on Linux (this is {platform.system()})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (install g++, or set CXX)"
    return None


def loaded() -> bool:
    return _state["module"] is not None


@contextlib.contextmanager
def disabled():
    """Use PyTorch's kernels inside this block even when the native ones are loaded."""
    _state["off"] += 1
    try:
        yield
    finally:
        _state["off"] -= 1


# ----------------------------------------------------------------------------- choosing per shape
# The kernels were tuned on one CPU (an AMD Zen 5 without AMX). On another CPU PyTorch's own op can
# be the faster one: with AMX (Intel Sapphire Rapids and later) oneDNN's convolution weight
# gradient runs on the matrix units and the native one took 1.56x as long per fast-recipe step.
# So before training, each native op is timed against PyTorch's on every shape the networks will
# feed it, and the faster is kept, shape by shape. The decisions are cached beside the build
# (they depend on the CPU, the thread count and the build), so only the first run pays for them.

_ELEMENT_DTYPES = (torch.bfloat16, torch.float32)   # what the max-pool and the fused batch norm + GELU read

MARGIN = 0.02   # another implementation must be at least 2 % faster: a tie goes to PyTorch's


def _pool_key(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> str:
    # bf16 keys keep their first name (choices cached before fp32 existed still count)
    prefix = "pool" if dtype == torch.bfloat16 else "fp32 pool"
    return f"{prefix} {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"


def _conv_key(conv: torch.nn.Conv2d, x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> str:
    # bf16 keys keep their first name, so choices cached before fp32 was timed still count
    prefix = "wgrad" if dtype == torch.bfloat16 else "fp32 conv"
    return f"{prefix} {conv.in_channels}->{conv.out_channels} {x.shape[2]}x{x.shape[3]}"


def _bn_key(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> str:
    prefix = "bngelu" if dtype == torch.bfloat16 else "fp32 bngelu"   # bf16 keeps its first name
    return f"{prefix} {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"


def _wanted(key: str) -> bool:
    """Use the native max-pool (or fused batch norm + GELU) for this shape?"""
    choice = _state["choice"]
    return choice is None or choice.get(key, "pytorch") == "native"


def _wgrad_impl(key: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """How to compute the weight gradient of a 3x3 convolution of this shape: "native",
    "matmul", "gemm" (the whole convolution as matrix products) or "pytorch" (shapes never timed
    get PyTorch's: never slower than PyTorch). Not measured (choice None): the native weight
    gradient of that dtype where it is built, PyTorch's otherwise."""
    choice = _state["choice"]
    if choice is None:
        return "native" if _native_wgrad(dtype) else "pytorch"
    return choice.get(key, "pytorch")


def _shapes(models, sizes, dtype: torch.dtype = torch.bfloat16) -> dict:
    """{key: (op, shape of one input image)} for every layer at every image side that has an
    implementation besides PyTorch's in ``dtype``. In fp32: the 3x3 convolutions ("conv32") and,
    where the kernels are built, the max-pools ("pool32") and batch norms + GELU ("bngelu32")."""
    found = {}
    fp32 = dtype == torch.float32
    pools = not fp32 or _state["module"] is not None

    def hook(module, inputs, _out):
        x = inputs[0]
        if isinstance(module, Conv3x3):
            if _conv_static_ok(module):
                found[_conv_key(module, x, dtype)] = ("conv32" if fp32 else "wgrad", module.in_channels,
                                                      module.out_channels, *x.shape[2:])
        elif x.shape[2] >= 2 and x.shape[3] >= 2 and pools:
            found[_pool_key(x, dtype)] = ("pool32" if fp32 else "pool", *x.shape[1:])
    for model in models:
        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, (MaxPool2x2, Conv3x3))]
        was_training = model.training
        model.eval()
        _state["record"] = (found, dtype) if pools else None   # bn_gelu adds its shapes
        try:
            with torch.no_grad(), disabled():
                for size in sizes:
                    model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
        finally:
            _state["record"] = None
            model.train(was_training)
            for h in handles:
                h.remove()
    return found


DROP = 1.5     # after the first timed round, an implementation this much slower than the fastest is not timed again
SCREEN = 3.0   # nor, from its warm-up on, one whose warm-up took this much longer than the fastest (not PyTorch's)


def _best_ms(fns: dict, repeats: int, common=None, using: tuple = ()) -> dict:
    """Fastest of ``repeats`` runs of each function in milliseconds, run in turns after one
    warm-up each. The fastest, not the median: the decision is cached for good, and other work
    on the machine only ever adds time (a run stalled by another process must not decide).

    An implementation whose first timed run took more than DROP times the fastest first run
    keeps that one time and is not run again: its minimum could only win if that run had been
    stalled by half, and the slow candidates (the whole convolution as one matrix product on
    large images: 2-5x) cost most of the timing. On a Zen 4 108 of the 300 timings of the fast
    recipe's shapes were that much slower (benchmarks/kernel_setup.py, docs/benchmarks.md section 7).
    One whose warm-up already took SCREEN times the fastest warm-up keeps that time and is not
    run at all: the whole convolution as matrix products on 9x9 pixels and more, 2.5-15x the
    fastest on the Zen 4 (docs/benchmarks.md section 7). PyTorch's own op is always timed, so
    that what is kept is never slower.

    ``common``: work that the implementations named in ``using`` all do alike (``fns`` time only
    where they differ); it is timed once per round, and its fastest run is added to theirs. It
    only matters against the others, so once none of those is timed any more, neither is it."""
    import time
    fns = dict(fns, **({"common": common} if common is not None else {}))
    times = {k: [] for k in fns}

    def whole(run: dict, keys) -> dict:   # each one's time of that run, the common work added
        return {k: run[k] + (run["common"] if k in using else 0.0) for k in keys if k != "common"}
    warm = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warm[k] = (time.perf_counter() - t0) * 1e3
    warm_whole = whole(warm, fns)
    live = [k for k in fns if k in ("pytorch", "common") or warm_whole[k] <= SCREEN * min(warm_whole.values())]
    for k in set(warm_whole) - set(live):
        times[k].append(warm[k])
    for r in range(repeats):
        for k in live:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if r == 0:
            first = whole({k: times[k][0] for k in live}, live)
            live = [k for k in first if first[k] <= DROP * min(first.values())]
            if common is not None and any(k not in using for k in live):
                live.append("common")
    best = {k: min(v) for k, v in times.items()}
    extra = best.pop("common", 0.0)
    return {k: v + (extra if k in using else 0.0) for k, v in best.items()}


def _pytorch_pool(x):
    return F.max_pool2d(x, 2)


def _pytorch_conv3x3(x, weight):
    return F.conv2d(x, weight, None, 1, 1)


def _pytorch_conv3x3_backward(x, weight, g, mask: list):
    """PyTorch's own backward of :func:`_pytorch_conv3x3`: (input grad, weight grad, bias grad),
    each computed where ``mask`` asks."""
    return torch.ops.aten.convolution_backward(g, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, mask)


def _pytorch_input_grad(x, weight, g):
    return _pytorch_conv3x3_backward(x, weight, g, [True, False, False])[0]


def _pytorch_wgrad(x, weight, g):
    return _pytorch_conv3x3_backward(x, weight, g, [False, True, False])[1]


def _pytorch_bn_gelu(x, weight, bias):
    return F.gelu(F.batch_norm(x, None, None, weight, bias, True, 0.4, 1e-12))


GEMM_SIDE = 6   # the whole convolution as matrix products is timed on images of at most this side


def _wgrad_candidates(dtype: torch.dtype = torch.bfloat16, side: int = 1) -> tuple:
    """The convolution implementations `choose` times besides PyTorch's on images of ``side``
    pixels: the weight gradient in C++ (bf16, where built) or as nine matrix products, and the
    whole convolution as matrix products (CIFARKIT_GEMM_CONV=0 leaves that one out). On the AMX
    Xeon it made the fast recipe's step on 16-24 px images 0.74-0.92 of the time, and 13-epoch
    runs with and without it reached the same accuracy over six seeds (90.55 against 90.58 %,
    docs/benchmarks.md). In fp32 on an AMD Zen 3 it took 0.33-0.89 of oneDNN's time on 1x1 to
    3x3-pixel images (section 6). Only up to GEMM_SIDE pixels: on 7x7 and more oneDNN's
    convolution was 2-4x faster on the Xeon, and the fastest way 2-13x on a Zen 4, where that
    one timed run of it took about 3 s of the chooser's 22 (docs/benchmarks.md section 7)."""
    found = ("native", "matmul") if _native_wgrad(dtype) else ("matmul",)
    return found if os.environ.get("CIFARKIT_GEMM_CONV") == "0" or side > GEMM_SIDE else found + ("gemm",)


def _normal(*shapes, dtype: torch.dtype) -> list:
    """Standard normal tensors of these (N, C, H, W) shapes, channels_last in ``dtype``, for timing:
    consecutive slices of one block of values, kept until `choose` is done. A block too small is
    replaced by one at least twice its size (grown to each larger need, the recipe's shapes had
    regenerated it 12 times). Generating each shape's own inputs took 3.6 of the chooser's 21.7 s
    on a Zen 4; the times do not depend on the values."""
    need = sum(math.prod(s) for s in shapes)
    block = _state.get("noise")
    if block is None or block.numel() < need:
        size = max(need, 2 * block.numel()) if block is not None else need
        block = _state["noise"] = torch.randn(size, generator=torch.Generator().manual_seed(0))
    out, at = [], 0
    for n, c, h, w in shapes:
        size = n * c * h * w
        out.append(block[at:at + size].view(n, h, w, c).permute(0, 3, 1, 2).to(dtype))
        at += size
    return out


def _time_op(spec: tuple, batch: int, repeats: int) -> dict:
    """Forward + backward on random inputs of one shape (bf16, or fp32 for "pool32", "bngelu32"
    and "conv32"): PyTorch's op and each other implementation ({"pytorch": ms, "native": ms[,
    "matmul": ms]})."""
    dtype = torch.float32 if spec[0] in ("pool32", "bngelu32", "conv32") else torch.bfloat16
    if spec[0] in ("pool", "pool32"):
        _, c, h, w = spec
        x, gy = _normal((batch, c, h, w), (batch, c, h // 2, w // 2), dtype=dtype)
        x.requires_grad_()
        fns = {impl: lambda op=op: torch.autograd.grad(op(x), x, gy)
               for impl, op in (("pytorch", _pytorch_pool), ("native", _MaxPool2x2.apply))}
    elif spec[0] in ("bngelu", "bngelu32"):
        _, c, h, w = spec
        x, gy = _normal((batch, c, h, w), (batch, c, h, w), dtype=dtype)
        x.requires_grad_()
        weight, bias = torch.ones(c), torch.zeros(c, requires_grad=True)
        ops = {"pytorch": lambda: _pytorch_bn_gelu(x, weight, bias),
               "native": lambda: _BNGELU.apply(x, weight, bias, 1e-12)[0]}
        fns = {impl: lambda op=op: torch.autograd.grad(op(), (x, bias), gy) for impl, op in ops.items()}
    else:   # "wgrad": bf16 (as training runs under autocast); "conv32": fp32
        _, ci, co, h, w = spec
        x, weight, gy = _normal((batch, ci, h, w), (co, ci, 3, 3), (batch, co, h, w), dtype=dtype)
        # PyTorch's, the C++ and the nine-product ways differ only in the weight gradient: the
        # forward and the input gradient are PyTorch's in all three, so they are timed once
        # (`common`) instead of once per way. PyTorch's own backward computes the two gradients
        # in one call, which took 0.98-1.06 of the two computed apart on seven of the fast
        # recipe's shapes on a Zen 4, three runs (within MARGIN but on 3x3 px, where the error
        # favours PyTorch's); timing the 13-epoch recipe's shapes took 24.8 s instead of 38.3-38.7 (and
        # 20.3-25.7 s with SCREEN too). `benchmarks/kernel_setup.py`, docs/benchmarks.md section 7.
        grads = {"pytorch": lambda: _pytorch_wgrad(x, weight, gy)}
        cands = _wgrad_candidates(dtype, max(h, w))
        if "native" in cands and dtype == torch.float32:
            grads["native"] = lambda: _state["module"].conv3x3_wgrad32(x, gy)
        elif "native" in cands:
            grads["native"] = lambda: _state["module"].conv3x3_wgrad(x, gy).to(torch.bfloat16)
        if "matmul" in cands:
            grads["matmul"] = lambda: matmul_wgrad(x, gy)
        using = tuple(grads)
        if "gemm" in cands:   # all three of its products differ: timed whole
            grads["gemm"] = lambda: (gemm_conv3x3(x, weight), gemm_conv3x3_backward(x, weight, gy, True, True))
        return _best_ms(grads, repeats, common=lambda: (_pytorch_conv3x3(x, weight),
                                                        _pytorch_input_grad(x, weight, gy)),
                        using=using)
    return _best_ms(fns, repeats)


def _pick(ms: dict) -> str:
    """The fastest implementation, if it beats PyTorch's by MARGIN; else "pytorch"."""
    best = min((k for k in ms if k != "pytorch"), key=ms.get)
    return best if ms[best] < (1 - MARGIN) * ms["pytorch"] else "pytorch"


def cache_key(key: str, batch: int, threads: int | None = None) -> str:
    """A decision's name in the cache: the shape's key, the thread count and the batch it was
    timed at. The batch is part of it because the fastest way changes with it: on a Zen 4 the
    224->224 convolution's weight gradient on 7x7 images timed at 32 images was a tie (C++
    11.3 ms, PyTorch's 11.4: PyTorch's kept), at 256 the C++ one was 5 % faster (75.4 against
    79.6) and at 2,000 20 % (198 against 246; docs/benchmarks.md section 7). Before, the tests'
    small runs, sharing the cache beside the build, decided for the user's later runs at 256."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{threads} threads, batch {batch}, {key}"


def _cache_path() -> Path:
    """Beside the build; without one (fp32 needs none), in the user's cache under the name the
    build would have: a new CPU, torch or Python gets its own file, as the build does."""
    if _state["module"] is not None:
        return Path(_state["module"].__file__).with_name("choices.json")
    from .config import user_cache_root
    return user_cache_root() / f"{_build_name()}-choices.json"


def choose(models, sizes, batch: int = 256, repeats: int = 3, cache: Path | None = None,
           precision: str = "bf16") -> dict:
    """Time each native op (and the weight gradient's matrix products) against PyTorch's on the
    shapes ``models`` feed it at the image ``sizes``, and use the fastest, PyTorch's unless
    another is faster by MARGIN. Decisions are read from and added
    to ``cache`` (default: beside the build). Returns ``{op: [native shapes, all shapes],
    "timed": shapes timed now}`` (for "wgrad" the first number counts shapes not left to PyTorch;
    "wgrad_by" says how many each implementation got). In bf16 it does nothing (returns {})
    unless the kernels are loaded. ``precision="fp32"`` times the 3x3 convolutions in fp32 against
    their matrix-product forms, which are PyTorch ops and need no build, and where the kernels are
    built also against the fp32 C++ weight gradient, and the max-pools and batch norms + GELU
    against the fp32 C++ ones (nothing with CIFARKIT_NATIVE=0)."""
    fp32 = precision == "fp32"
    if (_state["module"] is None and not fp32) or (fp32 and os.environ.get("CIFARKIT_NATIVE") == "0"):
        return {}
    if os.environ.get("CIFARKIT_NATIVE") == "always":   # for measuring the kernels themselves
        _state["choice"] = None
        return {"always": True}
    dtype = torch.float32 if fp32 else torch.bfloat16
    cache = Path(cache) if cache is not None else _cache_path()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    threads = torch.get_num_threads()
    choice, summary, timed = {}, {"pool": [0, 0], "wgrad": [0, 0], "bngelu": [0, 0], "wgrad_by": {}}, 0
    try:
        for key, spec in sorted(_shapes(models, sizes, dtype).items()):
            name = cache_key(key, batch, threads)
            entry = known.get(name)
            cands = _wgrad_candidates(dtype, max(spec[-2:])) if spec[0] in ("wgrad", "conv32") else ("native",)
            wanted = {"use", "pytorch", *cands}
            if entry is None or not wanted <= entry.keys():   # new, or cached before a candidate existed
                ms = _time_op(spec, batch, repeats)
                use = _pick(ms)
                # native_faster: what cifarkit before 2026-11-30 reads from this shared file
                entry = {**ms, "batch": batch, "use": use, "native_faster": use == "native"}
                known[name] = entry
                timed += 1
            use = entry["use"]
            # chosen before CIFARKIT_GEMM_CONV=0 was set, or above GEMM_SIDE before it existed: the best of the rest
            if use not in wanted:
                use = _pick({impl: entry[impl] for impl in wanted - {"use"}})
            choice[key] = use
            op = {"conv32": "wgrad", "pool32": "pool", "bngelu32": "bngelu"}.get(spec[0], spec[0])
            summary[op][0] += choice[key] != "pytorch"
            summary[op][1] += 1
            if op == "wgrad":
                summary["wgrad_by"][choice[key]] = summary["wgrad_by"].get(choice[key], 0) + 1
    finally:
        _state["noise"] = None   # the timing inputs' values (_normal)
    if timed:
        try:   # a cache that cannot be written only costs the timing again next time
            cache.parent.mkdir(parents=True, exist_ok=True)   # fp32's, in the user's cache
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp, cache)
        except OSError:
            pass
    _state["choice"] = choice
    return {**summary, "timed": timed, **({"fp32": True} if fp32 else {})}


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, code = _state["module"].pool_fwd(x, x.requires_grad)
        ctx.save_for_backward(code)
        ctx.hw = (x.shape[2], x.shape[3])
        return out

    @staticmethod
    def backward(ctx, g):
        code, = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        return _state["module"].pool_bwd(g, code, *ctx.hw)


def _plain_eager() -> bool:
    """Not inside tracing, scripting, torch.compile or ONNX export: they see PyTorch's ops only."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def _channels_last(x: torch.Tensor, dtypes: tuple) -> bool:
    """A channels_last 4-D CPU tensor of one of ``dtypes``."""
    return (x.device.type == "cpu" and x.dtype in dtypes and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last))


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, with the native kernel when it is loaded and ``x`` suits it (bf16
    or fp32 channels_last)."""
    if (_state["module"] is not None and not _state["off"]
            and _channels_last(x, _ELEMENT_DTYPES) and x.numel() > 0 and _plain_eager()
            and x.shape[2] >= 2 and x.shape[3] >= 2 and _wanted(_pool_key(x, x.dtype))):
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2)


class MaxPool2x2(torch.nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (same repr, no state) that uses the native kernel when loaded."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)


class _BNGELU(torch.autograd.Function):
    """gelu(batch_norm(x)) with the batch's statistics, as one native op (csrc/native.cpp):
    returns (y, batch mean, biased batch variance); the last two carry no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var, rstd = _state["module"].bn_gelu_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx, dw, db = _state["module"].bn_gelu_bwd(gy, x, mean, rstd, weight, bias)
        return dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None, None


def _has_hooks(*modules) -> bool:
    m = torch.nn.modules.module   # its global hooks see every module: the fused op would skip them
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or any(
        mod._forward_hooks or mod._forward_pre_hooks for mod in modules))


def _bn_eligible(bn: torch.nn.BatchNorm2d, act: torch.nn.Module, x: torch.Tensor) -> bool:
    """A training-mode BatchNorm2d (batch statistics, running ones updated) with fp32 affine
    parameters, then an exact GELU, on a bf16 or fp32 channels_last CPU batch of more than one
    value per channel, outside tracing and compiling; no hooks to bypass."""
    return (bn.training and bn.track_running_stats and bn.running_mean is not None and bn.affine
            and type(act) is torch.nn.GELU and act.approximate == "none"
            and bn.weight.dtype == torch.float32 and bn.bias.dtype == torch.float32
            and _channels_last(x, _ELEMENT_DTYPES) and x.numel() > x.shape[1] and _plain_eager()
            and not _has_hooks(bn, act))


def bn_gelu(bn: torch.nn.BatchNorm2d, act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(bn(x))``: fused into one native op (statistics, normalisation and GELU in two passes
    over x, and two in the backward) when the kernels are loaded, ``bn`` is in training mode,
    ``act`` is an exact ``nn.GELU`` and ``x`` a bf16 or fp32 channels_last CPU batch; else the two
    modules.
    The running statistics and ``num_batches_tracked`` are updated as ``nn.BatchNorm2d`` does."""
    if _state["record"] is not None and x.dim() == 4:   # `choose` is collecting shapes
        found, dtype = _state["record"]
        found[_bn_key(x, dtype)] = ("bngelu32" if dtype == torch.float32 else "bngelu", *x.shape[1:])
    if not (_state["module"] is not None and not _state["off"] and _bn_eligible(bn, act, x)
            and _wanted(_bn_key(x, x.dtype))):
        return act(bn(x))
    y, mean, var = _BNGELU.apply(x, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():   # as _BatchNorm.forward: momentum None = cumulative average
        bn.num_batches_tracked.add_(1)
        f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        n = x.numel() // x.shape[1]
        bn.running_mean.mul_(1 - f).add_(mean, alpha=f)
        bn.running_var.mul_(1 - f).add_(var * (n / (n - 1)), alpha=f)
    return y


def conv_wgrad_available() -> bool:
    """The native 3x3 convolution weight gradient is built (needs AVX-512 BF16) and switched on."""
    return _native_wgrad(torch.bfloat16)


def _native_wgrad(dtype: torch.dtype) -> bool:
    """The native weight gradient in ``dtype`` is built and switched on: bf16 needs AVX-512 BF16,
    fp32 AVX2 and FMA."""
    m = _state["module"]
    if m is None or _state["off"]:
        return False
    return bool(m.has_conv3x3_wgrad32() if dtype == torch.float32 else m.has_conv3x3_wgrad())


def matmul_wgrad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a bias-free 3x3, stride-1, padding-1 convolution as nine matrix
    products, one per kernel tap (i, j): grad[:, :, i, j] = G^T X_ij, where G is the output
    gradient as an (images x pixels) x out-channels matrix and X_ij the zero-padded input shifted
    by the tap, as (images x pixels) x in-channels. bf16 in and out, the sums in fp32 inside the
    matrix product and rounded once, as PyTorch's own weight gradient is.

    Written with PyTorch's ops rather than in C++: the matrix products are oneDNN's, which use
    AMX where the CPU has it, and on small images (6x6 pixels and less) they beat oneDNN's
    convolution weight gradient there (`choose` measures it; docs/benchmarks.md)."""
    n, c, h, w = x.shape
    co = g.shape[1]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))                   # N, H+2, W+2, C
    # G^T made contiguous once: a transposed left operand with a long summed side was about
    # 2x slower in the matrix product than a copy plus the plain product
    gt = g.permute(1, 0, 2, 3).reshape(co, n * h * w)
    out = torch.empty(co, 3, 3, c, dtype=g.dtype, device=g.device)
    for i in range(3):
        for j in range(3):
            torch.mm(gt, xp[:, i:i + h, j:j + w].reshape(n * h * w, c), out=out[:, i, j])
    return out.permute(0, 3, 1, 2)                                            # channels_last


def _im2col(x: torch.Tensor) -> torch.Tensor:
    """The zero-padded 3x3 neighbourhoods of a channels_last (N, C, H, W) tensor as an
    (N*H*W) x (9*C) matrix, taps in (row, column, channel) order."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))                   # N, H+2, W+2, C
    return torch.cat([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], 3).view(n * h * w, 9 * c)


def gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free 3x3, stride-1, padding-1 convolution as one matrix product of the input's
    neighbourhoods (im2col) with the filters; bf16 in and out (fp32 sums inside the product).

    Written with PyTorch's ops: on small images (the last groups of a network at 16-24 px, 1x1
    to 3x3 pixels) oneDNN's convolution ran at 54-122 GFLOP/s on the AMX Xeon, the same work as
    one matrix product at about 550 (docs/benchmarks.md); `choose` measures it per shape
    (unless CIFARKIT_GEMM_CONV=0)."""
    n, _, h, w = x.shape
    co = weight.shape[0]
    if h == 1 and w == 1:   # only the centre tap meets the image, the other 8 see padding: 9x less work
        return (x.reshape(n, -1) @ weight[:, :, 1, 1].t()).view(n, co, 1, 1)
    wm = weight.permute(0, 2, 3, 1).reshape(co, -1)                          # co x (3, 3, ci)
    return (_im2col(x) @ wm.t()).view(n, h, w, co).permute(0, 3, 1, 2)       # channels_last


def gemm_conv3x3_backward(x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, input_grad: bool,
                          weight_grad: bool) -> tuple:
    """(input gradient or None, weight gradient or None) of :func:`gemm_conv3x3`, each one matrix
    product: the input gradient is the output gradient convolved with the filters flipped and
    their channel sides swapped; the weight gradient is G^T times the input's neighbourhoods."""
    n, ci, h, w = x.shape
    co = weight.shape[0]
    gx = gw = None
    if h == 1 and w == 1:   # the centre tap alone, as in the forward; the other taps' gradient is 0
        g2 = g.reshape(n, co)
        if input_grad:
            gx = (g2 @ weight[:, :, 1, 1]).view(n, ci, 1, 1)
        if weight_grad:
            gw = torch.zeros(co, 3, 3, ci, dtype=g.dtype, device=g.device)
            gw[:, 1, 1] = g2.t() @ x.reshape(n, ci)
            gw = gw.permute(0, 3, 1, 2)                                       # channels_last
        return gx, gw
    if input_grad:
        wf = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * co, ci)       # (3, 3, co) x ci
        gx = (_im2col(g) @ wf).view(n, h, w, ci).permute(0, 3, 1, 2)
    if weight_grad:
        # G^T made contiguous once, as in matmul_wgrad
        gt = g.permute(1, 0, 2, 3).reshape(co, n * h * w)
        gw = (gt @ _im2col(x)).view(co, 3, 3, ci).permute(0, 3, 1, 2)
    return gx, gw


class _Conv3x3(torch.autograd.Function):
    """A bias-free 3x3, stride-1, padding-1 convolution in bf16 whose weight gradient is computed
    by the native ``conv3x3_wgrad`` (fp32 sums, rounded to bf16 like PyTorch's, handed to the fp32
    weight) or by :func:`matmul_wgrad` (``impl``); the forward and the gradient to the input are
    then PyTorch's (oneDNN's), which run near the CPU's bf16 peak on all but the smallest images.
    ``impl="gemm"``: forward and both gradients as one matrix product each (:func:`gemm_conv3x3`).
    In fp32 (an fp32 input outside bf16 autocast) the same, all in fp32, "native" being the AVX2
    kernel ``conv3x3_wgrad32``."""

    @staticmethod
    def forward(ctx, x, weight, impl="native"):
        dtype = _compute_dtype(x)
        xb = x.to(dtype).contiguous(memory_format=torch.channels_last)
        wb = weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = gemm_conv3x3(xb, wb) if impl == "gemm" else F.conv2d(xb, wb, None, 1, 1)
        ctx.save_for_backward(xb, wb)
        ctx.impl = impl
        ctx.in_dtype = x.dtype
        ctx.weight_channels_last = weight.is_contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    def backward(ctx, g):
        xb, wb = ctx.saved_tensors
        g = g.to(xb.dtype).contiguous(memory_format=torch.channels_last)
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.impl == "gemm":
            gx, gw = gemm_conv3x3_backward(xb, wb, g, need_x, need_w)
        else:
            gx = gw = None
            if need_x:
                gx = torch.ops.aten.convolution_backward(
                    g, xb, wb, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
            # Rounded to bf16, as PyTorch's bf16 weight gradient is: the fast recipe trained 0.3
            # points better so (seeds 0-2: 91.21 % against 90.90 % with the fp32 sums kept;
            # docs/benchmarks.md), though the fp32 sums are the more exact gradient.
            if need_w and ctx.impl == "matmul":
                gw = matmul_wgrad(xb, g)
            elif need_w and xb.dtype == torch.float32:
                gw = _state["module"].conv3x3_wgrad32(xb, g)
            elif need_w:
                gw = _state["module"].conv3x3_wgrad(xb, g).to(torch.bfloat16)
        if gx is not None:
            gx = gx.to(ctx.in_dtype)
        if gw is not None:
            gw = gw.to(torch.float32, memory_format=torch.channels_last if ctx.weight_channels_last
                       else torch.contiguous_format)
        return gx, gw, None


def _conv_static_ok(conv: torch.nn.Conv2d) -> bool:
    """The layer's own settings are ones the native weight gradient handles."""
    return (conv.bias is None and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.out_channels % 16 == 0
            and conv.in_channels % 4 == 0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a CPU convolution of ``x`` runs in: bf16 (a bf16 input, or under bf16 autocast),
    fp32 (an fp32 input, no autocast) or None (anything else: left to PyTorch)."""
    if x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                     and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return torch.bfloat16
    if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return None


def _conv_dtype(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.dtype | None:
    """The dtype this training-step convolution runs in if `choose` may steer it, else None."""
    if not (torch.is_grad_enabled() and conv.weight.requires_grad and _conv_static_ok(conv)
            and x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0
            and conv.weight.dtype == torch.float32 and _plain_eager()):
        return None
    return _compute_dtype(x)


class Conv3x3(torch.nn.Conv2d):
    """``nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)`` (same parameters and state dict)
    whose training step on a CPU uses what `choose` picked for its shape: in bf16 (when the
    kernels are loaded) the native weight gradient, nine matrix products or the whole convolution
    as matrix products; in fp32 the same three, the native one being the AVX2 fp32 kernel (the
    matrix products need no build). Anywhere else (eval, GPU, export, shapes never chosen) it is
    exactly ``nn.Conv2d``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no module test here: fp32's matrix products need no build; without a `choose`,
        # _wgrad_impl gives the native weight gradient of the dtype where it is built
        dtype = None if _state["off"] else _conv_dtype(self, x)
        if dtype is not None:
            impl = _wgrad_impl(_conv_key(self, x, dtype), dtype)
            if impl != "pytorch":
                return _Conv3x3.apply(x, self.weight, impl)
        return super().forward(x)
