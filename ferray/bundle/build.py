"""`ferray ensemble`: a serving bundle made from trained checkpoints (Ray-free).

A bundle is a folder: bundle.json (the typed BundleCard: fusion, labels, any number of named members,
the named sets of them, every evaluation, each member's training facts), the members' checkpoints
with only what inference needs (model_NAME.pt: half-precision weights + config; loaded with
weights_only=True), the SR generator the members of input "sr" share (sr.pt), the members' run
records (run_NAME/), confusion matrices and MODEL_CARD.md, rendered from the card alone.
`ferray.bundle.load_bundle` rebuilds everything from the folder alone.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import torch

from ferray import __version__
from ferray.bundle.card import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    CARD_FILE,
    TRAINING_FIGURE,
    BundleCard,
    MemberCard,
    SRCard,
    write_card,
)
from ferray.bundle.evaluation import answered, evaluate_views
from ferray.bundle.fusion import (
    SELECTION_HOW,
    fit_fusion,
    greedy_selection,
    member_accuracies,
    selected_members,
    set_accuracies,
)
from ferray.bundle.load import answering_members, fusion_rule
from ferray.bundle.probs_cache import ProbsCache
from ferray.bundle.runtime import load_members, member_input
from ferray.bundle.views import choice_record, choose_center_only, parse_center_only, served_views
from ferray.config import ConfigError, ExperimentConfig
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
from ferray.engine import CheckpointError, load_checkpoint, slim_checkpoint
from ferray.models import num_params
from ferray.runs import RUN_FILES

log = logging.getLogger(__name__)


def bundle_selection_split(cfg: ExperimentConfig, manifest: dict, data) -> str:
    """The split a bundle's fusion is fitted on: the one its first member was selected on when the data
    has it (the same faces, so nothing else is touched), else the data's own selection split."""
    chosen = cfg.data.selection_split
    return chosen if chosen in manifest["splits"] else selection_split(manifest, "auto", str(data))


def default_sets(names: list[str]) -> dict[str, list[str]]:
    """ "all" (every member) and, for an ensemble, "fast" (its first member alone)."""
    return {"all": list(names)} | ({"fast": [names[0]]} if len(names) > 1 else {})


