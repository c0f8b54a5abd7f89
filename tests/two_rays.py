"""Two Rays on one machine: ferray's own (embedded) Ray, then a second head started after it, as when
a user runs `ferray serve` beside a training run. A process of the first Ray that looks its cluster up
without an address (the state API, as Ray Train's placement-group cleaner does) must find its own
cluster, not the newer one.

    python tests/two_rays.py OUT      # prints one line "RESULT {json}" for tests/test_cluster.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ferray.testing import free_port, wait_for_dashboard


def second_head(out: Path) -> subprocess.Popen:
    """`ray start --head --block` on ports of its own; stopped by terminating it (never `ray stop`,
    which would stop every Ray on the machine)."""
    dashboard = free_port()
    command = [
        *("ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=0"),
        *("--include-dashboard=true", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}"),
        *(f"--metrics-export-port={free_port()}", "--object-store-memory=80000000", "--disable-usage-stats"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    log = open(out / "second-head.log", "w")  # noqa: SIM115 - open for the head's lifetime
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for_dashboard(f"http://127.0.0.1:{dashboard}", head, 120)
    return head


def run(out: Path) -> dict:
    import ray

    from ferray.distributed.runtime import connect

    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)
    info = connect(quiet=True, progress=False)
    head = second_head(out)
    try:

        @ray.remote(num_cpus=0)
        class Looker:
            def look(self) -> dict:
                from ray.util.state import list_actors

                me = ray.get_runtime_context().get_actor_id()
                seen = [a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")])]
                return {"env": os.environ.get("RAY_ADDRESS"), "finds_itself": me in seen}

        looker = Looker.remote()
        facts = ray.get(looker.look.remote(), timeout=120)
    finally:
        head.terminate()
        head.wait(timeout=60)
    port = info.address.rsplit(":", 1)[1]
    return facts | {"own_port": port, "driver_env": os.environ.get("RAY_ADDRESS")}


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(Path(sys.argv[1]))), flush=True)
