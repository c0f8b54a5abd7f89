"""`ferray train` and `ferray sr train`: the engine under Ray Train (TorchTrainer, Train V2).

Driver: checks the data and the run folder, writes config.yaml, builds the Ray datasets and the
trainer (`build_trainer`, which `ferray tune` reuses), runs it, and copies the best checkpoint to
RUN/best.pt. Workers (`train_loop`): DDP via prepare_model, their shard of Training through
get_dataset_shard, the task's epoch and evaluation (ferray.tasks: a classifier or the SRGAN), a
checkpoint and a report every epoch.
Ray keeps the best checkpoint by eval accuracy and always the latest, restarts lost workers from
the latest (FailureConfig), and `--resume` continues an interrupted run of the same name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ferray.config import ConfigError, ExperimentConfig, differences, from_dict, to_dict
from ferray.data.contract import (
    DataError,
    decode_faces,
    load_split,
    read_manifest,
    selection_split,
    split_dir,
    untouched_splits,
)
from ferray.device import cpu_worker_env
from ferray.fit import fit
from ferray.runs import BEST_FILE, CONFIG_FILE, PROVENANCE_FILE, RunFolder, RunRecord
from ferray.tasks import CLASSIFIER, Task

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 4096


# ------------------------------------------------------------------------------------------ data
def check_data(cfg: ExperimentConfig, task: Task = CLASSIFIER) -> dict:
    """The manifest of cfg.data.path, after checking that the splits are there and resolving the
    selection split (written back into cfg, so every checkpoint and result names it). A relative path
    is made absolute here, in the driver: workers and trials run in working directories of their own."""
    if "://" not in cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).absolute())
    manifest = read_manifest(cfg.data.path)
    task.check_data(manifest, cfg)
    if cfg.data.train_split not in manifest["splits"]:
        raise DataError(f"{cfg.data.path}: no {cfg.data.train_split!r} split (has: {', '.join(manifest['splits'])})")
    cfg.data.selection_split = selection_split(manifest, cfg.data.selection_split, cfg.data.path)
    if cfg.data.selection_split == cfg.data.train_split:
        raise ConfigError(f"data.selection_split {cfg.data.selection_split!r} is the training split; choose another")
    return manifest


def reads_its_own_faces(cfg: ExperimentConfig) -> bool:
    """A one-worker run that caches its faces reads the training split from its files itself, in the
    key order its Ray Data shard would hold them (the same batches, bit for bit): with nothing to
    shard, the pipeline's streaming executor, split coordinator and read workers were ~9 s of
    start-up (new processes) before the first step of every run, for no parallelism."""
    return cfg.scaling.workers == 1 and cfg.train.loader == "cache"


def build_datasets(cfg: ExperimentConfig) -> dict:
    """The training split as a Ray Dataset, sharded across workers. The eval split is not here: rank 0
    evaluates all of it, so it reads it itself (a few MB); a Dataset would cost a streaming executor
    and fresh worker processes per run (seconds of start-up) for no parallelism."""
    import ray.data

    path = str(split_dir(Path(cfg.data.path).absolute(), cfg.data.train_split))
    return {"train": ray.data.read_parquet(path).map_batches(decode_faces, batch_format="pyarrow")}


def _batches(shard, batch_size: int, device, train: bool, seed: int | None = None):
    """Stream a shard as (uint8 faces, labels) batches on `device` (`seed`: the shuffle buffer's)."""
    import torch

    iterator = shard.iter_torch_batches(
        batch_size=batch_size,
        dtypes={"image": torch.uint8, "label": torch.int64, "key": torch.int64},  # every column decode_faces makes
        device=device,
        drop_last=train,
        local_shuffle_buffer_size=SHUFFLE_BUFFER if train else None,
        local_shuffle_seed=seed if train else None,
    )
    for batch in iterator:
        yield batch["image"], batch["label"]


def _cached(shard, device):
    """Read a whole shard once into two tensors on `device` (faces stay uint8: 2.3 kB each), in the
    order of the faces' keys (reproducible; the epochs reshuffle it with the run's seed)."""
    import torch

    images, labels, keys = [], [], []
    for batch in shard.iter_torch_batches(
        batch_size=8192, dtypes={"image": torch.uint8, "label": torch.int64, "key": torch.int64}
    ):
        images.append(batch["image"])
        labels.append(batch["label"])
        keys.append(batch["key"])
    return in_key_order(torch.cat(images), torch.cat(labels), torch.cat(keys), device)


def in_key_order(images, labels, keys, device):
    """(faces, labels, keys) sorted by the keys (decode_faces), on `device`: the order a cached shard
    trains in, wherever the faces were read (a Ray Data shard, or the files in a one-worker Tune trial)."""
    order = keys.argsort()
    return images[order].to(device), labels[order].to(device), keys[order].to(device)


def read_in_key_order(cfg: ExperimentConfig, device):
    """The whole training split read from its files, in key order: what one worker's cached shard
    holds, without a Ray Data pipeline."""
    import numpy as np
    import torch

    from ferray.data.contract import read_split

    batch = decode_faces(read_split(cfg.data.path, cfg.data.train_split))
    return in_key_order(
        torch.from_numpy(np.ascontiguousarray(batch["image"])),
        torch.from_numpy(np.ascontiguousarray(batch["label"], dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(batch["key"])),
        device,
    )


def selection_rows(cfg: ExperimentConfig) -> int:
    """The selection split's size, from the manifest (a budget's plan holds its evaluations)."""
    split = read_manifest(cfg.data.path)["splits"].get(cfg.data.selection_split, {})
    return int(split.get("rows", 0))


def selection_batches(cfg: ExperimentConfig, device):
    """The whole selection split on `device`, in id order, as evaluation batches (read from its files:
    one worker evaluates all of it)."""
    import torch

    from ferray.engine import TensorBatches

    images, labels, _ = load_split(cfg.data.path, cfg.data.selection_split)
    return TensorBatches(
        torch.from_numpy(images).to(device),
        torch.from_numpy(labels).to(device),
        cfg.train.eval_batch_size,
        shuffle=False,
        drop_last=False,
    )


class _EpochData:
    """The worker's training and evaluation batches per epoch, cached or streamed (train.loader)."""

    def __init__(self, cfg: ExperimentConfig, device, rank: int):
        import ray.train

        from ferray.engine import TensorBatches

        self.cfg, self.device, self.rank = cfg, device, rank
        if reads_its_own_faces(cfg):
            images, labels, keys = read_in_key_order(cfg, device)
        elif cfg.train.loader == "cache":
            self.train_shard = ray.train.get_dataset_shard("train")
            images, labels, keys = _cached(self.train_shard, device)
        else:
            self.train_shard = ray.train.get_dataset_shard("train")
        if cfg.train.loader == "cache":
            self.train_cache = TensorBatches(
                images,
                labels,
                cfg.train.batch_size,
                seed=cfg.train.seed,
                rank=rank,
                keys=keys if cfg.distill.bank else None,  # a student finds its teacher's answers by them
            )
        self.eval_batches = selection_batches(cfg, device) if rank == 0 else None

    def train(self, epoch: int):
        """Epoch `epoch`'s batches, in an order fixed by (seed, rank, epoch)."""
        from ferray.engine import epoch_seed

        if self.cfg.train.loader == "cache":
            return self.train_cache.epoch(epoch)
        seed = epoch_seed(self.cfg.train.seed, self.rank, epoch) % 2**32  # the buffer's numpy generator takes 32 bits
        return _batches(self.train_shard, self.cfg.train.batch_size, self.device, True, seed)

    def eval(self):
        return self.eval_batches


# --------------------------------------------------------------------------------------- workers
def train_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: the engine, with DDP, shards and per-epoch reports."""
    import ray.train
    import ray.train.torch
    import torch

    from ferray import engine
    from ferray.distributed.placement import record_placement_group
    from ferray.distributed.runtime import quiet_worker_logs

    quiet_worker_logs()
    task = loop_config["task"]
    cfg = from_dict(loop_config["experiment"])
    run_dir = Path(loop_config["run_dir"])
    check_visible_here(run_dir)
    run_files = RunFolder(run_dir)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    engine.seed_everything(cfg.train.seed + rank)  # python and numpy; torch is seeded per rank and epoch
    device = ray.train.torch.get_device()
    state = task.build(cfg, device, wrap=ray.train.torch.prepare_model, rank=rank)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            task.restore(state, engine.load_checkpoint(folder, kind=task.kind))
        if rank == 0:
            run_files.rewrite_epochs(state.history)
            print(f"resumed from the checkpoint of epoch {state.epoch}", flush=True)

    if rank == 0:
        from ferray.device import training_machine_facts

        record_placement_group(run_dir)
        run_files.write_machine(training_machine_facts(state))
    steps_per_epoch = max(1, loop_config["train_rows"] // (cfg.train.batch_size * world))
    data = _EpochData(cfg, device, rank)
    writer = tensorboard_writer(run_dir) if rank == 0 else None

    def report(state, row: dict) -> None:
        """Every worker reports each epoch (a barrier); rank 0 with the checkpoint and the log line."""
        with tempfile.TemporaryDirectory() as folder:
            reported = None
            if rank == 0:
                task.save(Path(folder) / engine.CHECKPOINT_FILE, state, row)
                reported = ray.train.Checkpoint.from_directory(folder)
                log_epoch(run_files, writer, task.format_epoch(row, cfg), row)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=reported)

    fit(
        task,
        state,
        data.train,
        lambda s: _evaluate_on_rank0(task, s, data, device, rank, world),
        steps_per_epoch,
        on_epoch=report,
        agree=lambda n: _from_rank0(n, device, world),
        workers=world,
        eval_images=loop_config.get("eval_rows", 0),
    )
    if writer is not None:
        writer.close()


def check_visible_here(run_dir: Path) -> None:
    """The run folder the driver made must be there on this worker's node: the check at submit time
    sees only the nodes up then (on an autoscaling cluster, often the head alone), and a worker that
    made the folder afresh on its own disk would write the run where no one reads it."""
    if not (run_dir / CONFIG_FILE).is_file():
        import socket

        raise ConfigError(
            f"run folder {run_dir} is not on this node ({socket.gethostname()}): runs must be on storage "
            "every node mounts at the same path (NFS/EFS; see cluster.yaml), e.g. --out /mnt/ferray/runs"
        )


def _from_rank0(value: int, device, world: int) -> int:
    """Rank 0's value on every worker (a time budget's plan: all workers must stop after the same epoch)."""
    import torch
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        shared = torch.tensor([value], device=device)
        dist.broadcast(shared, src=0)
        value = int(shared.item())
    return value


def _evaluate_on_rank0(task, state, data: _EpochData, device, rank: int, world: int) -> dict:
    """Rank 0 evaluates the whole eval split (it is not split across workers); the others get the
    task's shared results by broadcast, so schedules that watch them stay in step everywhere."""
    import torch
    import torch.distributed as dist

    result = dict.fromkeys(task.shared_keys, 0.0)
    if rank == 0:
        result = task.evaluate(state, data.eval())
    if world > 1 and dist.is_initialized():
        shared = torch.tensor([float(result[k]) for k in task.shared_keys], device=device, dtype=torch.float64)
        dist.broadcast(shared, src=0)
        if rank != 0:
            result = dict(zip(task.shared_keys, shared.tolist()))
    return result


def tensorboard_writer(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard events are a convenience; metrics.jsonl always exists
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_epoch(folder: RunFolder, writer, line: str, row: dict) -> None:
    folder.append_epoch(row)
    if writer is not None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()
    print(line, flush=True)


# ---------------------------------------------------------------------------------------- driver
def build_trainer(
    cfg: ExperimentConfig,
    run_dir: Path,
    train_rows: int,
    task: Task = CLASSIFIER,
    callbacks: list | None = None,
):
    """A TorchTrainer for `cfg` writing to `run_dir` (= storage_path / name); shared with `ferray tune`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    metric = task.select_by
    gpus = cfg.scaling.gpus_per_worker
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "experiment": to_dict(cfg),
            "run_dir": str(run_dir),
            "train_rows": train_rows,
            "eval_rows": selection_rows(cfg),
            "task": task,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        **data_arguments(cfg),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            # Ray Train patches print() to log as well, which shows every epoch line twice.
            worker_runtime_env={
                "env_vars": {
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    "FERRAY_VERBOSE": os.environ.get("FERRAY_VERBOSE", ""),
                    **cpu_worker_env(gpus),
                }
            },
        ),
    )


def data_arguments(cfg: ExperimentConfig) -> dict:
    """The trainer's datasets (the training split, sharded across the workers), unless the one
    worker reads its faces itself (reads_its_own_faces)."""
    import ray.train

    if reads_its_own_faces(cfg):
        return {}
    return {"datasets": build_datasets(cfg), "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}


def run_resources(cfg: ExperimentConfig) -> dict:
    """The CPUs and GPUs a run's workers hold together (a Tune trial's, a report run's)."""
    return {
        "CPU": cfg.scaling.workers * cfg.scaling.cpus_per_worker,
        "GPU": cfg.scaling.workers * cfg.scaling.gpus_per_worker,
    }


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse, before starting, a request the cluster can never satisfy (instead of waiting forever)."""
    from ferray.distributed.cluster import require

    require("GPU", cfg.scaling.workers, cfg.scaling.gpus_per_worker, "workers")
    require("CPU", cfg.scaling.workers, cfg.scaling.cpus_per_worker, "workers")


def prepare_run_dir(out: Path, name: str, resume: bool) -> Path:
    run_dir = (Path(out) / name).absolute()
    if resume and not run_dir.is_dir():
        raise ConfigError(f"--resume: no run at {run_dir} to resume")
    if not resume and run_dir.exists():
        raise ConfigError(f"{run_dir} exists: pass --resume to continue it, or choose another --name/--out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# What a resume may change: how long the run goes on (the schedule re-plans to the new length and
# says so), how often it prints, how many restarts it allows, and where the same faces now lie.
SAFE_RESUME_CHANGES = (
    "train.epochs",
    "train.budget_minutes",
    "train.progress_seconds",
    "scaling.max_failures",
    "data.path",
)


def check_resume(run_dir: Path, cfg: ExperimentConfig, manifest: dict) -> None:
    """Refuse to continue a run with another config or other faces than it trained with: the
    checkpoint's weights, optimizer and schedule belong to the run's own config.yaml. Only the
    SAFE_RESUME_CHANGES pass, each said."""
    import yaml

    try:
        saved = from_dict(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise ConfigError(
            f"--resume: {run_dir / 'config.yaml'} is missing or unreadable ({e}); cannot check "
            "that this is the same run"
        ) from None
    changed = differences(saved, cfg)
    refused = {k: v for k, v in changed.items() if k not in SAFE_RESUME_CHANGES}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in refused.items())
        raise ConfigError(
            f"--resume of {run_dir}: the config differs from the run's ({listed}). A resume continues "
            f"the same run; it may change only {', '.join(SAFE_RESUME_CHANGES)}. Start a new run "
            "(another --name) for another config"
        )
    provenance = run_dir / PROVENANCE_FILE
    recorded = json.loads(provenance.read_text()).get("data_checksum") if provenance.is_file() else None
    if recorded is not None and recorded != manifest["checksum"]:
        raise ConfigError(
            f"--resume of {run_dir}: {cfg.data.path} holds other faces than the run trained on "
            f"(checksum {manifest['checksum']}, the run's {recorded})"
        )
    for key, (old, new) in changed.items():
        log.info(
            f"resume: {key} {old!r} -> {new!r}"
            + (" (the schedule re-plans to the new length)" if key in ("train.epochs", "train.budget_minutes") else "")
        )


def planned(cfg: ExperimentConfig) -> str:
    """The epochs a run asks for, as its first line says them."""
    if cfg.train.budget_minutes > 0:
        return f"the epochs that fit {cfg.train.budget_minutes:g} minutes (at most {cfg.train.epochs})"
    return f"{cfg.train.epochs} epochs"


def warm_start_lineage(cfg: ExperimentConfig, task: Task) -> list[dict]:
    """The chain of runs a warm restart continues (train.init, made absolute), read here so that a
    wrong file is refused before Ray starts; [] without one."""
    if not cfg.train.init:
        return []
    if task is not CLASSIFIER:
        raise ConfigError("train.init (--init) warm-restarts classifiers; the SRGAN has no warm restart")
    from ferray.sittings import warm_start

    cfg.train.init = str(Path(cfg.train.init).resolve())
    return warm_start(cfg.train.init, cfg.model.name)[1]


def pin_outside_files(cfg: ExperimentConfig, task: Task) -> dict[str, str]:
    """Decide here, once, which files outside the run the workers read, and write the decision into
    `cfg` (which every worker receives): ImageNet weights as the absolute file the driver found, the
    SRGAN's content loss as the kind chosen here (auto would be decided again on each node, and
    ranks on nodes with and without VGG19's weights would train different losses). Returns the
    files, for the shared-storage check."""
    files: dict[str, str] = {}
    if task is CLASSIFIER and cfg.model.pretrained not in ("none", ""):
        from ferray.models.resnet_vgg import pretrained_file

        cfg.model.pretrained = files["model.pretrained"] = str(pretrained_file(cfg.model.name, cfg.model.pretrained))
    if task is not CLASSIFIER:
        from ferray.sr.losses import resolve_content, vgg19_weights_path

        cfg.sr.content = resolve_content(cfg.sr)
        if cfg.sr.content == "vgg19":
            cfg.sr.content_weights = files["sr.content_weights"] = str(vgg19_weights_path(cfg.sr).resolve())
        if cfg.sr.content == "model_a":
            cfg.sr.content_checkpoint = files["sr.content_checkpoint"] = str(Path(cfg.sr.content_checkpoint).resolve())
    return files


def run_training(
    cfg: ExperimentConfig,
    out: Path,
    name: str | None = None,
    resume: bool = False,
    task: Task = CLASSIFIER,
) -> RunRecord:
    """Train `cfg` under Ray Train; returns the run's record (also written to RUN/result.json)."""
    from ferray.device import code_version
    from ferray.distributed.cluster import check_shared_paths
    from ferray.distributed.runtime import connect

    manifest = check_data(cfg, task)
    outside = pin_outside_files(cfg, task)  # before the resume check: the run's config has them pinned
    train_rows = manifest["splits"][cfg.data.train_split]["rows"]
    run_dir = prepare_run_dir(out, name or cfg.name, resume)
    if resume:
        check_resume(run_dir, cfg, manifest)
    lineage = warm_start_lineage(cfg, task)
    info = connect()
    check_resources(cfg)
    check_shared_paths(
        {"data": cfg.data.path, "run folder": run_dir, **({"init": cfg.train.init} if lineage else {}), **outside}
    )
    provenance = {"commit": code_version(), "data_checksum": manifest["checksum"], "data": cfg.data.path}
    RunFolder(run_dir).start(cfg, provenance={**provenance, **({"continues": lineage} if lineage else {})})
    log.info(
        f"train: {task.model_name(cfg)} on {cfg.data.path} ({train_rows:,} {cfg.data.train_split} faces), "
        f"{cfg.scaling.workers} worker(s) x {cfg.scaling.gpus_per_worker:g} GPU, {planned(cfg)}; "
        f"ray {info.mode}; run folder {run_dir}"
    )
    t0 = time.perf_counter()
    result = build_trainer(cfg, run_dir, train_rows, task).fit()
    if result.error is not None:
        raise result.error
    return finish_run(cfg, run_dir, result, time.perf_counter() - t0, task)


def finish_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    result,
    seconds: float,
    task: Task = CLASSIFIER,
) -> RunRecord:
    """best.pt from Ray's best checkpoint, then the run's record, read from its own files."""
    from ferray.engine import CHECKPOINT_FILE, load_checkpoint

    best = result.get_best_checkpoint(task.select_by, "max") if result.best_checkpoints else result.checkpoint
    with best.as_directory() as folder:  # copied beside, then renamed: a kill never leaves half a best.pt
        partial = run_dir / (BEST_FILE + ".partial")
        shutil.copy(Path(folder) / CHECKPOINT_FILE, partial)
        partial.replace(run_dir / BEST_FILE)
    payload = load_checkpoint(run_dir / BEST_FILE, kind=task.kind)
    epochs = int((result.metrics or {}).get("epoch", payload["epoch"]))
    run = RunFolder(run_dir)
    record = run.record(
        cfg,
        task,
        best_epoch=payload["epoch"],
        best_value=task.best(payload),
        epochs=epochs,
        planned_epochs=int((result.metrics or {}).get("planned_epochs", epochs)),
        seconds=seconds,
        workers=cfg.scaling.workers,
        gpus_per_worker=cfg.scaling.gpus_per_worker,
        test_splits=untouched_splits(read_manifest(cfg.data.path), cfg.data.selection_split, cfg.data.train_split),
    )
    run.write_record(record)
    weights = run.write_weights(payload)  # best.pt as read above
    log.info(
        f"train: done in {seconds:.0f}s; best {cfg.data.selection_split} (selection) "
        f"{task.format_value(record.best_value)} at epoch {record.best_epoch}; checkpoint {run_dir / BEST_FILE}; "
        f"its weights alone in half precision (keep these): {weights} ({weights.stat().st_size / 2**20:.1f} MB)"
    )
    return record
