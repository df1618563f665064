"""End to end on real CIFAR-10 images (a symlinked subset of the shared folder): train through the
CLI in a subprocess, then evaluate, and assert real learning."""
import json
import os
import subprocess
import sys

from helpers import real_subset


def test_cli_trains_on_real_images_well_above_chance(real_data, tmp_path):
    data = real_subset(real_data, tmp_path / "subset", per_class=250)   # 2,500 real images
    out = tmp_path / "run"
    env = {**os.environ, "CIFARKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "cifarkit", "train", "--data", str(data), "--out", str(out),
           "--model", "tudui_relu", "--optimizer", "adamw", "--lr", "0.002", "--batch-size", "64",
           "--epochs", "8", "--val-size", "500", "--flip"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch   8/8" in r.stdout
    assert "\r" not in r.stderr            # not a terminal: plain progress lines only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.30, summary    # chance is 0.10
    r = subprocess.run([sys.executable, "-m", "cifarkit", "eval", str(out / "best.ckpt"), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n"] == 500 and abs(res["accuracy"] - summary["best_val_acc"]) < 1e-6
