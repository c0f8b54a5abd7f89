"""The training engine: one epoch of training, evaluation, checkpoints (plain PyTorch, no Ray).

Every runner calls these unchanged: the Ray Train loop (ferray.distributed.train), the Tune trials, the
Ray-free GPU bench, and the tests. Batches are (uint8 faces (B, H, W), labels (B,)) on any
device; augmentation happens on the batch's device.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ferray import __version__
from ferray.augment import predict_proba, train_views
from ferray.config import ExperimentConfig, OptimConfig, from_dict, to_dict
from ferray.labels import NUM_CLASSES
from ferray.device import autocast, keep_cpu_buffers, use_bf16
from ferray.losses import JointLoss
from ferray.metrics import confusion_matrix, summarize_confusion
from ferray.models import build_model
from ferray.errors import CheckpointError

CHECKPOINT_FORMAT = "ferray.checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


# ------------------------------------------------------------------------------------------ batches
class TensorBatches:
    """In-memory faces as shuffled batches, a new order each epoch (the data can live on the GPU)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


# -------------------------------------------------------------------------------------- optimizing
def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer, with the head and the backbone as separate groups when their rates differ."""
    params = model.parameters()
    if cfg.backbone_lr_ratio != 1.0 and hasattr(model, "head_parameters"):
        head = model.head_parameters()
        head_ids = {id(p) for p in head}
        params = [{"params": [p for p in model.parameters() if id(p) not in head_ids], "lr_scale": cfg.backbone_lr_ratio},
                  {"params": head, "lr_scale": 1.0}]
    if cfg.name == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


class LRSchedule:
    """Learning rate as a function of (fractional) epoch: warm-up, then none/cosine/step/plateau."""

    def __init__(self, cfg: OptimConfig, epochs: int):
        self.cfg, self.epochs = cfg, epochs
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0

    def factor(self, epoch: float) -> float:
        cfg = self.cfg
        warm = min(1.0, (epoch + 1e-9) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        if cfg.schedule == "cosine":
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
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs,
                "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale, self.best, self.bad_epochs = state["plateau_scale"], state["best"], state["bad_epochs"]
        self.epochs = state.get("epochs", self.epochs)  # a time budget may have re-planned the run


def planned_epochs(epoch_seconds: list[float], budget_s: float, most: int) -> int:
    """How many epochs a run with a time budget trains: those done, plus those the time left holds
    at the median epoch time (the first epoch, which includes warm-up, only when it is the only one),
    at most `most`. Re-planned after every epoch, so a machine that slows down shortens the run
    instead of overrunning its budget; the schedule follows the plan."""
    if budget_s <= 0 or not epoch_seconds:
        return most
    per_epoch = statistics.median(epoch_seconds[1:] or epoch_seconds)
    left = max(0.0, budget_s - sum(epoch_seconds))
    return int(min(most, len(epoch_seconds) + left // max(per_epoch, 1e-6)))


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
    epoch: int = 0  # epochs completed
    best_accuracy: float = 0.0
    history: list = field(default_factory=list)

    @property
    def core(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def use_amp(self) -> bool:
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


def build_state(cfg: ExperimentConfig, device: torch.device,
                wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0) -> TrainState:
    """Model, loss, optimizer and schedule from a config; `wrap` (e.g. DDP) is applied to the model.
    Every rank builds the same initial weights (seeded by the run's seed alone)."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu":
        keep_cpu_buffers()  # training at batch 64: 7% faster (measured in ferray.device)
    model = build_model(cfg.model.name, num_classes=NUM_CLASSES, dropout=cfg.model.dropout,
                        pretrained=cfg.model.pretrained).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = JointLoss(NUM_CLASSES, model.num_features, cfg.loss.center_lambda, cfg.loss.center_alpha,
                        cfg.loss.label_smoothing, cfg.loss.center_reduction).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    if wrap is not None:
        model = wrap(model)
    if cfg.train.compile:
        model = compiled(model, cfg.train.compile_mode)
    return TrainState(cfg, model, loss_fn, optimizer, LRSchedule(cfg.optim, cfg.train.epochs), device, rank)


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
                self._compiled, self.fallback = None, f"{type(e).__name__}: {str(e)[:300]}"
                print(f"torch.compile failed; training continues in eager mode ({self.fallback})", flush=True)
        return self.module(*args, **kwargs)


class EpochProgress:
    """A line every `every_s` seconds within a long epoch, on rank 0 only: how far it is, how fast it
    goes and how long is left ("epoch 17/25: step 161/403 (40%), 33 img/s, ~7 min left")."""

    def __init__(self, epoch: int, planned: int, steps: int, every_s: float, rank: int = 0,
                 echo: Callable[[str], None] = lambda line: print(line, flush=True), clock=time.perf_counter):
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
        self.echo(f"epoch {self.epoch}/{self.planned}: step {step}/{self.steps} ({min(step / self.steps, 1):.0%}), "
                  f"{rate}, ~{f'{left / 60:.0f} min' if left >= 90 else f'{left:.0f} s'} left")


def train_one_epoch(state: TrainState, batches: Iterable, steps_per_epoch: int) -> dict:
    """One pass over `batches`; returns loss parts, training accuracy, images and seconds."""
    cfg, device = state.cfg, state.device
    model, loss_fn, optimizer = state.model, state.loss_fn, state.optimizer
    model.train()
    torch.manual_seed(epoch_seed(cfg.train.seed, state.rank, state.epoch))
    totals = torch.zeros(4, device=device)  # loss * n, ce * n, center * n, correct
    images_seen, step, t0 = 0, 0, time.perf_counter()
    progress = EpochProgress(state.epoch + 1, state.schedule.epochs, steps_per_epoch, cfg.train.progress_seconds,
                             state.rank)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()
        factor = state.schedule.factor(state.epoch + step / max(steps_per_epoch, 1))
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0) * factor
        x = train_views(images, cfg.augment, cfg.data.input_scale)
        if state.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, state.use_amp):
            logits, features = model(x, return_embedding=True)
        loss, parts = loss_fn(logits, features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        loss_fn.after_step(features, labels)
        n = labels.shape[0]
        totals += torch.stack([loss.detach() * n, parts["ce"] * n, parts["center"] * n,
                               (logits.argmax(1) == labels).sum().float()])
        images_seen += n
        step += 1
        progress.update(step, images_seen)
    if images_seen == 0:
        raise RuntimeError("the training data produced no batch (fewer rows than one batch?)")
    loss_sum, ce_sum, center_sum, correct = (totals / images_seen).tolist()
    seconds = time.perf_counter() - t0
    # How much the center term weighs against the cross-entropy: the measurement lambda is chosen by.
    center_share = cfg.loss.center_lambda * center_sum / max(ce_sum, 1e-12)
    return {"train_loss": loss_sum, "train_ce": ce_sum, "train_center": center_sum,
            "train_center_share": center_share, "train_acc": correct,
            "train_images": images_seen, "train_seconds": seconds, "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": images_seen / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, crop: int, tta: bool, device: torch.device,
             amp: bool = False, scale: int = 1, keep_probs: bool = False, channels_last: bool = False) -> dict:
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


def end_epoch(state: TrainState, train_metrics: dict, eval_metrics: dict) -> dict:
    """Record an epoch: schedule step, best accuracy, history; returns the epoch's flat metrics."""
    state.epoch += 1
    accuracy = eval_metrics["accuracy"]
    state.schedule.on_eval(accuracy)
    improved = accuracy > state.best_accuracy
    state.best_accuracy = max(state.best_accuracy, accuracy)
    row = {"epoch": state.epoch, **train_metrics, "eval_acc": accuracy, "eval_loss": eval_metrics["loss"],
           "best_eval_acc": state.best_accuracy, "improved": improved}
    state.history.append(row)
    return row


# -------------------------------------------------------------------------------------- checkpoints
def checkpoint_payload(state: TrainState, metrics: dict) -> dict:
    """Everything in plain types and tensors, so torch.load(weights_only=True) can read it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "classifier",
        "ferray_version": __version__,
        "config": to_dict(state.cfg),
        "pretrained": bool(getattr(state.core, "pretrained", False)),
        "model": {k: v.detach().cpu() for k, v in state.core.state_dict().items()},
        "centers": state.loss_fn.center.centers.detach().cpu(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "epoch": state.epoch,
        "best_accuracy": state.best_accuracy,
        "history": state.history,
        "metrics": metrics,
    }


def save_checkpoint(path: str | Path, state: TrainState, metrics: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint_payload(state, metrics), tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, kind: str = "classifier") -> dict:
    """Read a ferray checkpoint (a file, or a folder holding checkpoint.pt) with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-ferray pickles
        raise CheckpointError(f"{path}: not a readable ferray checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a ferray checkpoint (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__})")
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path}: a {payload.get('kind')} checkpoint, expected a {kind} one")
    return payload


