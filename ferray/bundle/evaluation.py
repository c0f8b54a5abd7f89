"""A bundle measured: every split x view for its card, and `ferray evaluate --bundle` (Ray-free)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ferray.bundle.card import Evaluation, ViewReport
from ferray.bundle.fusion import FusionRule, calibrate, expected_calibration_error, fuse, member_accuracies, score
from ferray.bundle.load import load_bundle, resolve_bundle
from ferray.bundle.runtime import Ensemble
from ferray.data.contract import FER_SIZE, DataError, load_split, read_manifest
from ferray.metrics import confusion_matrix, summarize_confusion

log = logging.getLogger(__name__)


def evaluate_views(
    ensemble: Ensemble, data, splits: list[str], selection: str, known: dict | None = None
) -> dict[str, Evaluation]:
    """Every split x {center crop, ten-crop TTA}: the fused report with each member's accuracy, the
    selection split marked as such. `known`: {(split, tta): (P_A, P_B)} already computed."""
    known = dict(known or {})
    evaluations = {}
    for split in splits:
        faces, labels, _ = load_split(data, split)
        evaluations[split] = Evaluation(selection=split == selection)
        for tta in (False, True):
            if (split, tta) not in known:
                log.info(f"ensemble: {split} ({len(labels):,} faces){' with ten-crop TTA' if tta else ''} ...")
                ensemble.tta = tta
                known[split, tta] = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
            pa, pb = known[split, tta]
            report = fused_summary(pa, pb, labels, ensemble.rule)
            report["members"] = member_accuracies(pa, pb, labels, ensemble.weight_a)
            evaluations[split].views["tta" if tta else "center"] = ViewReport(**report)
    return evaluations


def fused_summary(pa: np.ndarray, pb: np.ndarray | None, labels: np.ndarray, rule: FusionRule) -> dict:
    """The confusion summary of the served answers, with their calibration error before and after
    the temperature (the temperature moves no argmax, so the accuracy is the same either way)."""
    fused = fuse(pa, pb, rule.weight_a)
    report = summarize_confusion(confusion_matrix(labels, fused.argmax(1)))
    report["ece"] = expected_calibration_error(calibrate(fused, rule.temperature), labels)
    report["ece_uncalibrated"] = expected_calibration_error(fused, labels)
    return report


def _numpy(pair) -> tuple[np.ndarray, np.ndarray | None]:
    pa, pb = pair
    return pa.numpy(), None if pb is None else pb.numpy()


def evaluate_bundle(
    bundle: str | Path | None,
    data: str | Path,
    split: str = "PublicTest",
    out: str | Path | None = None,
    tta: bool | None = None,
    int8: bool = False,
    members: str = "all",
) -> dict:
    """The ensemble's report on a split, with each member's accuracy beside it; `tta` None: as the
    bundle says (the fusion weight is the bundle's either way). With `out`, writes
    eval-<split>[-tta].{json,png} there (never into the bundle: it may be the installed default)."""
    from ferray.evaluate import format_report

    ensemble, card = load_bundle(bundle, members=members, int8=int8)
    if tta is not None:
        ensemble.tta = tta
    faces, labels, _ = load_split(data, split)
    if faces.shape[1:] != (FER_SIZE, FER_SIZE):
        raise DataError(f"{data}: the bundle takes the prepared 48x48 faces, not {faces.shape[1]}x{faces.shape[2]}")
    pa, pb = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
    report = fused_report(pa, pb, labels, ensemble.rule, split, ensemble.tta, resolve_bundle(bundle))
    report["precision"] = _precision(ensemble, "a")
    report["selection_split"] = card.selection_split
    report["selection"] = split == card.selection_split and read_manifest(data)["checksum"] == card.data["checksum"]
    if out is not None:
        log.info(f"wrote {write_fused_report(report, Path(out))}")
    log.info(format_report(report))
    members = ", ".join(f"{name.upper()} {acc:.2%}" for name, acc in report["members"].items())
    log.info(
        f"members on {split}: {members}, ensemble {report['accuracy']:.2%} (w_A = {ensemble.weight_a:.2f}, "
        f"T = {ensemble.temperature:.2f}: calibration error {report['ece_uncalibrated']:.3f} -> "
        f"{report['ece']:.3f}; A forwarded in {report['precision']})"
        + ("  [the bundle's selection split: not a test]" if report["selection"] else "")
    )
    return report


def _precision(ensemble: Ensemble, which: str) -> str:
    """How member `which` was forwarded: the copy's own account (frozen bf16, int8), else fp32 or autocast."""
    runner, autocast = ensemble.runner(which)
    return getattr(runner, "how", "bf16 autocast" if autocast else "fp32")


def fused_report(
    pa: np.ndarray,
    pb: np.ndarray | None,
    labels: np.ndarray,
    rule: FusionRule,
    split: str,
    tta: bool,
    bundle: str | Path,
) -> dict:
    """The ensemble's evaluation from its members' probabilities, each member's accuracy beside it."""
    report = fused_summary(pa, pb, labels, rule)
    members = {"a": score(pa, labels)[0]} | ({"b": score(pb, labels)[0]} if pb is not None else {})
    return {
        **report,
        "split": split,
        "tta": tta,
        "model": "ensemble (A + B)" if pb is not None else "Model A",
        "epoch": "-",
        "members": members,
        "bundle": str(bundle),
        "weight_a": rule.weight_a,
        "temperature": rule.temperature,
    }


def write_fused_report(report: dict, out: Path) -> Path:
    """eval-<split>[-tta][-int8].json and .png (the normalized confusion matrix) in `out`."""
    from ferray.metrics import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    int8 = report.get("precision", "").startswith("int8")
    stem = out / (f"eval-{report['split']}" + ("-tta" if report["tta"] else "") + ("-int8" if int8 else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(
        report["confusion"],
        stem.with_suffix(".png"),
        f"{report['model']} on {report['split']}{' (TTA)' if report['tta'] else ''}: {report['accuracy']:.2%}",
    )
    return stem.with_suffix(".json")
