"""A bundle measured: every split x view for its card, and `ferray evaluate --bundle` (Ray-free)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ferray.bundle.card import Evaluation, ViewReport
from ferray.bundle.fusion import (
    FusionRule,
    calibrate,
    expected_calibration_error,
    member_accuracies,
    score,
    set_accuracies,
)
from ferray.bundle.load import answering_members, fusion_rule, load_bundle, resolve_bundle
from ferray.bundle.probs_cache import ProbsCache
from ferray.bundle.runtime import Ensemble
from ferray.data.contract import FER_SIZE, DataError, load_split, read_manifest
from ferray.logs import FaceProgress
from ferray.metrics import confusion_matrix, summarize_confusion

log = logging.getLogger(__name__)


def evaluate_views(
    ensemble: Ensemble,
    data,
    splits: list[str],
    selection: str,
    known: dict | None = None,
    sets: dict | None = None,
    cache: ProbsCache | None = None,
) -> dict[str, Evaluation]:
    """Every split x {center crop, ten-crop TTA}: the fused report with each member's and each set's
    accuracy, the selection split marked as such. `known`: {(split, tta): {member: P}} already
    computed; `cache`: members' answers kept from earlier builds (ferray.bundle.probs_cache)."""
    known, checksum = dict(known or {}), read_manifest(data)["checksum"]
    evaluations = {}
    for split in splits:
        faces, labels, _ = load_split(data, split)
        evaluations[split] = Evaluation(selection=split == selection)
        for tta in (False, True):
            if (split, tta) not in known:
                log.info(f"ensemble: {split} ({len(labels):,} faces){' with ten-crop TTA' if tta else ''} ...")
                ensemble.tta = tta
                what = f"ensemble: {split}{' TTA' if tta else ''}"
                known[split, tta] = answered(ensemble, faces, what, cache, (checksum, split))
            probs = known[split, tta]
            fused = {name: probs[name] for name in ensemble.rule.weights}  # the "all" set's members
            report = fused_summary(fused, labels, ensemble.rule)
            report["members"] = member_accuracies(probs, labels, ensemble.rule.weights, list(fused))
            report["sets"] = set_accuracies(probs, labels, ensemble.rule.weights, sets or {})
            evaluations[split].views["tta" if tta else "center"] = ViewReport(**report)
    return evaluations


def fused_summary(probs: dict, labels: np.ndarray, rule: FusionRule) -> dict:
    """The confusion summary of the served answers, with their calibration error before and after
    the temperature (the temperature moves no argmax, so the accuracy is the same either way)."""
    uncalibrated = FusionRule(rule.weights, 1.0)(probs)
    report = summarize_confusion(confusion_matrix(labels, uncalibrated.argmax(1)))
    report["ece"] = expected_calibration_error(calibrate(uncalibrated, rule.temperature), labels)
    report["ece_uncalibrated"] = expected_calibration_error(uncalibrated, labels)
    return report


def _numpy(probs: dict) -> dict[str, np.ndarray]:
    return {name: p.numpy() for name, p in probs.items()}


PROGRESS_EVERY_S = 30.0


def answered(
    ensemble: Ensemble, faces: np.ndarray, what: str, cache: ProbsCache | None = None, where: tuple = ()
) -> dict[str, np.ndarray]:
    """Every member's probabilities of a split's faces, with a progress line every half minute;
    with a `cache` (and `where`: the data's checksum and the split), those it holds are read, not
    forwarded, and the others are kept there."""
    keys = {name: cache.key(ensemble, name, *where) for name in ensemble.members} if cache else {}
    found = {name: p for name, key in keys.items() if (p := cache.get(key, len(faces))) is not None}
    if found:
        log.info(f"{what}: {', '.join(found)} read from the cache {cache.folder}")
    todo = [name for name in ensemble.members if name not in found]
    fresh = {}
    if todo:
        progress = FaceProgress(what, len(faces), every_s=PROGRESS_EVERY_S)
        fresh = _numpy(ensemble.member_probs(torch.from_numpy(faces), progress=progress, names=todo))
        for name in fresh if cache else ():
            cache.put(keys[name], fresh[name])
    return {name: found[name] if name in found else fresh[name] for name in ensemble.members}


