"""d2l's training plot: train loss, train acc and test acc per epoch."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [record["epoch"] for record in history]
    fig, ax = plt.subplots(figsize=(4.5, 3.3))
    for name, style in (("loss", "-"), ("train_acc", "m--"), ("test_acc", "g-.")):
        ax.plot(epochs, [record[name] for record in history], style, label=name.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
