"""MODEL_CARD.md of a serving bundle, rendered from its bundle.json alone (Ray-free).

Every number on the card comes from the card's own record (the evaluations `ferray ensemble` ran,
the facts the training run wrote into its result.json), so the two can never disagree and no
figure is typed by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferray.bundle.card import BundleCard, Int8Card, MemberCard, SRCard

VIEWS = (("center", "center crop"), ("tta", "ten-crop TTA"))


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _duration(seconds) -> str:
    if seconds is None:
        return "n/a"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _member_line(name: str, member: MemberCard, sr: SRCard | None = None) -> str:
    if member.pretrained:
        origin = "fine-tuned from ImageNet weights"
    elif member.run and member.run.get("continues"):  # a warm restart (a student, a second sitting)
        origin = "no pretrained weights, continued from earlier sittings (below)"
    else:
        origin = "trained from scratch"
    if member.distilled:
        taught = member.distilled
        source = (
            f"the teacher bank `{taught['bank']}`"
            if "bank" in taught
            else f"the bundle `{taught.get('online', '?')}` answering its views as it trained"
        )
        origin += (
            f", distilled from {source} (temperature {taught['temperature']:g}, "
            f"labels' share {taught['label_share']:g})"
        )
    weights = "the moving average of its weights" if member.weights == "ema" else "its weights as trained"
    alone = "" if member.temperature is None else f" (temperature alone {member.temperature:.3f})"
    line = (
        f"- **{name}**{alone}: `{member.model}` "
        f"({member.parameters:,} parameters, depth {member.depth or 'n/a'}), "
        f"{origin}, {member.epochs} epochs, selected on {member.selection_split} "
        f"({_pct(member.selection_accuracy)} there, center crop; {weights}); input "
    )
    if member.input == "sr":
        line += f"the face upscaled 2x by the SR generator ({sr.content_loss if sr else '?'} content loss)"
    elif member.input_scale > 1:
        line += f"the face upscaled {member.input_scale}x by bicubic"
    else:
        line += "the 48x48 face"
    cost = f"; {member.cost_ms:.1f} ms a face where the bundle was built" if member.cost_ms else ""
    return line + f", {member.crop}x{member.crop} crops{cost}."


def _run_lines(member: MemberCard) -> list[str]:
    run = member.run
    if not run:
        return []
    machine = run.get("machine", {})
    lines = [
        f"  - training run `{run.get('name', '?')}`: {run.get('epochs', '?')} epochs in "
        f"{_duration(run.get('train_seconds', run.get('seconds')))}"
        + (f" (budget {run['budget_minutes']:g} min)" if run.get("budget_minutes") else "")
        + f", best epoch {run.get('best_epoch', '?')}, {run.get('workers', 1)} worker(s)"
    ]
    if run.get("continues"):
        chain = " -> ".join(
            f"`{link.get('name', '?')}` ({link.get('epochs', '?')} epochs"
            + (f", distilled from `{link['distilled']}`" if link.get("distilled") else "")
            + f", weights `{link.get('checksum', '?')}`)"
            for link in run["continues"]
        )
        lines.append(f"  - a warm restart continuing {chain}")
    if machine:
        lines.append(
            f"  - machine: {machine.get('cpu', '?')}, {machine.get('threads', '?')} threads, "
            f"{machine.get('accelerator', 'no GPU')}, {machine.get('precision', '?')}; torch "
            f"{machine.get('torch', '?')}"
        )
    if run.get("commit"):
        lines.append(f"  - code: ferray commit `{run['commit']}`")
    if run.get("data_checksum"):
        lines.append(f"  - data checksum `{run['data_checksum']}`")
    return lines


def _curves(card: BundleCard) -> list[tuple[str, str]]:
    """(member, figure) for each member whose training curves the bundle holds."""
    return [(m, member.curves) for m, member in card.members.items() if member.curves]


def _accuracy_table(card: BundleCard) -> list[str]:
    evaluations = card.evaluations
    members = list(card.names())
    sets = [  # the sets measured (a bundle of the first format measured none)
        name
        for name in card.sets
        if name != "all" and any(name in e.views["tta"].sets for e in evaluations.values() if "tta" in e.views)
    ]
    header = ["split", "role", *[label for _, label in VIEWS]]
    if len(members) > 1:
        header += [f"{m} alone ({VIEWS[1][1]})" for m in members]
        header += [f"set {name} ({VIEWS[1][1]})" for name in sets]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for split, evaluation in evaluations.items():
        views = evaluation.views
        role = (
            "selection (chose the epoch" + (", the fusion" if len(members) > 1 else "") + "): not a test"
            if evaluation.selection
            else "test (untouched)"
        )
        row = [split, role, *[_pct(views[v].accuracy) for v, _ in VIEWS]]
        if len(members) > 1:
            row += [_pct(views["tta"].members.get(m)) for m in members]
            row += [_pct(views["tta"].sets.get(name)) for name in sets]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _per_class_table(card: BundleCard) -> list[str]:
    evaluations = card.evaluations
    view = card.view()
    splits = list(evaluations)
    if not splits:
        return []
    first = evaluations[splits[0]].views[view]
    lines = [
        "| class | "
        + " | ".join(f"{s} ({'selection' if evaluations[s].selection else 'test'})" for s in splits)
        + " | faces ("
        + splits[-1]
        + ") |",
        "|" + " --- |" * (len(splits) + 2),
    ]
    for name in first.per_class:
        cells = [_pct(evaluations[s].views[view].per_class[name]) for s in splits]
        support = evaluations[splits[-1]].views[view].support[name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {support:,} |")
    return lines


def _selection_lines(selection: dict, split: str) -> list[str]:
    """The members kept from the candidates, and the greedy path that chose them."""
    from ferray.bundle.build import SELECTION_FIGURE

    left_out = [name for name in selection["candidates"] if name not in selection["kept"]]
    return [
        "",
        "## Members chosen",
        "",
        f"{selection['how'][0].upper()}{selection['how'][1:]}. Kept {', '.join(selection['kept'])}"
        + (f"; left out {', '.join(left_out)}." if left_out else "."),
        "",
        f"| members | {split} |",
        "|---|---|",
        *(f"| {' + '.join(step['members'])} | {_pct(step['accuracy'])} |" for step in selection["path"]),
        "",
        f"![greedy selection on {split}]({SELECTION_FIGURE.format(split=split)})",
    ]


def render_model_card(card: BundleCard) -> str:
    sr, many = card.sr, len(card.members) > 1
    evaluations = card.evaluations
    tests = [s for s, e in evaluations.items() if not e.selection]
    selection = card.selection_split
    lines = [
        "# ferray model card",
        "",
        "Facial-expression recognition on 48x48 grayscale faces: 7 classes in FER2013 order "
        f"({', '.join(card.labels)}).",
        "",
        "## Members",
        "",
    ]
    for name, member in card.members.items():
        lines += [_member_line(name, member, sr), *_run_lines(member)]
    if card.sets:
        lines += ["", "Sets (`--members SET`): " + "; ".join(f"`{n}` = {' + '.join(m)}" for n, m in card.sets.items())]
    lines += [f"\n![training curves of {m}]({figure})" for m, figure in _curves(card)]
    if tests:
        one = len(tests) == 1
        untouched = (
            f"{', '.join(tests)} {'was' if one else 'were'} never used for any choice and "
            f"{'is the test' if one else 'are the tests'}."
        )
    else:
        untouched = "no split was left untouched as a test."
    lines += [
        "",
        "## Protocol",
        "",
        f"Every choice made from data (best epoch, schedules{', the fusion' if many else ''}) was made on "
        f"**{selection}**; {untouched}",
    ]
    if many:
        fusion = card.fusion
        total = sum(fusion.weights.values())
        mean = " + ".join(f"{w / total:.2f} * P_{name}" for name, w in fusion.weights.items())
        lines += [
            "",
            "## Fusion",
            "",
            f"{fusion.method}: P = {mean}, fitted on {fusion.fitted_on} ({fusion.how}).",
            f"- weights: {fusion.weights_choice}",
        ]
        lines += [
            f"- alternative on {fusion.fitted_on}: {name}: {_pct(alt['accuracy'])}"
            for name, alt in card.alternatives.items()
            if "accuracy" in alt
        ]
    if card.selection is not None:
        lines += _selection_lines(card.selection, card.selection_split)
    lines += [
        "",
        "## Accuracy",
        "",
        "Served with "
        + ("ten-crop test-time augmentation (4 corners + center, mirrored)" if card.tta else "the center crop")
        + ".",
        *_center_only_lines(card),
        "",
    ]
    if evaluations:
        lines += _accuracy_table(card)
        lines += [
            "",
            f"Per class ({'ten-crop TTA' if card.tta else 'center crop'}):",
            "",
            *_per_class_table(card),
            "",
        ]
        lines += [f"![confusion on {s}](confusion-{s}.png)" for s in evaluations]
    else:
        acc = card.accuracy[selection]
        lines += [f"- {selection} (selection, not a test): ensemble {_pct(acc['ensemble'])}"]
    lines += _calibration_lines(card)
    for name, member in card.members.items():
        lines += _int8_lines(name, member.int8)
    lines += ["", f"Data: {card.data['path']} (checksum `{card.data['checksum']}`).", ""]
    return "\n".join(lines)


def _calibration_lines(card: BundleCard) -> list[str]:
    """The temperature of the served probabilities and their calibration error, before and after."""
    view = card.view()
    rows = [(s, e.views[view]) for s, e in card.evaluations.items() if e.views[view].ece is not None]
    if not rows:
        return []
    fusion = card.fusion
    lines = [
        "",
        "## Calibration",
        "",
        f"The served probabilities are P^(1/T) renormalized, T = {fusion.temperature:.3f} fitted on "
        f"{fusion.fitted_on} (least log-loss; no answer's label changes). Expected calibration error "
        "(15 equal-width confidence bins), lower is better:",
        "",
        "| split | before (T = 1) | served |",
        "| --- | --- | --- |",
    ]
    for split, report in rows:
        role = "selection" if card.evaluations[split].selection else "test"
        lines.append(f"| {split} ({role}) | {report.ece_uncalibrated:.4f} | {report.ece:.4f} |")
    return lines


def _int8_lines(name: str, int8: Int8Card | None) -> list[str]:
    """A member in int8 (`ferray quantize`), measured by that command on the same splits."""
    if not int8:
        return []
    source = int8.calibration
    lines = [
        "",
        f"## int8 (CPU throughput): member {name}",
        "",
        f"Member {name} also runs in int8 on a CPU ({int8.how}), with activation ranges calibrated on the ten "
        f"views of {source['faces']:,} {source['split']} faces (seed {source['seed']}; `{int8.ranges}`). "
        "Measured by `ferray quantize`:",
        "",
        "| split | center crop | ten-crop TTA |",
        "| --- | --- | --- |",
    ]
    for split, e in int8.evaluations.items():
        role = "selection" if e.selection else "test"
        lines.append(f"| {split} ({role}) | {_pct(e.accuracy.get('center'))} | {_pct(e.accuracy.get('tta'))} |")
    return lines


def _center_only_lines(card) -> list[str]:
    """Which members answer from the center crop alone, and why (the TTA columns are the served views)."""
    choice = card.center_only_choice
    if not card.tta or not choice:
        return []
    who = " + ".join(card.center_only) or "none"
    return [
        f"Served by the center crop alone: {who} (the TTA columns below are the served views). How: "
        f"{choice['how']}: {_pct(choice['accuracy'])} against {_pct(choice['accuracy_every_member_tta'])} "
        f"with ten crops for every member; {choice['cost_ms']:.1f} against "
        f"{choice['cost_ms_every_member_tta']:.1f} ms a face where the bundle was built."
    ]
