"""`ferray ensemble`: a serving bundle made from trained checkpoints (Ray-free).

A bundle is a folder: bundle.json (the typed BundleCard: fusion, labels, members, every
evaluation, each member's training facts), the members' checkpoints with only what inference
needs (half-precision weights + config; loaded with weights_only=True), the members' run records
(run_a/, run_b/), confusion matrices and MODEL_CARD.md, rendered from the card alone.
`ferray.bundle.load_bundle` rebuilds everything from the folder alone.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np
import torch

from ferray import __version__
from ferray.bundle.card import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    CARD_FILE,
    TRAINING_FIGURE,
    BundleCard,
    MemberCard,
    Members,
    SRCard,
    write_card,
)
from ferray.bundle.evaluation import _numpy, evaluate_views
from ferray.bundle.fusion import fit_fusion, member_accuracies
from ferray.bundle.runtime import load_members
from ferray.config import ExperimentConfig
from ferray.data.contract import (
    EMOTIONS,
    FER_SIZE,
    DataError,
    atomic_output,
    load_split,
    read_manifest,
    selection_split,
    untouched_splits,
)
from ferray.device import default_device
from ferray.engine import load_checkpoint, slim_checkpoint
from ferray.models import num_params
from ferray.runs import RUN_FILES

log = logging.getLogger(__name__)


def bundle_selection_split(cfg_a: ExperimentConfig, manifest: dict, data) -> str:
    """The split a bundle's fusion is fitted on: the one member A was selected on when the data has
    it (the same faces, so nothing else is touched), else the data's own selection split."""
    chosen = cfg_a.data.selection_split
    return chosen if chosen in manifest["splits"] else selection_split(manifest, "auto", str(data))


def build_bundle(
    a: str | Path,
    b: str | Path | None,
    sr: str | Path | None,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    tta: bool = True,
    overwrite: bool = False,
    probs: tuple[np.ndarray, np.ndarray] | None = None,
    tests: bool = True,
) -> BundleCard:
    """Fit the fusion on the selection split of `data` (`split`, else the one A was selected on) and
    write the serving bundle to `out`; with `tests`, also evaluate every split that neither trained
    nor selected (center crop and TTA: the figures of the model card). `b` None: a bundle of A alone.
    `probs`: the members' (P_A, P_B) on the selection split with that TTA, when already computed."""
    device = default_device()
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(f"{data}: the ensemble is fitted on the prepared 48x48 faces (B's SR input is made from them)")
    ensemble = load_members(a, b, sr, device, fold=False)
    member_cards = Members(  # the members as trained (their parameter counts), before folding for the evaluations
        a=_member_card(ensemble.model_a, ensemble.cfg_a, a, "a"),
        b=None if b is None else _member_card(ensemble.model_b, ensemble.cfg_b, b, "b"),
        sr=None
        if sr is None
        else SRCard(
            checkpoint="sr.pt", source=str(sr), content_loss=load_checkpoint(sr, kind="sr").get("content_loss")
        ),
    )
    ensemble.fold_batch_norms()
    split = split or bundle_selection_split(ensemble.cfg_a, manifest, data)
    faces, labels, _ = load_split(data, split)
    if probs is None:
        log.info(
            f"ensemble: members on {len(labels):,} {split} (selection) faces{' with ten-crop TTA' if tta else ''} ..."
        )
        ensemble.tta = tta
        probs = _numpy(ensemble.member_probs(torch.from_numpy(faces)))
    pa, pb = probs
    if (pb is not None and pa.shape != pb.shape) or len(pa) != len(labels):
        raise ValueError(
            f"probs: shapes {pa.shape} and {None if pb is None else pb.shape} for {len(labels)} {split} faces"
        )
    fusion, alternatives = fit_fusion(pa, pb, labels, split)
    ensemble.weight_a, ensemble.temperature = fusion.weight_a, fusion.temperature
    accuracy = member_accuracies(pa, pb, labels, ensemble.weight_a)
    splits = [split] + (untouched_splits(manifest, split, ensemble.cfg_a.data.train_split) if tests else [])
    evaluations = evaluate_views(ensemble, data, splits, split, {(split, tta): (pa, pb)}) if tests else {}
    card = BundleCard(
        format=BUNDLE_FORMAT,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ferray_version=__version__,
        labels=list(EMOTIONS),
        tta=tta,
        selection_split=split,
        fusion=fusion,
        accuracy={split: accuracy},
        alternatives=alternatives,
        evaluations=evaluations,
        data={"path": str(Path(data).absolute()), "checksum": manifest["checksum"], "splits": manifest["splits"]},
        members=member_cards,
    )
    _write_bundle(out, card, a, b, sr, overwrite)
    members = f"A {accuracy['a']:.2%}" + (f", B {accuracy['b']:.2%}" if b is not None else "")
    fused = (
        f"; w_A = {fusion.weight_a:.2f}, ensemble {accuracy['ensemble']:.2%} (logit mean "
        f"{alternatives['logit mean']['accuracy']:.2%}, stacking "
        f"{alternatives['stacking (logistic regression, 5-fold CV)']['accuracy']:.2%} by 5-fold CV)"
        if b
        else ""
    )
    log.info(f"ensemble: {split} (selection) accuracy {members}{fused}; bundle {out}")
    for name in splits[1:]:
        view = evaluations[name].views[card.view()]
        log.info(f"ensemble: {name} (test) accuracy {view.accuracy:.2%}{' with TTA' if tta else ''}")
    return card


