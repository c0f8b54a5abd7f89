"""Ray's fake multi-node provider (the one Ray tests its autoscaler with), with each node's Ray
directory apart, as separate machines have: its sessions, logs, sockets, and the working directories
that jobs upload are unpacked under a folder of its own (per-node `--temp-dir`, Ray >= 2.52).

Named as an external provider in tests/autoscaling.py's cluster config; the head's autoscaler imports
it (tests/ is on the head's PYTHONPATH)."""

from __future__ import annotations

import itertools
from pathlib import Path

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class NodesApartProvider(FakeMultiNodeProvider):
    """Each node the autoscaler starts gets provider_config["nodes_root"]/nN as its temp dir."""

    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.nodes_root = Path(provider_config["nodes_root"])
        self.started = itertools.count(1)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        node_dir = self.nodes_root / f"n{next(self.started)}"
        node_dir.mkdir(parents=True, exist_ok=True)
        # the fake provider builds each node's parameters inline; its temp dir is added to them here
        make = parameter.RayParams
        parameter.RayParams = lambda **kwargs: make(**kwargs, temp_dir=str(node_dir))
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams = make
