"""An autoscaling Ray cluster on this machine, driven as a user drives cluster.yaml's: Ray's own fake
multi-node provider (RAY_FAKE_CLUSTER=1, the one Ray tests its autoscaler with) starts and stops
"nodes" (raylets of their own) as the load asks, and every stage goes through the Jobs API.

    python tests/autoscaling.py OUT        # prints one line "RESULT {json}" for tests/test_cluster.py

The node types mirror cluster.yaml's: a head of 0 CPUs and 0 GPUs (it runs no work), a CPU worker
type and a GPU worker type whose GPU is a declared resource (this machine has none: processes given
it compute on the CPU, which is what ferray.device does where torch sees no GPU), each with a
maximum, an idle timeout of seconds, token authentication on. The stages: prepare (a CSV of
synthetic faces) -> train on 2 workers the autoscaler puts on 2 new nodes -> a Tune search of 2
trials -> sr upscale on a GPU node -> ensemble -> serve -> one request over HTTP -> every worker
node gone after its idle timeout. `ray job submit --working-dir` uploads a copy of the project made
with .rayignore's rules, from a folder other than the installed package.

Each node's Ray directory (sessions, sockets, unpacked uploads) is its own (tests/fake_nodes.py).
What it cannot show (docs/cluster.md): nodes here share one file system and one machine, so the
shared-storage checks pass trivially, and nothing of AWS (images, drivers, EFS, security groups).
Run in a subprocess: the test session holds a Ray of its own, and this cluster has its own ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import checkpoints_written

from ferray.testing import free_port, wait_for_dashboard

# Every Ray process of this cluster, this script's own driver included, authenticates with the token
# in ~/.ray/auth_token (made by the head on first use). Ray reads the mode when it is imported.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_ADDRESS", None)
REPO = Path(__file__).resolve().parents[1]
IDLE_MINUTES = 0.25
NODE_TYPES = {
    "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
    "cpu_worker": {
        # one Train worker of 2 CPUs a node, and a CPU beside it for Ray Data's reads (which wait for a
        # free CPU rather than ask the autoscaler for one; cluster.yaml's nodes have 8 and 16 CPUs)
        "resources": {"CPU": 3, "object_store_memory": 120 << 20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    },
    "gpu_worker": {
        "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 120 << 20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}


def autoscaling_config(gcs: str, head_id: str, nodes_root: Path) -> dict:
    """A cluster-launcher config for the fake provider, with cluster.yaml's node-type layout; each
    node's Ray directory (sessions, sockets, unpacked uploads) under nodes_root, apart."""
    empty = ("file_mounts", "cluster_synced_files", "rsync_exclude", "rsync_filter")
    commands = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return {
        "cluster_name": "ferray-fake",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        # autoscaler v2 (as Ray's own AutoscalingCluster runs it): it follows the nodes through Ray's
        # own view of them; v1 waits for a node updater (ssh) the fake raylets cannot have
        # (as an external provider: the wheel lacks the fake provider's default config file, which
        # the autoscaler reads for the built-in type name)
        "provider": {
            "type": "external",
            "module": "fake_nodes.NodesApartProvider",
            "nodes_root": str(nodes_root),
            "gcs_address": gcs,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": head_id,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": NODE_TYPES,
        "head_node_type": "ray.head.default",
        "file_mounts_sync_continuously": False,
        **{key: ({} if key == "file_mounts" else []) for key in empty},
        **{key: [] for key in commands},
    }


class FakeCluster:
    """`ray start --head --block` with the autoscaler of a fake provider; stopped with its process."""

    def __init__(self, out: Path):
        import tempfile

        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        self.out, self.head_id = out, FAKE_HEAD_NODE_ID
        # every node's Ray directory apart, the head's too; short paths (Unix sockets live there)
        self.nodes_root = Path(tempfile.mkdtemp(prefix="fk", dir="/tmp"))
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "RAY_FAKE_CLUSTER": "1",
            # the head's autoscaler imports the provider of tests/fake_nodes.py
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": self.head_id,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": self.head_id,
            "RAY_AUTH_MODE": "token",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
            "FERRAY_MAX_CPUS": "7",  # what the node types can ever offer (cluster.yaml sets the same)
            "FERRAY_MAX_GPUS": "1",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            # a killed node is declared dead after ~1.5 s rather than Ray's ~15 s, and Train checks
            # its workers twice a second: the test waits on both, and a real cluster's timing is not
            # what it checks
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "500",
            "RAY_health_check_failure_threshold": "3",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        config = self.out / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{self.port}", self.head_id, self.nodes_root)))
        command = [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--autoscaling-config={config}",
            "--include-dashboard=true",
            f"--dashboard-port={self.dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
            f"--temp-dir={self.nodes_root / 'head'}",
        ]
        log = open(self.out / "head.log", "w")  # noqa: SIM115 - open for the head's lifetime
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_dashboard(self.address, self.process, 120)
        except RuntimeError as error:
            raise RuntimeError(f"{error}: {(self.out / 'head.log').read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.nodes_root, ignore_errors=True)

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, workdir: Path, *command: str, wait: bool = True) -> tuple[str, str]:
        """Submit `command` as a job with `workdir` uploaded; (job id, its logs) once it ends, or
        (job id, "") at once with wait=False. A failed job raises with its logs."""
        flags = [] if wait else ["--no-wait"]
        where = ("--address", self.address, "--working-dir", str(workdir))
        done = self.ray("job", "submit", *where, *flags, "--", *in_upload(command))
        found = re.search(r"raysubmit_\w+", done.stdout + done.stderr)
        if found is None:
            raise RuntimeError(f"{' '.join(command)}: not submitted: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        job = found.group(0)
        return job, (self.finished(job, " ".join(command)) if wait else "")

    def finished(self, job: str, what: str) -> str:
        """The logs of `job` once it ends; RuntimeError with its logs if it did not succeed."""
        self.ray("job", "logs", "--address", self.address, "--follow", job)  # returns when the job ends
        logs = self.ray("job", "logs", "--address", self.address, job).stdout
        status = self.ray("job", "status", "--address", self.address, job)
        if "succeeded" not in (status.stdout + status.stderr).lower():
            raise RuntimeError(f"{what}: the job failed:\n{logs[-4000:]}")
        return logs

    def node_dirs(self) -> list[str]:
        """The Ray directory of each alive worker node (its raylet's socket lies under it)."""
        return sorted(
            str(Path(n["RayletSocketName"]).relative_to(self.nodes_root).parts[0])
            for n in self.workers()
            if Path(n["RayletSocketName"]).is_relative_to(self.nodes_root)
        )

    def workers(self) -> list[dict]:
        """The alive nodes other than the head, with their resources."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def kill_node_holding(class_name: str) -> dict:
    """SIGKILL the raylet of a worker node that holds an alive actor of `class_name` (its workers die
    with it, as when a machine goes): how many such actors there were, on how many nodes, and how
    many the killed node held."""
    import signal

    import ray
    from ray.util.state import list_actors

    actors = [
        a
        for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        if class_name in (a.class_name or "")
    ]
    if not actors:
        raise RuntimeError(f"no alive {class_name} actor to kill the node of")
    node_id = actors[0].node_id
    socket = next(n["RayletSocketName"] for n in ray.nodes() if n["NodeID"] == node_id)
    raylets = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if proc.name.isdigit() and words[0].endswith("raylet") and any(socket in word for word in words):
            raylets.append(int(proc.name))
    if len(raylets) != 1:
        raise RuntimeError(f"found {len(raylets)} raylets for the node of socket {socket}")
    os.kill(raylets[0], signal.SIGKILL)
    held = [a for a in actors if a.node_id == node_id]
    return {"actors": len(actors), "on_nodes": len({a.node_id for a in actors}), "on_killed_node": len(held)}


def in_upload(command: tuple[str, ...]) -> list[str]:
    """`command` with "@/x" standing for the uploaded copy's x: a job runs in its upload, so x."""
    return [word[2:] if word.startswith("@/") else word for word in command]


def project_copy(out: Path) -> Path:
    """The tree `ray job submit --working-dir .` would upload, copied apart (Ray's own walk and
    .rayignore rules), so that the jobs run ferray from the upload, not from the installed package."""
    from ray._private.runtime_env.packaging import _dir_travel

    target = out / "project"

    def copy(path: Path) -> None:
        if path.is_file():
            dest = target / path.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)

    _dir_travel(REPO, [], copy, include_gitignore=True)
    return target


def wait_for(what: str, ready, timeout: float) -> float:
    """Poll `ready()` until true; the seconds it took, or RuntimeError naming `what`."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic() - t0


def request_over_http(port: int) -> dict:
    """/readyz until ready, then one /predict/pixels of a gray face."""
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    wait_for("the served bundle's /readyz", ready, 300)
    body = json.dumps({"pixels": [128] * 48 * 48}).encode()  # one face, a FER2013 pixel row
    request = urllib.request.Request(
        f"{url}/predict/pixels", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def train_losing_a_node(cluster: FakeCluster, workdir: Path, data: str, runs: str) -> dict:
    """Train on 2 workers that the autoscaler puts on 2 new nodes; once the first epoch's checkpoint
    is in the shared root, a node holding a worker is killed: the run must restart its workers (on a
    node the autoscaler starts in its place) from that checkpoint and finish every epoch once."""
    command = ("ferray", "train", "@/experiments/debug_a.yaml", "--data", data, "--out", runs, "--workers", "2")
    command += ("--epochs", "3", "--set", "scaling.cpus_per_worker=2", "--set", "train.batch_size=32")
    command += ("--set", "scaling.max_failures=2")
    run_dir = Path(runs) / "debug_a"
    t0 = time.monotonic()
    job, _ = cluster.submit(workdir, *command, wait=False)
    wait_for("the first epoch's checkpoint", lambda: checkpoints_written(run_dir) >= 1, 600)
    facts = {"killed_after_epochs": checkpoints_written(run_dir), "nodes_before_the_kill": len(cluster.workers())}
    facts["node_dirs"] = cluster.node_dirs()
    facts["kill"] = kill_node_holding("RayTrainWorker")
    logs = cluster.finished(job, "train")
    result = json.loads((run_dir / "result.json").read_text())
    logged = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = re.findall(r"resumed from the checkpoint of epoch (\d+)", logs)
    return facts | {
        "seconds": round(time.monotonic() - t0, 1),
        "epochs": result["epochs"],
        "workers": result["workers"],
        "logged": logged,
        "resumed_from": [int(e) for e in resumed],
    }


def run(out: Path, quick: bool = False) -> dict:
    import ray

    from ferray.data.synth import SynthSpec, synthesize

    out.mkdir(parents=True, exist_ok=True)
    shared = out / "shared"  # the cluster's shared root (/mnt/ferray on cluster.yaml's nodes)
    synthesize(shared / "csv", SynthSpec(n=420, seed=3), fmt="csv")
    workdir = project_copy(out)
    cluster = FakeCluster(out)
    cluster.start()
    facts: dict = {"stages": {}}
    try:
        ray.init(address=f"127.0.0.1:{cluster.port}", logging_level="ERROR")
        facts["workers_at_start"] = len(cluster.workers())
        data, runs = str(shared / "data"), str(shared / "runs")

        def stage(name: str, *command: str) -> str:
            t0 = time.monotonic()
            _, logs = cluster.submit(workdir, *command)
            facts["stages"][name] = {"seconds": round(time.monotonic() - t0, 1), "workers": len(cluster.workers())}
            return logs

        logs = stage("prepare", "ferray", "prepare", "--source", str(shared / "csv" / "fer2013.csv"), "--out", data)
        facts["uses_the_cluster"] = "ferray: using the Ray cluster at" in logs
        if quick:  # prepare alone, then the idle nodes going (for working on this script)
            facts["idle_seconds"] = round(
                wait_for("the worker nodes to go when idle", lambda: not cluster.workers(), 300)
            )
            return facts
        facts["train"] = train_losing_a_node(cluster, workdir, data, runs)
        facts["stages"]["train"] = {"seconds": facts["train"]["seconds"], "workers": len(cluster.workers())}
        stage(
            "tune",
            *("ferray", "tune", "@/experiments/debug_tune.yaml", "--data", data, "--out", runs, "--samples", "2"),
            *("--set", "train.epochs=1"),
        )
        logs = stage(
            "upscale",
            *("ferray", "sr", "upscale", "--method", "bicubic", "--data", data, "--out", str(shared / "data_x2")),
            *("--actors", "1", "--gpus-per-actor", "1"),
        )
        # the autoscaler's own events in the job's log (the node may be gone, idle, by the time the job's
        # end is seen here)
        facts["gpu_nodes_added"] = len(re.findall(r"Adding 1 node\(s\) of type gpu_worker", logs))
        bundle = str(shared / "bundle")
        stage(
            "ensemble",
            *("ferray", "ensemble", "--member", f"a={shared / 'runs' / 'debug_a' / 'best.pt'}"),
            *("--data", data, "--out", bundle, "--no-tta"),
        )
        # the fake nodes share this machine's address, so one proxy (on the head) takes the port; on a
        # real cluster each node has its own address and serve/config.yaml's EveryNode holds
        config = shared / "serve.yaml"
        every_node = (REPO / "serve" / "config.yaml").read_text()
        config.write_text(every_node.replace("proxy_location: EveryNode", "proxy_location: HeadOnly"))
        port = free_port()
        serving = ("ferray", "serve", "--bundle", bundle, "--port", str(port), "--config", str(config))
        job, _ = cluster.submit(workdir, *serving, wait=False)
        t0 = time.monotonic()
        facts["answer"] = request_over_http(port)
        facts["stages"]["serve"] = {"seconds": round(time.monotonic() - t0, 1), "workers": len(cluster.workers())}
        cluster.ray("job", "stop", "--address", cluster.address, job)
        facts["idle_seconds"] = round(wait_for("the worker nodes to go when idle", lambda: not cluster.workers(), 300))
    finally:
        ray.shutdown()
        cluster.stop()
    return facts


if __name__ == "__main__":
    import signal

    # a timeout's SIGTERM unwinds through run()'s `finally`, which stops the head and its nodes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("RESULT " + json.dumps(run(Path(sys.argv[1]), quick="--quick" in sys.argv)), flush=True)
