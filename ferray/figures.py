"""The report's figures that no single stage draws: training crops (Figure 3), guided-backprop maps
of one image (`ferray explain`) and a per-class grid of them (Figure 4). Ray-free; matplotlib with
the Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ferray.augment import MEAN, STD, train_views
from ferray.config import AugmentConfig
from ferray.data.contract import EMOTIONS
from ferray.plotting import pyplot, save


def map_to_image(saliency: np.ndarray) -> np.ndarray:
    """A map as a displayable image in [0, 1]: centered on 0, scaled by its 99th |value| percentile."""
    saliency = saliency - saliency.mean()
    spread = np.percentile(np.abs(saliency), 99) or 1.0
    return np.clip(0.5 + 0.5 * saliency / spread, 0, 1)


def _unit(face: np.ndarray) -> np.ndarray:
    """A standardized crop stretched to [0, 1] for display."""
    return (face - face.min()) / max(float(face.max() - face.min()), 1e-6)


def training_crops(face: np.ndarray, augment: AugmentConfig, count: int = 8, seed: int = 0) -> np.ndarray:
    """`count` views of one uint8 face exactly as training makes them, back on the [0, 1] scale."""
    torch.manual_seed(seed)
    batch = torch.from_numpy(np.ascontiguousarray(face)).unsqueeze(0).repeat(count, 1, 1)
    views = train_views(batch, augment)
    return (views * STD + MEAN).clamp(0, 1)[:, 0].numpy()


def plot_crops(
    face: np.ndarray, augment: AugmentConfig, path: str | Path, count: int = 8, seed: int = 0, title: str = ""
) -> Path:
    """The face, then `count` random training views (crop, flip, rotation, shift, zoom, jitter)."""
    plt = pyplot()
    crops = training_crops(face, augment, count, seed)
    columns = min(count + 1, 5)
    rows = -(-(count + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    panels = [(face / 255.0, f"face {face.shape[0]}x{face.shape[1]}")]
    panels += [(c, f"view {k} ({c.shape[0]}x{c.shape[1]})") for k, c in enumerate(crops, 1)]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, name) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=7)
    return save(fig, path, title)


def plot_guided_grid(columns: dict[int, list[dict]], path: str | Path, title: str = "") -> Path:
    """Classes as columns; for each face a row pair: the face, then its guided-backprop map.
    `columns` maps a class index to rows of {crop, map, probs} (as ferray.explain makes them)."""

    plt = pyplot()
    per_class = max(len(rows) for rows in columns.values())
    fig, axes = plt.subplots(
        2 * per_class, len(columns), figsize=(1.35 * len(columns), 1.45 * 2 * per_class), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for j, (label, rows) in enumerate(sorted(columns.items())):
        axes[0, j].set_title(EMOTIONS[label], fontsize=8)
        for i, row in enumerate(rows):
            predicted = int(np.argmax(row["probs"]))
            axes[2 * i, j].imshow(_unit(row["crop"]), cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, j].imshow(map_to_image(row["map"]), cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, j].text(
                0.5,
                -0.08,
                f"pred {EMOTIONS[predicted]}",
                transform=axes[2 * i + 1, j].transAxes,
                ha="center",
                va="top",
                fontsize=6,
            )
    return save(fig, path, title)


def plot_explanations(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Rows of (face, guided map, |map| over the face); a row holds crop, map, probs and label (or None)."""

    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(5.4, 1.8 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        face = _unit(row["crop"])
        axes[i, 0].imshow(face, cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(map_to_image(row["map"]), cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(face, cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(np.abs(row["map"]), cmap="inferno", alpha=0.55)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        predicted = int(np.argmax(row["probs"]))
        truth = f"true {EMOTIONS[row['label']]}\n" if row.get("label") is not None else ""
        axes[i, 0].set_ylabel(f"{truth}predicted {EMOTIONS[predicted]}\n{row['probs'][predicted]:.0%}", fontsize=7)
    for ax, name in zip(axes[0], ("face (center crop)", "guided backprop", "|map| over face")):
        ax.set_title(name, fontsize=8)
    return save(fig, path, title)


def training_views(
    data, out, checkpoint=None, experiment=None, overrides=(), index: int = 0, count: int = 8, seed: int = 0
):
    """`ferray crops`: a Training face of `data` and `count` random views of it, with the augmentation of
    a checkpoint's config or an experiment file (plus `overrides`); the PNG's path."""
    from ferray.config import apply_overrides, from_dict, load_config
    from ferray.data.contract import load_split
    from ferray.engine import load_checkpoint
    from ferray.errors import UsageError

    if checkpoint is not None:
        cfg = from_dict(apply_overrides(load_checkpoint(checkpoint)["config"], list(overrides)))
    else:
        cfg = load_config(experiment, list(overrides))
    faces, _, _ = load_split(data, cfg.data.train_split)
    if not 0 <= index < len(faces) or count < 1:
        raise UsageError(
            f"--index must be in 0..{len(faces) - 1} ({data} has {len(faces):,} "
            f"{cfg.data.train_split} faces) and --count at least 1"
        )
    return plot_crops(
        faces[index],
        cfg.augment,
        out,
        count,
        seed,
        title=f"random {cfg.augment.crop}x{cfg.augment.crop} training views ({cfg.name})",
    )


def plot_training_curves(rows: list[dict], path: str | Path, title: str = "", kept: int | None = None) -> Path:
    """A classifier run's curves from its metrics.jsonl rows: training loss and cross-entropy, the
    selection split's loss; training accuracy (under augmentation) against the selection split's,
    the raw weights and their moving average apart where both were evaluated; the center term's
    share of the loss."""
    from ferray.plotting import pyplot, save

    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax, share_ax) = plt.subplots(1, 3, figsize=(12, 3.4))
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    loss_ax.plot(epochs, [r["train_ce"] for r in rows], label="train cross-entropy", linestyle=":")
    loss_ax.plot(epochs, [r["eval_loss"] for r in rows], label="selection split log-loss")
    acc_ax.plot(epochs, [r["train_acc"] for r in rows], label="train (augmented)")
    if all("eval_raw_acc" in r for r in rows):
        acc_ax.plot(epochs, [r["eval_raw_acc"] for r in rows], label="selection, raw weights")
        acc_ax.plot(epochs, [r["eval_ema_acc"] for r in rows], label="selection, EMA weights")
    else:
        acc_ax.plot(epochs, [r["eval_acc"] for r in rows], label="selection split")
    # the epoch the run kept (its result.json's best_epoch: of tied epochs, the one checkpointed), else the best
    best = next((r for r in rows if r["epoch"] == kept), None) or max(rows, key=lambda r: r["eval_acc"])
    acc_ax.scatter([best["epoch"]], [best["eval_acc"]], color="black", zorder=3, label=f"kept: epoch {best['epoch']}")
    share_ax.plot(epochs, [100 * r.get("train_center_share", 0.0) for r in rows], label="center term, % of CE")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy"), (share_ax, "center term share (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path, title)
