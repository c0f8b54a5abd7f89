"""Finding and loading a bundle folder: the default one that ships, its card, its members (Ray-free)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ferray.bundle.card import BUNDLE_FILE, BundleCard, load_card
from ferray.bundle.fusion import rule_of
from ferray.bundle.runtime import Ensemble, load_members
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


MEMBER_CHOICES = ("all", "a")


def answering_members(card: BundleCard, members: str | tuple[str, ...] | list[str] = "all") -> tuple[str, ...]:
    """The members that answer: "all" (every member the bundle holds) or "a" (Model A alone, the
    cheaper path); a tuple of member names is taken as it is (what a Serve replica loads)."""
    if isinstance(members, str):
        if members not in MEMBER_CHOICES:
            raise ValueError(f"members {members!r}: choose {' or '.join(MEMBER_CHOICES)}")
        return card.members.names() if members == "all" else ("a",)
    return tuple(members)


def load_bundle(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    members: str | tuple[str, ...] = "all",
    fold: bool = True,
    int8: bool = False,
) -> tuple[Ensemble, BundleCard]:
    """The ensemble of a bundle folder (None: the default one), from the folder alone (never a path a
    client names). `members` picks what to load and answer with ("all", "a": answering_members): a
    Serve replica of Model A needs neither B nor the generator. `fold`: batch norms folded for
    inference (False: the models exactly as trained). `int8`: forward in int8 on the CPU (the
    bundle must be calibrated: `ferray quantize`)."""
    path = resolve_bundle(path)
    card = read_bundle_card(path)
    members = answering_members(card, members)
    device = torch.device(device) if device else default_device()
    parts = card.members
    a = path / parts.a.checkpoint if "a" in members else None
    b = path / parts.b.checkpoint if "b" in members and parts.b is not None else None
    sr = path / parts.sr.checkpoint if b is not None and parts.sr is not None else None
    ensemble = load_members(a, b, sr, device, fold)
    rule = rule_of(card.fusion, members)  # Model A alone: its own temperature
    ensemble.weight_a, ensemble.temperature, ensemble.tta = rule.weight_a, rule.temperature, card.tta
    ensemble.int8 = int8
    if not int8:  # the ranges are read only where they are used
        return ensemble, card
    for name in members:
        member = getattr(parts, name, None)
        if member is not None and member.int8 is not None:
            ensemble.int8_ranges[name] = _read_json(path / member.int8.ranges, "int8 calibration")
    if not ensemble.int8_ranges:
        from ferray.models.quantized import Int8Unavailable

        loaded = " or ".join(m.upper() for m in members if getattr(parts, m, None) is not None)
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
    """The members a bundle holds: ("a", "b"), or ("a",) for a bundle of Model A alone."""
    return card.members.names()


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
