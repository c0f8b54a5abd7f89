"""The training engine: one epoch of training, evaluation, checkpoints (plain PyTorch, no Ray).

Every runner calls these unchanged: the Ray Train loop (ferray.distributed.train), the Tune trials, the
Ray-free GPU bench, and the tests. Batches are (uint8 faces (B, H, W), labels (B,)) on any
device; augmentation happens on the batch's device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ferray.augment import predict_proba, train_views

# the checkpoints' names, kept here for the engine's callers (engine.save_checkpoint, ...)
from ferray.checkpoints import (  # noqa: F401
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    checkpoint_payload,
    load_checkpoint,
    model_from_checkpoint,
    restore_state,
    resumed_plan,
    save_checkpoint,
    slim_checkpoint,
)
from ferray.config import ExperimentConfig, OptimConfig
from ferray.device import fast_cuda_math, keep_cpu_buffers, use_bf16
from ferray.ema import WeightEMA
from ferray.errors import CheckpointError  # noqa: F401 - engine.CheckpointError, for its callers
from ferray.labels import NUM_CLASSES
from ferray.logs import time_left
from ferray.losses import JointLoss
from ferray.metrics import confusion_matrix, summarize_confusion
from ferray.models import build_model
from ferray.precision import Precision


# ------------------------------------------------------------------------------------------ batches
class TensorBatches:
    """In-memory faces as shuffled batches (the data can live on the GPU). Each epoch's order is a
    function of (seed, rank, epoch) alone, so a resumed run sees the batches an uninterrupted one
    would: `epoch(e)` gives epoch e's batches; plain iteration goes through epochs 0, 1, 2, ...
    With `keys` (the faces' keys: a student finds its teacher's answers by them) a batch is
    (images, labels, keys)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        keys: torch.Tensor | None = None,
    ):
        if len(images) != len(labels) or (keys is not None and len(keys) != len(labels)):
            counted = f", {len(keys)} keys" if keys is not None else ""
            raise ValueError(f"{len(images)} images but {len(labels)} labels{counted}")
        self.images, self.labels, self.keys = images, labels, keys
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.next_epoch = seed, rank, 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int) -> TensorBatches:
        """These batches, set to give epoch `epoch`'s order next (0-based)."""
        self.next_epoch = epoch
        return self

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.rank, epoch))
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.order(self.next_epoch).to(self.images.device)
        self.next_epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if self.keys is None:
                yield self.images[idx], self.labels[idx]
            else:
                yield self.images[idx], self.labels[idx], self.keys[idx.to(self.keys.device)]


