"""`ferray quantize`: calibrate a bundle's Model A for int8 CPU inference, and measure it (Ray-free).

    ferray quantize BUNDLE --data DIR [--faces 256] [--seed 0]

Feeds the ten TTA views of `--faces` Training faces (seeded) through Model A to record its activation
ranges (ferray.models.quantized.calibrate), writes them to BUNDLE/model_a.int8.json, then evaluates
the int8 model on the bundle's selection split and on every split the bundle was tested on, center
crop and TTA, and records those accuracies in bundle.json (members.a.int8) and MODEL_CARD.md beside
the bf16/fp32 ones. Calibration uses Training faces only, so the test splits stay untouched.
`ferray evaluate --bundle BUNDLE --int8`, `ferray predict --int8`, `ferray.load(..., int8=True)` and
the Serve setting `model_a.int8` then forward in int8.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ferray.augment import eval_views
from ferray.bundle import (
    BUNDLE_FILE,
    CARD_FILE,
    default_bundle_path,
    evaluate_views,
    load_bundle,
    model_card,
    read_bundle_card,
    resolve_bundle,
)
from ferray.bundle.card import Int8Card, Int8Evaluation, write_card
from ferray.data.contract import FER_SIZE, DataError, load_split, read_manifest
from ferray.errors import UsageError

log = logging.getLogger(__name__)

RANGES_FILE = "model_{member}.int8.json"
CALIBRATION_SPLIT = "Training"  # never a split that selects or tests


def calibration_crops(data, crop: int, faces: int, seed: int, split: str = CALIBRATION_SPLIT) -> torch.Tensor:
    """The ten TTA views (standardized, as inference makes them) of `faces` faces of `split`, drawn
    without replacement with `seed`."""
    images, _, _ = load_split(data, split)
    if faces < 1 or faces > len(images):
        raise UsageError(f"--faces {faces}: {data} has {len(images):,} {split} faces; give 1..{len(images):,}")
    pick = np.sort(np.random.default_rng(seed).choice(len(images), faces, replace=False))
    return eval_views(torch.from_numpy(images[pick]), crop, tta=True).reshape(-1, 1, crop, crop)


def quantize_bundle(bundle, data, faces: int = 256, seed: int = 0, member: str | None = None) -> Int8Card:
    """Calibrate `member` of `bundle` (default: its first, Model A in a paper bundle) on `data`, write
    its ranges and the measured int8 accuracies into the bundle; returns the member card's new int8
    entry."""
    from ferray.models.quantized import calibrate

    path = resolve_bundle(bundle)
    if str(bundle) == "default":
        raise UsageError(
            f"ferray quantize writes into the bundle, and `default` is the one installed with ferray "
            f"({default_bundle_path()}): copy it (cp -r {default_bundle_path()} mybundle) and quantize "
            "the copy, or name the folder itself"
        )
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(f"{data}: the bundle takes the prepared 48x48 faces, not {manifest['image_size']}")
    card = read_bundle_card(path)
    member = member or card.names()[0]
    if member not in card.members or card.members[member].input != "face":
        raise UsageError(
            f"--member {member!r}: int8 calibrates a member that reads the 48x48 faces; the bundle's are "
            + ", ".join(name for name, m in card.members.items() if m.input == "face")
        )
    ensemble, card = load_bundle(path, "cpu", members=(member,))
    crop = ensemble.members[member].cfg.augment.crop
    crops = calibration_crops(data, crop, faces, seed)
    source = {"split": CALIBRATION_SPLIT, "faces": faces, "seed": seed, "checksum": manifest["checksum"]}
    log.info(f"quantize: calibrating member {member} on {len(crops):,} views of {faces:,} {source['split']} faces ...")
    started = time.perf_counter()
    ranges = calibrate(ensemble.members[member].model, crop, crops)
    ranges["calibration"] = source
    calibrated = time.perf_counter() - started
    log.info(
        f"quantize: {len(ranges['observers'])} activation ranges in {calibrated:.0f} s; compiling the int8 "
        "model (each batch shape once) ..."
    )
    ensemble.int8, ensemble.int8_ranges = True, {member: ranges}
    ensemble.warm_up(member)
    splits = list(card.evaluations) or [card.selection_split]
    selection = card.selection_split
    evaluations = evaluate_views(ensemble, data, splits, selection)
    ranges_file = RANGES_FILE.format(member=member)
    entry = Int8Card(
        ranges=ranges_file,
        how="torchao PT2E, X86InductorQuantizer: int8 weights per channel, uint8 "
        "activations per tensor; compiled by inductor",
        calibration=source,
        made_with=ranges["made_with"],
        calibration_seconds=round(calibrated, 1),
        evaluations={
            split: Int8Evaluation(
                selection=split == selection,
                data_checksum=manifest["checksum"],
                accuracy={view: report.accuracy for view, report in e.views.items()},
            )
            for split, e in evaluations.items()
        },
    )
    _replace(path / ranges_file, json.dumps(ranges, indent=1) + "\n")
    card.members[member].int8 = entry
    write_card(card, path / BUNDLE_FILE)
    _replace(path / CARD_FILE, model_card(card))
    for split, e in entry.evaluations.items():
        before = card.evaluations[split].views if split in card.evaluations else {}
        figures = ", ".join(
            f"{view} {acc:.2%}" + (f" (was {before[view].accuracy:.2%})" if view in before else "")
            for view, acc in e.accuracy.items()
        )
        log.info(f"quantize: {split} ({'selection' if e.selection else 'test'}) int8 accuracy: {figures}")
    log.info(f"quantize: wrote {path / ranges_file} and the int8 figures into {path / BUNDLE_FILE}")
    return entry


def _replace(file: Path, text: str) -> None:
    """`file` replaced whole (a reader, a Serve replica loading the bundle, never sees half of it)."""
    partial = file.with_name(f".{file.name}.partial")
    partial.write_text(text)
    partial.replace(file)