def build_bundle(
    members: dict[str, str | Path],
    sr: str | Path | None,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    tta: bool = True,
    overwrite: bool = False,
    probs: dict | None = None,
    tests: bool = True,
    sets: dict[str, list[str]] | None = None,
    weights: str = "auto",
    inputs: dict[str, str] | None = None,
    select: str = "none",
    cache: str | Path | None = None,
    center_only: str = "none",
) -> BundleCard:
    """Fit the fusion of `members` ({name: checkpoint}, in order) on the selection split of `data`
    (`split`, else the one the first member was selected on) and write the serving bundle to `out`;
    with `tests`, also evaluate every split that neither trained nor selected (center crop and TTA:
    the figures of the model card). `sr`: the SR generator of the members that read SR faces
    (`inputs`, else each member's own training crop says: ferray.bundle.runtime.member_input).
    `sets`: named sets of members (default_sets). `weights`: auto | equal | fitted (fit_fusion).
    `probs`: the members' probabilities on the selection split with that TTA, when already computed.
    `select`: "greedy" keeps the members that greedy forward selection chooses on the selection split
    (ferray.bundle.fusion.greedy_selection; its path goes into the card and a figure); "none" keeps all.
    `cache`: a folder where the members' answers on each split are kept and found again
    (ferray.bundle.probs_cache: building again forwards only what changed). `center_only`: "none",
    "auto" or member names: the members served by the center crop alone (ferray.bundle.views)."""
    if not members:
        raise ConfigError("a bundle needs at least one member")
    if select not in SELECT_CHOICES:
        raise ConfigError(f"select {select!r}: choose one of {', '.join(SELECT_CHOICES)}")
    names = list(members)
    bad = [name for name in names if not name.replace("_", "").isalnum() or not name.isascii()]
    if bad:
        raise ConfigError(f"member name(s) {', '.join(map(repr, bad))}: use letters, digits and _ (e.g. a, r18)")
    check_sets(sets or {}, names)
    device = default_device()
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(f"{data}: the ensemble is fitted on the prepared 48x48 faces (SR input is made from them)")
    inputs = dict(inputs or {})
    for name, checkpoint in members.items():
        inputs.setdefault(name, member_input(model_config(checkpoint), sr))
    ensemble = load_members({name: (members[name], inputs[name]) for name in names}, sr, device, fold=False)
    if sr is not None and not ensemble.needs_sr:
        raise CheckpointError(f"{sr}: an SR generator, but no member reads SR faces")
    # the members as trained (their parameter counts), before folding for the evaluations
    member_cards = {name: _member_card(ensemble.members[name], members[name], name) for name in names}
    ensemble.fold_batch_norms()
    split = split or bundle_selection_split(ensemble.members[names[0]].cfg, manifest, data)
    faces, labels, _ = load_split(data, split)
    probs_cache = ProbsCache(cache) if cache is not None else None
    if probs is None:
        log.info(
            f"ensemble: {len(names)} member(s) on {len(labels):,} {split} (selection) faces"
            f"{' with ten-crop TTA' if tta else ''} ..."
        )
        ensemble.tta = tta
        what = f"ensemble: {split} (selection){' TTA' if tta else ''}"
        probs = answered(ensemble, faces, what, probs_cache, (manifest["checksum"], split))
    if list(probs) != names or any(p.shape != (len(labels), len(EMOTIONS)) for p in probs.values()):
        shapes = {name: tuple(p.shape) for name, p in probs.items()}
        raise ConfigError(f"probs: {shapes} for the members {names} on {len(labels)} {split} faces")
    selection = None
    if select == "greedy" and len(names) > 1:
        path = greedy_selection(probs, labels)
        chosen = [name for name in names if name in selected_members(path)]  # in the order given
        # a member another named set asks for (a distilled `fast` one) stays in the bundle for that
        # set, and the ensemble ("all") is what the selection chose
        asked = {m for set_name, ms in (sets or {}).items() if set_name != "all" for m in ms}
        kept = [name for name in names if name in chosen or name in asked]
        selection = {"how": SELECTION_HOW.format(split=split), "candidates": names, "kept": chosen, "path": path}
        log.info(_selection_lines(selection))
        names, probs = kept, {name: probs[name] for name in kept}
        members, member_cards = {n: members[n] for n in kept}, {n: member_cards[n] for n in kept}
        ensemble.members = {name: ensemble.members[name] for name in kept}
        if not ensemble.needs_sr:
            sr, ensemble.generator = None, None
        if sets:
            sets = {"all": chosen} | sets
            check_sets(sets, names, after="greedy selection")
        else:
            sets = default_sets(chosen)
    sets = sets or default_sets(names)
    known, served_center, center_choice, costs = {(split, tta): probs}, [], None, None
    if tta and center_only != "none":
        asked = parse_center_only(center_only, names)
        where = (manifest["checksum"], split)
        alone = frozenset(ms[0] for name, ms in sets.items() if len(ms) == 1 and name != "all")  # e.g. fast
        served_center, center_choice, center, costs = _center_only(
            ensemble, faces, labels, probs, where, asked, probs_cache, alone
        )
        probs = served_views(probs, center, served_center)
        known = {(split, True): probs, (split, False): center}
    fusion, alternatives, temperatures = fit_fusion(probs, labels, split, sets, weights)
    costs = costs or member_costs(ensemble, torch.from_numpy(faces[:COST_FACES]), tta)
    for name, temperature in temperatures.items():
        member_cards[name].temperature, member_cards[name].cost_ms = temperature, costs[name]
    accuracy = member_accuracies(probs, labels, fusion.weights, sets.get("all")) | {
        f"set {name}": value for name, value in set_accuracies(probs, labels, fusion.weights, sets).items()
    }
    card = BundleCard(
        format=BUNDLE_FORMAT,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        ferray_version=__version__,
        labels=list(EMOTIONS),
        tta=tta,
        selection_split=split,
        fusion=fusion,
        members=member_cards,
        sr=None if sr is None else SRCard("sr.pt", str(sr), load_checkpoint(sr, kind="sr").get("content_loss")),
        sets=sets,
        accuracy={split: accuracy},
        alternatives=alternatives,
        selection=selection,
        data={"path": str(Path(data).absolute()), "checksum": manifest["checksum"], "splits": manifest["splits"]},
        center_only=served_center,
        center_only_choice=center_choice,
    )
    ensemble.rule = fusion_rule(card, answering_members(card, "all"))
    train_split = ensemble.members[names[0]].cfg.data.train_split
    splits = [split] + (untouched_splits(manifest, split, train_split) if tests else [])
    card.evaluations = evaluate_views(ensemble, data, splits, split, known, sets, probs_cache) if tests else {}
    _write_bundle(out, card, members, sr, overwrite)
    _log_built(card, split, splits, out)
    return card


