"""d2l's training plot, made for a report: train loss, and train and test accuracy, per
epoch."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curves_figure(history: list[dict]) -> Figure:
    """Two panels, loss and accuracy, each epoch a marker (one epoch is one point).
    matplotlib's Figure draws without pyplot, so no global backend is chosen."""
    epochs = [record["epoch"] for record in history]
    fig = Figure(figsize=(8, 3.3))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["loss"] for r in history], "o-", label="train loss")
    loss_ax.set_ylabel("loss")
    for name, style in (("train_acc", "s--"), ("test_acc", "^-.")):
        acc_ax.plot(epochs, [r[name] for r in history], style, label=name.replace("_", " "))
    acc_ax.set_ylabel("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, max(epochs[-1], 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.4)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: Path) -> None:
    curves_figure(history).savefig(path, dpi=120)
