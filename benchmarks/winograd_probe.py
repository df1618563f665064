"""Would Winograd's F(2x2, 3x3) convolution beat oneDNN's on this CPU? A probe, not used in training.

F(2x2, 3x3) computes each 2x2 block of a 3x3 convolution's output from a 4x4 block of its input
with 16 multiplications per in/out channel pair instead of 36: 2.25x fewer (less on odd sides,
whose last block is half outside the image: 7x7 pixels cost 8x8; and less again against oneDNN's
direct convolution, which skips the taps on the zero padding: docs/benchmarks.md section 7). The multiplications become 16
matrix products (one per position of the 4x4 block), between transforms of the input, the
filters and the output that are sums and differences only (Lavin and Gray, 2015).

For each 3x3 convolution of the fast recipe's network this prints, at one batch size:
- the relative error of the forward pass, of the gradient to the input and of the gradient to
  the filters, against a float64 reference, for oneDNN's ops and for this one, in bf16 or fp32;
- the forward and both gradients' milliseconds, oneDNN's and this one's, and this one's
  16 matrix products alone: if those alone are no faster than oneDNN's whole convolution, no
  implementation of the transforms can make Winograd pay.

It is written with PyTorch ops on purpose (a probe, meant to be read): the transforms are
strided additions into the layout the matrix products read, the products one ``torch.bmm``
and the gradient to the filters reuses the forward's transformed input.

    python benchmarks/winograd_probe.py [--batch 500] [--repeats 5] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# G: the filter transform of F(2x2, 3x3); B^T (input) and A^T (output) are written out as the
# additions in input_transform and output_transform.
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
LAYERS = [(24, 64, 31), (64, 64, 15), (64, 224, 15), (224, 224, 7), (224, 320, 7), (320, 320, 3)]


def filter_transform(w: torch.Tensor) -> torch.Tensor:
    """(Co, Ci, 3, 3) filters -> (16, Ci, Co): G w G^T per channel pair, computed in fp32."""
    u = torch.einsum("ka,oiab,lb->klio", G, w.float(), G)
    return u.reshape(16, w.shape[1], w.shape[0]).to(w.dtype).contiguous()


def input_transform(x: torch.Tensor) -> tuple:
    """(N, H, W, C) images -> (16, N*Th*Tw, C): B^T d B of every 4x4 block d of the zero-padded
    input taken every 2 pixels, and the sizes (n, h, w, th, tw)."""
    n, h, w, c = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (0, 0, 1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    d = [xp[:, i:i + 2 * th:2] for i in range(4)]          # the 4 rows of every block
    r = torch.empty(4, n, th, 2 * tw + 2, c, dtype=x.dtype)
    torch.sub(d[0], d[2], out=r[0])
    torch.add(d[1], d[2], out=r[1])
    torch.sub(d[2], d[1], out=r[2])
    torch.sub(d[1], d[3], out=r[3])
    v = torch.empty(4, 4, n, th, tw, c, dtype=x.dtype)
    for k in range(4):                                      # then the 4 columns
        e = [r[k][:, :, j:j + 2 * tw:2] for j in range(4)]
        torch.sub(e[0], e[2], out=v[k, 0])
        torch.add(e[1], e[2], out=v[k, 1])
        torch.sub(e[2], e[1], out=v[k, 2])
        torch.sub(e[1], e[3], out=v[k, 3])
    return v.view(16, n * th * tw, c), (n, h, w, th, tw)


def output_transform(m: torch.Tensor, dims: tuple) -> torch.Tensor:
    """(16, N*Th*Tw, Co) products -> (N, H, W, Co) output: A^T m A per block."""
    n, h, w, th, tw = dims
    co = m.shape[2]
    m = m.view(4, 4, n, th, tw, co)
    s = torch.empty(2, 4, n, th, tw, co, dtype=m.dtype)
    torch.add(m[0], m[1], out=s[0])
    s[0].add_(m[2])
    torch.sub(m[1], m[2], out=s[1])
    s[1].sub_(m[3])
    y = torch.empty(n, th, 2, tw, 2, co, dtype=m.dtype)
    for a in range(2):
        torch.add(s[a][0], s[a][1], out=y[:, :, a, :, 0])
        y[:, :, a, :, 0].add_(s[a][2])
        torch.sub(s[a][1], s[a][2], out=y[:, :, a, :, 1])
        y[:, :, a, :, 1].sub_(s[a][3])
    y = y.view(n, 2 * th, 2 * tw, co)
    return y if (2 * th, 2 * tw) == (h, w) else y[:, :h, :w].contiguous()


def grad_transform(g: torch.Tensor, dims: tuple) -> torch.Tensor:
    """(N, H, W, Co) output gradient -> (16, N*Th*Tw, Co): A g A^T per 2x2 block (the
    transpose of output_transform), zero where a block lies outside the image."""
    n, h, w, th, tw = dims
    co = g.shape[3]
    gp = F.pad(g, (0, 0, 0, 2 * tw - w, 0, 2 * th - h)).view(n, th, 2, tw, 2, co)
    t = torch.empty(4, n, th, tw, 2, co, dtype=g.dtype)
    y0, y1 = gp[:, :, 0], gp[:, :, 1]
    t[0].copy_(y0)
    torch.add(y0, y1, out=t[1])
    torch.sub(y0, y1, out=t[2])
    torch.neg(y1, out=t[3])
    out = torch.empty(4, 4, n, th, tw, co, dtype=g.dtype)
    for k in range(4):
        z0, z1 = t[k][..., 0, :], t[k][..., 1, :]
        out[k, 0].copy_(z0)
        torch.add(z0, z1, out=out[k, 1])
        torch.sub(z0, z1, out=out[k, 2])
        torch.neg(z1, out=out[k, 3])
    return out.view(16, n * th * tw, co)


def products(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The 16 matrix products v[k] @ u[k] as one batched product (16 torch.mm calls were no
    faster in this probe's runs on a Zen 4: 210-234 against 222-258 GFLOP/s on the 7x7 layers)."""
    return torch.bmm(v, u)


