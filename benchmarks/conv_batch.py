"""Does a convolution's time per image depend on the batch? PyTorch's (oneDNN's) forward and both
gradients of the fast network's 3x3 convolutions at 32 px, per 1,000 images, at several batch
sizes, in one process: each size runs as many calls as make up the largest batch, sizes in turns.

    python benchmarks/conv_batch.py [--batches 250,500,1000,2000] [--dtype fp32] [--rounds 5]

The question it answers: airbench's Muon record trains all 2,000 images of a batch, `sprint` at
most 1,000, so a CPU whose convolutions slow down at 2,000 would make the record's estimated time
(vs_airbench.py --muon-record) too high. Prints medians of `--rounds` rounds, in ms per 1,000
images, and each batch's sum over the layers against the largest batch's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="250,500,1000,2000")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from cifarkit.device import set_threads
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the CPU line (model, family, bf16 units) the recipe runs report
    from winograd_probe import LAYERS  # the fast recipe's 3x3 convolutions at 32 px
    set_threads()
    batches = [int(b) for b in args.batches.split(",")]
    top = max(batches)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"# python benchmarks/conv_batch.py --batches {args.batches} --dtype {args.dtype} --rounds {args.rounds}")
    print(f"# {_machine(torch.device('cpu'))}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"forward + input gradient + weight gradient, ms per 1,000 images (median of {args.rounds} rounds)")

    def step(x, w, g):
        F.conv2d(x, w, None, 1, 1)
        torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                            [True, True, False])
    gen = torch.Generator().manual_seed(0)
    sums = dict.fromkeys(batches, 0.0)
    for ci, co, side in LAYERS:
        data = {}
        for b in batches:
            cl = torch.channels_last
            data[b] = (torch.randn(b, ci, side, side, generator=gen).to(dtype).contiguous(memory_format=cl),
                       torch.randn(co, ci, 3, 3, generator=gen).to(dtype).contiguous(memory_format=cl),
                       torch.randn(b, co, side, side, generator=gen).to(dtype).contiguous(memory_format=cl))
            step(*data[b])   # warm-up
        times = {b: [] for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                t0 = time.perf_counter()
                for _ in range(top // b):
                    step(*data[b])
                times[b].append((time.perf_counter() - t0) * 1e3 * 1000 / (b * (top // b)))
        med = {b: statistics.median(v) for b, v in times.items()}
        for b in batches:
            sums[b] += med[b]
        print(f"{ci:3d}->{co:3d} {side:2d}x{side:<2d} " + " | ".join(f"batch {b} {med[b]:7.1f}" for b in batches),
              flush=True)
    print("all layers: " + " | ".join(f"batch {b} {sums[b]:7.1f} ({sums[b] / sums[top]:.2f})" for b in batches))


if __name__ == "__main__":
    main()
