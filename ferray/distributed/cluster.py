"""Checks that make a multi-node cluster fail early and clearly instead of hanging or losing work.

- Paths (data, run storage) must be visible on every node, not just where the command runs: a task
  pinned to each alive node looks for them. On one machine that is always true; on a real cluster
  it is true only for shared storage (NFS/EFS, a FUSE-mounted bucket), which is what ferray needs
  for runs whose workers write checkpoints and metrics from any node.
- A CPU or GPU request is compared with what the cluster can ever have: what it has now, or the
  autoscaler's ceiling that FERRAY_MAX_CPUS / FERRAY_MAX_GPUS declare (cluster.yaml sets them),
  whichever is larger; more is refused at once instead of waiting forever for nodes that never come.
"""

from __future__ import annotations

import os
from pathlib import Path

from ferray.config import ConfigError


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def missing_on_nodes(paths: dict[str, str | Path], timeout_s: float = 60.0) -> list[str]:
    """'what PATH (node IP)' for each path some alive node cannot see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return [f"{what} {path} (this node)" for what, path in paths.items() if not _exists(str(path))]
    probe = ray.remote(num_cpus=0)(_exists)  # zero CPUs: runs on a head that keeps its CPUs to itself
    pending = []
    for node in nodes:
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        for what, path in paths.items():
            ref = probe.options(scheduling_strategy=strategy).remote(str(Path(path).absolute()))
            pending.append((ref, what, path, node["NodeManagerAddress"]))
    ray.wait([ref for ref, *_ in pending], num_returns=len(pending), timeout=timeout_s)
    return [f"{what} {path} (node {ip})" for ref, what, path, ip in pending if not _found_or_node_gone(ref)]


def _found_or_node_gone(ref) -> bool:
    """A probe's answer; True for a node that left between the listing and the probe (an autoscaler
    stops idle nodes at any moment): no worker can run there, so it cannot miss a path."""
    import ray
    from ray.exceptions import NodeDiedError, TaskUnschedulableError

    try:
        return ray.get(ref, timeout=0)
    except (TaskUnschedulableError, NodeDiedError):
        return True


def check_shared_paths(paths: dict[str, str | Path]) -> None:
    """Refuse to start when a path is missing on some node (not shared storage)."""
    missing = missing_on_nodes(paths)
    if missing:
        raise ConfigError(
            "not visible on every node of this Ray cluster: "
            + "; ".join(missing)
            + ". Runs and data must be on storage every node mounts (NFS/EFS at the same path; "
            "see cluster.yaml), or the workers on other nodes cannot read or write them"
        )


def require(resource: str, count: int, each: float, what: str) -> None:
    """Refuse, before anything starts, `count` x `each` of a resource ("CPU" or "GPU") that this
    cluster can never hold (Ray would wait for it forever). The same ConfigError for every stage."""
    import ray

    need, have = count * each, ray.cluster_resources().get(resource, 0)
    if need > ceiling(resource, have):
        raise ConfigError(
            f"{count} {what} x {each:g} {resource} need {need:g} {resource}s; this Ray cluster has "
            f"{have:g} and can have at most {ceiling(resource, have):g} (an autoscaling cluster declares "
            f"more in FERRAY_MAX_{resource}S)"
        )


def ceiling(resource: str, current: float) -> float:
    """The most of `resource` ("CPU" or "GPU") this cluster can ever offer: what it has now, or the
    autoscaler's ceiling declared in FERRAY_MAX_CPUS / FERRAY_MAX_GPUS, whichever is larger."""
    name = f"FERRAY_MAX_{resource}S"
    declared = os.environ.get(name)
    try:
        return max(current, float(declared)) if declared else current
    except ValueError:
        raise ConfigError(f"{name}={declared!r} is not a number") from None
