"""PNG figures of training runs: curves, confusion matrices, comparisons."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "save_panels"]


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (batch argmax)")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], label="val top-1")
    if "ema_val_top1" in history[0]:
        ax_acc.plot(epochs, [h["ema_val_top1"] for h in history], label="val top-1 (EMA)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    save_panels(fig, (ax_loss, ax_acc), path, title)


def save_panels(fig, axes, path: Path, title: str = "", legend: bool = True) -> None:
    """The common end of every curves figure: grid (and legend) on each panel, the title, write, close."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 1.5)))
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
