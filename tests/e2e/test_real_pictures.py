"""Issue 3 on real CIFAR-10 images: every picture command run on a small real subset, each PNG
checked for size and non-blank content."""
import numpy as np
import pytest
from PIL import Image

from cifarkit.cli import main
from helpers import real_subset


def _non_blank_png(path, min_w, min_h):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] >= min_w and img.shape[0] >= min_h, img.shape
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 100


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    import os
    real = os.environ.get("CIFARKIT_REAL_DATA")
    if not real or not os.path.isdir(os.path.join(real, "train")):
        pytest.skip("set CIFARKIT_REAL_DATA to the CIFAR-10 JPEG folder")
    tmp = tmp_path_factory.mktemp("realpics")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARKIT_CACHE", str(tmp / "cache"))
        from pathlib import Path
        data = real_subset(Path(real), tmp / "subset", per_class=60)
        out = tmp / "run"
        assert main(["train", "--data", str(data), "--out", str(out), "--model", "tudui_relu",
                     "--optimizer", "adamw", "--lr", "0.002", "--epochs", "3", "--val-size", "100",
                     "--quiet"]) == 0
        yield data, out, mp


def test_real_curves_and_tensorboard(real_run):
    _, out, _ = real_run
    _non_blank_png(out / "curves.png", 600, 250)
    assert any((out / "tb").iterdir())


def test_real_show_data(real_run, tmp_path):
    data, _, _ = real_run
    for extra in ([], ["--augmented"]):
        assert main(["show-data", "--data", str(data), "--out", str(tmp_path / "g.png"), *extra]) == 0
        _non_blank_png(tmp_path / "g.png", 500, 500)


def test_real_confusion_mistakes_features(real_run, tmp_path):
    data, out, _ = real_run
    assert main(["eval", str(out / "best.ckpt"), "--confusion", str(tmp_path / "cm.png")]) == 0
    _non_blank_png(tmp_path / "cm.png", 800, 300)
    assert main(["mistakes", str(out / "best.ckpt"), "--out", str(tmp_path / "m.png"), "--n", "16"]) == 0
    _non_blank_png(tmp_path / "m.png", 500, 150)
    img = next((data / "train" / "horse").iterdir())
    assert main(["features", str(out / "best.ckpt"), str(img), "--layer", "1", "--out", str(tmp_path / "f.png")]) == 0
    _non_blank_png(tmp_path / "f.png", 400, 300)
