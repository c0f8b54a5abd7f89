"""`ferray train` through Ray Train on synthetic faces: 2 workers, resume (a lost worker: test_cluster.py)."""

import json

import pytest

from ferray.config import load_config
from ferray.data.contract import read_manifest
from ferray.data.synth import SynthSpec, synthesize
from ferray.distributed.train import run_training
from ferray.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synth"
    synthesize(path, SynthSpec(n=280, seed=1))
    return path


def tiny(data, epochs, *extra):
    return load_config(
        None,
        [
            f"data.path={data}",
            "model.name=xception_a_tiny",
            f"train.epochs={epochs}",
            "train.batch_size=32",
            "optim.lr=0.003",
            "loss.center_lambda=0.001",
            "scaling.workers=2",
            "scaling.cpus_per_worker=1",
            *extra,
        ],
    )


# the terms of experiments/model_a_cpu_v2.yaml that change what a worker does each step and epoch
SECOND_GENERATION = (
    "train.ema_decay=0.9",
    "optim.weight_decay=0.05",
    "augment.erase_prob=0.5",
    "loss.label_smoothing=0.1",
    "model.dropout=0.2",
)


def epochs_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def test_two_workers_train_then_an_interrupted_run_resumes_and_evaluates(ray_session, synth_data, tmp_path):
    # (a worker lost mid-run, with its node, is tests/test_cluster.py's multi-node test)
    run_dir = tmp_path / "run"
    first = run_training(tiny(synth_data, 2, *SECOND_GENERATION), tmp_path, name="run")
    assert first.epochs == 2 and first.workers == 2 and first.metric == "eval_acc"
    assert epochs_logged(run_dir) == [1, 2]
    assert {"config.yaml", "metrics.jsonl", "best.pt", "result.json"} <= {p.name for p in run_dir.iterdir()}
    assert list(run_dir.glob("tensorboard/events.out.tfevents.*"))
    with pytest.raises(Exception, match="exists: pass --resume"):
        run_training(tiny(synth_data, 3), tmp_path, name="run")

    resumed = run_training(tiny(synth_data, 3, *SECOND_GENERATION), tmp_path, name="run", resume=True)
    assert resumed.epochs == 3 and epochs_logged(run_dir) == [1, 2, 3]  # continued, not restarted
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the EMA was evaluated beside the raw weights on both workers' epochs, and the better one kept
    assert all(r["eval_acc"] == max(r["eval_raw_acc"], r["eval_ema_acc"]) for r in rows)

    report = evaluate_checkpoint(run_dir / "best.pt", synth_data, "PrivateTest", tta=True)
    private = read_manifest(synth_data)["splits"]["PrivateTest"]["rows"]
    assert report["samples"] == private and (run_dir / "eval-PrivateTest-tta.png").stat().st_size > 1000

    # best.fp16.pt, the file worth keeping when the run folder is not: the selected weights alone,
    # in half precision, read by the same readers and classifying as best.pt does
    import torch

    best, weights = (torch.load(run_dir / name, weights_only=True) for name in ("best.pt", "best.fp16.pt"))
    assert weights["epoch"] == best["epoch"] and weights["weights"] == best["weights"]
    assert not {"optimizer", "train_model", "ema", "history"} & set(weights)
    assert {v.dtype for v in weights["model"].values() if v.is_floating_point()} == {torch.float16}
    assert (run_dir / "best.fp16.pt").stat().st_size < (run_dir / "best.pt").stat().st_size / 2
    half = evaluate_checkpoint(run_dir / "best.fp16.pt", synth_data, "PrivateTest", tta=True)
    assert abs(half["accuracy"] - report["accuracy"]) <= 1 / private


def test_each_workers_shard_has_the_global_class_mix(ray_session, tmp_path):
    """Image folders come out in class order; prepare's shuffle must reach every Train worker."""
    import threading

    import numpy as np
    import pyarrow.parquet as pq

    from ferray.data.carve import carve_and_shuffle
    from ferray.data.contract import NUM_CLASSES, read_split, split_dir
    from ferray.distributed.train import build_datasets

    data = tmp_path / "faces"
    synthesize(data, SynthSpec(n=2800, seed=5))
    table = read_split(data, "Training").sort_by("label")  # as an image folder lists its faces
    for f in split_dir(data, "Training").glob("*.parquet"):
        f.unlink()
    pq.write_table(table, split_dir(data, "Training") / "part-0.parquet")
    carve_and_shuffle(data, 0.0)
    shards = build_datasets(tiny(data, 1))["train"].streaming_split(2, equal=True)
    counts = [None, None]

    def consume(i):
        labels = [batch["label"] for batch in shards[i].iter_batches(batch_size=256, batch_format="numpy")]
        counts[i] = np.bincount(np.concatenate(labels), minlength=NUM_CLASSES)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    overall = np.bincount(table.column("label").to_numpy(), minlength=NUM_CLASSES) / table.num_rows
    for shard in counts:
        assert np.abs(shard / shard.sum() - overall).max() < 0.04, (shard, overall)


def test_one_worker_reads_the_faces_its_ray_data_shard_would_hold(ray_session, synth_data):
    """A one-worker run that caches its faces skips Ray Data and reads the split's files
    (reads_its_own_faces): the same faces in the same order as the cached Ray Data shard, so the
    run's batches are the ones it trained on through the pipeline."""
    import torch

    from ferray.distributed.train import _cached, build_datasets, data_arguments, read_in_key_order, reads_its_own_faces

    one = tiny(synth_data, 1, "scaling.workers=1")
    assert reads_its_own_faces(one) and data_arguments(one) == {}
    for cfg in (tiny(synth_data, 1), tiny(synth_data, 1, "scaling.workers=1", "train.loader=stream")):
        assert not reads_its_own_faces(cfg) and "train" in data_arguments(cfg)["datasets"]
    images, labels, keys = read_in_key_order(one, torch.device("cpu"))
    shard_images, shard_labels, shard_keys = _cached(build_datasets(one)["train"], torch.device("cpu"))
    assert torch.equal(images, shard_images) and torch.equal(labels, shard_labels) and torch.equal(keys, shard_keys)
    assert len(labels) == read_manifest(synth_data)["splits"]["Training"]["rows"]
