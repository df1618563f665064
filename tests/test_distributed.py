"""Issue 6: two CPU processes (gloo, via torchrun) train exactly like one process with the same
global batch: same loss curve within float tolerance, one checkpoint, one set of log lines."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cifarkit import load_checkpoint
from helpers import make_folder

ARGS = ["--epochs", "3", "--batch-size", "16", "--val-size", "24", "--model", "tudui_relu",
        "--optimizer", "sgd", "--lr", "0.01", "--momentum", "0.9", "--flip", "--crop-pad", "2",
        "--precision", "fp32", "--no-tensorboard", "--quiet", "--threads", "1"]


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_gloo_processes_match_one(tmp_path):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=40)
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "cifarkit", "train", "--data", str(data),
                          "--out", str(tmp_path / "one"), *ARGS], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "cifarkit", "train", "--data", str(data),
                          "--out", str(tmp_path / "two"), *ARGS], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # one voice: each epoch line printed once, by rank 0
    assert two.stdout.count("epoch   1/3") == 1 and two.stdout.count("epoch   3/3") == 1
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["epoch"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-4)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=0.02)
    w1 = load_checkpoint(tmp_path / "one" / "last.ckpt").state_dict
    w2 = load_checkpoint(tmp_path / "two" / "last.ckpt").state_dict
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3) for k in w1)
    files = sorted(os.listdir(tmp_path / "two"))
    assert files == sorted(["best.ckpt", "config.yaml", "curves.png", "last.ckpt", "metrics.jsonl",
                            "summary.json"])
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


def test_resume_with_a_different_world_size(tmp_path):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=40)
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "r"
    a = ARGS.copy()
    a[a.index("--epochs") + 1] = "1"
    first = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "-m", "cifarkit", "train", "--data", str(data),
                            "--out", str(run), *a], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-m", "cifarkit", "train", "--resume", str(run), "--epochs", "2",
                             "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]


def test_hard_stale_shares_its_loss_table_across_processes(tmp_path):
    """Each process trains its own slice of the batch; every process must rank the next batches
    with the losses of all of them. Rank 0 alone would know about half the images it trained."""
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=40)
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    a = ARGS.copy()
    a[a.index("--epochs") + 1] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "cifarkit", "train", "--data", str(data),
                          "--out", str(tmp_path / "r"), *a, "--hard-fraction", "0.5", "--hard-start", "1",
                          "--hard-stale"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # one epoch before --hard-start: the two processes trained all 96 images, 48 each
    table = load_checkpoint(tmp_path / "r" / "last.ckpt").extra["hard_memory"]
    assert table.shape == (96,) and torch.isfinite(table).all()
