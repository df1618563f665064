"""Shared fixtures: every test gets its own decode cache; small learnable image folders."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers import make_folder, real_subset  # noqa: F401  (re-exported for older imports)

REAL_DATA_ENV = "CIFARKIT_REAL_DATA"

# A test run started in the background from a non-interactive shell (`make test &`) inherits
# SIGINT ignored, and so would every training it starts; the Ctrl-C tests need it delivered as
# in a terminal (Python installs its handler in the children when SIGINT is not ignored).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CIFARKIT_CACHE", str(tmp_path_factory.mktemp("decode-cache")))
    monkeypatch.setenv("CIFARKIT_DATA", str(tmp_path_factory.mktemp("cifar-root")))


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images", n_per_class=40)


@pytest.fixture
def real_data() -> Path:
    path = os.environ.get(REAL_DATA_ENV)
    if not path or not Path(path, "train").is_dir():
        pytest.skip(f"set {REAL_DATA_ENV} to the CIFAR-10 JPEG folder (…/cifar10-jpeg) to run real-data tests")
    return Path(path)




@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One small real training run through the CLI (3 easy classes, 40 images each, 24 held out),
    shared read-only by the CLI, export, serve and reliability tests. Tests that change a run
    copy it first."""
    from cifarkit.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARKIT_CACHE", str(tmp / "cache"))
        data = make_folder(tmp / "data", classes=("cat", "dog", "ship"), n_per_class=40)
        out = tmp / "run"
        rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "16",
                   "--model", "tudui_relu", "--optimizer", "adamw", "--lr", "0.003", "--val-size", "24",
                   "--quiet", "--no-tensorboard"])
    assert rc == 0
    return data, out
