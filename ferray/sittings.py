"""Training in sittings (Ray-free): a time budget planned once, and warm restarts from committed weights.

A machine here lasts one sitting, and what is not committed goes with it. So a run is sized to end
inside its sitting (`train.budget_minutes`: the epochs that fit, planned once from the measured
step rate, the cosine reaching its floor at the budget's end), and a later sitting continues from
the half-precision weights the run left (`train.init`, `ferray train --init`): a warm restart,
with a fresh optimizer and a short warm-up, so no optimizer state has to travel between machines.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from pathlib import Path

import torch.nn as nn

from ferray.config import from_dict
from ferray.errors import CheckpointError

# The steps whose pace plans a budgeted run: past the first ones (compilation, allocator warm-up),
# few enough that the plan is made early in the first epoch.
PLAN_AFTER_STEPS = 300
SKIP_STEPS = 30
# An evaluation's forward pass against a training step's forward + backward, per image: the
# selection split's cost is estimated from the training rate, before any evaluation has run.
EVAL_SPEEDUP = 3.0


# -------------------------------------------------------------------------------------------- budget
class BudgetPlan:
    """Plans a budgeted run's length once: after `plan_after` steps of its first epoch (or at the
    first epoch's end, if it is shorter), from the pace of the steps since `skip`, it fixes the
    epochs (at most `most`) whose training and selection evaluations fit `budget_s` from the run's
    start. The plan is kept to the end: the schedule's cosine spans exactly those epochs, and a
    resumed run continues it (re-planning every epoch bent the cosine as the pace moved)."""

    def __init__(
        self,
        budget_s: float,
        most: int,
        steps_per_epoch: int,
        eval_images: int,
        batch_size: int,
        evaluations: int = 1,
        plan_after: int = PLAN_AFTER_STEPS,
        skip: int = SKIP_STEPS,
        clock=time.perf_counter,
    ):
        self.budget_s, self.most, self.steps_per_epoch = budget_s, most, max(1, steps_per_epoch)
        self.eval_images, self.batch_size, self.evaluations = eval_images, batch_size, evaluations
        self.plan_after = max(1, min(plan_after, self.steps_per_epoch))
        self.skip = min(skip, self.plan_after // 4)
        self.clock = clock
        self.start = clock()
        self.skip_time: float | None = None
        self.epochs: int | None = None
        self.details: dict = {}

    def after_step(self, step: int) -> int | None:
        """Called after each step of the first epoch (1-based); the plan, once, at `plan_after`."""
        if self.epochs is not None:
            return None
        if step == self.skip:
            self.skip_time = self.clock()
        if step < self.plan_after:
            return None
        return self.plan(step)

    def plan(self, step: int) -> int:
        """The epochs that fit, from the pace so far (`step` steps into the first epoch)."""
        now = self.clock()
        if self.skip_time is not None and step > self.skip:
            since, counted = self.skip_time, step - self.skip
        else:
            since, counted = self.start, step
        step_s = (now - since) / max(counted, 1)
        eval_s = self.evaluations * self.eval_images * step_s / (self.batch_size * EVAL_SPEEDUP)
        epoch_s = self.steps_per_epoch * step_s + eval_s
        # the time spent, plus what the first epoch still needs, then whole epochs
        first_left = (self.steps_per_epoch - step) * step_s + eval_s
        left = self.budget_s - (now - self.start) - first_left
        self.epochs = int(max(1, min(self.most, 1 + math.floor(max(left, 0.0) / max(epoch_s, 1e-9)))))
        self.details = {
            "budget_minutes": round(self.budget_s / 60, 2),
            "planned_epochs": self.epochs,
            "measured_steps": counted,
            "step_seconds": round(step_s, 4),
            "epoch_seconds_estimate": round(epoch_s, 1),
            "evaluation_seconds_estimate": round(eval_s, 1),
        }
        return self.epochs

    def describe(self) -> str:
        d = self.details
        return (
            f"budget {d['budget_minutes']:g} min: {d['planned_epochs']} epoch(s) planned, kept to the end "
            f"({d['step_seconds'] * 1000:.0f} ms a step over {d['measured_steps']} steps, "
            f"~{d['epoch_seconds_estimate']:.0f} s an epoch with "
            f"~{d['evaluation_seconds_estimate']:.0f} s of evaluation)"
        )


def planned_epochs(epoch_seconds: list[float], budget_s: float, most: int) -> int:
    """The epochs a budget holds given whole epochs already timed: those done, plus those the time
    left holds at their median time (the first epoch, which includes warm-up, only when it is the
    only one), at most `most`. For a resume under a changed budget (a new plan from the epochs the
    run has)."""
    if budget_s <= 0 or not epoch_seconds:
        return most
    per_epoch = statistics.median(epoch_seconds[1:] or epoch_seconds)
    left = max(0.0, budget_s - sum(epoch_seconds))
    return int(min(most, len(epoch_seconds) + left // max(per_epoch, 1e-6)))


# ------------------------------------------------------------------------------------ warm restarts
def warm_start(path: str | Path, model_name: str) -> tuple[dict, list[dict]]:
    """The checkpoint a run starts from (train.init: best.pt, best.fp16.pt or a bundle's member
    file) and the chain of runs the new run continues: the checkpoint's own chain, then itself."""
    from ferray.engine import load_checkpoint

    payload = load_checkpoint(path)
    cfg = from_dict(payload["config"])
    if cfg.model.name != model_name:
        raise CheckpointError(f"train.init {path}: a {cfg.model.name} checkpoint; this run trains {model_name}")
    link = {
        "name": cfg.name,
        "epochs": int(payload.get("epoch", 0)),
        "selection": (payload.get("metrics") or {}).get("eval_acc"),
        "selection_split": cfg.data.selection_split,
        "checksum": file_checksum(path),
    }
    if cfg.distill.bank:  # a student's sitting: the teacher bank it learned from, or its online teacher
        link["distilled"] = Path(cfg.distill.bank).name
    elif cfg.distill.online:
        link["distilled"] = f"{cfg.distill.teacher_name()} (online)"
    return payload, [*payload.get("lineage", []), link]


def file_checksum(path: str | Path) -> str:
    """blake2b (64 bits) of a file's bytes: names exactly which weights a run started from."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"blake2b64:{digest.hexdigest()}"


def load_weights_strictly(model: nn.Module, weights: dict, where: str | Path) -> None:
    """Every tensor of the model from `weights` (half precision is widened), or an error that names
    the first layer that is missing, extra or of another shape."""
    own = model.state_dict()
    for key in own:
        if key not in weights:
            raise CheckpointError(f"{where}: no weights for layer {key} of this {type(model).__name__}")
    for key, value in weights.items():
        if key not in own:
            raise CheckpointError(f"{where}: layer {key} is not in this {type(model).__name__}")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{where}: layer {key} is {tuple(value.shape)} there and {tuple(own[key].shape)} in this model"
            )
    model.load_state_dict(weights)