def evaluate_bundle(
    bundle: str | Path | None,
    data: str | Path,
    split: str = "PublicTest",
    out: str | Path | None = None,
    tta: bool | None = None,
    int8: bool = False,
    members: str = "all",
) -> dict:
    """The report of the bundle's answers from `members` (a set or member names) on a split, with
    every member and every set of the bundle beside it (all of them are forwarded once, and each set
    fused from those answers); `tta` None: as the bundle says. With `out`, writes
    eval-<split>[-tta].{json,png} there (never into the bundle: it may be the installed default)."""
    from ferray.evaluate import format_report

    ensemble, card = load_bundle(bundle, members="all", int8=int8)
    answering = answering_members(card, members)
    if tta is not None:
        ensemble.tta = tta
    faces, labels, _ = load_split(data, split)
    if faces.shape[1:] != (FER_SIZE, FER_SIZE):
        raise DataError(f"{data}: the bundle takes the prepared 48x48 faces, not {faces.shape[1]}x{faces.shape[2]}")
    probs = answered(ensemble, faces, f"evaluate: {split}{' TTA' if ensemble.tta else ''}")
    rule = fusion_rule(card, answering)
    report = fused_report({n: probs[n] for n in answering}, labels, rule, split, ensemble.tta, resolve_bundle(bundle))
    report["members"] = {name: score(p, labels)[0] for name, p in probs.items()}
    report["sets"] = {name: _set_accuracy(card, probs, labels, name) for name in card.sets}
    report["precision"] = _precision(ensemble, answering[0])
    report["selection_split"] = card.selection_split
    report["selection"] = split == card.selection_split and read_manifest(data)["checksum"] == card.data["checksum"]
    if out is not None:
        log.info(f"wrote {write_fused_report(report, Path(out))}")
    log.info(format_report(report))
    log.info(side_by_side(report, card))
    return report


def _set_accuracy(card, probs: dict, labels: np.ndarray, name: str) -> float:
    names = answering_members(card, name)
    return score(fusion_rule(card, names)({n: probs[n] for n in names}), labels)[0]


def side_by_side(report: dict, card) -> str:
    """Every member and every set of the bundle on the report's split, the answering one marked."""
    view = "ten-crop TTA" if report["tta"] else "center crop"
    lines = [f"{report['split']} ({view}){'  [the selection split: not a test]' if report['selection'] else ''}:"]
    for name, accuracy in report["members"].items():
        member = card.members[name]
        lines.append(f"  member {name:<8} {accuracy:7.2%}  {member.model} on {member.input} faces")
    for name, accuracy in report["sets"].items():
        lines.append(f"  set    {name:<8} {accuracy:7.2%}  {' + '.join(card.sets[name])}")
    lines.append(
        f"  answering: {report['model']} {report['accuracy']:.2%} (T = {report['temperature']:.2f}: calibration "
        f"error {report['ece_uncalibrated']:.3f} -> {report['ece']:.3f}; forwarded in {report['precision']})"
    )
    return "\n".join(lines)


def _precision(ensemble: Ensemble, which: str) -> str:
    """How member `which` was forwarded: the copy's own account (frozen bf16, int8), else fp32 or autocast."""
    runner, autocast = ensemble.runner(which)
    return getattr(runner, "how", "bf16 autocast" if autocast else "fp32")


def fused_report(
    probs: dict,
    labels: np.ndarray,
    rule: FusionRule,
    split: str,
    tta: bool,
    bundle: str | Path,
) -> dict:
    """The evaluation of the answers fused from `probs` (the answering members'), each member's
    accuracy beside it."""
    report = fused_summary(probs, labels, rule)
    return {
        **report,
        "split": split,
        "tta": tta,
        "model": " + ".join(probs) if len(probs) > 1 else f"member {next(iter(probs))}",
        "epoch": "-",
        "members": {name: score(p, labels)[0] for name, p in probs.items()},
        "bundle": str(bundle),
        "weights": dict(rule.weights),
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
