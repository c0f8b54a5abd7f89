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

BUNDLE_FORMAT = "ferray.bundle/2"  # any number of named members, named sets of them
V1_FORMAT = "ferray.bundle/1"  # Model A [+ Model B]: still read, upgraded as it is loaded (upgrade_v1)
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
    sets: dict = field(default_factory=dict)  # each named set's fused accuracy on the same faces
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
    """How the members' probabilities become the served ones: P = sum_i w_i P_i / sum_i w_i over the
    answering members, then P^(1/T) renormalised (ferray.bundle.fusion.FusionRule)."""

    method: str
    weights: dict  # member name -> weight (equal unless fitted weights beat them: weights_choice)
    fitted_on: str | None
    how: str
    temperature: float = 1.0  # of the full set's fused output, fitted on `fitted_on`
    set_temperatures: dict = field(default_factory=dict)  # each named set's own fitted temperature
    weights_choice: str = "equal"  # why these weights (equal, or fitted and by how much they won)


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
    # what the member reads: "face" (the 48x48 face) or "sr" (the bundle's SR generator's 96x96 face)
    input: str = "face"
    # the member's own, fitted on the selection split, for its answers alone (None: never fitted, as in
    # the B of a ferray.bundle/1 bundle, which answered only fused; it then answers at T = 1)
    temperature: float | None = None
    # the member's forward per face (ms) with the bundle's views, timed by `ferray ensemble` on the
    # machine that built the bundle (docs/benchmarks.md: bench/cpu_infer, each member and set)
    cost_ms: float | None = None
    # a student's teaching (its config's distill section): the teacher bank it learned from (its
    # name says the teacher, the split, the views and their seed), the temperature and the labels' share
    distilled: dict | None = None


@dataclass
class SRCard:
    checkpoint: str
    source: str
    content_loss: str | None = None


@dataclass
class BundleCard:
    format: str
    created: str
    ferray_version: str
    labels: list
    tta: bool  # served with ten-crop TTA
    selection_split: str
    fusion: Fusion
    members: dict[str, MemberCard]  # in the bundle's order (the first: the fast set's default)
    sr: SRCard | None = None  # the SR generator that the members of input "sr" share
    sets: dict = field(default_factory=dict)  # set name -> member names, e.g. {"all": [...], "fast": ["a"]}
    accuracy: dict = field(default_factory=dict)  # {selection split: {member..., set..., ensemble}}
    alternatives: dict = field(default_factory=dict)  # other fusions measured on the selection split
    # how the members were chosen from candidates (`ferray ensemble --select greedy`): how, the
    # candidates, the kept ones and the greedy path's accuracy at each size; None when all were kept
    selection: dict | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # path, checksum, splits
    upgraded_from: str | None = None  # the format it was written in, when read from an older one
    # the members served by the center crop alone although the bundle serves ten-crop TTA, and how they
    # were chosen (`ferray ensemble --center-only`: ferray.bundle.views); the "tta" view of the
    # evaluations is the served one (these members' center crop in it)
    center_only: list = field(default_factory=list)
    center_only_choice: dict | None = None

    def names(self) -> tuple[str, ...]:
        """The members, in the bundle's order."""
        return tuple(self.members)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def view(self) -> str:
        """The view the bundle serves with."""
        return "tta" if self.tta else "center"


# What a served card shows: the model's science, named field by field, so that a field added to the
# card later stays private until it is listed here (where files were on the machines that made it,
# the libraries and systems they ran, the data's path: a map of the server, not the model's science).
PUBLIC_CARD_KEYS = (
    "format", "created", "ferray_version", "labels", "tta", "selection_split", "fusion", "members", "sr",
    "sets", "accuracy", "alternatives", "selection", "evaluations", "upgraded_from", "center_only",
    "center_only_choice",
)  # fmt: skip
PUBLIC_MEMBER_KEYS = (
    "model", "parameters", "depth", "crop", "input_scale", "pretrained", "epochs", "selection_split",
    "selection_accuracy", "run", "weights", "int8", "input", "temperature", "cost_ms",
)  # fmt: skip
PUBLIC_RUN_KEYS = (
    "name", "best_epoch", "epochs", "planned_epochs", "budget_minutes", "seconds", "train_seconds", "workers",
    "gpus_per_worker", "images_per_s",
)  # fmt: skip
PUBLIC_SR_KEYS = ("content_loss",)
PUBLIC_INT8_KEYS = ("how", "calibration", "calibration_seconds", "evaluations")


def shown(data: dict | None, keys: tuple[str, ...]) -> dict | None:
    return None if data is None else {k: data[k] for k in keys if k in data}


def public_card(card: BundleCard) -> dict:
    """The card as GET /model serves it: only the fields PUBLIC_*_KEYS name."""
    data = shown(card.to_dict(), PUBLIC_CARD_KEYS)
    data["sr"] = shown(data.get("sr"), PUBLIC_SR_KEYS)
    members = {}
    for name, member in data["members"].items():
        if not member:
            members[name] = member
            continue
        member = shown(member, PUBLIC_MEMBER_KEYS)
        member["run"] = shown(member.get("run"), PUBLIC_RUN_KEYS)
        member["int8"] = shown(member.get("int8"), PUBLIC_INT8_KEYS)
        members[name] = member
    data["members"] = members
    return data


def upgrade_v1(data: dict) -> dict:
    """A ferray.bundle/1 card (members a [+ b, behind the SR generator sr], one weight for A) as
    today's: the same members and fusion, the sets it could answer with ("all"; "fast": A alone, at
    A's own temperature, as `--members a` answered)."""
    data = dict(data)
    members = dict(data["members"])
    sr = members.pop("sr", None)
    names = [name for name in ("a", "b") if members.get(name)]
    members = {name: dict(members[name]) for name in names}
    fusion = dict(data["fusion"])
    weight_a, temperature_a = fusion.pop("weight_a"), fusion.pop("temperature_a", 1.0)
    for name in names:
        members[name]["input"] = "sr" if name == "b" and sr else "face"
    members["a"]["temperature"] = temperature_a  # B's was never fitted: it answered only fused
    fusion["weights"] = {"a": weight_a, "b": 1 - weight_a} if "b" in members else {"a": 1.0}
    temperature = fusion.get("temperature", 1.0)
    fusion["set_temperatures"] = {"all": temperature, "fast": temperature_a}
    fusion["weights_choice"] = "fitted (the weight of A on a grid, as ferray.bundle/1 made every bundle)"
    data.update(
        format=BUNDLE_FORMAT,
        members=members,
        sr=sr,
        sets={"all": names, "fast": ["a"]},
        fusion=fusion,
        upgraded_from=V1_FORMAT,
    )
    return data


def card_from_dict(data: dict, where: str = BUNDLE_FILE) -> BundleCard:
    if isinstance(data, dict) and data.get("format") == V1_FORMAT:
        data = upgrade_v1(data)
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
    if not isinstance(data, dict) or data.get("format") not in (BUNDLE_FORMAT, V1_FORMAT):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{card_file}: format {found!r}, expected {BUNDLE_FORMAT!r} (or {V1_FORMAT!r})")
    return card_from_dict(data, str(card_file))


def write_card(card: BundleCard, card_file: Path) -> None:
    partial = card_file.with_name(card_file.name + ".partial")
    partial.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    partial.replace(card_file)
