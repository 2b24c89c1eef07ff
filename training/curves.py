"""The training curves of a run (``curves.png``): loss and accuracy per epoch, train beside validation."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: Path) -> None:
    """Plot ``history`` (one dict per epoch, as history.jsonl holds them) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the training machines
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (augmented)")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    for key in sorted(k for k in history[-1] if k.startswith("val_acc_")):  # e.g. the DCNN's ten-crop figure
        ax_acc.plot(epochs, [h.get(key) for h in history], label=key.removeprefix("val_acc_"))
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
