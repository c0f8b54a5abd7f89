"""Data-parallel scaling of `ferray train`: 1 and 2 workers on two simulated nodes of this machine,
and an estimate of epoch times on 1, 4 and 16 GPUs.

    python -m bench.scaling [--model xception_a] [--n 1400] [--epochs 3]

A Ray cluster of a head (1 CPU, for Ray Data) and two worker nodes (1 CPU each) is started on
this machine with ray.cluster_utils.Cluster. The same training epochs run with 1 worker and with
2 workers (one per node, DDP over gloo), and the images/s of the epochs after the first (the first
pays for warm-up) are compared: the ratio is the scaling efficiency x 2.

What it can show on 2 cores: whether the runner, the sharding and DDP add overhead that
prevents scaling (the 2-worker run uses both cores, the 1-worker run one). What it cannot show:
GPU scaling. For that it prints an estimate from the measured per-worker throughput and the
gradient size: per step, compute = batch / per-GPU rate, and a ring all-reduce moves
2 (N-1)/N x gradient bytes over the interconnect (--bandwidth-gbs, default 25 GB/s: NVLink-less
PCIe/EFA class; NVLink is ~10x more), not overlapped with compute (a pessimistic bound).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FER_TRAIN = 28_709


def run(workers: int, data: Path, out: Path, args) -> dict:
    from ferray.config import load_config
    from ferray.distributed.train import run_training

    cfg = load_config(
        REPO / "experiments" / "debug_a.yaml",
        [
            f"data.path={data}",
            f"model.name={args.model}",
            f"train.epochs={args.epochs}",
            f"scaling.workers={workers}",
            "scaling.cpus_per_worker=1",
            f"train.batch_size={args.batch_size}",
        ],
    )
    run_training(cfg, out, name=f"w{workers}")
    rows = [json.loads(line) for line in (out / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    return {
        "images_per_s": sum(r["images_per_s"] for r in steady) / len(steady),
        "epoch_s": sum(r["train_seconds"] for r in steady) / len(steady),
    }


def estimate(name: str, params: int, rate: float, batch: int, bandwidth_gbs: float) -> str:
    grad_bytes = params * 4
    lines = [
        f"{name}: {params:,} parameters = {grad_bytes / 1e6:.1f} MB of fp32 gradients; "
        f"per-GPU rate {rate:,.0f} img/s, batch {batch} per GPU"
    ]
    for gpus in (1, 4, 16):
        steps = FER_TRAIN / (batch * gpus)
        compute = batch / rate
        comm = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * grad_bytes / (bandwidth_gbs * 1e9)
        lines.append(
            f"  {gpus:>2} GPU(s): {steps:,.0f} steps x ({compute * 1e3:.1f} ms compute + {comm * 1e3:.2f} ms "
            f"all-reduce) = {steps * (compute + comm):.1f} s per epoch"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="xception_a")
    parser.add_argument("--n", type=int, default=1400, help="synthetic faces")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bandwidth-gbs", type=float, default=25.0)
    parser.add_argument(
        "--gpu-rate-a",
        type=float,
        default=None,
        help="Model A img/s on one GPU (default: the figure bench/gpu_model_a.py printed, if given)",
    )
    parser.add_argument("--gpu-rate-b", type=float, default=None, help="Model B img/s on one GPU")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.runtime import connect
    from ferray.models import build_model, num_params

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "object_store_memory": 300 << 20},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    ray.init(address=cluster.address, logging_level="ERROR")
    connect(progress=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            synthesize(tmp / "data", SynthSpec(n=args.n, seed=0))
            one = run(1, tmp / "data", tmp / "runs", args)
            two = run(2, tmp / "data", tmp / "runs", args)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(
        f"{args.model}, {args.epochs} epochs of {int(args.n * 0.8):,} synthetic faces, batch {args.batch_size} "
        f"per worker, 1 CPU per worker, nodes of 1 CPU (steady epochs)"
    )
    print(f"  1 worker : {one['images_per_s']:8.1f} img/s, {one['epoch_s']:.1f} s per epoch")
    print(f"  2 workers: {two['images_per_s']:8.1f} img/s, {two['epoch_s']:.1f} s per epoch")
    print(f"  2 workers / 1 worker: {two['images_per_s'] / one['images_per_s']:.2f}x (ideal 2.00x)")
    print()
    print(f"Estimate for FER2013 Training ({FER_TRAIN:,} faces) at {args.bandwidth_gbs:g} GB/s all-reduce bandwidth:")
    cpu_rate = one["images_per_s"]
    rate_a = args.gpu_rate_a or cpu_rate
    rate_b = args.gpu_rate_b or cpu_rate / 12  # ResNet50 at 88x88 is ~12x Model A's FLOPs per image
    source = "given" if args.gpu_rate_a else "this machine's measured 1-worker CPU rate, no GPU figure given"
    print(f"(per-device rates: {source})")
    print(estimate("Model A (xception_a)", num_params(build_model("xception_a")), rate_a, 64, args.bandwidth_gbs))
    print(estimate("Model B (resnet50_b)", num_params(build_model("resnet50_b")), rate_b, 64, args.bandwidth_gbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