# -------------------------------------------------------------------------------------- optimizing
def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies: to convolution and linear weights, not to batch norm, PReLU
    slopes or biases (all of them 1-D)."""
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The optimizer's groups: (backbone, head) when their rates differ, each split into the
    parameters that decay and those that do not. Each group carries its `lr_scale` and its
    `decoupled_wd` (applied by `apply_weight_decay`, not by the optimizer's own coupled term)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [(named, 1.0)]
    if cfg.backbone_lr_ratio != 1.0 and hasattr(model, "head_parameters"):
        head_ids = {id(p) for p in model.head_parameters()}
        parts = [
            ([(n, p) for n, p in named if id(p) not in head_ids], cfg.backbone_lr_ratio),
            ([(n, p) for n, p in named if id(p) in head_ids], 1.0),
        ]
    groups = []
    for members, lr_scale in parts:
        for decayed in (True, False):
            params = [p for n, p in members if decays(n, p) == decayed]
            if params:
                groups.append(
                    {"params": params, "lr_scale": lr_scale, "decoupled_wd": cfg.weight_decay if decayed else 0.0}
                )
    return groups


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (weight decay is decoupled: see apply_weight_decay)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamax":
        return torch.optim.Adamax(groups, lr=cfg.lr, weight_decay=0.0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=0.0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0, nesterov=True)


@torch.no_grad()
def apply_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """w <- w * (1 - lr * wd) for each group's decayed weights, before the optimizer's step (AdamW's
    rule, for every optimizer: the decay does not pass through Adam's or AdaMax's normalisation)."""
    for group in optimizer.param_groups:
        wd = group.get("decoupled_wd", 0.0)
        if wd > 0:
            torch._foreach_mul_(group["params"], 1.0 - group["lr"] * wd)


def optimizer_step(precision: Precision, optimizer: torch.optim.Optimizer) -> None:
    """Decoupled weight decay and the optimizer's step. With fp16's gradient scaler a step whose
    gradients overflowed is skipped, and so is its decay: there it follows the update instead of
    preceding it (the same to first order in lr * wd)."""
    if precision.scaler is None:
        apply_weight_decay(optimizer)
        optimizer.step()
    elif precision.step(optimizer):
        apply_weight_decay(optimizer)


class LRSchedule:
    """Learning rate as a function of (fractional) epoch: warm-up, then none/cosine/step/plateau."""

    def __init__(self, cfg: OptimConfig, epochs: int, planned: bool = True):
        self.cfg, self.epochs = cfg, epochs
        # False: a time budget has not planned the run's length yet (ferray.sittings.BudgetPlan):
        # the cosine holds at its peak until it does, so no step follows a length it will not have.
        self.planned = planned
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def factor(self, epoch: float) -> float:
        cfg = self.cfg
        warm = min(1.0, (epoch + 1e-9) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        if cfg.schedule == "cosine" and not self.planned:
            decay = 1.0
        elif cfg.schedule == "cosine":
            span = max(self.epochs - cfg.warmup_epochs, 1e-9)
            progress = min(max(epoch - cfg.warmup_epochs, 0.0) / span, 1.0)
            decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.schedule == "step":
            decay = cfg.gamma ** sum(epoch >= m for m in cfg.step_epochs)
        elif cfg.schedule == "plateau":
            decay = self.plateau_scale
        else:
            decay = 1.0
        return warm * decay

    def on_eval(self, accuracy: float) -> None:
        """Plateau: scale the rate by gamma after `patience` epochs without a better accuracy."""
        if accuracy > self.best:
            self.best, self.bad_epochs = accuracy, 0
            return
        self.bad_epochs += 1
        if self.cfg.schedule == "plateau" and self.bad_epochs > self.cfg.patience:
            self.plateau_scale *= self.cfg.gamma
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "epochs": self.epochs,
            "planned": self.planned,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], state["bad_epochs"]
        self.epochs = state.get("epochs", self.epochs)  # a time budget's plan
        self.planned = state.get("planned", True)


# ------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything a run needs to continue: model, loss (with its centers), optimizer, schedule."""

    cfg: ExperimentConfig
    model: nn.Module  # possibly wrapped (DDP); `core` is the bare module
    loss_fn: JointLoss
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    device: torch.device
    rank: int = 0  # this worker's rank: its augmentation and dropout draw their own random stream
    ema: WeightEMA | None = None  # the moving average of the weights (train.ema_decay > 0)
    epoch: int = 0  # epochs completed
    best_accuracy: float = 0.0
    history: list = field(default_factory=list)
    # the runs this one continues (train.init): oldest first, each {name, epochs, selection, checksum}
    lineage: list = field(default_factory=list)
    step_hook: Callable[[int], None] | None = None  # called after each step (a budget's plan)
    precision: Precision | None = None  # the step's autocast and gradient scaler; None: from the device
    # a ferray.distill.student.Teacher (distill.bank) or OnlineTeacher (distill.online): views and answers
    teacher: object | None = None

    def __post_init__(self):
        if self.precision is None:
            self.precision = Precision.for_device(self.device, self.cfg.train.amp)

    @property
    def core(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def use_amp(self) -> bool:
        """bf16 autocast (evaluation's: where the hardware has no bf16 it evaluates in fp32)."""
        return use_bf16(self.device, self.cfg.train.amp)

    @property
    def channels_last(self) -> bool:
        return self.cfg.train.channels_last


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's random stream in one epoch: distinct per rank (so DDP workers draw
    different augmentations and dropout masks) and per epoch (so a resumed run draws what an
    uninterrupted one would), reproducible from the run's seed."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63


