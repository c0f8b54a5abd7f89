"""The one training loop (Ray-free): epochs -> evaluation on the selection split -> the time budget
-> whatever the runner does with each epoch.

Every runner calls `fit`: the Ray Train worker (ferray.distributed.train, which reports each epoch to Ray with
a checkpoint), the Tune trials (through it), and the Ray-free GPU benches (through `LocalRun`, which
keeps the files a Ray run keeps). What differs between them is passed in: how batches come, how the
evaluation is shared among workers, what an epoch's end does.

    run = LocalRun(run_dir, cfg)
    result = fit(get_task("classifier"), state, train_batches.epoch, lambda s: task.evaluate(s, val),
                 steps_per_epoch, on_epoch=run.on_epoch)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ferray.runs import BEST_FILE, LATEST_FILE, METRICS_FILE, RESULT_FILE, RunFolder, RunRecord
from ferray.sittings import BudgetPlan, warm_start

log = logging.getLogger(__name__)

__all__ = ["BEST_FILE", "LATEST_FILE", "METRICS_FILE", "RESULT_FILE", "LocalRun", "fit"]


def fit(
    task,
    state,
    train: Callable[[int], Iterable],
    evaluate: Callable[[object], dict],
    steps_per_epoch: int,
    *,
    on_epoch: Callable[[object, dict], None] | None = None,
    agree: Callable[[int], int] = lambda n: n,
    workers: int = 1,
    eval_images: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict]:
    """Train `state` until its planned epochs are done; returns the rows of the epochs trained here.

    `train(epoch)` gives that epoch's batches (0-based; their order must depend on the run's seed,
    the rank and the epoch only, so a resumed run sees what an uninterrupted one sees);
    `evaluate(state)` the selection split's results (every worker must get the same ones);
    `agree(n)` makes every worker take the same plan (rank 0's);
    `on_epoch(state, row)` checkpoints, logs and reports. With train.budget_minutes a fresh run is
    planned once, early in its first epoch (ferray.sittings.BudgetPlan; `eval_images`: the
    selection split's size, whose evaluation the budget holds too), and keeps that plan."""
    rows = []
    loop_start = clock()
    planner = _budget_plan(task, state, steps_per_epoch, eval_images, agree, clock)
    while state.epoch < task.planned_epochs(state):
        epoch_start = clock()
        train_metrics = task.train_epoch(state, train(state.epoch), steps_per_epoch)
        if planner is not None:
            _finish_plan(task, state, planner, agree)
        row = task.end_epoch(state, train_metrics, evaluate(state))
        row["workers"] = workers
        row["images_per_s"] = train_metrics["images_per_s"] * workers  # each worker saw its shard
        row["loop_seconds"] = clock() - loop_start
        row["epoch_seconds"] = clock() - epoch_start
        row["planned_epochs"] = task.planned_epochs(state)
        if planner is not None:
            row["budget_plan"], planner = planner.details, None
        rows.append(row)
        if on_epoch is not None:
            on_epoch(state, row)
    return rows


def _budget_plan(task, state, steps_per_epoch: int, eval_images: int, agree, clock) -> BudgetPlan | None:
    """The plan of a fresh budgeted run, hooked to its steps (tasks whose loop calls
    `state.step_hook`); None for a run without a budget or a resumed one (its plan is kept)."""
    cfg = state.cfg
    if cfg.train.budget_minutes <= 0 or state.epoch > 0:
        return None
    ema = getattr(state, "ema", None) is not None
    planner = BudgetPlan(
        cfg.train.budget_minutes * 60,
        cfg.train.epochs,
        steps_per_epoch,
        eval_images,
        cfg.train.batch_size,
        evaluations=2 if ema else 1,  # the raw weights and their moving average
        clock=clock,
    )

    def after_step(step: int) -> None:
        epochs = planner.after_step(step)
        if epochs is not None:
            _adopt_plan(task, state, planner, agree(epochs))

    state.step_hook = after_step
    return planner


def _finish_plan(task, state, planner: BudgetPlan, agree) -> None:
    """After the first epoch: plan now if its steps did not (a task whose loop has no step hook)."""
    state.step_hook = None
    if planner.epochs is None:
        _adopt_plan(task, state, planner, agree(planner.plan(planner.plan_after)))


def _adopt_plan(task, state, planner: BudgetPlan, epochs: int) -> None:
    planner.epochs = planner.details["planned_epochs"] = epochs
    task.replan(state, epochs)
    if getattr(state, "rank", 0) == 0:
        print(planner.describe(), flush=True)


class LocalRun:
    """A run folder written as `ferray train` writes one, without Ray (through ferray.runs.RunFolder):
    config.yaml, metrics.jsonl, best.pt (by the task's metric on the selection split), latest.pt
    and result.json, the last two rewritten after every epoch so a run killed at any moment keeps
    what it measured. `facts` (the machine, the compile outcome, test evaluations) go into the
    record's facts; a "machine" fact becomes machine.json."""

    def __init__(self, run_dir: str | Path, task, cfg, facts: dict | None = None):
        self.folder = RunFolder(run_dir)
        self.run_dir, self.task, self.cfg = self.folder.path, task, cfg
        self.facts = dict(facts or {})
        lineage = warm_start(cfg.train.init, cfg.model.name)[1] if cfg.train.init else []
        self.folder.start(cfg, provenance={"continues": lineage} if lineage else None, fresh_metrics=True)
        if "machine" in self.facts:
            self.folder.write_machine(self.facts.pop("machine"))
        self.best: dict | None = None
        self.started = time.perf_counter()

    def on_epoch(self, state, row: dict) -> None:
        self.folder.append_epoch(row)
        self.task.save(self.run_dir / LATEST_FILE, state, row)
        if self.best is None or row[self.task.select_by] > self.best[self.task.select_by]:
            self.best = row
            self.task.save(self.run_dir / BEST_FILE, state, row)
        log.info(self.task.format_epoch(row, self.cfg))
        self.write_result(state)

    def write_result(self, state, **extra) -> RunRecord:
        """result.json as `ferray train` writes it (`extra`, e.g. test evaluations, joins the facts)."""
        self.facts.update(extra)
        best = self.best or {}
        record = self.folder.record(
            self.cfg,
            self.task,
            best_epoch=best.get("epoch"),
            best_value=best.get(self.task.metric),
            epochs=state.epoch,
            planned_epochs=self.task.planned_epochs(state),
            seconds=time.perf_counter() - self.started,
            facts=self.facts,
            gpus_per_worker=float(state.device.type == "cuda") if hasattr(state, "device") else 0.0,
        )
        return self.folder.write_record(record)
