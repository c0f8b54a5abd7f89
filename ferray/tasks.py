"""What the Ray Train loop trains, as one small interface (Ray-free).

`ferray train` (classifiers) and `ferray sr train` (the SRGAN) share one Ray Train runner
(ferray.distributed.train); a Task supplies the parts that differ: building and restoring the state, one
training epoch, the evaluation, the per-epoch row, the checkpoint and the progress line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ferray import engine
from ferray.config import ExperimentConfig
from ferray.sr import engine as sr_engine


class Task(Protocol):
    """What a run trains, as every runner sees it (ferray.fit, the Ray Train loop, ferray.runs)."""

    name: str  # "classifier" | "sr": the record's task
    kind: str  # the checkpoint kind it writes and reads
    metric: str  # the run's figure, on the selection split (the record's metric)
    select_by: str  # the row key that chooses the kept checkpoint (higher wins)
    shared_keys: tuple[str, ...]  # evaluation results every worker needs (rank 0 computes them)
    reported_metrics: tuple[str, ...]  # what each epoch reports to Ray Train and Tune

    def check_data(self, manifest: dict, cfg: ExperimentConfig) -> None: ...
    def model_name(self, cfg: ExperimentConfig) -> str: ...
    def format_value(self, value: float) -> str: ...
    def build(self, cfg: ExperimentConfig, device: torch.device, wrap=None, rank: int = 0): ...
    def restore(self, state, payload: dict) -> None: ...
    def train_epoch(self, state, batches, steps_per_epoch: int) -> dict: ...
    def evaluate(self, state, batches) -> dict: ...
    def end_epoch(self, state, train_metrics: dict, eval_metrics: dict) -> dict: ...
    def planned_epochs(self, state) -> int: ...
    def replan(self, state, epochs: int) -> None: ...
    def save(self, path: Path, state, row: dict) -> None: ...
    def restore_weights(self, state, path: Path) -> None: ...
    def best(self, payload: dict) -> float: ...
    def format_epoch(self, row: dict, cfg: ExperimentConfig) -> str: ...


class ClassifierTask:
    # metric: what the run reports as its figure; select_by: what chooses the kept checkpoint (higher wins)
    name, kind, metric, select_by = "classifier", "classifier", "eval_acc", "eval_acc"
    # evaluation results every worker needs (rank 0 computes them): see engine.evaluate_state
    shared_keys = ("accuracy", "loss", "raw_accuracy", "ema_accuracy", "ema_selected")
    # what each epoch reports (to Ray Train and Tune): a search may optimize any of them
    reported_metrics = ("eval_acc", "best_eval_acc", "eval_loss", "train_acc", "train_loss")

    def check_data(self, manifest: dict, cfg: ExperimentConfig) -> None:
        size = manifest["image_size"][0] * cfg.data.input_scale  # faces upscaled on the fly are cropped after it
        if cfg.augment.crop > size:
            from ferray.errors import ConfigError

            scaled = f" (upscaled {cfg.data.input_scale}x)" if cfg.data.input_scale > 1 else ""
            raise ConfigError(
                f"augment.crop {cfg.augment.crop} is larger than the {size}x{size} faces{scaled} in {cfg.data.path}"
            )

    def model_name(self, cfg: ExperimentConfig) -> str:
        return cfg.model.name

    def format_value(self, value: float) -> str:
        return f"accuracy {value:.2%}"

    def build(self, cfg: ExperimentConfig, device: torch.device, wrap=None, rank: int = 0):
        return engine.build_state(cfg, device, wrap, rank)

    def restore(self, state, payload: dict) -> None:
        engine.restore_state(state, payload)

    def train_epoch(self, state, batches, steps_per_epoch: int) -> dict:
        return engine.train_one_epoch(state, batches, steps_per_epoch)

    def evaluate(self, state, batches) -> dict:
        return engine.evaluate_state(state, batches, state.cfg.train.eval_tta)

    def end_epoch(self, state, train_metrics: dict, eval_metrics: dict) -> dict:
        return engine.end_epoch(state, train_metrics, eval_metrics)

    def planned_epochs(self, state) -> int:
        return state.schedule.epochs

    def replan(self, state, epochs: int) -> None:
        """A time budget's length; the learning-rate schedule spans it from now on."""
        state.schedule.epochs, state.schedule.planned = epochs, True

    def save(self, path: Path, state, row: dict) -> None:
        engine.save_checkpoint(path, state, row)

    def restore_weights(self, state, path: Path) -> None:
        """The weights of a checkpoint of this run (its kept epoch), for testing."""
        state.core.load_state_dict(engine.load_checkpoint(path, kind=self.kind)["model"])

    def best(self, payload: dict) -> float:
        return payload["metrics"][self.metric]

    def format_epoch(self, row: dict, cfg: ExperimentConfig) -> str:
        ema = (
            f" [raw {row['eval_raw_acc']:.2%}, EMA {row['eval_ema_acc']:.2%}: {row['eval_weights']}]"
            if "eval_weights" in row
            else ""
        )
        teacher = f"(KL to the teacher {row['train_kl']:.3f}) " if "train_kl" in row else ""
        return (
            f"epoch {row['epoch']:>3}/{row['planned_epochs']}  loss {row['train_loss']:.4f}  {teacher}"
            f"(center {row['train_center_share']:.1%} of CE, lambda {row.get('train_center_lambda', 0):.3g})  "
            f"train {row['train_acc']:6.2%}  "
            f"{cfg.data.selection_split} {row['eval_acc']:6.2%}{ema} (best {row['best_eval_acc']:6.2%})  "
            f"{row['images_per_s']:,.0f} img/s  {row['epoch_seconds']:.0f}s  lr {row['lr']:.2e}"
        )


