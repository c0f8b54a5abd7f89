"""One typed experiment config: YAML -> command-line overrides -> every checkpoint and result.

    cfg = load_config("experiments/model_a.yaml", overrides=["optim.lr=0.003", "train.epochs=30"])

Unknown keys, wrong types and bad values are errors that name the file (or the override) and the
key. `to_dict(cfg)` holds only plain values, so a checkpoint saved with it loads with
torch.load(weights_only=True), and `from_dict` rebuilds the same config from a checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ferray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = "xception_a"
    dropout: float = 0.0
    # Model A's dropout before the classifier: "channel" drops whole maps of the 6x6x1536 features
    # (ferray's default since the second generation); "element" drops single values, as the shipped
    # first-generation model was trained. Models with a pooled head drop element-wise either way.
    dropout_kind: str = "channel"
    pretrained: str = "none"  # "none" | "imagenet" | a path to a state dict (models that support it)
    # The experiment (beside this one) to train instead when the pretrained weights are not on the
    # machine: a fine-tuning recipe must never run on random weights.
    scratch_recipe: str = ""


@dataclass
class DataConfig:
    path: str = "data/fer2013"  # a folder written by `ferray prepare` (or `ferray synth`)
    train_split: str = "Training"
    # The split every data-driven choice is made on (best epoch, schedules, Tune, fusion weights, the
    # SR generator). auto: Validation where `ferray prepare` carved one, else PublicTest with
    # PrivateTest as the test (FER2013's protocol). Runs record the resolved name.
    selection_split: str = "auto"
    input_scale: int = 1  # 2: bicubic 2x on the fly (the baseline for SR-upscaled data)


@dataclass
class AugmentConfig:
    crop: int = 44  # random crop for training, center / ten crops for evaluation
    flip: bool = True
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    shift: float = 0.1  # fraction of the image side
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    brightness: float = 0.0  # additive, fraction of the range
    contrast: float = 0.0  # multiplicative, around each image's mean
    erase_prob: float = 0.0  # random erasing of a rectangle


@dataclass
class OptimConfig:
    name: str = "adamax"  # adamax | adam | adamw | sgd
    lr: float = 0.01
    # Decoupled from the gradient for every optimizer (w <- w - lr * weight_decay * w, as AdamW),
    # and only on convolution and linear weights: batch norm, PReLU slopes and biases are spared
    # (decaying them fights the normalisation instead of limiting capacity).
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "none"  # none | cosine | step | plateau
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    step_epochs: list = field(default_factory=list)  # step: epochs at which lr *= gamma
    gamma: float = 0.1  # step and plateau factor
    patience: int = 10  # plateau: epochs without a better eval accuracy before lr *= gamma
    grad_clip: float = 0.0
    backbone_lr_ratio: float = 1.0  # the backbone's lr as a fraction of the head's (fine-tuning)


@dataclass
class LossConfig:
    # The weight of the center term; every epoch line prints its share of the cross-entropy.
    center_lambda: float = 0.1
    # > 0: lambda follows this share of the cross-entropy instead (re-set every step from running
    # means, at most center_lambda): the term's scale drifts several-fold during training.
    center_share: float = 0.0
    center_alpha: float = 0.5
    center_reduction: str = "mean"  # mean | sum over the batch
    # raw: the paper's term, on the pooled features as they are (what every run before this option
    # trained with); normalized: on L2-normalised embeddings, where batch norm cannot cancel the
    # term by shrinking the features (ferray.losses).
    center_features: str = "raw"
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 250
    # > 0: a wall-time budget for the epochs (training + selection evaluation). The run trains the
    # epochs that fit, at most `epochs`, re-planned after each epoch; the schedule spans the plan,
    # so it moves as the plan does. 0: one fixed schedule over `epochs`, which --resume continues
    # exactly (what a long run wants).
    budget_minutes: float = 0.0
    # A warm restart: the path of a classifier checkpoint of the same model (best.pt, best.fp16.pt,
    # a bundle's member file) whose weights this run starts from, loaded strictly. The optimizer
    # starts fresh and optim.warmup_epochs rises to optim.lr, so no optimizer state has to travel
    # between machines; the run records the chain of runs it continues. "": from the builder.
    init: str = ""
    batch_size: int = 64  # per worker
    seed: int = 0
    # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX); fp32 elsewhere.
    # false forces fp32 everywhere.
    amp: bool = True
    channels_last: bool = True  # NHWC activations (faster convolutions on GPUs and oneDNN CPUs)
    compile: bool = False  # torch.compile the training step's model; falls back to eager if it fails
    compile_mode: str = (
        "default"  # default | reduce-overhead (CUDA graphs: for launch-bound small models) | max-autotune
    )
    eval_tta: bool = False  # ten-crop TTA in the per-epoch evaluation (slower)
    # > 0: keep an exponential moving average of the weights (this decay per step, warmed up over
    # the first steps), evaluate it beside the raw weights on the selection split every epoch, and
    # let each epoch's checkpoint ship whichever of the two scored higher there.
    ema_decay: float = 0.0
    eval_batch_size: int = 256
    # a progress line (step, share, img/s, time left) this often within an epoch, from rank 0: an
    # epoch of FER2013 takes minutes on a CPU. 0: only the line at each epoch's end.
    progress_seconds: float = 60.0
    # cache: each worker reads its shard once into (GPU) memory and reshuffles it every epoch;
    # stream: Ray Data streams the shard every epoch (for data larger than a worker's memory).
    loader: str = "cache"


@dataclass
class ScalingConfig:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # restarts from the latest checkpoint after a lost worker


@dataclass
class SRConfig:
    """SRGAN settings (used by `ferray sr train`); batch size, epochs and data come from train/data."""

    generator_channels: int = 64
    generator_blocks: int = 16
    bicubic_skip: bool = True  # predict the residual over bicubic (ours: much faster to train)
    discriminator_channels: int = 64
    pretrain_epochs: int = 10  # pixel-MSE (SRResNet) epochs before the adversarial ones
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    # auto | vgg19 | model_a | mse (auto: vgg19 if its weights are local, else model_a if
    # content_checkpoint is set, else mse)
    content: str = "auto"
    content_layer: str = "vgg54"  # vgg22 | vgg54 (SRGAN's names), for content: vgg19
    content_weights: str = ""  # a VGG19 state dict file; default: torchvision's cache
    content_checkpoint: str = ""  # a Model A checkpoint, for content: model_a
    adversarial_weight: float = 1e-3


@dataclass
class DistillConfig:
    """A student taught by a teacher bank (`ferray distill bank`), or by a teacher bundle answering the
    student's own augmented views as it trains (online); neither: it trains on labels alone."""

    bank: str = ""  # the bank's folder, or its name under DATA/teacher_banks
    # with a bank: a bundle the bank must have been made with ("": the bank's own record is trusted);
    # online: the bundle that answers ("": the shipped one)
    teacher: str = ""
    # the teacher answers every step's views (new ones each epoch, as training augments them) instead
    # of a bank's fixed views: no bank to make, any number of views, for a teacher forward per step
    online: bool = False
    temperature: float = 2.0  # the softening of both sides' answers (Hinton et al.)
    label_share: float = 0.4  # the cross-entropy's share of the loss; the rest is KL to the teacher

    def teacher_name(self) -> str:
        """The online teacher's bundle by name ("default": the one that shipped when it taught)."""
        return Path(self.teacher).name if self.teacher else "default"


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


