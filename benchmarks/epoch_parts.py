"""Where a real training epoch's time goes: wall-clock seconds per part, per epoch.

Runs `cifarkit train` with the given flags (default: the fast recipe) and wraps the training
loop's parts with timers: the loader (indexing, augmentation, resizing), the proxy network's step
(--hard-proxy), the network's forward pass with its loss, its backward pass, and its optimiser
step. What is left of an epoch's total (the picking of the hardest images, the metrics, the
progress line) is small. Prints one JSON line per epoch. The parts are timed as they run, on a
machine whose speed may drift: compare parts within one epoch, or the same epoch side by side.

    python benchmarks/epoch_parts.py --data ../shared/data/cifar10-jpeg --epochs 6 --progressive 16,16,24,24
"""
from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
import warnings


def main(argv: list[str]) -> int:
    from cifarkit.cli import main as cli
    from cifarkit.training import loader, loop, selective

    spent = collections.defaultdict(float)

    def timed(owner, name: str, part: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[part] += time.perf_counter() - t
        setattr(owner, name, wrapper)

    timed(loader.Loader, "batch", "loader")
    timed(selective.Proxy, "step", "proxy_step")
    timed(loop.Forward, "__call__", "forward")
    timed(loop, "_backward", "backward")
    epoch_fn = loop.train_one_epoch

    def epoch(run, index):
        if not getattr(run.state.opt, "_timed", False):   # the network's optimiser, once per run
            timed(run.state.opt, "step", "optimizer")
            run.state.opt._timed = True
        spent.clear()
        t = time.perf_counter()
        out = epoch_fn(run, index)
        total = time.perf_counter() - t
        print(json.dumps({"epoch": index + 1, "px": loader.epoch_size(run.cfg, index), "total_s": round(total, 2),
                          **{k: round(v, 2) for k, v in spent.items()}}), flush=True)
        return out
    loop.train_one_epoch = epoch
    # wrapping the optimiser's step after the scheduler was built makes PyTorch warn; the order
    # of the calls is unchanged
    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")
    with tempfile.TemporaryDirectory() as tmp:
        args = argv if "--recipe" in argv else ["--recipe", "fast", *argv]
        return cli(["train", "--quiet", "--no-tensorboard", "--out", f"{tmp}/run", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