COST_FACES = 32  # selection faces each member's cost per face is timed on
NAMED_HOW = "named (--center-only)"


def _center_only(
    ensemble, faces, labels, tta_probs: dict, where: tuple, asked, cache, keep: frozenset = frozenset()
) -> tuple[list, dict, dict, dict]:
    """(the members served by the center crop alone, the choice's record, every member's center-crop
    answers on the selection split, each member's cost per face with the views it is served with),
    `where` = (the data's checksum, the split); `asked`: "auto" or the members named. Sets the
    ensemble's `center_only`."""
    split = where[1]
    ensemble.tta = False
    center = answered(ensemble, faces, f"ensemble: {split} (selection)", cache, where)
    cost_faces = torch.from_numpy(faces[:COST_FACES])
    center_ms, tta_ms = member_costs(ensemble, cost_faces, False), member_costs(ensemble, cost_faces, True)
    if asked == "auto":
        chosen, record = choose_center_only(tta_probs, center, labels, tta_ms, center_ms, split, keep)
    else:
        chosen, record = asked, choice_record(tta_probs, center, labels, tta_ms, center_ms, asked, NAMED_HOW)
    ensemble.tta, ensemble.center_only = True, frozenset(chosen)
    log.info(
        f"ensemble: served by the center crop alone: {', '.join(chosen) or 'none'} ({split} "
        f"{record['accuracy']:.2%} against {record['accuracy_every_member_tta']:.2%} with ten crops each; "
        f"{record['cost_ms']:.1f} against {record['cost_ms_every_member_tta']:.1f} ms a face here)"
    )
    served_ms = {name: center_ms[name] if name in chosen else tta_ms[name] for name in tta_ms}
    return chosen, record, center, served_ms


SELECT_CHOICES = ("none", "greedy")


def check_sets(sets: dict[str, list[str]], names: list[str], after: str = "") -> None:
    """Every named set is non-empty and made of the bundle's members."""
    for set_name, set_members in sets.items():
        unknown = [m for m in set_members if m not in names]
        if unknown or not set_members:
            kept = f" kept by {after}" if after else ""
            raise ConfigError(
                f"set {set_name!r}: {', '.join(unknown) or 'no members'} (the members{kept} are {', '.join(names)})"
            )


def _selection_lines(selection: dict) -> str:
    steps = [f"  {' + '.join(step['members'])}: {step['accuracy']:.2%}" for step in selection["path"]]
    return "greedy selection:\n" + "\n".join(steps) + f"\nkept: {', '.join(selection['kept'])}"


def member_costs(ensemble, faces: torch.Tensor, tta: bool) -> dict[str, float]:
    """Each member's forward per face (ms) with the bundle's views, on this machine, as served (the
    batch norms folded; an SR member's time includes the generator's): the best of two timed calls
    after a warm-up one, in hundredths of a ms."""
    import time

    ensemble.tta, costs = tta, {}
    for name, member in ensemble.members.items():

        def forward(name=name, member=member):
            upscaled = ensemble.upscale(faces) if member.input == "sr" else None
            return ensemble.probs(name, faces, upscaled)

        forward()
        times = []
        for _ in range(2):
            started = time.perf_counter()
            forward()
            times.append(time.perf_counter() - started)
        costs[name] = round(1000 * min(times) / len(faces), 2)
    return costs


def model_config(checkpoint) -> ExperimentConfig:
    from ferray.config import from_dict

    return from_dict(load_checkpoint(checkpoint)["config"])


