"""The report's figures that no single stage draws: training crops (Figure 3) and a per-class grid of
guided-backprop maps (Figure 4). Ray-free; matplotlib with the Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ferray.augment import MEAN, STD, train_views
from ferray.config import AugmentConfig
from ferray.data.contract import EMOTIONS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_crops(face: np.ndarray, augment: AugmentConfig, count: int = 8, seed: int = 0) -> np.ndarray:
    """`count` views of one uint8 face exactly as training makes them, back on the [0, 1] scale."""
    torch.manual_seed(seed)
    batch = torch.from_numpy(np.ascontiguousarray(face)).unsqueeze(0).repeat(count, 1, 1)
    views = train_views(batch, augment)
    return (views * STD + MEAN).clamp(0, 1)[:, 0].numpy()


def plot_crops(face: np.ndarray, augment: AugmentConfig, path: str | Path, count: int = 8, seed: int = 0,
               title: str = "") -> Path:
    """The face, then `count` random training views (crop, flip, rotation, shift, zoom, jitter)."""
    plt = _pyplot()
    crops = training_crops(face, augment, count, seed)
    columns = min(count + 1, 5)
    rows = -(-(count + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    panels = [(face / 255.0, f"face {face.shape[0]}x{face.shape[1]}")]
    panels += [(c, f"crop {c.shape[0]}x{c.shape[1]}") for c in crops]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, name) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_guided_grid(columns: dict[int, list[dict]], path: str | Path, title: str = "") -> Path:
    """Classes as columns; for each face a row pair: the face, then its guided-backprop map.
    `columns` maps a class index to rows of {crop, map, probs} (as ferray.explain makes them)."""
    from ferray.explain import map_to_image

    plt = _pyplot()
    per_class = max(len(rows) for rows in columns.values())
    fig, axes = plt.subplots(2 * per_class, len(columns), figsize=(1.35 * len(columns), 1.45 * 2 * per_class),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (label, rows) in enumerate(sorted(columns.items())):
        axes[0, j].set_title(EMOTIONS[label], fontsize=8)
        for i, row in enumerate(rows):
            face = row["crop"]
            face = (face - face.min()) / max(float(face.max() - face.min()), 1e-6)
            predicted = int(np.argmax(row["probs"]))
            axes[2 * i, j].imshow(face, cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, j].imshow(map_to_image(row["map"]), cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, j].text(0.5, -0.08, f"pred {EMOTIONS[predicted]}", transform=axes[2 * i + 1, j].transAxes,
                                    ha="center", va="top", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
