import os

import pytest

from helpers import make_folder

from cifarkit.cli import main


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small trained run (3 classes) shared by the reliability tests."""
    tmp = tmp_path_factory.mktemp("rel")
    os.environ.setdefault("CIFARKIT_CACHE", str(tmp / "cache"))
    data = make_folder(tmp / "data", classes=("cat", "dog", "ship"), n_per_class=30)
    out = tmp / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "16",
               "--model", "tudui_relu", "--optimizer", "adamw", "--lr", "0.003", "--val-size", "15",
               "--quiet", "--no-tensorboard"])
    assert rc == 0
    return data, out
