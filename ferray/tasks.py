"""What the Ray Train loop trains, as one small interface (Ray-free).

`ferray train` (classifiers) and `ferray sr train` (the SRGAN) share one Ray Train runner
(ferray.train); a Task supplies the parts that differ: building and restoring the state, one
training epoch, the evaluation, the per-epoch row, the checkpoint and the progress line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ferray import engine
from ferray.config import ExperimentConfig
from ferray.sr import engine as sr_engine


class ClassifierTask:
    name, kind, metric = "classifier", "classifier", "eval_acc"
    shared_keys = ("accuracy", "loss")  # evaluation results every worker needs (rank 0 computes them)

    def build(self, cfg: ExperimentConfig, device: torch.device, wrap=None):
        return engine.build_state(cfg, device, wrap)

    def restore(self, state, payload: dict) -> None:
        engine.restore_state(state, payload)

    def train_epoch(self, state, batches, steps_per_epoch: int) -> dict:
        return engine.train_one_epoch(state, batches, steps_per_epoch)

    def evaluate(self, state, batches) -> dict:
        cfg = state.cfg
        return engine.evaluate(state.core, batches, cfg.augment.crop, cfg.train.eval_tta, state.device, state.use_amp,
                               cfg.data.input_scale)

    def end_epoch(self, state, train_metrics: dict, eval_metrics: dict) -> dict:
        return engine.end_epoch(state, train_metrics, eval_metrics)

    def save(self, path: Path, state, row: dict) -> None:
        engine.save_checkpoint(path, state, row)

    def best(self, payload: dict) -> float:
        return payload["metrics"][self.metric]

    def format_epoch(self, row: dict, cfg: ExperimentConfig) -> str:
        return (f"epoch {row['epoch']:>3}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                f"train {row['train_acc']:6.2%}  {cfg.data.eval_split} {row['eval_acc']:6.2%} "
                f"(best {row['best_eval_acc']:6.2%})  {row['images_per_s']:,.0f} img/s  lr {row['lr']:.2e}")


class SRTask:
    name, kind, metric = "sr", sr_engine.SR_KIND, "eval_psnr"
    shared_keys = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain", "ssim_gain", "samples")

    def build(self, cfg: ExperimentConfig, device: torch.device, wrap=None):
        return sr_engine.build_sr_state(cfg, device, wrap)

    def restore(self, state, payload: dict) -> None:
        sr_engine.restore_sr_state(state, payload)

    def train_epoch(self, state, batches, steps_per_epoch: int) -> dict:
        return sr_engine.train_sr_epoch(state, batches, steps_per_epoch)

    def evaluate(self, state, batches) -> dict:
        return sr_engine.evaluate_sr(state.core, batches, state.device)

    def end_epoch(self, state, train_metrics: dict, eval_metrics: dict) -> dict:
        return sr_engine.end_sr_epoch(state, train_metrics, eval_metrics)

    def save(self, path: Path, state, row: dict) -> None:
        sr_engine.save_sr_checkpoint(path, state, row)

    def best(self, payload: dict) -> float:
        return payload["metrics"][self.metric]

    def format_epoch(self, row: dict, cfg: ExperimentConfig) -> str:
        return (f"epoch {row['epoch']:>3}/{cfg.train.epochs} [{row['phase']}]  pixel mse {row['train_pixel_mse']:.5f}  "
                f"content {row['train_content']:.4f}  D {row['train_d_loss']:.3f}  {cfg.data.eval_split} PSNR "
                f"{row['eval_psnr']:.2f} dB (bicubic {row['eval_bicubic_psnr']:.2f}, {row['eval_psnr_gain']:+.2f})  "
                f"SSIM {row['eval_ssim']:.4f}  {row['images_per_s']:,.0f} img/s")


TASKS = {task.name: task for task in (ClassifierTask(), SRTask())}


def get_task(name: str):
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
