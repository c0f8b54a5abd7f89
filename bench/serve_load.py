"""Serving throughput and latency under a bounded load on 127.0.0.1.

    python -m bench.serve_load [--bundle BUNDLE] [--clients 16] [--seconds 20]

N concurrent clients POST 48x48 face PNGs to /predict for T seconds (after a warm-up), against
  (a) the Serve app of serve/config.yaml in its fused layout (one deployment holds every member);
  (b) the same app in its split layout (A, and the SR generator + B, in deployments of their own);
  (c) a plain single-process baseline: the same bundle behind one FastAPI/uvicorn process, one
      request at a time, torch on every core (bench/plain_server.py).
Prints requests/s, p50/p95/p99 latency and errors for each, and the ratios against (c).
Target on a 2-core machine: (a) >= 1.5x (c) at 16 clients, p99 under 1 s, no errors.

Without --bundle, an untrained bundle of the real Model A (xception_a, 2.7M parameters) and a
ResNet18 Model B on SR faces is written first (speed does not depend on the weights); --tta turns on
the ten-crop TTA (10x the model work per face). Any bundle works (`--bundle default`: Model A
alone). It also prints the models' own time per request and the throughput the cores bound, and
each server's share of that bound.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loadgen import HEADER, face_bodies, format_row, run_load

REPO = Path(__file__).resolve().parents[1]


def compute_per_request(bundle: Path) -> tuple[float, str]:
    """Seconds of one core that one request's models take (a face, batches of 16, one thread), and
    how they split between A, the SR generator and B: the work no server layout can avoid."""
    import torch

    from ferray.augment import predict_proba
    from ferray.bundle import bundle_members, load_bundle, read_bundle_card

    torch.set_num_threads(1)
    members = bundle_members(read_bundle_card(bundle))
    ensemble, _ = load_bundle(bundle, members=members)
    faces = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)

    def timed(fn, repeat=5):
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat / len(faces)

    with torch.no_grad():
        parts = {"A": timed(lambda: ensemble.probs_a(faces))}
        if "b" in members and ensemble.generator is not None:
            parts["SR"] = timed(lambda: ensemble.generator(faces.float().unsqueeze(1) / 255))
            up = (ensemble.generator(faces.float().unsqueeze(1) / 255).clamp(0, 1) * 255).to(torch.uint8).squeeze(1)
            parts["B"] = timed(lambda: predict_proba(ensemble.model_b, up, ensemble.cfg_b.augment.crop, ensemble.tta))
        elif "b" in members:
            parts["B"] = timed(lambda: ensemble.probs_b(faces))
    total = sum(parts.values())
    return total, ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in parts.items())


def serve_phase(name, bundle, overrides, bodies, args) -> dict:
    from ray import serve

    from ferray.distributed.serving import start
    from ferray.testing import free_port

    url = start(bundle, port=free_port(), overrides=overrides)
    try:
        run_load(url, bodies, args.clients, args.warmup)
        return run_load(url, bodies, args.clients, args.seconds).summary()
    finally:
        serve.shutdown()


def plain_phase(bundle, bodies, args) -> dict:
    from ferray.distributed.serving import wait_ready
    from ferray.testing import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.plain_server", "--bundle", str(bundle), "--port", str(port)], cwd=REPO
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        run_load(url, bodies, args.clients, args.warmup)
        return run_load(url, bodies, args.clients, args.seconds).summary()
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="serving bundle (default: an untrained Model A + ResNet18 B)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tta", action="store_true", help="ten-crop TTA in the generated bundle")
    parser.add_argument("--model-b", default="resnet18_b", help="Model B of the generated bundle")
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="start Serve with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray's high-throughput mode)",
    )
    args = parser.parse_args()
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read when Serve starts, in this process's Ray

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.runtime import connect
    from ferray.testing import untrained_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            synthesize(Path(tmp) / "data", SynthSpec(n=140, seed=0))
            bundle = untrained_bundle(
                tmp,
                Path(tmp) / "data",
                tta=args.tta,
                model_a="xception_a",
                model_b=args.model_b,
                sr_channels=32,
                sr_blocks=4,
            )
            print(f"bundle: untrained xception_a + {args.model_b} on SR faces, TTA {'on' if args.tta else 'off'}")
        per_request, parts = compute_per_request(bundle)
        cores = os.cpu_count() or 1
        bound = cores / per_request
        print(
            f"models per request: {per_request * 1e3:.1f} ms of one core ({parts}); {cores} cores bound "
            f"the throughput near {bound:.0f} req/s"
        )
        bodies = face_bodies()
        connect()
        results = {}
        print(f"{args.clients} clients, {args.seconds:.0f} s each after {args.warmup:.0f} s warm-up")
        print(HEADER)
        for name, overrides in (
            ("(a) Serve, fused, batching", ["layout=fused"]),
            ("(b) Serve, split, batching", ["layout=split"]),
        ):
            results[name] = serve_phase(name, bundle, overrides, bodies, args)
            print(format_row(name, results[name]), flush=True)
        results["(c) plain process"] = plain_phase(bundle, bodies, args)
        print(format_row("(c) plain process", results["(c) plain process"]))
    base = results["(c) plain process"]["rps"]
    if base == 0:
        print("the baseline answered nothing: no ratio")
        return 1
    a = results["(a) Serve, fused, batching"]
    for name in ("(a) Serve, fused, batching", "(b) Serve, split, batching"):
        print(
            f"{name} / (c): {results[name]['rps'] / base:.2f}x throughput, {results[name]['rps'] / bound:.0%} of the "
            f"{cores}-core bound"
        )
    print(f"(c) plain process: {base / bound:.0%} of the bound")
    met = a["rps"] / base >= 1.5 and a["p99"] < 1.0 and a["errors"] == 0
    print(f"target (a) >= 1.5x (c), p99 < 1 s, no errors: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
