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

from ferray.engine import planned_epochs
from ferray.runs import BEST_FILE, LATEST_FILE, METRICS_FILE, RESULT_FILE, RunFolder, RunRecord

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
) -> list[dict]:
    """Train `state` until its planned epochs are done; returns the rows of the epochs trained here.

    `train(epoch)` gives that epoch's batches (0-based; their order must depend on the run's seed,
    the rank and the epoch only, so a resumed run sees what an uninterrupted one sees);
    `evaluate(state)` the selection split's results (every worker must get the same ones);
    `agree(n)` makes every worker take the same plan (rank 0's);
    `on_epoch(state, row)` checkpoints, logs and reports. With train.budget_minutes the run is
    re-planned after each epoch from the epoch times of the whole run (resumes included)."""
    cfg, rows = state.cfg, []
    loop_start = time.perf_counter()
    while state.epoch < task.planned_epochs(state):
        epoch_start = time.perf_counter()
        train_metrics = task.train_epoch(state, train(state.epoch), steps_per_epoch)
        row = task.end_epoch(state, train_metrics, evaluate(state))
        row["workers"] = workers
        row["images_per_s"] = train_metrics["images_per_s"] * workers  # each worker saw its shard
        row["loop_seconds"] = time.perf_counter() - loop_start
        row["epoch_seconds"] = time.perf_counter() - epoch_start
        if cfg.train.budget_minutes > 0:
            seconds = [r.get("epoch_seconds", 0.0) for r in state.history]
            task.replan(state, agree(planned_epochs(seconds, cfg.train.budget_minutes * 60, cfg.train.epochs)))
        row["planned_epochs"] = task.planned_epochs(state)
        rows.append(row)
        if on_epoch is not None:
            on_epoch(state, row)
    return rows


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
        self.folder.start(cfg, fresh_metrics=True)
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