def build_state(
    cfg: ExperimentConfig, device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0
) -> TrainState:
    """Model, loss, optimizer and schedule from a config; `wrap` (e.g. DDP) is applied to the model.
    Every rank builds the same initial weights (seeded by the run's seed alone)."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu":
        keep_cpu_buffers()  # freed activation buffers reused, not page-faulted in every step
    fast_cuda_math(device)
    model = build_model(
        cfg.model.name,
        num_classes=NUM_CLASSES,
        dropout=cfg.model.dropout,
        dropout_kind=cfg.model.dropout_kind,
        pretrained=cfg.model.pretrained,
    )
    lineage = []
    if cfg.train.init:
        from ferray.sittings import load_weights_strictly, warm_start

        payload, lineage = warm_start(cfg.train.init, cfg.model.name)
        load_weights_strictly(model, payload["model"], cfg.train.init)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = JointLoss(
        NUM_CLASSES,
        model.num_features,
        cfg.loss.center_lambda,
        cfg.loss.center_alpha,
        cfg.loss.label_smoothing,
        cfg.loss.center_reduction,
        cfg.loss.center_features,
        cfg.loss.center_share,
        (cfg.distill.temperature, cfg.distill.label_share),
    ).to(device)
    teacher = None
    if cfg.distill.bank or cfg.distill.online:
        from ferray.distill.student import load_teacher

        teacher = load_teacher(cfg, device)
    optimizer = make_optimizer(model, cfg.optim)
    ema = WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if wrap is not None:
        model = wrap(model)
    if cfg.train.compile:
        model = compiled(model, cfg.train.compile_mode)
    schedule = LRSchedule(cfg.optim, cfg.train.epochs, planned=cfg.train.budget_minutes <= 0)
    return TrainState(cfg, model, loss_fn, optimizer, schedule, device, rank, ema, lineage=lineage, teacher=teacher)


class compiled(nn.Module):
    """torch.compile of a model that falls back to eager, once and for good, if compiling fails
    (no compiler on the machine, an unsupported op): a long run must not die of it. `fallback`
    holds the reason, for the run's output and results."""

    def __init__(self, model: nn.Module, mode: str = "default"):
        super().__init__()
        self.module = model
        self.fallback: str | None = None
        try:
            self._compiled = torch.compile(model, mode=None if mode == "default" else mode)
        except Exception as e:  # noqa: BLE001 - any failure means eager
            self._compiled, self.fallback = None, f"{type(e).__name__}: {e}"

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self.give_up(e)
        return self.module(*args, **kwargs)

    def give_up(self, error: Exception) -> bool:
        """Eager from now on; False where it was eager already (the error is then not compile's)."""
        if self._compiled is None:
            return False
        self._compiled, self.fallback = None, f"{type(error).__name__}: {str(error)[:300]}"
        print(f"torch.compile failed; training continues in eager mode ({self.fallback})", flush=True)
        return True


def forward_backward(state: TrainState, x: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None):
    """One step's forward, loss and backward: (logits, features, loss, parts). The backward graph is
    compiled at the first backward (and again for a new shape), outside `compiled.forward`: a failure
    there turns the model eager and the step is done again, where eager cannot fail the same way."""
    for attempt in (0, 1):
        with state.precision.autocast():
            logits, features = state.model(x, return_embedding=True)
        loss, parts = state.loss_fn(logits, features, labels, teacher)
        state.optimizer.zero_grad(set_to_none=True)
        try:
            state.precision.backward(loss)
        except Exception as e:
            if attempt or not isinstance(state.model, compiled) or not state.model.give_up(e):
                raise
            continue
        return logits, features, loss, parts


