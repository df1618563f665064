"""Every matplotlib figure cifarkit draws (Agg backend: works without a display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    import io

    from . import atomic
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic.write_bytes(Path(path), buf.getvalue())


def plot_curves(history: list, path) -> None:
    """Loss and accuracy per epoch, train and val."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    vx = [h["epoch"] for h in history if h.get("val_loss") is not None]
    a1.plot(vx, [h["val_loss"] for h in history if h.get("val_loss") is not None], "s-", label="val")
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    a2.plot(vx, [h["val_acc"] for h in history if h.get("val_acc") is not None], "s-", label="val")
    check = [h for h in history if h.get("val_check_acc") is not None]   # eval_subset passes
    if check:
        cx = [h["epoch"] for h in check]
        a1.plot(cx, [h["val_check_loss"] for h in check], "x", label="val check")
        a2.plot(cx, [h["val_check_acc"] for h in check], "x",
                label=f"val check ({check[-1]['val_check_images']:,} images)")
    a1.set_xlabel("epoch"); a1.set_ylabel("loss"); a1.set_title("loss"); a1.legend(); a1.grid(alpha=.3)
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy"); a2.set_title("accuracy"); a2.legend()
    a2.grid(alpha=.3)
    _save(fig, path)


def plot_confusion(confusion, classes, path) -> None:
    """Counts and row-normalised (per true class) side by side."""
    _save(confusion_figure(confusion, classes), path)


def confusion_figure(confusion, classes):
    plt = _plt()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    size = max(5, 0.55 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    for ax, data, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues")
        ax.set_title(title); ax.set_xlabel("predicted"); ax.set_ylabel("true")
        ax.set_xticks(range(k)); ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k)); ax.set_yticklabels(classes, fontsize=8)
        if k <= 20:
            hi = data.max() or 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if data[i, j] > hi / 2 else "black")
    return fig


def image_grid(images_uint8, titles, path, cols: int = 10, scale: float = 1.2) -> None:
    """A grid of (N,3,H,W) uint8 images with a caption each."""
    plt = _plt()
    n = len(images_uint8)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * (scale + 0.25)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images_uint8, titles):
        ax.imshow(np.asarray(img).transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(title, fontsize=7)
    _save(fig, path)


def feature_maps(maps, title: str, path, max_maps: int = 64) -> None:
    """(C,H,W) float activations, one panel per channel."""
    plt = _plt()
    maps = np.asarray(maps)[:max_maps]
    c = len(maps)
    cols = min(8, c)
    rows = (c + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.3 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, m) in enumerate(zip(axes.flat, maps)):
        ax.imshow(m, cmap="viridis", interpolation="nearest")
        ax.set_title(str(i), fontsize=6)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
