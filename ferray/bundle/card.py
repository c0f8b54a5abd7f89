"""bundle.json as typed records: what `ferray ensemble` writes and every reader reads back (Ray-free).

    card = read_bundle_card(path)
    card.evaluations["PublicTest"].views["tta"].accuracy     # a typo is an AttributeError, not a None

Read through the same typed builder as the experiment config (ferray.config.build_typed), so an
unknown key, a missing one or a wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ferray.config import ConfigError, build_typed
from ferray.errors import CheckpointError

BUNDLE_FORMAT = "ferray.bundle/1"
BUNDLE_FILE = "bundle.json"
CARD_FILE = "MODEL_CARD.md"
TRAINING_FIGURE = "training-{member}.png"  # a member's curves, drawn from its run's metrics.jsonl
VIEWS = ("center", "tta")  # the center crop; ten-crop TTA (4 corners + center, mirrored)


@dataclass
class ViewReport:
    """The fused model on one split with one view (ferray.metrics.summarize_confusion + members)."""

    accuracy: float
    samples: int
    per_class: dict
    support: dict
    confusion: list
    confusion_normalized: list
    members: dict = field(default_factory=dict)  # each member's and the ensemble's accuracy on the same faces
    # expected calibration error of the served (calibrated) probabilities, and of the fused ones
    # before the temperature (None in bundles made before calibration)
    ece: float | None = None
    ece_uncalibrated: float | None = None


@dataclass
class Evaluation:
    selection: bool  # the split every choice was made on: never a test
    views: dict[str, ViewReport] = field(default_factory=dict)  # keys: VIEWS


@dataclass
class Fusion:
    method: str
    weight_a: float
    fitted_on: str | None
    how: str
    # the fused output's temperature, fitted on `fitted_on` (ferray.bundle.fusion.fit_temperature);
    # 1.0 in bundles made before it existed
    temperature: float = 1.0
    # Model A's own temperature, for answers from A alone (members "a": ferray.bundle.fusion.rule_of)
    temperature_a: float = 1.0


@dataclass
class Int8Evaluation:
    selection: bool
    data_checksum: str
    accuracy: dict  # {view: accuracy}


@dataclass
class Int8Card:
    """Member A in int8 (`ferray quantize`): where its ranges are and what it scored."""

    ranges: str  # the calibration file in the bundle
    how: str
    calibration: dict  # split, faces, seed, checksum
    made_with: dict  # library versions
    calibration_seconds: float
    evaluations: dict[str, Int8Evaluation] = field(default_factory=dict)


@dataclass
class MemberCard:
    checkpoint: str  # file in the bundle
    source: str  # the training checkpoint it was made from
    model: str
    parameters: int
    depth: int | None
    crop: int
    input_scale: int
    pretrained: bool
    trained_on: str
    epochs: int
    selection_split: str
    selection_accuracy: float | None
    run: dict | None = None  # the training run's own facts (ferray.runs.RunRecord, a subset)
    weights: str = "raw"  # "ema" when the moving average of the weights was selected
    curves: str | None = None  # the training curves' figure in the bundle, drawn from the run's metrics
    int8: Int8Card | None = None


@dataclass
class SRCard:
    checkpoint: str
    source: str
    content_loss: str | None = None


@dataclass
class Members:
    a: MemberCard
    b: MemberCard | None = None
    sr: SRCard | None = None

    def names(self) -> tuple[str, ...]:
        """The classifiers held: ("a", "b"), or ("a",) for a bundle of Model A alone."""
        return ("a", "b") if self.b is not None else ("a",)


@dataclass
class BundleCard:
    format: str
    created: str
    ferray_version: str
    labels: list
    tta: bool  # served with ten-crop TTA
    selection_split: str
    fusion: Fusion
    members: Members
    accuracy: dict = field(default_factory=dict)  # {selection split: {a, b, ensemble}}
    alternatives: dict = field(default_factory=dict)  # other fusions measured on the selection split
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # path, checksum, splits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def view(self) -> str:
        """The view the bundle serves with."""
        return "tta" if self.tta else "center"


# what a served card leaves out: where the files were on the machines that made it, and the
# libraries and systems they ran (a map of the server for whoever asks, and not the model's science)
PRIVATE_MEMBER_KEYS = ("source", "trained_on", "checkpoint")
PRIVATE_RUN_KEYS = ("machine", "commit", "data_checksum")


def public_card(card: BundleCard) -> dict:
    """The card as GET /model serves it: the model's scientific content (members, fusion, every
    evaluation, training length) without local paths, library versions or the machines' names."""
    data = card.to_dict()
    data.pop("data", None)
    for member in data["members"].values():
        if not member:
            continue
        for key in PRIVATE_MEMBER_KEYS:
            member.pop(key, None)
        if member.get("run"):
            member["run"] = {k: v for k, v in member["run"].items() if k not in PRIVATE_RUN_KEYS}
        if member.get("int8"):
            member["int8"] = {k: v for k, v in member["int8"].items() if k not in ("made_with", "ranges")}
    return data


def card_from_dict(data: dict, where: str = BUNDLE_FILE) -> BundleCard:
    try:
        return build_typed(BundleCard, data, "")
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_card(card_file: Path) -> BundleCard:
    """bundle.json, checked: its format, and every key and type."""
    try:
        data = json.loads(card_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{card_file}: missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{card_file}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{card_file}: format {found!r}, expected {BUNDLE_FORMAT!r}")
    return card_from_dict(data, str(card_file))


def write_card(card: BundleCard, card_file: Path) -> None:
    partial = card_file.with_name(card_file.name + ".partial")
    partial.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    partial.replace(card_file)
