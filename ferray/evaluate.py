"""`ferray evaluate`: a checkpoint on any split of a prepared dataset (Ray-free, torch only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ferray.data.contract import EMOTIONS, load_split
from ferray.device import default_device, use_bf16
from ferray.engine import TensorBatches, evaluate, model_from_checkpoint
from ferray.metrics import most_confused, plot_confusion

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "PublicTest",
    tta: bool = False,
    out: str | Path | None = None,
    batch_size: int = 256,
    keep_probs: bool = False,
) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix; writes eval-<split>[-tta].{json,png}.
    `keep_probs`: the result also holds "probs" (N, 7) and the faces' "ids" in the split's order
    (not written to the JSON)."""
    device = default_device()
    model, cfg, payload = model_from_checkpoint(checkpoint, device)
    images, labels, ids = load_split(data, split)
    batches = TensorBatches(
        torch.from_numpy(images), torch.from_numpy(labels), batch_size, shuffle=False, drop_last=False
    )
    result = evaluate(
        model,
        batches,
        cfg.augment.crop,
        tta,
        device,
        amp=use_bf16(device, cfg.train.amp),
        scale=cfg.data.input_scale,
        keep_probs=keep_probs,
    )
    if keep_probs:
        result["ids"] = list(ids)
    result.update(
        {
            "checkpoint": str(checkpoint),
            "data": str(data),
            "split": split,
            "tta": tta,
            "model": cfg.model.name,
            "epoch": payload["epoch"],
            "pretrained": payload.get("pretrained", False),
            "selection_split": cfg.data.selection_split,
            "selection": is_selection(cfg, split, data),
        }
    )
    out = Path(out) if out is not None else Path(checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{split}" + ("-tta" if tta else "")
    (out / f"{stem}.json").write_text(
        json.dumps({k: v for k, v in result.items() if k not in ("probs", "ids")}, indent=2) + "\n"
    )
    plot_confusion(
        result["confusion"],
        out / f"{stem}.png",
        f"{cfg.model.name} on {split}{' (TTA)' if tta else ''}: {result['accuracy']:.2%}",
    )
    log.info(format_report(result))
    log.info(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return result


def is_selection(cfg, split: str, data) -> bool:
    """Whether `split` of `data` is the split this model was selected on (then its accuracy is not a
    test): the same split name on the data it was trained on, or on data of the same faces."""
    if split != cfg.data.selection_split:
        return False
    from ferray.data.contract import DataError, read_manifest

    try:
        same = read_manifest(data)["checksum"] == read_manifest(cfg.data.path)["checksum"]
    except (DataError, OSError):
        same = True  # the training data is not here to compare: say so rather than claim a test
    return same


def format_report(result: dict) -> str:
    role = ""
    if "selection" in result:
        role = (
            "  [the selection split: it chose this model, so this is not a test]"
            if result["selection"]
            else "  [a test split: never used to choose anything]"
            if result.get("selection_split")
            else ""
        )
    lines = [
        f"{result['model']} (epoch {result['epoch']}) on {result['split']}"
        f"{' with ten-crop TTA' if result['tta'] else ''}: accuracy {result['accuracy']:.2%} "
        f"({result['samples']:,} faces){role}",
        f"{'class':<10}{'accuracy':>10}{'faces':>8}",
    ]
    for name in EMOTIONS:
        lines.append(f"{name:<10}{result['per_class'][name]:>10.2%}{result['support'][name]:>8,}")
    pairs = ", ".join(f"{a}->{b} {r:.0%}" for a, b, r in most_confused(result["confusion"]))
    lines.append(f"most confused: {pairs}")
    return "\n".join(lines)
