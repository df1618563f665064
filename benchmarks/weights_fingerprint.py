"""Fingerprints of three small deterministic training runs: a refactoring check.

Trains three configurations that between them use every part of the training core (flips,
Muon, progressive sizes, alternating flip, a proxy for selective backprop in bf16 with the native
kernels, EMA, selection by the network itself, cutout, label smoothing) on a synthetic set the
tests also use, and prints a SHA-256 of each run's final weights and of its metrics (without the
timings). Run it on two checkouts; equal lines mean the change did not alter what training does.

    CIFARKIT_NATIVE=always python benchmarks/weights_fingerprint.py --src ../old-checkout OUT_OLD
    CIFARKIT_NATIVE=always python benchmarks/weights_fingerprint.py OUT_NEW
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "tudui": dict(model="tudui_relu", optimizer="adamw", lr=3e-3, precision="fp32", flip=True, crop_pad=2),
    "fast-muon-prog-alt-proxy": dict(
        model="fast", model_args={"widths": [8, 16, 16]}, optimizer="muon", lr=0.24,
        optimizer_args={"whiten_bias_epochs": 1}, hard_fraction=0.5, hard_proxy=[4, 8, 8],
        progressive=[16, 24], flip=True, alt_flip=True, crop_pad=2, precision="bf16"),
    "ema-hard-cutout": dict(model="tudui_relu", optimizer="sgd", lr=0.05, ema=0.9, hard_fraction=0.5,
                            hard_start=1, cutout=4, precision="fp32", label_smoothing=0.1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a new folder for the data and the runs")
    ap.add_argument("--src", type=Path, default=ROOT, help="the checkout whose cifarkit to run")
    a = ap.parse_args()
    sys.path[:0] = [str(a.src / "src"), str(ROOT / "tests")]
    from helpers import make_folder
    import cifarkit
    from cifarkit import load_checkpoint, resolve_config, train
    print("cifarkit from", Path(cifarkit.__file__).parent)
    data = make_folder(a.out / "d", classes=("a", "b", "c"), n_per_class=40)
    for name, kw in RUNS.items():
        cfg = resolve_config("tutorial", overrides=dict(
            data=str(data), out=str(a.out / name), val_size=24, epochs=3, batch_size=16,
            tensorboard=False, deterministic=True, **kw))
        s = train(cfg, progress=False, log=lambda *x: None)
        ck = load_checkpoint(a.out / name / "last.ckpt")
        h = hashlib.sha256()
        for k in sorted(ck.state_dict):
            h.update(k.encode())
            h.update(ck.state_dict[k].float().numpy().tobytes())
        m = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s", "val_seconds")}
             for line in (a.out / name / "metrics.jsonl").read_text().splitlines()]
        print(f"{name:<26} weights {h.hexdigest()[:16]}  metrics "
              f"{hashlib.sha256(json.dumps(m).encode()).hexdigest()[:16]}  val {s['best_val_acc']:.4f}")


if __name__ == "__main__":
    main()
