"""Serving throughput and latency under a bounded load on 127.0.0.1.

    python -m bench.serve_load [--bundle BUNDLE] [--clients 16] [--seconds 20] [--rounds 3]

N concurrent clients POST 48x48 face PNGs to /predict for T seconds (after a warm-up), against
  (a) the Serve app of serve/config.yaml as `ferray serve` starts it: the fused layout (one
      deployment holds every member) in Serve's high-throughput mode (HAProxy ingress, gRPC
      between replicas: ferray.distributed.runtime.SERVE_FAST_ENV);
  (b) the same app in Ray's default mode (a Python proxy actor; FERRAY_SERVE_FAST=0);
  (c) the split layout (A, and the SR generator + B, in deployments of their own), fast mode;
  (d) a plain single-process baseline: the same bundle behind one FastAPI/uvicorn process, one
      request at a time, torch on every core (bench/plain_server.py).
Each server runs in a process of its own (its own Ray). Prints requests/s, p50/p95/p99 latency and
errors for each, the ratios against (d), and the CPU each process spent per answered request
(where the time goes: proxy, ingress, model replicas).
Target on a 2-core machine: (a) >= 1.5x (d) at 16 clients, p99 under 1 s, no errors. With more
clients than the queues admit (`--clients 200`: overload) it prints how the rest were answered (503
counts, and how fast).
A server's throughput varies from run to run on a shared VM (the plain process by a third here):
`--rounds N` runs the servers in turn N times (a, d, a, d, ...) and compares their median rounds,
the p99 taken from the worst round.

Without --bundle, an untrained bundle of the real Model A (xception_a, 2.7M parameters) and a
ResNet18 Model B on SR faces is written first (speed does not depend on the weights); --tta turns on
the ten-crop TTA (10x the model work per face). Any bundle works (`--bundle default`: the shipped
ensemble, with its TTA). It also prints the models' own time per request and the throughput the cores bound, and
each server's share of that bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.loadgen import HEADER, cpu_per_request, cpu_times, face_bodies, format_row, run_load, speed_bundle

REPO = Path(__file__).resolve().parents[1]


def compute_per_request(bundle: Path) -> tuple[float, str]:
    """Seconds of one core that one request's models take (a face, batches of 16, one thread), and
    how they split between A, the SR generator and B: the work no server layout can avoid."""
    import torch

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

    with torch.no_grad():  # the served path: probs forwards the frozen bf16 copies where the CPU has bf16
        parts = {}
        if ensemble.generator is not None:
            parts["SR"] = timed(lambda: ensemble.upscale(faces))
        for name in members:
            upscaled = ensemble.upscale(faces) if ensemble.members[name].input == "sr" else None
            parts[name] = timed(lambda name=name, upscaled=upscaled: ensemble.probs(name, faces, upscaled))
    total = sum(parts.values())
    return total, ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in parts.items())


PHASES = {
    # name: (server, layout, Serve's high-throughput mode)
    "(a) Serve, fused, fast mode": ("serve", "fused", True),
    "(b) Serve, fused, Ray's default mode": ("serve", "fused", False),
    "(c) Serve, split, fast mode": ("serve", "split", True),
    "(d) plain process": ("plain", None, None),
}
BASELINE, DEFAULT = "(d) plain process", "(a) Serve, fused, fast mode"


def measure(url: str, bodies, args) -> dict:
    """Warm-up, then the timed load, with each process's CPU per request over the timed part."""
    run_load(url, bodies, args.clients, args.warmup)
    before = cpu_times()
    summary = run_load(url, bodies, args.clients, args.seconds).summary()
    summary["cpu"] = cpu_per_request(before, cpu_times(), summary["ok"])
    return summary


def serve_phase(layout: str, bundle: Path, bodies, args) -> dict:
    import ray
    from ray import serve

    from ferray.distributed.serving import start
    from ferray.testing import free_port

    url = start(bundle, port=free_port(), overrides=[f"layout={layout}"])
    try:
        return measure(url, bodies, args)
    finally:
        serve.shutdown()
        ray.shutdown()


