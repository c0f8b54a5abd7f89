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
    origin = "fine-tuned from ImageNet weights" if member.pretrained else "trained from scratch"
    weights = "the moving average of its weights" if member.weights == "ema" else "its weights as trained"
    line = (
        f"- **{name}**: `{member.model}` ({member.parameters:,} parameters, depth {member.depth or 'n/a'}), "
        f"{origin}, {member.epochs} epochs, selected on {member.selection_split} "
        f"({_pct(member.selection_accuracy)} there, center crop; {weights}); input "
    )
    if name == "B":
        line += (
            f"the face upscaled 2x by the SR generator ({sr.content_loss} content loss)"
            if sr
            else "the face upscaled 2x by bicubic"
        )
    else:
        line += "the 48x48 face"
    return line + f", {member.crop}x{member.crop} crops."


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
    members = [(m, getattr(card.members, m)) for m in card.members.names()]
    return [(m, member.curves) for m, member in members if member.curves]


def _accuracy_table(card: BundleCard) -> list[str]:
    evaluations = card.evaluations
    members = list(card.members.names())
    header = ["split", "role", *[label for _, label in VIEWS]]
    if len(members) > 1:
        header += [f"{m.upper()} alone ({label})" for m in members for _, label in VIEWS[1:]]
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
            row += [_pct(views["tta"].members[m]) for m in members]
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


def render_model_card(card: BundleCard) -> str:
    a, b, sr = card.members.a, card.members.b, card.members.sr
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
        _member_line("A", a),
        *_run_lines(a),
    ]
    if b:
        lines += [_member_line("B", b, sr), *_run_lines(b)]
    lines += [f"\n![training curves of {m.upper()}]({figure})" for m, figure in _curves(card)]
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
        f"Every choice made from data (best epoch, schedules{', fusion weight' if b else ''}) was made on "
        f"**{selection}**; {untouched}",
    ]
    if b:
        fusion = card.fusion
        lines += [
            "",
            "## Fusion",
            "",
            f"{fusion.method}: P = {fusion.weight_a:.2f} * P_A + {1 - fusion.weight_a:.2f} * P_B, "
            f"fitted on {fusion.fitted_on} ({fusion.how}).",
        ]
        lines += [
            f"- alternative on {fusion.fitted_on}: {name}: {_pct(alt['accuracy'])}"
            for name, alt in card.alternatives.items()
        ]
    lines += [
        "",
        "## Accuracy",
        "",
        "Served with "
        + ("ten-crop test-time augmentation (4 corners + center, mirrored)" if card.tta else "the center crop")
        + ".",
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
    lines += _int8_lines(a.int8)
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


def _int8_lines(int8: Int8Card | None) -> list[str]:
    """Member A in int8 (`ferray quantize`), measured by that command on the same splits."""
    if not int8:
        return []
    source = int8.calibration
    lines = [
        "",
        "## int8 (CPU throughput)",
        "",
        f"Model A also runs in int8 on a CPU ({int8.how}), with activation ranges calibrated on the ten "
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