def _log_built(card: BundleCard, split: str, splits: list[str], out) -> None:
    accuracy, fusion = card.accuracy[split], card.fusion
    members = ", ".join(f"{name} {accuracy[name]:.2%}" for name in card.names())
    sets = ", ".join(f"{name} {accuracy[f'set {name}']:.2%}" for name in card.sets)
    log.info(
        f"ensemble: {split} (selection) accuracy: members {members}; sets {sets}; weights {fusion.weights_choice}; "
        f"bundle {out}"
    )
    for name in splits[1:]:
        view = card.evaluations[name].views[card.view()]
        log.info(f"ensemble: {name} (test) accuracy {view.accuracy:.2%}{' with TTA' if card.tta else ''}")


def _write_bundle(out, card: BundleCard, members: dict, sr, overwrite: bool) -> None:
    from ferray.metrics import plot_confusion

    with atomic_output(out, overwrite=overwrite, kind="bundle") as tmp:
        for name, checkpoint in members.items():
            torch.save(slim_checkpoint(load_checkpoint(checkpoint)), tmp / card.members[name].checkpoint)
            _copy_run_files(Path(checkpoint).parent, tmp / f"run_{name}")
            _plot_run(tmp / f"run_{name}", card.members[name], tmp, f"member {name}")
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
        if card.selection is not None:
            split = card.selection_split
            plot_selection(card.selection, tmp / SELECTION_FIGURE.format(split=split), split)
        write_card(card, tmp / BUNDLE_FILE)
        (tmp / CARD_FILE).write_text(model_card(card))


SELECTION_FIGURE = "selection-{split}.png"


def plot_selection(selection: dict, path: Path, split: str) -> Path:
    """The greedy path: the selection split's accuracy against the number of members, each point
    labelled with the member it added; the kept set marked."""
    from ferray.plotting import pyplot, save

    plt = pyplot()
    path_steps = selection["path"]
    sizes = list(range(1, len(path_steps) + 1))
    accuracy = [100 * step["accuracy"] for step in path_steps]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(sizes, accuracy, marker="o")
    for size, value, step in zip(sizes, accuracy, path_steps):
        ax.annotate(f"+{step['members'][-1]}", (size, value), textcoords="offset points", xytext=(0, 6), ha="center")
    kept = len(selection["kept"])
    ax.axvline(kept, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(sizes)
    ax.set_xlabel("members (greedy forward selection, equal weights)")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.grid(alpha=0.3)
    return save(fig, path, f"members chosen on {split}: {kept} of {len(selection['candidates'])} kept")


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


def _member_card(member, source, name: str) -> MemberCard:
    payload = load_checkpoint(source)
    model, cfg = member.model, member.cfg
    return MemberCard(
        checkpoint=f"model_{name}.pt",
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
        curves=_curves_figure(source, name),
        input=member.input,
        distilled=distilled_facts(cfg),
    )


def distilled_facts(cfg) -> dict | None:
    """How a student was taught (None for a model trained on labels alone): the teacher bank, or the
    teacher bundle that answered online."""
    if not (cfg.distill.bank or cfg.distill.online):
        return None
    taught = {"bank": Path(cfg.distill.bank).name} if cfg.distill.bank else {"online": cfg.distill.teacher_name()}
    return taught | {"temperature": cfg.distill.temperature, "label_share": cfg.distill.label_share}


def run_facts(checkpoint) -> dict | None:
    """What the member's run recorded about itself (RUN/result.json beside RUN/best.pt), if it is there:
    a search's best checkpoint sits beside the search's summary instead, which is no run's record."""
    import json

    from ferray.runs import RESULT_FILE, read_record

    result = Path(checkpoint).parent / RESULT_FILE
    if result.is_file() and "task" not in json.loads(result.read_text()):
        return None
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
        "planned_epochs",
        "continues",
    )
    return {k: facts[k] for k in keep if k in facts}


def model_card(card: BundleCard) -> str:
    """MODEL_CARD.md, written from bundle.json alone (so the two never disagree)."""
    from ferray.report.model_card import render_model_card

    return render_model_card(card)
