"""What Ray Train costs over the bare engine: the same epochs on the same data, both ways.

    python -m bench.train_overhead [--epochs 4] [--n 2800] [--model xception_a_tiny] [--threads 2]

Bare: the core loop in this process (ferray.fit through ferray.local: train epoch, evaluation,
checkpoint and metrics files each epoch).
Ray Train: `ferray train`'s TorchTrainer with one worker of --threads CPUs, same config, same
synthetic faces (written once as a prepared dataset). Both are timed from the start of their
first epoch to the end of their last (worker start-up and data loading excluded, reported apart),
and print images/s; the ratio is the overhead. Target: Ray Train within 10% of the bare engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def config(data: Path, args):
    from ferray.config import load_config

    return load_config(
        None,
        [
            f"data.path={data}",
            f"model.name={args.model}",
            f"train.epochs={args.epochs}",
            "train.batch_size=64",
            "optim.lr=0.003",
            "optim.schedule=cosine",
            "loss.center_lambda=0.001",
            "scaling.workers=1",
            f"scaling.cpus_per_worker={args.threads}",
        ],
    )


def bare(cfg, folder: Path) -> tuple[float, int, float]:
    """The core loop alone (ferray.local: ferray.fit + a run folder), on the same split files."""
    from ferray.data.memory import load_faces
    from ferray.local import train_local

    torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
    splits = load_faces(cfg.data.path)
    cfg.data.selection_split = "PublicTest"  # synthetic data has PrivateTest: FER2013's protocol
    state, run = train_local(
        cfg,
        splits[cfg.data.train_split],
        splits["PublicTest"],
        torch.device("cpu"),
        folder / "bare",
    )
    rows = state.history
    return rows[-1]["loop_seconds"], sum(r["train_images"] for r in rows), run.best["eval_acc"]


def ray_train(cfg, folder: Path) -> tuple[float, int, float, float]:
    from ferray.distributed.train import run_training

    t0 = time.perf_counter()
    result = run_training(cfg, folder, name="overhead")
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (folder / "overhead" / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["loop_seconds"], sum(r["train_images"] for r in rows), result.best_value, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n", type=int, default=2800, help="synthetic faces (80%% train)")
    parser.add_argument("--model", default="xception_a_tiny")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both (the worker's CPUs)")
    args = parser.parse_args()

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.runtime import connect

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthesize(folder / "data", SynthSpec(n=args.n, seed=0))
        cfg = config(folder / "data", args)
        connect(progress=False)
        bare_s, bare_images, bare_acc = bare(cfg, folder)
        ray_s, ray_images, ray_acc, ray_total = ray_train(cfg, folder)
    print(
        f"{args.model}, {args.epochs} epochs of {bare_images // args.epochs:,} synthetic faces, "
        f"batch 64, {args.threads} CPU threads, {torch.__version__}"
    )
    print(f"  bare engine      {bare_s:7.1f} s  {bare_images / bare_s:8.1f} images/s  best eval {bare_acc:.1%}")
    print(
        f"  Ray Train (1 w)  {ray_s:7.1f} s  {ray_images / ray_s:8.1f} images/s  best eval {ray_acc:.1%}"
        f"   (whole fit() incl. start-up: {ray_total:.1f} s)"
    )
    ratio = (ray_images / ray_s) / (bare_images / bare_s)
    print(f"Ray Train / bare images/s = {ratio:.3f}  (target >= 0.90; overhead {1 - ratio:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
