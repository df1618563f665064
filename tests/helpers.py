"""Helpers shared by the tests: small learnable image folders, CIFAR's pickled format, CLI runs."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np


def synthetic_images(n_per_class: int, n_classes: int, size: int = 32, seed: int = 0,
                     shape_only: bool = False):
    """Learnable images: each class has its own colour and a bar at its own position, plus noise.

    ``shape_only``: every class has the same colour, so only the bar's position tells them apart;
    a network whose convolutions do not learn stays near chance on them (a linear head on random
    convolution features separates the colours alone)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    colour = None
    for c in range(n_classes):
        if colour is None or not shape_only:   # one draw per class: the sets the tests are tuned on
            colour = rng.integers(40, 215, size=3)
        for _ in range(n_per_class):
            img = rng.normal(0, 28, size=(size, size, 3)) + colour
            pos = (c * size) // n_classes
            img[pos:pos + max(2, size // n_classes), :, :] += 70
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys)


def make_folder(root: Path, classes=("cat", "dog", "ship"), n_per_class: int = 30, size: int = 32,
                split: str = "train", seed: int = 0, ext: str = ".png", shape_only: bool = False) -> Path:
    from PIL import Image

    x, y = synthetic_images(n_per_class, len(classes), size, seed, shape_only)
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / split / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}{ext}")
    return root


def write_cifar_batches(root: Path, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR-10's python format: 5 pickled train batches, a test batch and batches.meta."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images((5 * n_train_per_batch + n_test) // 10 + 1, 10, 32, seed)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    k = 0
    for i in range(1, 6):
        batch = {"batch_label": f"training batch {i} of 5", "labels": y[k:k + n_train_per_batch].tolist(),
                 "data": flat[k:k + n_train_per_batch], "filenames": [b"x.png"] * n_train_per_batch}
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        k += n_train_per_batch
    test = {"batch_label": "testing batch 1 of 1", "labels": y[k:k + n_test].tolist(),
            "data": flat[k:k + n_test], "filenames": [b"x.png"] * n_test}
    (base / "test_batch").write_bytes(pickle.dumps(test))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": n_train_per_batch}))
    return base


def real_subset(real: Path, dest: Path, per_class: int) -> Path:
    """A small real-data folder made of symlinks (the images themselves are never copied)."""
    for cls in sorted(os.listdir(real / "train")):
        d = dest / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(real / "train" / cls))[:per_class]:
            os.symlink(real / "train" / cls / f, d / f)
    return dest



def cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from cifarkit.cli import main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:          # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_clear_line(rc, err, *needles, code=None):
    assert rc != 0, "expected a failure exit code"
    if code is not None:
        assert rc == code, (rc, err)
    lines = [l for l in err.strip().splitlines() if not l.startswith("warning:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, e.g. ``load_benchmark("vs_airbench")``."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
