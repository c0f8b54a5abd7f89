"""The Serve app under load while replicas are killed: errors and recovery time.

    python -m bench.serve_faults [--bundle BUNDLE] [--clients 8] [--seconds 40]

N clients POST faces to /predict for T seconds. At T/4 a Model B replica is killed (ray.kill, as a
crashed process would die), at T/2 a Model A replica. For each kill it prints: the requests that
failed (the ingress retries a request whose replica died, so the target is none), the longest
latency after the kill, the seconds until Serve reports the deployment HEALTHY again with a new
replica, and the throughput before and after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.loadgen import face_bodies, run_load, speed_bundle


def replica_names(deployment: str) -> list[str]:
    import ray
    from ray.util.state import list_actors

    return [
        a.name
        for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        if f":{deployment}" in (a.class_name or "") and a.name
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="serving bundle (default: an untrained Model A + ResNet18 B)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ferray.distributed.serving import start
    from ferray.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = speed_bundle(tmp, tta=False, model_b="resnet18_b")
        url = start(bundle, port=free_port(), overrides=["model_a.max_replicas=1", "model_b.max_replicas=1"])
        bodies = face_bodies()
        run_load(url, bodies, args.clients, 3)  # warm-up
        plan = [(args.seconds / 4, "ModelB"), (args.seconds / 2, "ModelA")]
        kills: list[dict] = []

        def on_tick(now: float) -> None:
            if len(kills) < len(plan) and now >= plan[len(kills)][0]:
                deployment = plan[len(kills)][1]
                victim = replica_names(deployment)[0]
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                kills.append({"deployment": deployment, "at": now, "victim": victim, "healthy_after": None})
            for kill in kills:
                if kill["healthy_after"] is None and now > kill["at"] + 0.2:
                    status = serve.status().applications["ferray"].deployments[kill["deployment"]]
                    names = replica_names(kill["deployment"])
                    if status.status == "HEALTHY" and names and kill["victim"] not in names:
                        kill["healthy_after"] = now - kill["at"]

        result = run_load(url, bodies, args.clients, args.seconds, on_tick=on_tick)
        serve.shutdown()
    whole = result.summary()
    print(
        f"{args.clients} clients for {args.seconds:.0f} s: {whole['requests']} requests, {whole['errors']} errors, "
        f"{whole['rps']:.1f} req/s, p99 {whole['p99'] * 1e3:.0f} ms"
    )
    for kill in kills:
        at = kill["at"]
        before, after = result.summary(max(0.0, at - 5), at), result.summary(at, at + 10)
        worst = max((r.latency for r in result.records if r.start >= at - 0.5 and r.start < at + 10), default=0.0)
        statuses = sorted({r.status for r in result.records if at <= r.start < at + 10})
        healthy = f"{kill['healthy_after']:.1f} s" if kill["healthy_after"] is not None else "not within the run"
        print(
            f"kill {kill['deployment']} replica at {at:.1f} s: {after['errors']} failed requests in the next 10 s "
            f"(statuses {statuses}), longest latency {worst * 1e3:.0f} ms, deployment HEALTHY with a new replica "
            f"after {healthy}; throughput {before['rps']:.1f} req/s before, {after['rps']:.1f} after"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
