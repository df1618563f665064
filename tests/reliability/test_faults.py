"""Issue 5, faults: kill -9 at random moments, Ctrl-C, exact resume, NaN, disk full, logs."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_one_clear_line, cli, make_folder

from cifarkit import load_checkpoint


def _spawn(argv, env):
    return subprocess.Popen([sys.executable, "-m", "cifarkit", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def data_and_env(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=120)
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    # decode once so every start is equally quick
    subprocess.run([sys.executable, "-c", f"from cifarkit.data import load_data; load_data({str(data)!r})"],
                   env=env, check=True)
    return data, env


TRAIN = ["--epochs", "6", "--batch-size", "8", "--val-size", "30", "--model", "tudui_relu",
         "--optimizer", "adamw", "--lr", "0.002", "--flip", "--crop-pad", "2", "--no-tensorboard"]


def _checkpoints_intact(run: Path) -> int:
    """Every checkpoint present loads; returns the epoch of last.ckpt (0 if none yet)."""
    for name in ("best.ckpt", "last.ckpt"):
        if (run / name).exists():
            load_checkpoint(run / name)        # raises on a torn file
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            json.loads(line)                    # never half a line
    return load_checkpoint(run / "last.ckpt").epoch if (run / "last.ckpt").exists() else 0


def test_kill_minus_nine_at_random_points_then_resume(data_and_env, tmp_path):
    data, env = data_and_env
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    # ResNet-18: slow enough steps and a 45 MB checkpoint, so kills land in training and in writes.
    heavy = ["--epochs", "8", "--batch-size", "16", "--val-size", "30", "--model", "resnet18",
             "--optimizer", "adamw", "--lr", "0.002", "--no-tensorboard"]
    for attempt in range(12):
        argv = ["train", "--resume", run] if (run / "last.ckpt").exists() else \
            ["train", "--data", data, "--out", run, *heavy]
        p = _spawn(argv, env)
        time.sleep(rng.uniform(2.5, 7.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=60)
        _checkpoints_intact(run)
        if kills >= 5 and (run / "last.ckpt").exists():
            break
    assert kills >= 5
    p = _spawn(["train", "--resume", run] if (run / "last.ckpt").exists()
               else ["train", "--data", data, "--out", run, *heavy], env)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert _checkpoints_intact(run) == 8
    epochs = [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_kill_while_checkpoint_is_written_keeps_the_old_one(tmp_path):
    """A process killed in the middle of writing a checkpoint leaves the previous file intact."""
    target = tmp_path / "last.ckpt"
    script = f"""
import os, signal, torch
from cifarkit.atomic import torch_save
torch_save({{"v": torch.ones(4)}}, {str(target)!r})
real_save = torch.save
def half_then_die(obj, f, *a, **k):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
torch_save({{"v": torch.zeros(4)}}, {str(target)!r})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(4))
    # the next save sweeps the stale temp file away
    from cifarkit.atomic import torch_save
    torch_save({"v": torch.full((4,), 2.0)}, target)
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_ctrl_c_saves_and_says_how_to_resume_then_resume_is_bit_exact(data_and_env, tmp_path):
    data, env = data_and_env
    det = [*TRAIN, "--deterministic", "--quiet"]
    full = _spawn(["train", "--data", data, "--out", tmp_path / "full", *det], env)
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    cut = _spawn(["train", "--data", data, "--out", tmp_path / "cut", *det], env)
    for line in cut.stdout:            # interrupt early in epoch 3, wherever it happens to be
        if line.startswith("epoch   2/"):
            break
    time.sleep(random.Random(7).uniform(0.05, 0.3))
    assert cut.poll() is None, "training finished before the interrupt; make it longer"
    cut.send_signal(signal.SIGINT)
    out, err = cut.communicate(timeout=120)
    assert cut.returncode == 130
    assert_one_clear_line(1, err, "interrupted", f"--resume {tmp_path / 'cut'}")
    res = _spawn(["train", "--resume", tmp_path / "cut", "--quiet"], env)
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    a = load_checkpoint(tmp_path / "full" / "last.ckpt").state_dict
    b = load_checkpoint(tmp_path / "cut" / "last.ckpt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s", "val_seconds")}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "full") == strip(tmp_path / "cut")


def test_nan_loss_stops_clearly_and_keeps_last_good(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=20)
    base = ["train", "--data", data, "--out", tmp_path / "r", "--batch-size", "8", "--val-size", "8",
            "--quiet", "--no-tensorboard", "--precision", "fp32"]
    assert cli(base + ["--epochs", "1"], capsys)[0] == 0
    before = (tmp_path / "r" / "last.ckpt").read_bytes()
    rc, _, err = cli(base + ["--epochs", "2", "--lr", "1e20"], capsys)
    assert_one_clear_line(rc, err, "loss became", "step", "learning rate")
    assert (tmp_path / "r" / "last.ckpt").read_bytes() == before


def test_disk_full_while_saving_keeps_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=20)
    run = tmp_path / "r"
    import cifarkit.atomic as ck
    real_fsync = os.fsync

    def fsync(fd):
        if (run / "last.ckpt").exists():   # epoch 1 was saved; then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(ck.os, "fsync", fsync)
    rc, _, err = cli(["train", "--data", data, "--out", run, "--epochs", "3", "--batch-size", "8",
                      "--val-size", "8", "--quiet", "--no-tensorboard"], capsys)
    monkeypatch.undo()
    assert_one_clear_line(rc, err, "No space left", "untouched")
    assert load_checkpoint(run / "last.ckpt").epoch == 1
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]


def test_output_folder_not_writable(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=10)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = cli(["train", "--data", data, "--out", blocker / "run", "--epochs", "1", "--quiet"], capsys)
    assert_one_clear_line(rc, err, "cannot create run folder")


def test_log_output_is_plain_when_not_a_terminal(data_and_env, tmp_path):
    data, env = data_and_env
    env = {**env}
    p = _spawn(["train", "--data", data, "--out", tmp_path / "r", "--epochs", "2", "--batch-size", "4",
                "--val-size", "30", "--model", "tudui", "--no-tensorboard"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "\r" not in out + err and "\x1b[" not in out + err     # no carriage returns, no ANSI codes
    assert len(err.splitlines()) < 30                              # a few progress lines, not a flood
    assert out.count("epoch ") >= 2