class EpochProgress:
    """A line every `every_s` seconds within a long epoch, on rank 0 only: how far it is, how fast it
    goes and how long is left ("epoch 17/25: step 161/403 (40%), 33 img/s, ~7 min left")."""

    def __init__(
        self,
        epoch: int,
        planned: int,
        steps: int,
        every_s: float,
        rank: int = 0,
        echo: Callable[[str], None] = lambda line: print(line, flush=True),
        clock=time.perf_counter,
    ):
        self.epoch, self.planned, self.steps, self.every_s = epoch, planned, steps, every_s
        self.enabled, self.echo, self.clock = every_s > 0 and rank == 0, echo, clock
        self.start = self.last = clock()

    def update(self, step: int, images: int) -> None:
        """After `step` steps and `images` images of this epoch."""
        if not self.enabled or self.clock() - self.last < self.every_s:
            return
        self.last = now = self.clock()
        elapsed = max(now - self.start, 1e-9)
        rate = f"{images / elapsed:,.0f} img/s"
        if self.steps <= 0:  # a streamed epoch of unknown length
            self.echo(f"epoch {self.epoch}/{self.planned}: step {step}, {rate}")
            return
        left = max(self.steps - step, 0) * elapsed / max(step, 1)
        self.echo(
            f"epoch {self.epoch}/{self.planned}: step {step}/{self.steps} ({min(step / self.steps, 1):.0%}), "
            f"{rate}, ~{time_left(left)} left"
        )


def lesson(state: TrainState, images: torch.Tensor, keys: torch.Tensor | None):
    """(the step's input views, the teacher's probabilities on them or None): training's random
    views, or with a teacher (distill.bank) the bank's views of these faces, found by their keys."""
    cfg = state.cfg
    if state.teacher is None:
        return train_views(images, cfg.augment, cfg.data.input_scale), None
    seed = epoch_seed(cfg.train.seed, state.rank, state.epoch)
    if cfg.distill.online:  # views of its own, answered now: no keys needed
        return state.teacher.lesson(images, None, seed, cfg.augment.crop, cfg.data.input_scale)
    if keys is None:
        raise RuntimeError("internal: a student's batches carry no face keys (distill.bank needs the cached loader)")
    return state.teacher.lesson(images, keys, seed, cfg.augment.crop, cfg.data.input_scale)


def train_one_epoch(state: TrainState, batches: Iterable, steps_per_epoch: int) -> dict:
    """One pass over `batches`; returns loss parts, training accuracy, images and seconds."""
    cfg, device = state.cfg, state.device
    model, loss_fn, optimizer = state.model, state.loss_fn, state.optimizer
    model.train()
    torch.manual_seed(epoch_seed(cfg.train.seed, state.rank, state.epoch))
    totals = torch.zeros(6, device=device)  # loss * n, ce * n, center * n, correct, lambda * center * n, kl * n
    images_seen, step, t0 = 0, 0, time.perf_counter()
    progress = EpochProgress(
        state.epoch + 1, state.schedule.epochs, steps_per_epoch, cfg.train.progress_seconds, state.rank
    )
    for batch in batches:
        images = batch[0].to(device, non_blocking=True)
        labels = batch[1].to(device, non_blocking=True).long()
        factor = state.schedule.factor(state.epoch + step / max(steps_per_epoch, 1))
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0) * factor
        x, teacher = lesson(state, images, batch[2] if len(batch) > 2 else None)
        if state.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, features, loss, parts = forward_backward(state, x, labels, teacher)
        state.precision.unscale(optimizer)
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer_step(state.precision, optimizer)
        loss_fn.after_step(features, labels)
        if state.ema is not None:
            state.ema.update(state.core)
        n = labels.shape[0]
        totals += torch.stack(
            [
                loss.detach() * n,
                parts["ce"] * n,
                parts["center"] * n,
                (logits.argmax(1) == labels).sum().float(),
                parts["lambda"] * parts["center"] * n,
                parts.get("kl", torch.zeros((), device=device)) * n,
            ]
        )
        images_seen += n
        step += 1
        progress.update(step, images_seen)
        if state.step_hook is not None:
            state.step_hook(step)
    if images_seen == 0:
        raise RuntimeError("the training data produced no batch (fewer rows than one batch?)")
    loss_sum, ce_sum, center_sum, correct, weighted_center, kl_sum = (totals / images_seen).tolist()
    seconds = time.perf_counter() - t0
    # How much the center term weighs against the cross-entropy (the figure lambda is chosen by),
    # and the lambda that weighed it (fixed, or following loss.center_share).
    center_share = weighted_center / max(ce_sum, 1e-12)
    distilled = {"train_kl": kl_sum} if state.teacher is not None else {}
    return {
        **distilled,
        "train_loss": loss_sum,
        "train_ce": ce_sum,
        "train_center": center_sum,
        "train_center_share": center_share,
        "train_center_lambda": weighted_center / max(center_sum, 1e-12),
        "train_acc": correct,
        "train_images": images_seen,
        "train_seconds": seconds,
        "lr": optimizer.param_groups[-1]["lr"],
        "images_per_s": images_seen / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    crop: int,
    tta: bool,
    device: torch.device,
    amp: bool = False,
    scale: int = 1,
    keep_probs: bool = False,
    channels_last: bool = False,
) -> dict:
    """Accuracy, per-class accuracy, confusion matrix and mean log-loss over `batches`; with
    `keep_probs` also "probs", the (N, C) probabilities in the batches' order (a numpy array)."""
    was_training = model.training
    model.eval()
    labels_all, probs_all, nll = [], [], 0.0
    for images, labels in batches:
        probs = predict_proba(model, images.to(device), crop, tta, amp, scale, channels_last)
        labels = labels.to(device).long()
        nll += -torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).sum().item()
        labels_all.append(labels.cpu())
        probs_all.append(probs.float().cpu())
    model.train(was_training)
    if not labels_all:
        raise RuntimeError("the evaluation data produced no batch")
    labels_all, probs_all = torch.cat(labels_all).numpy(), torch.cat(probs_all).numpy()
    result = summarize_confusion(confusion_matrix(labels_all, probs_all.argmax(1), NUM_CLASSES))
    result["loss"] = nll / len(labels_all)
    if keep_probs:
        result["probs"] = probs_all
    return result


