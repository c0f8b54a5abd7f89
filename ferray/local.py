"""Training and testing on one device without Ray, from faces held in memory (Ray-free).

The GPU benches are this module plus what they measure: `train_local` runs the core loop
(ferray.fit) over faces kept on the device as uint8, selecting on the selection split and writing a
run folder as `ferray train` does; `evaluate_tests` then evaluates the kept checkpoint on every test
split, center crop and ten-crop TTA, rewriting result.json after each evaluation so that a run
killed at any moment keeps everything it measured.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ferray.config import ExperimentConfig
from ferray.data.contract import id_keys
from ferray.data.memory import Faces
from ferray.engine import TensorBatches
from ferray.fit import BEST_FILE, LocalRun, fit
from ferray.tasks import CLASSIFIER, Task

log = logging.getLogger(__name__)


def on_device(faces: Faces, device, batch_size: int, train: bool, seed: int = 0, keys: bool = False) -> TensorBatches:
    """Faces as batches on `device` (uint8 there: 2.3 kB a face), shuffled each epoch when training;
    with `keys`, each batch carries its faces' keys (a student finds its teacher's answers by them)."""
    return TensorBatches(
        torch.from_numpy(faces.images).to(device),
        torch.from_numpy(faces.labels).to(device),
        batch_size,
        shuffle=train,
        drop_last=train,
        seed=seed,
        keys=torch.from_numpy(id_keys(faces.ids)) if keys else None,
    )


def train_local(
    cfg: ExperimentConfig,
    train: Faces,
    selection: Faces,
    device,
    run_dir: str | Path,
    task: Task = CLASSIFIER,
    facts: dict | None = None,
) -> tuple[object, LocalRun]:
    """(state with the kept checkpoint's weights loaded, the run). cfg.train.compile uses
    torch.compile, falling back to eager (said in the output and the run's facts) if it fails."""
    from ferray.device import training_machine_facts

    state = task.build(cfg, device)
    run = LocalRun(run_dir, task, cfg, {**(facts or {}), "machine": training_machine_facts(state)})
    train_batches = on_device(train, device, cfg.train.batch_size, True, cfg.train.seed, keys=bool(cfg.distill.bank))
    selection_batches = on_device(selection, device, cfg.train.eval_batch_size, False)
    t0 = time.perf_counter()
    fit(
        task,
        state,
        train_batches.epoch,
        lambda s: task.evaluate(s, selection_batches),
        len(train_batches),
        on_epoch=lambda s, row: _on_epoch(run, s, row),
        eval_images=len(selection_batches.labels),
    )
    run.facts["compile"] = _compile_outcome(state, cfg)
    run.facts["loop_seconds"] = round(time.perf_counter() - t0, 1)
    task.restore_weights(state, run.run_dir / BEST_FILE)
    run.folder.write_weights()
    run.write_result(state)
    return state, run


def _on_epoch(run: LocalRun, state, row: dict) -> None:
    run.facts["compile"] = _compile_outcome(state, state.cfg)
    run.on_epoch(state, row)


def _compile_outcome(state, cfg) -> str:
    if not cfg.train.compile:
        return "off"
    fallback = getattr(state.model, "fallback", None)
    return f"failed, trained in eager mode ({fallback})" if fallback else f"on ({cfg.train.compile_mode})"


def evaluate_tests(
    state,
    run: LocalRun,
    tests: dict[str, Faces],
    device,
    batch_size: int = 512,
    selection: str | None = None,
    probs: dict | None = None,
) -> dict:
    """{split: {"center": eval, "tta": eval}} of the kept checkpoint on each split of `tests` (the
    `selection` split may be among them, marked so); result.json gains each as soon as it is
    measured. `probs`, if given, receives {(split, view): (N, 7) probabilities}."""
    from ferray import engine

    cfg, results = state.cfg, {}
    for split, faces in tests.items():
        batches = on_device(faces, device, batch_size, False)
        results[split] = {"selection": split == selection}
        for view in ("center", "tta"):
            result = engine.evaluate(
                state.core,
                batches,
                cfg.augment.crop,
                view == "tta",
                device,
                state.use_amp,
                cfg.data.input_scale,
                keep_probs=probs is not None,
                channels_last=state.channels_last,
            )
            if probs is not None:
                probs[split, view] = result.pop("probs")
            results[split][view] = result
            run.write_result(state, tests=results)
            role = "selection" if split == selection else "test"
            log.info(
                f"{split} ({role}, {len(faces):,} faces){' ten-crop TTA' if view == 'tta' else ' center crop'}: "
                f"{result['accuracy']:.2%}"
            )
    return results
