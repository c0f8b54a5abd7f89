"""Which members a bundle serves with the center crop alone (Ray-free): `ferray ensemble --center-only`.

Ten-crop TTA costs each member ten forwards a face. Inside an ensemble the other members' views
already average much of what TTA averages, so some members may answer from the center crop alone at
a tenth of their cost without the fused answers losing anything. `auto` measures it on the selection
split: among every choice of members served by the center crop, the one of least cost per face
whose fused accuracy (equal weights, as the members were chosen) is at least that of every member with
ten crops; ties go to the more accurate. A list of names serves those members so without measuring.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from ferray.bundle.fusion import fuse, score
from ferray.config import ConfigError

CENTER_ONLY_HOW = (
    "the members served by the center crop alone are those of the cheapest choice (each member's cost "
    "per face with its views, timed where the bundle was built) whose fused accuracy on {split} with "
    "equal weights is at least that of every member with ten-crop TTA (ties: the more accurate)"
)
MOST_MEMBERS = 12  # 4,096 choices at most: each a fusion of the selection split's answers


def parse_center_only(value: str, names: list[str]) -> str | list[str]:
    """ "none" | "auto" | the members named in a comma list (each one of `names`)."""
    if value in ("none", "auto"):
        return value
    asked = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in asked if name not in names]
    if unknown or not asked:
        raise ConfigError(
            f"--center-only {value!r}: none, auto, or members of the bundle ({', '.join(names)}); "
            f"{', '.join(unknown) or 'no member'} is not one"
        )
    return asked


def choose_center_only(
    tta: dict[str, np.ndarray],
    center: dict[str, np.ndarray],
    labels: np.ndarray,
    tta_ms: dict[str, float],
    center_ms: dict[str, float],
    split: str,
    keep: frozenset = frozenset(),
) -> tuple[list[str], dict]:
    """(the members to serve by the center crop, the record of the choice for the card); the members
    in `keep` keep their ten crops (those that answer alone in a named set, such as `fast`: the
    choice is the whole ensemble's, and a member's views hold in every set it answers in)."""
    names = list(tta)
    candidates = [name for name in names if name not in keep]
    if len(candidates) > MOST_MEMBERS:
        raise ConfigError(f"--center-only auto: {len(candidates)} members; it weighs at most {MOST_MEMBERS}")
    everything = _accuracy(tta, center, labels, ())
    best, best_key = (), (_cost(names, tta_ms, center_ms, ()), -everything)
    for size in range(1, len(candidates) + 1):
        for chosen in combinations(candidates, size):
            found = _accuracy(tta, center, labels, chosen)
            key = (_cost(names, tta_ms, center_ms, chosen), -found)
            if found >= everything and key < best_key:
                best, best_key = chosen, key
    return list(best), choice_record(tta, center, labels, tta_ms, center_ms, best, CENTER_ONLY_HOW.format(split=split))


def choice_record(tta, center, labels, tta_ms: dict, center_ms: dict, chosen, how: str) -> dict:
    """The card's record of a choice: the members, the fused accuracy and cost per face with it and
    with ten crops for every member."""
    names = list(tta)
    return {
        "how": how,
        "center_only": list(chosen),
        "accuracy": _accuracy(tta, center, labels, tuple(chosen)),
        "accuracy_every_member_tta": _accuracy(tta, center, labels, ()),
        "cost_ms": round(_cost(names, tta_ms, center_ms, chosen), 2),
        "cost_ms_every_member_tta": round(_cost(names, tta_ms, center_ms, ()), 2),
    }


def _accuracy(tta: dict, center: dict, labels: np.ndarray, chosen) -> float:
    """The fused accuracy (equal weights, as the members were chosen) with `chosen` served by the center crop."""
    served = served_views(tta, center, chosen)
    return score(fuse(served, dict.fromkeys(served, 1.0)), labels)[0]


def _cost(names: list[str], tta_ms: dict, center_ms: dict, chosen) -> float:
    return sum(center_ms[n] if n in chosen else tta_ms[n] for n in names)


def served_views(tta: dict[str, np.ndarray], center: dict[str, np.ndarray], center_only) -> dict[str, np.ndarray]:
    """Each member's answers with the views it is served with."""
    return {name: center[name] if name in center_only else p for name, p in tta.items()}
