"""Training throughput: the notes' own loop against cifarkit's tutorial recipe, side by side.

The notes' loop: torchvision ImageFolder + ToTensor + DataLoader (decoding JPEGs per image, as the
course does), tudui, SGD(lr=0.01), CrossEntropyLoss, fp32, at batch 1 and batch 64.
cifarkit: `train` with the tutorial recipe (same network, optimiser, batch 64), one full epoch
over 45,000 images from the in-memory uint8 tensor (bf16 autocast + channels_last where the CPU
has native bf16). Each is repeated; the median is reported, with ratios.

    python benchmarks/throughput.py --data ../shared/data/cifar10-jpeg [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn


def notes_loop(data: Path, batch_size: int, images: int) -> float:
    """The notes' training loop verbatim in spirit; returns images/s over `images` images."""
    import torchvision
    from torch.utils.data import DataLoader

    from cifarkit import create_model

    ds = torchvision.datasets.ImageFolder(str(data / "train"), transform=torchvision.transforms.ToTensor())
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
    model = create_model("tudui")
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    seen, t0, warm = 0, None, 5
    for step, (imgs, targets) in enumerate(loader):
        if step == warm:
            t0, seen = time.perf_counter(), 0
        outputs = model(imgs)
        loss = loss_fn(outputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(targets)
        if t0 is not None and seen >= images:
            break
    return seen / (time.perf_counter() - t0)


def cifarkit_epoch(data: Path, extra: dict | None = None) -> tuple[float, dict]:
    from cifarkit import resolve_config, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config("tutorial", overrides={"data": str(data), "epochs": 1, "out": tmp,
                                                     "tensorboard": False, **(extra or {})})
        s = train(cfg, progress=False, log=lambda *a: None)
    return s["train_images_per_s"], s


KINDS = {
    "notes_b1": lambda a: notes_loop(a.data, 1, a.b1_images),
    "notes_b64": lambda a: notes_loop(a.data, 64, a.b64_images),
    "cifarkit_tutorial": lambda a: cifarkit_epoch(a.data)[0],
    "cifarkit_tutorial_fp32": lambda a: cifarkit_epoch(a.data, {"precision": "fp32"})[0],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--b1-images", type=int, default=1500)
    ap.add_argument("--b64-images", type=int, default=9600)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", choices=sorted(KINDS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    if a.one:  # child process: one measurement, printed as the last line
        print(json.dumps(KINDS[a.one](a)))
        return 0

    import subprocess
    def measure(kind: str) -> float:
        # A fresh process per measurement: what a user running that loop would see (allocator
        # and oneDNN caches start cold, nothing carries over from the other contender).
        out = subprocess.run([sys.executable, __file__, "--data", str(a.data), "--one", kind,
                              "--b1-images", str(a.b1_images), "--b64-images", str(a.b64_images)],
                             capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])

    results: dict[str, list[float]] = {k: [] for k in KINDS}
    cifarkit_epoch(a.data)  # build the decode cache once so its one-time cost is not counted
    for r in range(a.repeats):  # interleaved, so drifts in machine speed hit all alike
        for kind in KINDS:
            results[kind].append(measure(kind))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "machine": f"{_cpu_model()}, {torch.get_num_threads()} threads",
        "torch": str(torch.__version__), "python": sys.version.split()[0],
        "median_images_per_s": med, "runs": results,
        "ratio_vs_notes_b1": med["cifarkit_tutorial"] / med["notes_b1"],
        "ratio_vs_notes_b64": med["cifarkit_tutorial"] / med["notes_b64"],
        "ratio_fp32_vs_notes_b64": med["cifarkit_tutorial_fp32"] / med["notes_b64"],
    }
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