def conv_forward(x: torch.Tensor, w: torch.Tensor) -> tuple:
    """3x3, stride 1, padding 1 convolution of channels_last (N, C, H, W) ``x`` with (Co, C, 3, 3)
    ``w``: (output, transformed input kept for the filter gradient, sizes)."""
    v, dims = input_transform(x.permute(0, 2, 3, 1))
    y = output_transform(products(v, filter_transform(w)), dims)
    return y.permute(0, 3, 1, 2), v, dims


def conv_backward(v: torch.Tensor, dims: tuple, w: torch.Tensor, g: torch.Tensor) -> tuple:
    """(gradient to the input, gradient to the filters) of conv_forward, from its output gradient
    ``g``. The input's gradient is the output gradient convolved with the filters turned by 180
    degrees, in and out channels swapped; the filters' is G^T (sum over blocks of v^T (A g A^T)) G."""
    gx = conv_forward(g, w.flip(2, 3).transpose(0, 1))[0]
    dm = grad_transform(g.permute(0, 2, 3, 1), dims)
    du = torch.bmm(v.transpose(1, 2), dm)
    gw = torch.einsum("ka,klio,lb->oiab", G, du.float().view(4, 4, *du.shape[1:]), G)
    return gx, gw.to(w.dtype)


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=500, help="images per timed call")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (median)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="element type of both sides (fp32: what CPUs without bf16 train in)")
    args = ap.parse_args(argv)
    from cifarkit.device import set_threads
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the same CPU line as the other benchmarks print
    # as training does: threads, and glibc malloc told to keep large blocks (without it every
    # call's output is fresh pages, and the first layer's forward measured 1.8x slower)
    set_threads(0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    back = torch.ops.aten.convolution_backward
    print(f"{_machine(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, batch {args.batch}, medians of {args.repeats}, {args.dtype}")
    print(f"layer | rel. error fwd/gx/gw (against float64): oneDNN {args.dtype}, Winograd {args.dtype} | "
          "ms fwd: oneDNN, Winograd (its products) | ms both gradients: oneDNN, Winograd | Winograd/oneDNN")
    for ci, co, side in LAYERS:
        x = torch.randn(args.batch, ci, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5)).to(dtype)
        g = torch.randn(args.batch, co, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
        mask = [True, True, False]
        ref = (F.conv2d(x.double(), w.double(), None, 1, 1),
               *back(g.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)[:2])
        onednn = (F.conv2d(x, w, None, 1, 1), *back(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)[:2])
        y, v, dims = conv_forward(x, w)
        ours = (y, *conv_backward(v, dims, w, g))
        fmt = ".4f" if args.dtype == "bf16" else ".1e"   # fp32's errors are about 1e-7
        err = " ".join(f"{_rel(a, r):{fmt}}/{_rel(b, r):{fmt}}" for a, b, r in zip(onednn, ours, ref))
        u = filter_transform(w)
        t = [_ms(lambda: F.conv2d(x, w, None, 1, 1), args.repeats),
             _ms(lambda: conv_forward(x, w), args.repeats),
             _ms(lambda: products(v, u), args.repeats),
             _ms(lambda: back(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask), args.repeats),
             _ms(lambda: conv_backward(v, dims, w, g), args.repeats)]
        print(f"{ci}->{co} {side}x{side} | {err} | {t[0]:.1f}, {t[1]:.1f} ({t[2]:.1f}) | {t[3]:.1f}, {t[4]:.1f} | "
              f"{(t[1] + t[4]) / (t[0] + t[3]):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
