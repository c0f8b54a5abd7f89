"""A report plan (experiments/paper.yaml): which runs make Table 1 and the figures, read and checked.

    name: paper
    data: data/fer2013                 # the prepared 48x48 faces (--data overrides)
    sets: [train.seed=0]               # overrides applied to every run
    runs:                              # Table 1's classifiers, in training order
      - {key: vgg16, label: VGG16, experiment: vgg16.yaml}
      - {key: model_a, label: Model A, experiment: model_a.yaml, sets: [train.epochs=20]}  # this run's own
      - {key: model_b, label: "Model B", experiment: model_b.yaml, data: sr}   # on the SR faces
    not_run:                           # Table 1 rows this plan does not train, each with its command
      - {key: vgg16, label: VGG16, command: "ferray train experiments/vgg16.yaml --data data/fer2013 (a GPU)"}
    sr: {experiment: srgan.yaml, actors: 1, gpus_per_actor: 1}
    concurrent_runs: 2                 # runs that do not depend on each other trained at once (default 1)
    ensemble: {a: model_a, b: model_b}  # the bundle's members (any number): member name -> run key
    shipped: default                   # optional: a bundle whose members and sets get Table 1 rows too
                                       # (`default`, the installed one, or a folder relative to the plan)
    figures: {crops: 8, explain_per_class: 2, sr_faces: 6}
    paper: {model_a: {params: 2720439, depth: 83}, ensemble: {PublicTest: 71.608, PrivateTest: 73.244}}

Experiment paths are relative to the plan file. Every mistake is a ConfigError naming the file
and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ferray.config import ConfigError, ExperimentConfig, load_runnable_config, read_yaml

FIGURE_DEFAULTS = {"crops": 8, "explain_per_class": 2, "sr_faces": 6}
PAPER_KEYS = {"params", "depth", "PublicTest", "PrivateTest"}


@dataclass
class RunSpec:
    key: str
    label: str
    experiment: Path
    on_sr: bool  # trained on the SR-upscaled faces rather than the 48x48 ones
    sets: list[str] = field(default_factory=list)  # this run's own overrides, after the plan's


@dataclass
class NotRun:
    """A Table 1 row the plan leaves out (too big for the machine it runs on), and how to run it."""

    key: str  # as `paper:` names it
    label: str
    command: str


@dataclass
class ReportPlan:
    name: str
    source: Path
    data: Path
    runs: list[RunSpec]
    sr_experiment: Path
    ensemble: dict[str, str]  # the bundle's members, in order: member name -> run key
    description: str = ""
    sets: list[str] = field(default_factory=list)
    sr_actors: int = 1
    sr_gpus_per_actor: float = 0.0
    figures: dict = field(default_factory=lambda: dict(FIGURE_DEFAULTS))
    paper: dict = field(default_factory=dict)
    not_run: list[NotRun] = field(default_factory=list)
    concurrent_runs: int = 1
    # a bundle (default, or a folder) whose members and sets Table 1 shows beside the paper's rows, as
    # `ferray ensemble` measured them (ferray.report.shipped); None: none
    shipped: str | None = None

    @property
    def first_member(self) -> str:
        """The run key of the ensemble's first member (Model A in the paper's plans): its features feed
        the SR content loss where VGG19's are absent, and it draws Figures 3 and 4."""
        return next(iter(self.ensemble.values()))

    def run_config(self, spec: RunSpec, data: Path, resolve_split: bool = True) -> ExperimentConfig:
        """A run of the plan as it is trained: its experiment with the plan's and its own overrides."""
        return self.config(spec.experiment, data, resolve_split, spec.sets)

    def config(
        self, experiment: Path, data: Path, resolve_split: bool = True, sets: list[str] = ()
    ) -> ExperimentConfig:
        """An experiment as this plan runs it: on `data`, with the plan's overrides (its scratch recipe
        where its pretrained weights are not on this machine), its selection split resolved from the
        prepared data as `ferray train` resolves it (so a finished run's config.yaml compares equal).
        `resolve_split=False` checks the experiment alone, before the data is prepared."""
        from ferray.data.contract import read_manifest, selection_split

        cfg = load_runnable_config(experiment, [f"data.path={Path(data).absolute()}", *self.sets, *sets])
        if resolve_split:
            cfg.data.selection_split = selection_split(read_manifest(data), cfg.data.selection_split, str(data))
        return cfg

    def run(self, key: str) -> RunSpec:
        return next(r for r in self.runs if r.key == key)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _experiment(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected an experiment file name")
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: {value}: no such experiment file (looked at {path})")
    return path


def _list(raw: dict, key: str, path: Path) -> list:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: {key}: expected a list")
    return value


def _run_spec(base: Path, item, where: str) -> RunSpec:
    item = _mapping(item, where)
    unknown = set(item) - {"key", "label", "experiment", "data", "sets"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: key, label, experiment, data, sets)"
        )
    sets = item.get("sets", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ConfigError(f"{where}.sets: a list of key=value overrides")
    if not isinstance(item.get("key"), str) or not item["key"]:
        raise ConfigError(f"{where}.key: each run needs a key, e.g. model_a")
    if item.get("data", "fer") not in ("fer", "sr"):
        raise ConfigError(f"{where}.data: 'fer' (the 48x48 faces) or 'sr' (the upscaled ones), not {item['data']!r}")
    return RunSpec(
        item["key"],
        str(item.get("label", item["key"])),
        _experiment(base, item.get("experiment"), f"{where}.experiment"),
        item.get("data", "fer") == "sr",
        list(sets),
    )


def _shipped(base: Path, value, where: str) -> str | None:
    """`default` (the installed bundle) or a bundle folder, relative to the plan file; None if absent."""
    from ferray.bundle.card import BUNDLE_FILE
    from ferray.bundle.load import DEFAULT_BUNDLE

    if value is None or value == DEFAULT_BUNDLE:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: `default` or a bundle folder, not {value!r}")
    folder = (base / value).resolve()
    if not (folder / BUNDLE_FILE).is_file():
        raise ConfigError(f"{where}: {value}: not a ferray bundle (no {BUNDLE_FILE} in {folder})")
    return str(folder)


def _not_run(item, where: str) -> NotRun:
    item = _mapping(item, where)
    if set(item) != {"key", "label", "command"} or not all(isinstance(v, str) and v for v in item.values()):
        raise ConfigError(
            f"{where}: expected {{key, label, command}}: the row's key, name and the command that runs it"
        )
    return NotRun(item["key"], item["label"], item["command"])


def load_plan(path: str | Path, data: str | Path | None = None, sets: list[str] = ()) -> ReportPlan:
    path = Path(path)
    raw = read_yaml(path, "report plan")
    known = {
        "name",
        "description",
        "data",
        "sets",
        "runs",
        "not_run",
        "sr",
        "ensemble",
        "figures",
        "paper",
        "concurrent_runs",
        "shipped",
    }
    if set(raw) - known:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(sorted(set(raw) - known))} (known: {', '.join(sorted(known))})"
        )
    base = path.parent
    runs = raw.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: runs: a list of {{key, label, experiment[, data: sr]}} is required")
    specs = [_run_spec(base, item, f"{path}: runs[{i}]") for i, item in enumerate(runs)]
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: runs: a key is used twice ({', '.join(keys)})")
    sr = _mapping(raw.get("sr") or {}, f"{path}: sr")
    ensemble = _mapping(raw.get("ensemble") or {}, f"{path}: ensemble")
    if not ensemble:
        raise ConfigError(f"{path}: ensemble: the bundle's members, e.g. {{a: model_a, b: model_b}}")
    for member, key in ensemble.items():
        if key not in keys:
            raise ConfigError(f"{path}: ensemble.{member} must name one of the runs ({', '.join(keys)}), not {key!r}")
        if not str(member).replace("_", "").isalnum():
            raise ConfigError(f"{path}: ensemble.{member}: a member name is letters, digits and _")
    figures = {**FIGURE_DEFAULTS, **_mapping(raw.get("figures") or {}, f"{path}: figures")}
    for key, value in figures.items():
        if key not in FIGURE_DEFAULTS or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{path}: figures.{key}: expected a positive integer for one of {', '.join(FIGURE_DEFAULTS)}"
            )
    not_run = [_not_run(item, f"{path}: not_run[{i}]") for i, item in enumerate(_list(raw, "not_run", path))]
    if set(keys) & {r.key for r in not_run}:
        raise ConfigError(
            f"{path}: not_run: a key that is also a run ({', '.join(sorted(set(keys) & {r.key for r in not_run}))})"
        )
    paper = _mapping(raw.get("paper") or {}, f"{path}: paper")
    for key, values in paper.items():
        if (
            key not in {*keys, *(r.key for r in not_run), "ensemble"}
            or set(_mapping(values, f"{path}: paper.{key}")) - PAPER_KEYS
        ):
            raise ConfigError(
                f"{path}: paper.{key}: must name a run or `ensemble` and hold only {', '.join(sorted(PAPER_KEYS))}"
            )
    concurrent = raw.get("concurrent_runs", 1)
    if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1:
        raise ConfigError(f"{path}: concurrent_runs: a positive integer (runs trained at once), not {concurrent!r}")
    chosen = data if data is not None else raw.get("data")
    if not chosen:
        raise ConfigError(f"{path}: no data: give `data:` in the plan or --data")
    sets_ = raw.get("sets") or []
    if not isinstance(sets_, list):
        raise ConfigError(f"{path}: sets: a list of key=value overrides")
    plan = ReportPlan(
        name=str(raw.get("name", path.stem)),
        source=path.resolve(),
        data=Path(chosen),
        runs=specs,
        sr_experiment=_experiment(base, sr.get("experiment"), f"{path}: sr.experiment"),
        ensemble={str(member): str(key) for member, key in ensemble.items()},
        description=str(raw.get("description", "")),
        sets=[str(s) for s in sets_] + list(sets),
        sr_actors=int(sr.get("actors", 1)),
        sr_gpus_per_actor=float(sr.get("gpus_per_actor", 0)),
        figures=figures,
        paper=paper,
        not_run=not_run,
        concurrent_runs=concurrent,
        shipped=_shipped(base, raw.get("shipped"), f"{path}: shipped"),
    )
    for spec in specs:  # every experiment must load as the plan would run it: fail now, not after hours
        plan.run_config(spec, plan.data, resolve_split=False)
    plan.config(plan.sr_experiment, plan.data, resolve_split=False)
    return plan
