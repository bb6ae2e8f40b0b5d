"""Figures made for a report: d2l's training plot (train loss, train and test accuracy per
epoch, validation accuracy where there is any) and an evaluation's confusion matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
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
    for name, style in (("train_acc", "s--"), ("test_acc", "^-."), ("val_acc", "v:")):
        if name in history[0]:
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


def confusion_figure(confusion, class_names) -> Figure:
    """The (true, predicted) counts as a grid, rows normalised to fractions of each class,
    each cell labelled with its count."""
    fractions = confusion / confusion.sum(axis=1, keepdims=True).clip(min=1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for (row, column), count in np.ndenumerate(confusion):
        ax.text(column, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if fractions[row, column] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    return fig

