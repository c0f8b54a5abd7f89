"""The shipped model beside the paper's rows (Ray-free): a plan's `shipped:` bundle (the installed
default, or any bundle folder) gives Table 1 a row for each of its members and each of its sets.

Their figures are the ones `ferray ensemble` measured on every split and view when it built the
bundle (its bundle.json), read rather than measured again: the report refuses them unless they were
measured on the very faces the report evaluates (the prepared data's checksum) and on every split
the report's table has.
"""

from __future__ import annotations

from pathlib import Path

from ferray.bundle.card import VIEWS
from ferray.data.contract import DataError


def shipped_record(bundle: str, data_checksum: str, splits: list[str]) -> dict:
    """{bundle, created, tta, center_only, members: {name: {model, keras_params, depth, accuracy}}, sets: {name:
    {members, keras_params, accuracy}}}, each accuracy {split: {view: fraction}} from the bundle's card."""
    from ferray.bundle.load import read_bundle_card, resolve_bundle

    card, where = read_bundle_card(bundle), resolve_bundle(bundle)
    measured_on = card.data.get("checksum")
    if measured_on != data_checksum:
        raise DataError(
            f"shipped: {where} was measured on other faces (data {measured_on}) than the report's "
            f"({data_checksum}): its figures would not be comparable; build it on this data with `ferray ensemble`"
        )
    missing = [split for split in splits if split not in card.evaluations]
    if missing:
        raise DataError(
            f"shipped: {where} has no evaluation of {', '.join(missing)} (built with --no-tests?); "
            "build it again with `ferray ensemble` to measure every split"
        )
    members = {
        name: {
            "model": member.model,
            "keras_params": _keras_params(member.model),
            "depth": member.depth,
            "accuracy": _accuracies(card, splits, lambda view, name=name: view.members[name]),
        }
        for name, member in card.members.items()
    }
    sets = {
        name: {
            "members": list(names),
            "keras_params": sum(members[m]["keras_params"] for m in names),
            "accuracy": _accuracies(card, splits, lambda view, name=name: view.sets[name]),
        }
        for name, names in card.sets.items()
    }
    center_only = list(card.center_only) if card.tta else []
    return {
        "bundle": _shown(where),
        "created": card.created,
        "tta": card.tta,
        "center_only": center_only,  # members whose TTA figures are their center crop's (as served)
        "members": members,
        "sets": sets,
    }


def _accuracies(card, splits: list[str], pick) -> dict:
    return {split: {view: pick(card.evaluations[split].views[view]) for view in VIEWS} for split in splits}


def _keras_params(model: str) -> int:
    """The member's parameters as Table 1 counts them (weights and batch-norm statistics)."""
    from ferray.models import build_model, keras_params

    return keras_params(build_model(model))


def _shown(where: Path) -> str:
    """The bundle as a reader would name it: "default" for the installed one, else its path."""
    from ferray.bundle.load import default_bundle_path

    return "default" if where == default_bundle_path() else str(where)