CHOICES = {
    ("model", "dropout_kind"): ("channel", "element"),
    ("optim", "name"): ("adamax", "adam", "adamw", "sgd"),
    ("optim", "schedule"): ("none", "cosine", "step", "plateau"),
    ("loss", "center_reduction"): ("mean", "sum"),
    ("loss", "center_features"): ("normalized", "raw"),
    ("train", "loader"): ("cache", "stream"),
    ("train", "compile_mode"): ("default", "reduce-overhead", "max-autotune"),
    ("sr", "content"): ("auto", "vgg19", "model_a", "mse"),
    ("sr", "content_layer"): ("vgg22", "vgg54"),
}


# ------------------------------------------------------------------------------------- building
def _coerce(value, annotation, where: str):
    """Check/convert a YAML or JSON value to the field's type (ints are accepted for floats;
    `X | None` accepts None; a nested dataclass inside one is built too)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) == 1:
            if dataclasses.is_dataclass(options[0]):
                return build_typed(options[0], value, where)
            return _coerce(value, options[0], where)
    kind = annotation if isinstance(annotation, type) else typing.get_origin(annotation)
    if kind is dict and isinstance(value, dict):
        args = typing.get_args(annotation)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # dict[str, Record]: each value built
            return {k: build_typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build_typed(annotation, value, where)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML reads 3e-4 (no dot) as a string; accept it as the number it is
            return float(value)
        except ValueError:
            pass
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is list and isinstance(value, list):
        return list(value)
    if kind is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def build_typed(cls, data: dict, where: str):
    """A dataclass (nested ones too) from a mapping: unknown keys and wrong types are ConfigErrors
    naming `where` and the key. Every YAML kind goes through it (experiments, serve settings)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where or 'top level'}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_typed(hint, value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{where or 'top level'}: missing key(s) {', '.join(missing)}")
    return cls(**kwargs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} is {value!r}; choose one of {', '.join(allowed)}")
    checks = [
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.budget_minutes >= 0, "train.budget_minutes must be >= 0"),
        (cfg.train.progress_seconds >= 0, "train.progress_seconds must be >= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.loss.center_lambda >= 0, "loss.center_lambda must be >= 0"),
        (0 <= cfg.loss.label_smoothing < 1, "loss.label_smoothing must be in [0, 1)"),
        (0 <= cfg.loss.center_share < 1, "loss.center_share must be in [0, 1) (0: a fixed center_lambda)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1) (0: no moving average)"),
        (0 < cfg.loss.center_alpha <= 1, "loss.center_alpha must be in (0, 1]"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (8 <= cfg.augment.crop, "augment.crop must be >= 8"),
        (cfg.data.input_scale in (1, 2, 3, 4), "data.input_scale must be 1, 2, 3 or 4"),
        (0 < cfg.optim.backbone_lr_ratio <= 1, "optim.backbone_lr_ratio must be in (0, 1]"),
        (cfg.scaling.workers >= 1, "scaling.workers must be >= 1"),
        (cfg.scaling.gpus_per_worker >= 0, "scaling.gpus_per_worker must be >= 0"),
        (cfg.distill.temperature > 0, "distill.temperature must be > 0"),
        (0 <= cfg.distill.label_share <= 1, "distill.label_share must be in [0, 1]"),
        (not (cfg.distill.bank and cfg.distill.online), "distill.bank and distill.online: choose one teacher"),
        (
            not cfg.distill.bank or cfg.train.loader == "cache",
            "distill.bank needs train.loader: cache (a streamed shard does not carry the faces' keys the "
            "bank is found by)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_gpu_share(cfg.scaling)
    if cfg.optim.backbone_lr_ratio < 1 and cfg.model.pretrained in ("none", ""):
        raise ConfigError(
            f"optim.backbone_lr_ratio {cfg.optim.backbone_lr_ratio:g} is a fine-tuning recipe (the "
            "backbone learns slower than the head), and model.pretrained is none: random weights would "
            "barely train. Train from scratch with its own recipe (e.g. experiments/model_b_scratch.yaml) "
            "or set optim.backbone_lr_ratio=1"
        )
    return cfg


def check_gpu_share(scaling: ScalingConfig) -> None:
    """Several workers with a fraction of a GPU each would let Ray put two ranks on one GPU, where
    NCCL aborts (one process group cannot hold two ranks of one device)."""
    gpus = scaling.gpus_per_worker
    if scaling.workers > 1 and gpus and gpus != int(gpus):
        raise ConfigError(
            f"scaling.gpus_per_worker {gpus:g} with scaling.workers {scaling.workers}: ranks of one run "
            "cannot share a GPU (NCCL aborts); give each worker whole GPUs (1) or run one worker"
        )


LEGACY_KEYS = {("data", "eval_split"): "selection_split"}  # old name -> new name, for older checkpoints


def _rename_legacy(data: dict) -> dict:
    for (section, old), new in LEGACY_KEYS.items():
        node = data.get(section)
        if isinstance(node, dict) and old in node and new not in node:
            node = data[section] = dict(node)
            node[new] = node.pop(old)
    return data


def from_dict(data: dict) -> ExperimentConfig:
    return validate(build_typed(ExperimentConfig, _rename_legacy(dict(data)), ""))


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}: the keys --set takes."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: ExperimentConfig, new: ExperimentConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{key: (old value, new value)} for every --set key whose value differs, but those in `ignore`."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML; an empty value is the empty text,
    e.g. `distill.bank=` for no bank) to a config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.003")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        try:
            value = "" if not raw.strip() else yaml.safe_load(raw)  # `key=` empties a text setting
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path, what: str) -> dict:
    """A YAML file's top-level mapping; ConfigError naming the file if it is missing, not YAML, or
    not a mapping. The one reader of every YAML kind: experiments, searches, report plans, serve configs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply overrides, validate. `path=None` starts from the defaults."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "experiment file")
        where = str(path)
        data.setdefault("name", path.stem)
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(data)
    except ConfigError as e:
        suffix = f" (with --set {' '.join(overrides)})" if overrides else ""
        raise ConfigError(f"{where}{suffix}: {e}") from None


def load_runnable_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """load_config, then the weights check every runner makes before it starts anything: an experiment
    whose pretrained weights are missing is replaced by its model.scratch_recipe (said loudly), or
    refused with the file to place."""
    from ferray.models.resnet_vgg import pretrained_available

    cfg = load_config(path, overrides)
    try:
        available = pretrained_available(cfg.model.name, cfg.model.pretrained)
    except KeyError as e:  # an unknown model name
        raise ConfigError(f"{path}: model.name: {e.args[0]}") from None
    if available:
        return cfg
    if not cfg.model.scratch_recipe:
        from ferray.models import build_model

        try:
            build_model(cfg.model.name, pretrained=cfg.model.pretrained)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: {e}") from None
    scratch = Path(path).parent / cfg.model.scratch_recipe
    log.info(
        f"{path}: model.pretrained={cfg.model.pretrained} weights are not on this machine; training {scratch} "
        "instead (from scratch, with the recipe made for that)"
    )
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in ("model.pretrained", "optim.backbone_lr_ratio")]
    return load_runnable_config(scratch, kept)


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
