"""Peak memory of `cifarkit train` against the decoded size of the data set.

Makes folders of N small JPEGs (random shapes and colours, 3 classes), trains one epoch on each
at --image-size 128 through the CLI in a fresh process (the network of examples/small_net.py),
and samples the memory of that process and its decode workers every 20 ms (Linux /proc). Two
numbers per run:

  anon  anonymous memory (heap, tensors; proportional set size, so pages forked decode workers
        share are counted once): what must fit in RAM. It should grow with the batch, not with
        the set, because the decoded images live in a memory-mapped cache file;
  rss   anon plus the resident pages of mapped files (libraries, the cache): the kernel can drop
        the cache's pages at any time, so this is bounded by free memory, not required.

Each folder is trained twice: the first run decodes into the cache, the second maps it
("data:" line seconds show the start-up). With --src OLD (another checkout) the same runs use
that checkout's cifarkit too, side by side.

    python benchmarks/memory.py --sizes 2000,8000,32000 --batches 64,256
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def make_folder(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(n)
    for i in range(n):
        cls = ("a", "b", "c")[i % 3]
        w, h = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).ellipse((5, 5, w - 5, h - 5), fill=(255, 0, 0) if cls == "a" else
                                    (0, 255, 0) if cls == "b" else (0, 0, 255))
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.jpg", quality=85)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _kb(pid: int) -> tuple[int, int]:
    """(anonymous, all) proportional set size in KiB: pages a forked decode worker shares with
    its parent are counted once across the tree, not once per process."""
    try:
        text = open(f"/proc/{pid}/smaps_rollup").read()
    except OSError:
        return 0, 0
    get = lambda key: int(m.group(1)) if (m := re.search(rf"^{key}:\s+(\d+)", text, re.M)) else 0
    return get("Pss_Anon"), get("Pss")


def run(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; peak anon and rss (MiB) of its process tree, wall seconds, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"anon": 0, "rss": 0}

    def sample():
        while proc.poll() is None:
            anon = rss = 0
            for p in _tree(proc.pid):
                a, r = _kb(p)
                anon, rss = anon + a, rss + r
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    data_s = re.search(r"^data: .*?([\d.]+)s\)", out, re.M)
    return {"anon_mib": peak["anon"] / 1024, "rss_mib": peak["rss"] / 1024,
            "wall_s": time.perf_counter() - t0, "data_s": float(data_s.group(1)) if data_s else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,8000,32000", help="images per folder")
    ap.add_argument("--batches", default="64,256", help="batch sizes (the largest only on the middle folder)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--src", type=Path, action="append", default=[], help="another checkout to compare")
    ap.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="cifarkit-mem-"))
    sizes = [int(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    print(f"CPU: {_cpu()}; torch {_torch()}; --image-size {a.image_size}")
    print(f"{'code':<10} {'images':>7} {'decoded MiB':>11} {'batch':>5} {'run':<7} {'anon MiB':>9} "
          f"{'rss MiB':>8} {'data s':>7} {'wall s':>7}")
    for n in sizes:
        folder = work / f"set{n}"
        if not (folder / "train").is_dir():
            make_folder(folder, n)
        decoded = n * 3 * a.image_size ** 2 / 2 ** 20
        for src in [ROOT] + a.src:
            code = "this" if src == ROOT else src.name
            cache = work / f"cache-{code}-{n}"
            for b in batches if n == sizes[len(sizes) // 2] else batches[:1]:
                env = {**os.environ, "CIFARKIT_CACHE": str(cache), "PYTHONPATH": str(src / "src")}
                for which in ("first", "second"):
                    cmd = [sys.executable, "-m", "cifarkit", "train", "--data", str(folder),
                           "--model", f"{ROOT / 'examples' / 'small_net.py'}:small", "--image-size", str(a.image_size),
                           "--epochs", "1", "--batch-size", str(b), "--val-size", "300",
                           "--optimizer", "adamw", "--lr", "0.003", "--precision", "fp32",
                           "--no-tensorboard", "--out", str(work / f"run-{code}-{n}-{b}-{which}")]
                    r = run(cmd, env)
                    row = {"code": code, "images": n, "decoded_mib": decoded, "batch": b, "run": which, **r}
                    rows.append(row)
                    print(f"{code:<10} {n:>7} {decoded:>11.0f} {b:>5} {which:<7} {r['anon_mib']:>9.0f} "
                          f"{r['rss_mib']:>8.0f} {float('nan') if r['data_s'] is None else r['data_s']:>7.1f} {r['wall_s']:>7.1f}",
                          flush=True)
                    if which == "first":
                        import shutil
                        shutil.rmtree(work / f"run-{code}-{n}-{b}-first", ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _torch() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
