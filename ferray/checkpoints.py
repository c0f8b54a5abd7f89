"""Checkpoints of classifier runs: what one holds (plain types and tensors, readable with
weights_only=True), writing and reading one, the slim copy inference ships, and continuing a run's
state from one (plain PyTorch, no Ray). ferray.engine re-exports these names for its callers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ferray import __version__
from ferray.config import ExperimentConfig, from_dict, to_dict
from ferray.errors import CheckpointError
from ferray.labels import NUM_CLASSES
from ferray.models import build_model

if TYPE_CHECKING:
    from ferray.engine import TrainState

CHECKPOINT_FORMAT = "ferray.checkpoint/1"
CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_payload(state: TrainState, metrics: dict) -> dict:
    """Everything in plain types and tensors, so torch.load(weights_only=True) can read it.

    "model" holds the weights this checkpoint ships, the ones every reader loads (evaluate, the
    bundles, explain): the EMA's when metrics["eval_weights"] is "ema", else the raw ones; "weights"
    names which. With an EMA, "train_model" (the raw weights) and "ema" (the average and its step
    count) are there too, for --resume."""
    raw = {k: v.detach().cpu() for k, v in state.core.state_dict().items()}
    weights = metrics.get("eval_weights", "raw") if state.ema is not None else "raw"
    extra = {}
    if state.ema is not None:
        extra = {"train_model": raw, "ema": state.ema.state_dict()}
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "classifier",
        "ferray_version": __version__,
        "config": to_dict(state.cfg),
        "pretrained": bool(getattr(state.core, "pretrained", False)),
        "model": extra["ema"]["model"] if weights == "ema" else raw,
        "weights": weights,
        **extra,
        "centers": state.loss_fn.center.centers.detach().cpu(),
        "center_balance": torch.cat([state.loss_fn.balance, state.loss_fn.balanced[None]]).detach().cpu(),
        "optimizer": state.optimizer.state_dict(),
        "grad_scaler": state.precision.state_dict(),
        "schedule": state.schedule.state_dict(),
        "epoch": state.epoch,
        "best_accuracy": state.best_accuracy,
        "history": state.history,
        "metrics": metrics,
        "lineage": state.lineage,
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
        raise CheckpointError(
            f"{path}: not a ferray checkpoint (format "
            f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__})"
        )
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path}: a {payload.get('kind')} checkpoint, expected a {kind} one")
    return payload


def slim_checkpoint(payload: dict) -> dict:
    """What inference needs from a training checkpoint: weights (in half precision: a bundle ships
    inside the package, and fp16 weights classify as fp32 ones do), config, and the run's facts."""
    keep = (
        "format",
        "kind",
        "ferray_version",
        "config",
        "model",
        "weights",
        "epoch",
        "metrics",
        "pretrained",
        "content_loss",
        "lineage",
    )
    slim = {k: payload[k] for k in keep if k in payload}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["model"].items()}
    return slim


def restore_state(state: TrainState, payload: dict) -> None:
    """Continue a run from a checkpoint payload (model, EMA, centers, optimizer, schedule, counters)."""
    state.core.load_state_dict(payload.get("train_model", payload["model"]))
    if state.ema is not None:
        if "ema" in payload:
            state.ema.load_state_dict(payload["ema"])
        else:  # a run that trained without an average starts one from its current weights
            state.ema.module.load_state_dict(state.core.state_dict())
    state.loss_fn.center.centers.copy_(payload["centers"].to(state.device))
    if "center_balance" in payload:  # (log CE, log center, started): loss.center_share's running means
        balance = payload["center_balance"].to(state.device)
        state.loss_fn.balance.copy_(balance[:2])
        state.loss_fn.balanced.copy_(balance[2])
    try:
        state.optimizer.load_state_dict(payload["optimizer"])
    except ValueError as e:  # other parameter groups: written by a ferray before decoupled weight decay
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit this optimizer ({e}); it was written "
            "by an older ferray: start the run again"
        ) from None
    state.precision.load_state_dict(payload.get("grad_scaler", {}))
    state.schedule.load_state_dict(payload["schedule"])
    state.epoch, state.best_accuracy = payload["epoch"], payload["best_accuracy"]
    state.history = list(payload["history"])
    state.schedule.epochs = resumed_plan(state.cfg, payload)


def resumed_plan(cfg: ExperimentConfig, payload: dict) -> int:
    """The epochs a resumed run's schedule spans. The same train.epochs and budget as the
    checkpoint's: the plan the checkpoint was following, so the schedule continues exactly where it
    stopped. Changed ones (--set train.epochs=N, a new budget): a new plan from them, the time
    budget counting the epoch times recorded so far (the cosine then bends to the new length)."""
    train, saved = cfg.train, payload["config"].get("train", {})
    if (saved.get("epochs"), saved.get("budget_minutes", 0.0)) == (train.epochs, train.budget_minutes):
        return int(payload["schedule"].get("epochs", train.epochs))
    from ferray.sittings import planned_epochs

    seconds = [row.get("epoch_seconds", 0.0) for row in payload["history"]]
    return planned_epochs(seconds, train.budget_minutes * 60, train.epochs)


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ExperimentConfig, dict]:
    """Rebuild the model a checkpoint was trained as, from the checkpoint alone, in eval mode."""
    payload = load_checkpoint(path)
    cfg = from_dict(payload["config"])
    model = build_model(
        cfg.model.name, num_classes=NUM_CLASSES, dropout=cfg.model.dropout, dropout_kind=cfg.model.dropout_kind
    )
    model.load_state_dict(payload["model"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval(), cfg, payload
