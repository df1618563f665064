"""Choosing the device, precision and thread count: passed in everywhere, never assumed."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import CifarkitError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarkitError("--device cuda was asked for but no CUDA GPU is available here",
                            "use --device cpu (or auto)", exit_code=2)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CifarkitError("--device mps was asked for but Apple's MPS is not available here",
                            "use --device cpu (or auto)", exit_code=2)
    if name not in ("cpu", "cuda", "mps"):
        raise CifarkitError(f"unknown device {name!r}", "use auto, cpu, cuda or mps", exit_code=2)
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 convolutions/matmuls are several times faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise CifarkitError("--precision fp16 is not supported on the CPU",
                            "use --precision bf16 (fast on CPUs with AVX-512 BF16/AMX) or fp32",
                            exit_code=2)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CifarkitError("this GPU cannot do --precision bf16", "use --precision fp16 or fp32",
                            exit_code=2)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("this CPU has no native bf16: --precision bf16 will be emulated and slow")
    return precision


def precision_note(asked: str, device: torch.device, resolved: str) -> str:
    """Why ``auto`` resolved to fp32 on a CPU (see resolve_precision), for the run's start line."""
    if asked == "auto" and device.type == "cpu" and resolved == "fp32":
        return " (auto: this CPU has no native bf16)"
    return ""


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    A training step allocates and frees the same multi-megabyte activations every step. glibc
    serves blocks above its mmap threshold (128 KiB until it adapts) with fresh mmap()s, so every
    step pays page faults on zeroed pages: measured here, tudui at batch 64 runs at ~5,000 img/s
    with the default and ~7,500 img/s with these settings (see docs/benchmarks.md). Done by hand
    through ctypes because PyTorch exposes no such knob; a no-op where glibc is absent.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("CIFARKIT_MALLOC_TUNE", "1") == "0":
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)   # blocks up to 256 MiB come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)     # and the heap is not trimmed after each step
    except (OSError, AttributeError):
        pass


def set_threads(threads: int = 0) -> int:
    """One intra-op thread per available core (more only adds contention on small convs)."""
    tune_malloc()
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
