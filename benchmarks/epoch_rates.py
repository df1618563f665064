"""Arithmetic rate of each epoch of a finished `cifarkit train` run: training FLOPs over seconds.

Reads RUN/config.yaml (the resolved settings) and RUN/metrics.jsonl (each epoch's seconds and
image size), counts each epoch's training FLOPs as fast_recipe.epoch_flops does
(torch.utils.flop_counter: every epoch at its own size, selective backprop and its proxy counted)
and prints GFLOP/s per epoch, then what the run would take if every epoch ran at --at GFLOP/s
(e.g. the rate of the plain network at 32 px): how much of a run's time is not arithmetic.

    python benchmarks/epoch_rates.py RUN [--at 398]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder with config.yaml and metrics.jsonl")
    ap.add_argument("--at", type=float, help="GFLOP/s to price the whole run at, for comparison")
    a = ap.parse_args()
    from cifarkit.config import resolve
    from cifarkit.errors import CifarkitError
    sys.path.insert(0, str(Path(__file__).parent))
    from fast_recipe import epoch_flops

    try:
        cfg = resolve(config_file=a.run / "config.yaml")   # the run's settings, read as --config reads them
        rows = [json.loads(l) for l in (a.run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        summary = json.loads((a.run / "summary.json").read_text())
    except (CifarkitError, OSError, ValueError) as exc:
        why = getattr(exc, "message", None) or str(exc).splitlines()[0]   # without --config's hint
        print(f"error: {a.run} is not a finished run folder ({why}) -- give the folder "
              f"`cifarkit train --out` wrote", file=sys.stderr)
        return 1
    flops = epoch_flops(cfg, summary["n_train"])
    if len(rows) != len(flops):
        print(f"error: {a.run} has {len(rows)} epochs in metrics.jsonl, its config {len(flops)} -- "
              f"only a run that finished can be counted", file=sys.stderr)
        return 1
    print(f"{'epoch':>5} {'px':>3} {'TFLOP':>7} {'s':>7} {'GFLOP/s':>8}")
    for row, f in zip(rows, flops):
        print(f"{row['epoch']:5d} {row.get('image_size', cfg.image_size):3d} {f / 1e12:7.2f} "
              f"{row['seconds']:7.1f} {f / row['seconds'] / 1e9:8.0f}")
    total_f, total_s = sum(flops), sum(r["seconds"] for r in rows)
    print(f"  all     {total_f / 1e12:7.2f} {total_s:7.1f} {total_f / total_s / 1e9:8.0f}")
    if a.at:
        ideal = total_f / (a.at * 1e9)
        print(f"at {a.at:.0f} GFLOP/s throughout: {ideal:.1f} s, {ideal / total_s:.3f} of the epochs' {total_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
