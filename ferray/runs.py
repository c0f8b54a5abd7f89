"""A run folder and its record: the one writer of every file a training run leaves (Ray-free).

    runs/NAME/config.yaml        the final config (experiment + overrides + resolved data paths)
              provenance.json    the code's commit and the data's checksum
              machine.json       where the epochs ran (the worker's machine, not the driver's)
              metrics.jsonl      one row per epoch, as fit() made it
              latest.pt best.pt  the last epoch's checkpoint; the selected one
              best.fp16.pt       the selected weights alone, in half precision (a few MB: small enough
                                 to commit or copy off the machine the moment a run ends)
              result.json        the RunRecord: the run's summary, which later stages read

`ferray train` (its Ray driver and its rank-0 worker) and the Ray-free runner (ferray.fit.LocalRun:
the GPU benches, the tests) write through `RunFolder`, so both leave the same files with the same
schema; `read_record` reads result.json back as a typed RunRecord (older files included).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ferray.config import ConfigError, ExperimentConfig, build_typed, dump_yaml

CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
MACHINE_FILE = "machine.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
BEST_FILE = "best.pt"
LATEST_FILE = "latest.pt"
WEIGHTS_FILE = "best.fp16.pt"
RUN_FILES = (CONFIG_FILE, RESULT_FILE, METRICS_FILE, MACHINE_FILE, PROVENANCE_FILE)  # what a bundle keeps


@dataclass
class RunRecord:
    """result.json: what a finished (or running) training run says about itself."""

    name: str
    task: str  # "classifier" | "sr"
    model: str
    run_dir: str
    best_checkpoint: str
    selection_split: str
    metric: str  # what the run's figure is (eval_acc, eval_psnr), measured on the selection split
    best_value: float | None = None  # that figure for the kept checkpoint
    best_epoch: int | None = None
    epochs: int = 0  # epochs trained (resumes included)
    planned_epochs: int = 0
    test_splits: list = field(default_factory=list)  # the splits that neither trained nor selected
    seconds: float = 0.0  # wall time of the last invocation (a resume counts its own)
    train_seconds: float = 0.0  # the epochs' wall time over the whole run, resumes included
    images_per_s: float | None = None  # the median epoch's training rate, all workers together
    workers: int = 1
    gpus_per_worker: float = 0.0
    budget_minutes: float | None = None
    machine: dict | None = None
    commit: str | None = None
    data_checksum: str | None = None
    # a warm restart's chain (train.init): the runs it continues, oldest first, each with its name,
    # epochs, selection accuracy and the checksum of the weights it handed on
    continues: list = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)  # the last epoch's row (numbers only)
    facts: dict = field(default_factory=dict)  # what a runner adds: compile outcome, test evaluations, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# keys of result.json files written before RunRecord (the shipped bundle's run among them)
_LEGACY_METRICS = ("eval_acc", "eval_psnr")


def record_from_dict(data: dict, where: str = RESULT_FILE) -> RunRecord:
    """A RunRecord from result.json's mapping; files of older ferrays (`best_eval_acc` and the
    runner's facts at the top level) are read too."""
    data = dict(data)
    if "eval_split" in data and "selection_split" not in data:
        data["selection_split"] = data.pop("eval_split")
    for metric in _LEGACY_METRICS:
        if f"best_{metric}" in data and "metric" not in data:
            data["metric"], data["best_value"] = metric, data.pop(f"best_{metric}")
    names = {f.name for f in dataclasses.fields(RunRecord)}
    facts = {k: data.pop(k) for k in list(data) if k not in names}
    data["facts"] = {**data.get("facts", {}), **facts}
    try:
        return build_typed(RunRecord, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_record(run_dir: str | Path) -> RunRecord | None:
    """The run's result.json as a RunRecord, or None if it has none yet."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return record_from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


class RunFolder:
    """The files of one run. Every write replaces its file whole (or appends one line)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)

    def start(self, cfg: ExperimentConfig, provenance: dict | None = None, fresh_metrics: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _replace(self.path / CONFIG_FILE, dump_yaml(cfg))
        if provenance is not None:
            _replace(self.path / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
        if fresh_metrics:
            _replace(self.path / METRICS_FILE, "")

    def write_machine(self, facts: dict) -> None:
        _replace(self.path / MACHINE_FILE, json.dumps(facts, indent=2) + "\n")

    def append_epoch(self, row: dict) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewrite_epochs(self, history: list[dict]) -> None:
        """After a restart: exactly the epochs the checkpoint holds."""
        _replace(self.path / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))

    def epochs(self) -> list[dict]:
        path = self.path / METRICS_FILE
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def _json(self, name: str) -> dict:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def record(
        self,
        cfg: ExperimentConfig,
        task,
        *,
        best_epoch: int | None,
        best_value: float | None,
        epochs: int,
        planned_epochs: int,
        seconds: float,
        workers: int = 1,
        gpus_per_worker: float = 0.0,
        test_splits: list = (),
        facts: dict | None = None,
    ) -> RunRecord:
        """The RunRecord of this folder: the given facts of the runner, and what the run's own files
        say (epoch times and rates from metrics.jsonl, the machine, the commit, the data)."""
        history = self.epochs()
        rates = [row["images_per_s"] for row in history if "images_per_s" in row]
        provenance = self._json(PROVENANCE_FILE)
        final = history[-1] if history else {}
        return RunRecord(
            name=self.path.name,
            task=task.name,
            model=task.model_name(cfg),
            run_dir=str(self.path),
            best_checkpoint=str(self.path / BEST_FILE),
            selection_split=cfg.data.selection_split,
            metric=task.metric,
            best_value=best_value,
            best_epoch=best_epoch,
            epochs=epochs,
            planned_epochs=planned_epochs,
            test_splits=list(test_splits),
            seconds=round(seconds, 1),
            train_seconds=round(sum(row.get("epoch_seconds", 0.0) for row in history), 1),
            images_per_s=round(statistics.median(rates), 1) if rates else None,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            budget_minutes=cfg.train.budget_minutes or None,
            machine=self._json(MACHINE_FILE) or None,
            commit=provenance.get("commit"),
            data_checksum=provenance.get("data_checksum"),
            continues=list(provenance.get("continues", [])),
            final_metrics={k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            facts=dict(facts or {}),
        )

    def write_weights(self, best: dict | None = None) -> Path:
        """best.fp16.pt from best.pt (`best`: its payload, when the caller has read it already): what
        inference needs (the selected weights in half precision, the config, the epoch), without the
        optimizer, raw-weight and EMA state a resume needs. A run folder can go with its machine; this
        file is the part worth keeping, and `ferray evaluate`, `ferray ensemble` and `ferray explain`
        read it as they read best.pt."""
        import torch

        from ferray.engine import slim_checkpoint

        payload = best if best is not None else torch.load(self.path / BEST_FILE, map_location="cpu", weights_only=True)
        partial = self.path / (WEIGHTS_FILE + ".partial")
        torch.save(slim_checkpoint(payload), partial)
        partial.replace(self.path / WEIGHTS_FILE)
        return self.path / WEIGHTS_FILE

    def write_record(self, record: RunRecord) -> RunRecord:
        _replace(self.path / RESULT_FILE, json.dumps(record.to_dict(), indent=2, default=str) + "\n")
        return record


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
