"""Fine-tuning throughput: torchvision's ResNet-18 at 224 px on a folder of photos, backbone frozen
and not, `cifarkit train --recipe finetune` against the notes' loop (ImageFolder + DataLoader +
torchvision transforms, fp32 SGD), side by side, alternating, median of the repeats.

The weights file is a stand-in written locally (random values in torchvision's layout, under a
temporary $TORCH_HOME): speed does not depend on the values, and this machine cannot download.
Images/s counts training steps of the second epoch (the first one warms up); cifarkit's numbers
come from its metrics.jsonl, the peer's from the same clock around its loop (data loading
included for both: cifarkit reads its decoded cache, the peer decodes JPEGs every epoch).

    python benchmarks/finetune.py --images 192 --repeats 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEER = r'''
import sys, time, torch, torchvision
from torch import nn
from torchvision import transforms as T
data, weights, freeze, batch, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
# torchvision's usual fine-tuning transforms (cifarkit: centre crop once, then flips and shifts)
tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
ds = torchvision.datasets.ImageFolder(data + "/train", transform=tf)
loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
net = torchvision.models.resnet18()
net.load_state_dict(torch.load(weights, weights_only=True))
net.fc = nn.Linear(512, len(ds.classes))
if freeze:
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fc."))
opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)
loss_fn = nn.CrossEntropyLoss()
for epoch in range(2):
    net.train()
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    rate = n / (time.perf_counter() - t0)
print(rate)
'''


def make_photos(root: Path, n: int) -> None:
    """n photo-sized JPEGs (about 500x375, some portrait), two classes told apart by colour and shape."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ("a", "b")[i % 2]
        w, h = (500, 375) if i % 3 else (375, 500)
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        (draw.ellipse if cls == "a" else draw.rectangle)(box, fill=(200, 40, 40) if cls == "a" else (40, 40, 200))
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:04d}.jpg", quality=90)


def cifarkit_rate(data: Path, env: dict, out: Path, freeze: bool, precision: str, batch: int, val: int) -> float:
    cmd = [sys.executable, "-m", "cifarkit", "train", "--recipe", "finetune", "--data", str(data),
           "--epochs", "2", "--batch-size", str(batch), "--val-size", str(val), "--precision", precision,
           "--no-tensorboard", "--quiet", "--out", str(out)] + (["--freeze", "backbone"] if freeze else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"cifarkit failed: {r.stderr[-1500:]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [m for m in lines if "images_per_s" in m][-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192, help="training photos (plus --val held out)")
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    import torch
    import torchvision

    work = a.work or Path(tempfile.mkdtemp(prefix="cifarkit-ft-"))
    data = work / "photos"
    if not (data / "train").is_dir():
        make_photos(data, a.images + a.val)
    home = work / "torch_home"
    weights = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    env = {**os.environ, "TORCH_HOME": str(home), "CIFARKIT_CACHE": str(work / "cache")}
    threads = len(os.sched_getaffinity(0))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu} ({threads} threads); torch {torch.__version__}; resnet18 at 224 px, batch {a.batch}, "
          f"{a.images} training photos of ~500x375")
    (work / "peer.py").write_text(PEER)
    # the peer trains on the same images as cifarkit: all but --val (cifarkit holds those out)
    rows = {}
    for rep in range(a.repeats):
        for freeze in (True, False):
            tag = "frozen" if freeze else "full"
            for name, fn in (
                    ("cifarkit bf16", lambda: cifarkit_rate(data, env, work / f"r{rep}-{tag}-bf16", freeze, "bf16", a.batch, a.val)),
                    ("cifarkit fp32", lambda: cifarkit_rate(data, env, work / f"r{rep}-{tag}-fp32", freeze, "fp32", a.batch, a.val)),
                    ("notes' loop fp32", lambda: float(subprocess.run(
                        [sys.executable, str(work / "peer.py"), str(data), str(weights), str(int(freeze)),
                         str(a.batch), str(threads)], capture_output=True, text=True, env=env, check=True)
                        .stdout.split()[-1]))):
                rate = fn()
                rows.setdefault((tag, name), []).append(rate)
                print(f"  repeat {rep + 1}: {tag:<6} {name:<17} {rate:7.1f} images/s", flush=True)
    print(f"\n{'backbone':<8} {'run':<17} {'median images/s':>15} {'vs notes loop':>13}")
    for tag in ("frozen", "full"):
        peer = statistics.median(rows[(tag, "notes' loop fp32")])
        for name in ("cifarkit bf16", "cifarkit fp32", "notes' loop fp32"):
            med = statistics.median(rows[(tag, name)])
            print(f"{tag:<8} {name:<17} {med:15.1f} {med / peer:12.2f}x")


if __name__ == "__main__":
    main()