class SRTask:
    name, kind, metric, select_by = "sr", sr_engine.SR_KIND, "eval_psnr", "sr_choice"
    shared_keys = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain", "ssim_gain", "samples")
    reported_metrics = ("eval_psnr", "eval_ssim", "eval_psnr_gain", "best_eval_psnr")

    def check_data(self, manifest: dict, cfg: ExperimentConfig) -> None:
        from ferray.data.contract import FER_SIZE
        from ferray.errors import DataError

        if manifest["image_size"][0] != FER_SIZE:
            raise DataError(
                f"{cfg.data.path}: {manifest['image_size'][0]}x{manifest['image_size'][1]} faces; the SRGAN "
                f"trains on {FER_SIZE}x{FER_SIZE} faces (24 -> 48 pairs)"
            )

    def model_name(self, cfg: ExperimentConfig) -> str:
        return "srgan"

    def format_value(self, value: float) -> str:
        return f"PSNR {value:.2f} dB"

    def build(self, cfg: ExperimentConfig, device: torch.device, wrap=None, rank: int = 0):
        return sr_engine.build_sr_state(cfg, device, wrap, rank)

    def restore(self, state, payload: dict) -> None:
        sr_engine.restore_sr_state(state, payload)

    def train_epoch(self, state, batches, steps_per_epoch: int) -> dict:
        return sr_engine.train_sr_epoch(state, batches, steps_per_epoch)

    def evaluate(self, state, batches) -> dict:
        return sr_engine.evaluate_sr(state.core, batches, state.device)

    def end_epoch(self, state, train_metrics: dict, eval_metrics: dict) -> dict:
        return sr_engine.end_sr_epoch(state, train_metrics, eval_metrics)

    def planned_epochs(self, state) -> int:
        return state.cfg.train.epochs

    def replan(self, state, epochs: int) -> None:
        state.cfg.train.epochs = epochs  # the pre-training epochs come first and are kept

    def save(self, path: Path, state, row: dict) -> None:
        sr_engine.save_sr_checkpoint(path, state, row)

    def restore_weights(self, state, path: Path) -> None:
        state.core.load_state_dict(engine.load_checkpoint(path, kind=self.kind)["model"])

    def best(self, payload: dict) -> float:
        return payload["metrics"][self.metric]

    def format_epoch(self, row: dict, cfg: ExperimentConfig) -> str:
        return (
            f"epoch {row['epoch']:>3}/{row['planned_epochs']} [{row['phase']}]  pixel mse "
            f"{row['train_pixel_mse']:.5f}  "
            f"content {row['train_content']:.4f}  D {row['train_d_loss']:.3f}  {cfg.data.selection_split} PSNR "
            f"{row['eval_psnr']:.2f} dB (bicubic {row['eval_bicubic_psnr']:.2f}, {row['eval_psnr_gain']:+.2f})  "
            f"SSIM {row['eval_ssim']:.4f}  {row['images_per_s']:,.0f} img/s"
        )


CLASSIFIER: Task = ClassifierTask()
SR: Task = SRTask()
TASKS = {task.name: task for task in (CLASSIFIER, SR)}


def get_task(name: str) -> Task:
    """A task by its record name (result.json's "task")."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
