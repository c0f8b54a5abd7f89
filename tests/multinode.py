"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), for tests/test_cluster.py.

    python tests/multinode.py upscale OUT   # 2 upscale actors on 2 nodes, one node killed mid-run

(Training that loses a node is tested on nodes an autoscaler starts, through jobs: tests/autoscaling.py.)

Run in a subprocess because the test session already holds a single-node Ray. The head has one
CPU (Ray Data's reads); each of 3 worker nodes has 2 CPUs, so 2 actors of 2 CPUs sit on 2
different nodes, and the third is the node that an autoscaler would have added after a loss
(Cluster.add_node works only from the main thread, which the run occupies). The node killed is
one that holds an actor. Prints one JSON line with what happened, for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

HEAD = {"num_cpus": 1, "object_store_memory": 200 << 20, "include_dashboard": True}
WORKER = {"num_cpus": 2, "object_store_memory": 150 << 20}
CLUSTER: list = []


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from ferray.testing import free_port

    # ports of its own: the test session's Ray holds the default ones
    head = HEAD | {
        "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        # a killed node is declared dead after ~1.5 s instead of Ray's ~15 s: the test waits
        # for that before the run restarts, and a real cluster's timing is not what it checks
        "_system_config": {
            "health_check_period_ms": 500,
            "health_check_failure_threshold": 3,
            "health_check_timeout_ms": 500,
        },
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    CLUSTER.append(cluster)
    nodes = [cluster.add_node(**WORKER) for _ in range(3)]
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    from ferray.distributed.runtime import connect

    connect(progress=False)
    return cluster, nodes


def kill_node_holding(cluster, nodes, class_name: str) -> dict:
    """Kill (not gracefully) a worker node that holds an alive actor of `class_name`: how many such
    actors there were, on how many nodes, and how many the killed node held."""
    import ray
    from ray.util.state import list_actors

    actors = [
        a
        for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        if class_name in (a.class_name or "")
    ]
    seen = {"actors": len(actors), "on_nodes": len({a.node_id for a in actors}), "on_killed_node": 0}
    for node in nodes:
        held = [a for a in actors if a.node_id == node.node_id]
        if held:
            cluster.remove_node(node, allow_graceful=False)
            seen["on_killed_node"] = len(held)
            break
    return seen


def upscale_run(out: Path) -> dict:
    from ferray.data.contract import load_split, read_manifest
    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.upscale import upscale

    synthesize(out / "data", SynthSpec(n=4000, seed=6))
    cluster, nodes = start_cluster()
    events = {}

    def kill_an_actor_node():
        deadline = time.time() + 300
        while time.time() < deadline and "kill" not in events:
            seen = kill_node_holding(cluster, nodes, "Upscaler")
            if seen["on_killed_node"]:
                events["kill"] = seen
            time.sleep(0.3)

    watcher = threading.Thread(target=kill_an_actor_node, daemon=True)
    watcher.start()
    upscale(
        out / "data",
        out / "sr",
        "bicubic",
        None,
        actors=2,
        cpus_per_actor=2,
        batch_size=32,
    )  # many small batches: the kill lands mid-stream
    watcher.join(timeout=5)
    counts = {}
    for split in read_manifest(out / "data")["splits"]:
        _, labels, ids = load_split(out / "sr", split)
        counts[split] = {
            "rows": len(ids),
            "unique": len(set(ids)),
            "expected": read_manifest(out / "data")["splits"][split]["rows"],
        }
    return {"splits": counts, **events}


if __name__ == "__main__":
    what, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if what != "upscale":
        raise SystemExit(f"multinode.py: unknown run {what!r}; the one run is: upscale")
    summary = upscale_run(out)
    print("RESULT " + json.dumps(summary), flush=True)
    import ray

    ray.shutdown()
    CLUSTER[0].shutdown()
    os._exit(0)  # the interpreter's own exit races Ray's atexit hooks of the removed nodes
