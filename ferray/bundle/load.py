"""Finding and loading a bundle folder: the default one that ships, its card, its members (Ray-free)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ferray.bundle.card import BUNDLE_FILE, BundleCard, load_card
from ferray.bundle.fusion import FusionRule
from ferray.bundle.runtime import Ensemble, load_members
from ferray.config import ConfigError
from ferray.device import default_device
from ferray.engine import CheckpointError

DEFAULT_BUNDLE = "default"


def default_bundle_path() -> Path:
    """The bundle that ships inside the package: Model A trained on FER2013 (see its MODEL_CARD.md)."""
    return Path(__file__).resolve().parents[1] / "bundles" / DEFAULT_BUNDLE


def resolve_bundle(path: str | Path | None) -> Path:
    """A bundle folder; None or "default" is the one that ships with ferray."""
    if path is None or str(path) == DEFAULT_BUNDLE:
        return default_bundle_path()
    return Path(path)


def answering_members(card: BundleCard, members: str | tuple[str, ...] | list[str] = "all") -> tuple[str, ...]:
    """The members that answer: a set the bundle declares ("all", "fast", ...), or member names as a
    comma list ("a,c") or a tuple (what a Serve replica loads), in the bundle's order. "all" is every
    member, even in a bundle that declares no sets."""
    if isinstance(members, str):
        if members in card.sets:
            chosen = list(card.sets[members])
        elif members == "all":
            chosen = list(card.names())
        else:
            chosen = [name.strip() for name in members.split(",") if name.strip()]
    else:
        chosen = list(members)
    unknown = [name for name in chosen if name not in card.members]
    if unknown or not chosen:
        sets = ", ".join(card.sets) or "all"
        raise ConfigError(
            f"members {members!r}: {'no member ' + ', '.join(unknown) if unknown else 'none named'}; the bundle has "
            f"the sets {sets} and the members {', '.join(card.names())} (a set's name, or members as a comma list)"
        )
    return tuple(name for name in card.names() if name in chosen)


def fusion_rule(card: BundleCard, names: tuple[str, ...]) -> FusionRule:
    """The rule of answers from `names`: the fusion's weights of those members and the temperature
    fitted for that set (a named set's; one member's own; for another list, the full fusion's)."""
    fusion = card.fusion
    if len(names) == 1:
        temperature = card.members[names[0]].temperature
        return FusionRule({names[0]: 1.0}, 1.0 if temperature is None else temperature)
    weights = {name: fusion.weights.get(name, 1.0) for name in names}
    for set_name, members in card.sets.items():
        if set(members) == set(names) and set_name in fusion.set_temperatures:
            return FusionRule(weights, fusion.set_temperatures[set_name])
    return FusionRule(weights, fusion.temperature)


def load_bundle(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    members: str | tuple[str, ...] = "all",
    fold: bool = True,
    int8: bool = False,
) -> tuple[Ensemble, BundleCard]:
    """The ensemble of a bundle folder (None: the default one), from the folder alone (never a path a
    client names). `members` picks what to load and answer with (a set's name or member names:
    answering_members): a set without SR members needs no generator. `fold`: batch norms folded for
    inference (False: the models exactly as trained). `int8`: forward in int8 on the CPU (the
    bundle must be calibrated: `ferray quantize`)."""
    path = resolve_bundle(path)
    card = read_bundle_card(path)
    names = answering_members(card, members)
    device = torch.device(device) if device else default_device()
    chosen = {name: (path / card.members[name].checkpoint, card.members[name].input) for name in names}
    sr = path / card.sr.checkpoint if card.sr is not None else None
    ensemble = load_members(chosen, sr, device, fold)
    ensemble.rule, ensemble.tta = fusion_rule(card, names), card.tta
    ensemble.center_only = frozenset(card.center_only) & set(names)
    ensemble.int8 = int8
    if not int8:  # the ranges are read only where they are used
        return ensemble, card
    for name in names:
        member = card.members[name]
        if member.int8 is not None:
            ensemble.int8_ranges[name] = _read_json(path / member.int8.ranges, "int8 calibration")
    if not ensemble.int8_ranges:
        from ferray.models.quantized import Int8Unavailable

        loaded = " or ".join(names)
        raise Int8Unavailable(
            f"{path}: int8 asked for, but member {loaded} has no int8 calibration: make one with "
            f"`ferray quantize {path} --data DIR`"
        )
    return ensemble, card


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the bundle names this {what} file but it is missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def bundle_members(card: BundleCard) -> tuple[str, ...]:
    """The members a bundle holds, in its order."""
    return card.names()


def read_bundle_card(path: str | Path | None) -> BundleCard:
    """bundle.json of a bundle folder (None or "default": the one that ships), checked."""
    path = resolve_bundle(path)
    card_file = path / BUNDLE_FILE
    if not card_file.is_file():
        hint = (
            "the default bundle is missing from this installation"
            if path == default_bundle_path()
            else "make one with `ferray ensemble`"
        )
        raise CheckpointError(f"{path}: not a ferray bundle (no {BUNDLE_FILE}); {hint}")
    return load_card(card_file)
