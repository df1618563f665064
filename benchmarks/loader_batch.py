"""What the training loader costs per step, reading the whole batch and then keeping the picked
half (what --hard-stale did before commit 31e658a) against reading only the half the table picks
(Loader.batch(step, choose=...), what it does now), at each image size of the sprint recipe.

It times the real Loader (gather, alternating flip, 2 px translate, normalise to channels-last
float, resize) on random uint8 images of the CIFAR-10 training split's shape; the pixels' values
do not change the cost. Medians of ``--reps`` interleaved calls, in milliseconds per step.

    python benchmarks/loader_batch.py [--batch 2000] [--reps 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2000, help="images per step (the sprint recipe's 2000)")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per variant and size")
    ap.add_argument("--sizes", default="16,20,24,28,32", help="image sides in px")
    args = ap.parse_args()

    from cifarkit import resolve_config
    from cifarkit.data.tensors import TensorSplit
    from cifarkit.device import set_threads
    from cifarkit.distributed import Dist
    from cifarkit.training.loader import Loader
    from cifarkit.training.selective import _take
    set_threads(0)
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (45000, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.arange(45000) % 10)
    table = torch.rand(45000, generator=g)   # stands in for the stale-loss table
    half = lambda idx: idx[table[idx].topk(len(idx) // 2).indices.sort().values]   # noqa: E731

    print(f"loader ms per step of {args.batch} images (half of them trained), median of {args.reps}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'px':>4} {'read all, keep half':>20} {'read the half':>14} {'ratio':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = resolve_config("sprint", overrides={"progressive": [size], "batch_size": args.batch})
        loader = Loader(split, cfg, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], torch.device("cpu"), Dist())
        loader.start_epoch(0)
        after, before = [], []
        for rep in range(args.reps + 2):
            step = rep % loader.steps_per_epoch
            t0 = time.perf_counter()
            xb, yb, _, idx = loader.batch(step)
            keep = table[idx].topk(len(idx) // 2).indices.sort().values
            _take(xb, keep), yb[keep]
            t1 = time.perf_counter()
            loader.batch(step, choose=half)
            t2 = time.perf_counter()
            if rep >= 2:   # two warm-up calls
                before.append(t1 - t0)
                after.append(t2 - t1)
        b, a = statistics.median(before) * 1e3, statistics.median(after) * 1e3
        print(f"{size:>4} {b:>20.1f} {a:>14.1f} {a / b:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