def _write_bundle(out, card: BundleCard, a, b, sr, overwrite: bool) -> None:
    from ferray.metrics import plot_confusion

    with atomic_output(out, overwrite=overwrite, kind="bundle") as tmp:
        torch.save(slim_checkpoint(load_checkpoint(a)), tmp / "model_a.pt")
        _copy_run_files(Path(a).parent, tmp / "run_a")
        _plot_run(tmp / "run_a", card.members.a, tmp, "Model A")
        if b is not None:
            torch.save(slim_checkpoint(load_checkpoint(b)), tmp / "model_b.pt")
            _copy_run_files(Path(b).parent, tmp / "run_b")
            _plot_run(tmp / "run_b", card.members.b, tmp, "Model B")
        if sr is not None:
            torch.save(slim_checkpoint(load_checkpoint(sr, kind="sr")), tmp / "sr.pt")
        for split, evaluation in card.evaluations.items():
            report = evaluation.views[card.view()]
            role = "selection" if evaluation.selection else "test"
            plot_confusion(
                report.confusion,
                tmp / f"confusion-{split}.png",
                f"{split} ({role}){' TTA' if card.tta else ''}: {report.accuracy:.2%}",
            )
        write_card(card, tmp / BUNDLE_FILE)
        (tmp / CARD_FILE).write_text(model_card(card))


def _plot_run(run_files: Path, member: MemberCard, bundle: Path, name: str) -> None:
    """The member's training curves, drawn from the run's own metrics.jsonl (shipped beside it)."""
    from ferray.figures import plot_training_curves
    from ferray.runs import RunFolder

    if member.curves:
        rows = RunFolder(run_files).epochs()
        plot_training_curves(
            rows, bundle / member.curves, f"{name}: {len(rows)} epochs, kept epoch {member.epochs}", kept=member.epochs
        )


def _curves_figure(source, member: str) -> str | None:
    """The figure's name if the member's run left per-epoch metrics to draw, else None."""
    from ferray.runs import RunFolder

    rows = RunFolder(Path(source).parent).epochs()
    return TRAINING_FIGURE.format(member=member) if rows and all("eval_acc" in r for r in rows) else None


def _copy_run_files(run_dir: Path, into: Path) -> None:
    """The member's own record of its training (config, per-epoch metrics, result, machine), kept in
    the bundle so that its model card can be checked against the files it was written from."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if found:
        into.mkdir()
        for path in found:
            (into / path.name).write_bytes(path.read_bytes())


def _member_card(model, cfg: ExperimentConfig, source, member: str) -> MemberCard:
    payload = load_checkpoint(source)
    return MemberCard(
        checkpoint=f"model_{member}.pt",
        source=str(source),
        model=cfg.model.name,
        parameters=num_params(model),
        depth=getattr(model, "keras_depth", lambda: None)(),
        crop=cfg.augment.crop,
        input_scale=cfg.data.input_scale,
        pretrained=bool(payload.get("pretrained", False)),
        trained_on=cfg.data.path,
        epochs=payload["epoch"],
        selection_split=cfg.data.selection_split,
        selection_accuracy=payload.get("metrics", {}).get("eval_acc"),
        run=run_facts(source),
        weights=payload.get("weights", "raw"),
        curves=_curves_figure(source, member),
    )


def run_facts(checkpoint) -> dict | None:
    """What the member's run recorded about itself (RUN/result.json beside RUN/best.pt), if it is there."""
    from ferray.runs import read_record

    record = read_record(Path(checkpoint).parent)
    if record is None:
        return None
    facts = record.to_dict()
    keep = (
        "name",
        "best_epoch",
        "epochs",
        "seconds",
        "train_seconds",
        "workers",
        "gpus_per_worker",
        "machine",
        "commit",
        "data_checksum",
        "budget_minutes",
        "images_per_s",
    )
    return {k: facts[k] for k in keep if k in facts}


def model_card(card: BundleCard) -> str:
    """MODEL_CARD.md, written from bundle.json alone (so the two never disagree)."""
    from ferray.report.model_card import render_model_card

    return render_model_card(card)