def restore_state(state: TrainState, payload: dict) -> None:
    """Continue a run from a checkpoint payload (model, centers, optimizer, schedule, counters)."""
    state.core.load_state_dict(payload["model"])
    state.loss_fn.center.centers.copy_(payload["centers"].to(state.device))
    state.optimizer.load_state_dict(payload["optimizer"])
    state.schedule.load_state_dict(payload["schedule"])
    state.epoch, state.best_accuracy = payload["epoch"], payload["best_accuracy"]
    state.history = list(payload["history"])
    # The plan follows this run's config, not the checkpoint's: a resume may ask for more epochs
    # (--set train.epochs=N), and a time budget re-plans from the epoch times recorded so far.
    train = state.cfg.train
    seconds = [row.get("epoch_seconds", 0.0) for row in state.history]
    state.schedule.epochs = planned_epochs(seconds, train.budget_minutes * 60, train.epochs)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig, dict]:
    """Rebuild the model a checkpoint was trained as, from the checkpoint alone, in eval mode."""
    payload = load_checkpoint(path)
    cfg = from_dict(payload["config"])
    model = build_model(cfg.model.name, num_classes=NUM_CLASSES, dropout=cfg.model.dropout)
    model.load_state_dict(payload["model"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval(), cfg, payload


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
