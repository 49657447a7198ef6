"""The curves PNG of a self-supervised run: DINO loss and k-NN top-1 per epoch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..train.plots import save_panels  # noqa: E402

__all__ = ["plot_ssl_curves"]


def plot_ssl_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Left: DINO loss per epoch; right: k-NN top-1 (k = 20 and k = 10) from epoch 0 (random init) on."""
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [h for h in history if not math.isnan(float(h.get("train_loss", math.nan)))]
    ax_loss.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="DINO loss", title="loss")
    epochs = [h["epoch"] for h in history if "knn_top1" in h]
    for key, label in (("knn_top1", "k-NN top-1 (k=20)"), ("knn10_top1", "k-NN top-1 (k=10)")):
        ax_knn.plot(epochs, [h[key] for h in history if "knn_top1" in h], marker="o", label=label)
    ax_knn.set(xlabel="epoch (0 = random init)", ylabel="accuracy (%)", title="k-NN monitor (teacher)")
    ax_knn.legend()
    save_panels(fig, (ax_loss, ax_knn), path, title, legend=False)
