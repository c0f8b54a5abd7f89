"""Accuracy, per-class accuracy and confusion matrices, and their plots (Ray-free)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferray.labels import EMOTIONS


def confusion_matrix(labels, predictions, num_classes: int = len(EMOTIONS)) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize_confusion(cm: np.ndarray) -> dict:
    cm = np.asarray(cm)
    support = cm.sum(1)
    per_class = np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)
    normalized = np.divide(cm, support[:, None], out=np.zeros(cm.shape), where=support[:, None] > 0)
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "samples": int(cm.sum()),
        "per_class": {name: float(a) for name, a in zip(EMOTIONS, per_class)},
        "support": {name: int(s) for name, s in zip(EMOTIONS, support)},
        "confusion": cm.tolist(),
        "confusion_normalized": normalized.round(4).tolist(),
    }


def most_confused(cm: np.ndarray, top: int = 3) -> list[tuple[str, str, float]]:
    cm = np.asarray(cm, float)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    np.fill_diagonal(rates, 0)
    order = np.argsort(-rates, axis=None)[:top]
    return [(EMOTIONS[i // len(cm)], EMOTIONS[i % len(cm)], float(rates.flat[i])) for i in order]


def plot_confusion(cm: np.ndarray, path: str | Path, title: str) -> Path:
    """A normalized confusion matrix as a PNG (what the paper's Figure 5 shows)."""
    from ferray.plotting import pyplot, save

    plt = pyplot()

    cm = np.asarray(cm, float)
    normalized = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(
                j,
                i,
                f"{normalized[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if normalized[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save(fig, path, dpi=120)
