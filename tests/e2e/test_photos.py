"""Photos of any size: a folder of mixed-size pictures (real CIFAR-10 images scaled up, and the
colour photos scikit-image ships) trained at --image-size 64 and 128 with your own network, then
predicted on 2000x1500 photos exactly as evaluation sees them (resize the shorter side, centre crop)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NET = Path(__file__).resolve().parents[2] / "examples" / "small_net.py"   # any input size

# Mixed sizes and proportions (width, height): landscape, portrait and square, hundreds of pixels.
SIZES = [(96, 72), (72, 96), (160, 120), (128, 128), (240, 180), (120, 160), (200, 150), (64, 48),
         (300, 225), (150, 200)]


def _photos():
    skimage_data = pytest.importorskip("skimage.data")
    names = ["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "colorwheel"]
    return [Image.fromarray(getattr(skimage_data, n)()[..., :3]) for n in names], \
        Image.fromarray(skimage_data.chelsea())


def _crop(img: Image.Image, rng) -> Image.Image:
    """A random crop of 40-100 % of the shorter side, 3:4 to 4:3, at its own pixel size."""
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.4, 1.0))
    cw, ch = (side, int(side * rng.uniform(0.75, 1.0))) if rng.random() < 0.5 else \
        (int(side * rng.uniform(0.75, 1.0)), side)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    return img.crop((x, y, x + cw, y + ch))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """train/{cat,ship,photo}: 80 pictures each; test/: nine 2000x1500 (and 1500x2000) photos."""
    real = os.environ.get("CIFARKIT_REAL_DATA")
    if not real or not Path(real, "train", "cat").is_dir():
        pytest.skip("set CIFARKIT_REAL_DATA to the CIFAR-10 JPEG folder to run the photo test")
    photos, chelsea = _photos()
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls in ("cat", "ship"):
        files = sorted(Path(real, "train", cls).glob("*.jpg"))
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i, f in enumerate(files[:70 if cls == "cat" else 80]):
            Image.open(f).convert("RGB").resize(SIZES[i % len(SIZES)], Image.BICUBIC).save(d / f"{i:03d}.jpg")
        for i, f in enumerate(files[100:103]):
            t = root / "test" / cls
            t.mkdir(parents=True, exist_ok=True)
            Image.open(f).convert("RGB").resize((2000, 1500) if i < 2 else (1500, 2000),
                                                Image.BICUBIC).save(t / f"big{i}.jpg", quality=90)
    for i in range(10):   # the package's cat photo, cropped ten ways, joins the CIFAR cats
        _crop(chelsea, rng).save(root / "train" / "cat" / f"chelsea{i}.jpg")
    d = root / "train" / "photo"
    d.mkdir(parents=True)
    for i in range(80):
        _crop(photos[i % len(photos)], rng).save(d / f"{i:03d}.jpg")
    t = root / "test" / "photo"
    t.mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        p.resize((2000, 1500), Image.BICUBIC).save(t / f"big{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("size,pad", [(64, 4), (128, 8)])
def test_mixed_size_photos_train_and_predict_like_eval(photo_folder, tmp_path, size, pad):
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    net = f"{NET}:small"
    cmd = [sys.executable, "-m", "cifarkit", "train", "--data", str(photo_folder), "--model", net,
           "--image-size", str(size), "--out", str(out), "--optimizer", "adamw", "--lr", "0.003",
           "--batch-size", "32", "--epochs", "12", "--val-size", "60", "--flip", "--crop-pad", str(pad),
           "--precision", "fp32", "--no-tensorboard"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "classes: cat 60, photo 60, ship 60" in r.stdout     # 80 each, 20 each held out
    summary = json.loads((out / "summary.json").read_text())
    print(f"\n{size} px: best val {summary['best_val_acc']:.3f}")
    assert summary["best_val_acc"] >= 0.70, summary          # 3 classes: chance is 0.33

    from cifarkit import load_checkpoint
    from cifarkit.evaluate import evaluate_checkpoint
    ckpt = load_checkpoint(out / "best.ckpt", model=net)
    assert ckpt.preprocess["size"] == size and ckpt.preprocess["crop_mode"] == "center"

    # eval's preprocessing: the test/ folder decoded by the data loader, then the network
    res, split = evaluate_checkpoint(ckpt, str(photo_folder), "test", "cpu", "fp32", keep_probs=True,
                                     progress=False)
    assert split.x.shape == (9, 3, size, size)
    eval_classes = [ckpt.classes[i] for i in res.probs.argmax(1).tolist()]
    # predict on the same 2000x1500 files through the CLI
    r = subprocess.run([sys.executable, "-m", "cifarkit", "predict", str(out / "best.ckpt"), "--model", net,
                        str(photo_folder / "test"), "--json", "--top-k", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [Path(g["path"]).relative_to(photo_folder / "test").parts[0] for g in got] == \
        ["cat"] * 3 + ["photo"] * 3 + ["ship"] * 3          # the same files, in eval's order
    assert [g["top"][0]["class"] for g in got] == eval_classes
    for g, probs in zip(got, res.probs):
        for t in g["top"]:
            assert abs(t["prob"] - float(probs[ckpt.classes.index(t["class"])])) < 1e-4
    # and it learnt: most of the big photos are right
    right = sum(c == Path(g["path"]).parent.name for c, g in zip(eval_classes, got))
    print(f"{size} px: {right}/9 big photos right")
    assert right >= 6, (eval_classes, [g["path"] for g in got])
