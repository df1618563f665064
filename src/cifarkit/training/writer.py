"""What a run leaves in its folder: config.yaml, metrics.jsonl, TensorBoard events, best.ckpt and
last.ckpt, summary.json and curves.png. Only the main process writes; every file is written
atomically (``atomic.py``), so a kill at any moment leaves the previous version whole.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .. import atomic, checkpoint as ckpt_mod
from ..config import save_yaml


class RunWriter:
    def __init__(self, run_dir: Path, cfg, enabled: bool = True):
        self.run_dir, self.cfg, self.enabled = Path(run_dir), cfg, enabled
        self.tb = None

    def start(self, start_epoch: int, resumed: bool, samples) -> None:
        """config.yaml, and TensorBoard (from ``start_epoch``; a new run gets augmented samples)."""
        if not self.enabled:
            return
        save_yaml(self.cfg, self.run_dir / "config.yaml")
        self.tb = _tensorboard(self.run_dir, self.cfg, start_epoch)
        if self.tb is not None and not resumed:
            self.tb.add_images("train_samples_augmented", samples().cpu(), 0, dataformats="NCHW")

    def metrics(self, history: list, metrics: dict, val_result, classes) -> None:
        """After each epoch: metrics.jsonl, TensorBoard scalars (and the last epoch's confusion matrix)."""
        if not self.enabled:
            return
        # Rewritten whole from the history each epoch, so a kill never leaves half a line and a
        # resume never duplicates one.
        atomic.write_bytes(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, metrics["epoch"])
            if val_result is not None and metrics["epoch"] == self.cfg.epochs:
                from ..plots import confusion_figure
                self.tb.add_figure("val_confusion", confusion_figure(val_result.confusion, classes), metrics["epoch"])
            self.tb.flush()

    def checkpoints(self, make_ckpt, is_best: bool) -> None:
        """best.ckpt when the val accuracy improved (weights only), last.ckpt always (with the
        resume state). ``make_ckpt()`` builds the Checkpoint (only where it is written)."""
        if not self.enabled:
            return
        ckpt = make_ckpt()
        if is_best:
            ckpt_mod.save_checkpoint(ckpt, self.run_dir / "best.ckpt", with_training_state=False)
        ckpt_mod.save_checkpoint(ckpt, self.run_dir / "last.ckpt")

    def interrupted(self, ckpt) -> None:
        """A Ctrl-C mid-epoch: last.ckpt holds the exact position (the epoch's checkpoints stand)."""
        if self.enabled:
            ckpt_mod.save_checkpoint(ckpt, self.run_dir / "last.ckpt")

    def finish(self, summary: dict, history: list) -> None:
        self.close()
        if not self.enabled:
            return
        atomic.write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        try:
            from ..plots import plot_curves
            plot_curves(history, self.run_dir / "curves.png")
        except Exception as exc:  # a plotting problem must never lose a finished run
            warnings.warn(f"could not draw curves.png: {exc}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard(run_dir: Path, cfg, start_epoch: int):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed: no TensorBoard events written")
        return None
    # purge_step: a resumed run drops the events of the epochs it repeats
    return SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)


# ----------------------------------------------------------------------------- what is reported

def summary(cfg, p, history: list, wall: float, run_dir: Path, processes: int) -> dict:
    """summary.json: the run's result and where its time went."""
    import torch
    vals = [h["val_acc"] for h in history if h["val_acc"] is not None]
    seconds = sum(h["seconds"] for h in history)
    eval_seconds = sum(h.get("val_seconds", 0.0) for h in history)
    seen = sum(h["images_per_s"] * h["seconds"] for h in history)
    return {
        "recipe": cfg.recipe, "model": cfg.model,
        "best_val_acc": max(vals) if vals else None,
        "final_val_acc": vals[-1] if vals else None,
        "epochs": len(history),
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": wall,
        # data loading, kernel build, checkpoints, plots: what the user waits for beyond the work
        "other_seconds": max(0.0, wall - seconds - eval_seconds),
        "train_images_per_s": seen / max(seconds, 1e-9),
        "device": str(p.device) if p.device.type != "cuda" else torch.cuda.get_device_name(p.device),
        "precision": p.precision,
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "n_train": len(p.train), "n_val": len(p.val),
        "run_dir": str(run_dir),
        "processes": processes,
    }


def epoch_line(m: dict, epochs: int, image_size: int = 0) -> str:
    val = (f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}" if m["val_acc"] is not None
           else f"val check acc {m['val_check_acc']:.4f} ({m['val_check_images']:,} images)"
           if m.get("val_check_acc") is not None else "val -")
    size = f" | {m['image_size']} px" if m.get("image_size") and m["image_size"] != image_size else ""
    return (f"epoch {m['epoch']:>3}/{epochs}{size} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
            f" | {val} | lr {m['lr']:.4g} | {m['seconds']:.1f}s {m['images_per_s']:,.0f} img/s")


def final_line(s: dict, run_dir: Path) -> str:
    if s["best_val_acc"] is None:
        result = f"no validation split (--val-size 0): the final weights are {run_dir / 'last.ckpt'}"
    else:
        result = f"best val accuracy {s['best_val_acc']:.4f}"
    return (f"{result} | {s['train_seconds']:.1f}s training, {s['eval_seconds']:.1f}s "
            f"validation, {s['other_seconds']:.1f}s other | {s['train_images_per_s']:,.0f} "
            f"train images/s | run folder {run_dir}")