def evaluate_state(state: TrainState, batches: Iterable, tta: bool = False) -> dict:
    """The selection split's results for this epoch's candidate weights: the raw weights, and with
    an EMA the moving average too, whichever scores higher (ties go to the raw weights). Returns
    "accuracy" and "loss" of the candidate, "raw_accuracy", "ema_accuracy" (the raw one without an
    EMA) and "ema_selected" (1.0 or 0.0): plain numbers, so workers can share them by broadcast."""
    cfg = state.cfg
    scored = {}
    for name, model in (("raw", state.core), ("ema", state.ema.module if state.ema is not None else None)):
        if model is not None:
            scored[name] = evaluate(
                model,
                batches,
                cfg.augment.crop,
                tta,
                state.device,
                state.use_amp,
                cfg.data.input_scale,
                channels_last=state.channels_last,
            )
    ema_wins = "ema" in scored and scored["ema"]["accuracy"] > scored["raw"]["accuracy"]
    chosen = scored["ema" if ema_wins else "raw"]
    return {
        **chosen,
        "raw_accuracy": scored["raw"]["accuracy"],
        "raw_loss": scored["raw"]["loss"],
        "ema_accuracy": scored.get("ema", scored["raw"])["accuracy"],
        "ema_selected": float(ema_wins),
    }


def end_epoch(state: TrainState, train_metrics: dict, eval_metrics: dict) -> dict:
    """Record an epoch: schedule step, best accuracy, history; returns the epoch's flat metrics.
    With an EMA, eval_acc is the accuracy of the weights this epoch's checkpoint ships
    (eval_weights: "ema" or "raw"), and both accuracies are in the row."""
    state.epoch += 1
    accuracy = eval_metrics["accuracy"]
    state.schedule.on_eval(accuracy)
    improved = accuracy > state.best_accuracy
    state.best_accuracy = max(state.best_accuracy, accuracy)
    row = {
        "epoch": state.epoch,
        **train_metrics,
        "eval_acc": accuracy,
        "eval_loss": eval_metrics["loss"],
        "best_eval_acc": state.best_accuracy,
        "improved": improved,
    }
    if state.ema is not None:
        row.update(
            eval_raw_acc=eval_metrics.get("raw_accuracy", accuracy),
            eval_ema_acc=eval_metrics.get("ema_accuracy"),
            eval_weights="ema" if eval_metrics.get("ema_selected") else "raw",
        )
    state.history.append(row)
    return row


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