def plain_phase(bundle: Path, bodies, args) -> dict:
    from ferray.distributed.serving import wait_ready
    from ferray.testing import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.plain_server", "--bundle", str(bundle), "--port", str(port)], cwd=REPO
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        return measure(url, bodies, args)
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_phase(name: str, bundle: Path, args) -> dict:
    """One server, measured in a process of its own: each Serve mode needs a Ray started with its
    environment, and no phase inherits another's processes."""
    server, _, fast = PHASES[name]
    env = dict(os.environ, FERRAY_SERVE_FAST="1" if fast or server == "plain" else "0")
    # its clients stand for many users but all connect from 127.0.0.1: the limits per client address
    # (bench/serve_hostile.py measures them) would turn the overload's 503s into held 429s
    env.update(FERRAY_CLIENT_REQUESTS_PER_S="0", FERRAY_CLIENT_UPLOAD_MB_PER_S="0")
    for variable in ("RAY_ADDRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
        env.pop(variable, None)
    command = [sys.executable, "-m", "bench.serve_load", "--phase", name, "--bundle", str(bundle)]
    command += ["--clients", str(args.clients), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"phase {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def phase_main(args) -> int:
    """Child of run_phase: one server under load; prints RESULT {json}."""
    server, layout, _ = PHASES[args.phase]
    bodies = face_bodies()
    result = (
        serve_phase(layout, args.bundle, bodies, args) if server == "serve" else plain_phase(args.bundle, bodies, args)
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def median_round(rounds: list[dict]) -> dict:
    """A server's figures over its rounds: the round of median throughput (the lower one of an even
    count; its latency and CPU breakdown), with the worst p99 and every error and status of all
    rounds, so that a target is checked on the typical throughput and the worst tail."""
    typical = dict(sorted(rounds, key=lambda result: result["rps"])[(len(rounds) - 1) // 2])
    typical["p99"] = max(result["p99"] for result in rounds)
    typical["errors"] = sum(result["errors"] for result in rounds)
    typical["statuses"] = dict(sum((Counter(result["statuses"]) for result in rounds), Counter()))
    refused = [result["refused_p99"] for result in rounds if not math.isnan(result["refused_p99"])]
    typical["refused_p99"] = max(refused, default=float("nan"))
    return typical


def measure_servers(names: list[str], bundle: Path, args) -> dict[str, dict]:
    """Each server in turn, args.rounds times over (a, d, a, d, ...: a slow spell of the machine
    falls on both), a row per round, then each server's median round."""
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(1, args.rounds + 1):
        for name in names:
            rounds[name].append(run_phase(name, bundle, args))
            label = name if args.rounds == 1 else f"{name} #{round_number}"
            print(format_row(label, rounds[name][-1]), flush=True)
    if args.rounds == 1:
        return {name: results[0] for name, results in rounds.items()}
    print(f"median of {args.rounds} rounds (p99: the worst round; errors: all rounds):")
    summary = {name: median_round(results) for name, results in rounds.items()}
    for name, result in summary.items():
        print(format_row(name, result))
    return summary


def print_ratios(results: dict[str, dict], bound: float, cores: int) -> int:
    if BASELINE not in results or results[BASELINE]["rps"] == 0:
        print("no baseline measured: no ratio")
        return 0 if BASELINE not in results else 1
    base = results[BASELINE]["rps"]
    for name, result in results.items():
        if name != BASELINE:
            print(
                f"{name} / (d): {result['rps'] / base:.2f}x throughput, "
                f"{result['rps'] / bound:.0%} of the {cores}-core bound"
            )
    print(f"(d) plain process: {base / bound:.0%} of the bound")
    if DEFAULT in results:
        a = results[DEFAULT]
        met = a["rps"] / base >= 1.5 and a["p99"] < 1.0 and a["errors"] == 0
        print(f"target (a) >= 1.5x (d), p99 < 1 s, no errors: {'met' if met else 'MISSED'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="serving bundle (default: an untrained Model A + ResNet18 B)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the servers in turn this many times; compare their median rounds"
    )
    parser.add_argument("--tta", action="store_true", help="ten-crop TTA in the generated bundle")
    parser.add_argument("--model-b", default="resnet18_b", help="Model B of the generated bundle")
    parser.add_argument("--only", action="append", choices=sorted(PHASES), help="run these servers only (repeatable)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # internal: one server
    args = parser.parse_args()
    if args.phase:
        return phase_main(args)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1 (got {args.rounds})")

    from ferray.bundle import resolve_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = speed_bundle(tmp, tta=args.tta, model_b=args.model_b)
            print(f"bundle: untrained xception_a + {args.model_b} on SR faces, TTA {'on' if args.tta else 'off'}")
        per_request, parts = compute_per_request(bundle)
        cores = os.cpu_count() or 1
        bound = cores / per_request
        print(
            f"models per request: {per_request * 1e3:.1f} ms of one core ({parts}); {cores} cores bound "
            f"the throughput near {bound:.0f} req/s"
        )
        print(
            f"{args.clients} clients, {args.seconds:.0f} s each after {args.warmup:.0f} s warm-up, "
            "each server in a process of its own"
        )
        print(HEADER)
        results = measure_servers(args.only or list(PHASES), resolve_bundle(bundle).absolute(), args)
    for name, result in results.items():
        if result["errors"]:  # overload (--clients above what the queues admit): how it was answered
            statuses = ", ".join(f"{n} x {code}" for code, n in result["statuses"].items())
            print(f"  {name}: answered {statuses}; p99 of the refusals {result['refused_p99'] * 1e3:.0f} ms")
    print("CPU per answered request, by process (ms):")
    for name, result in results.items():
        print(f"  {name}: " + ", ".join(f"{command} {ms:.1f}" for command, ms in result["cpu"]))
    return print_ratios(results, bound, cores)


if __name__ == "__main__":
    sys.exit(main())
