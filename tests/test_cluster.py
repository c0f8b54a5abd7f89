"""Running on a real Ray cluster: cluster.yaml validated offline, jobs submitted to a local head node
through the job server, and multi-node runs that lose a node (tests/multinode.py)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import fresh_venv

from ferray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_the_autoscalers_own_validation():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema error
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}  # the head runs no work
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] == 0  # autoscaling GPUs
    assert "cpu_worker" in types
    # the cluster runs the Ray this project installs, or jobs from a laptop are refused
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert f"=={ray.__version__}" in " ".join(raw["setup_commands"])
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(Exception, match="min_workers|two"):  # the schema's own error, naming the field
        validate_config(prepare_config(broken))


def test_the_cluster_authenticates_every_call_and_opens_only_serve_to_the_world():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=/mnt/ferray/.ray/auth_token" in command
    head = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # the dashboard only through `ray dashboard`
    made = " ".join(raw["head_setup_commands"])
    assert "umask 077" in made and "secrets.token_hex" in made and "chmod 700 /mnt/ferray/.ray" in made
    opened = raw["provider"]["security_group"]["IpPermissions"]
    assert [(rule["FromPort"], rule["ToPort"], rule["IpProtocol"]) for rule in opened] == [(8000, 8000, "tcp")]
    cidrs = [r["CidrIp"] for rule in opened for r in rule["IpRanges"]]
    assert cidrs and "0.0.0.0/0" not in cidrs  # a range the user sets, never the whole internet
    assert yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["http_options"]["port"] == 8000


def test_the_shared_root_is_the_containers_and_the_object_store_fits_in_shared_memory():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    init = raw["initialization_commands"]
    mount = next(i for i, c in enumerate(init) if "mount -t nfs4" in c)
    assert any("chown 1000:100 /mnt/ferray" in c for c in init[mount + 1 :])  # after the mount, before setup
    shm = next(o for o in raw["docker"]["run_options"] if o.startswith("--shm-size="))
    shm_bytes = int(shm.split("=")[1].rstrip("g")) * 2**30
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    for command in starts:
        store = int(re.search(r"--object-store-memory=(\d+)", command).group(1))
        assert store + 2**30 <= shm_bytes  # the store in /dev/shm, with room for NCCL


def test_the_nodes_install_a_ray_that_pyproject_admits():
    """Ray refuses mixed versions: cluster.yaml's pinned Ray is one that the laptop's install allows."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_req,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    pinned = re.search(r"ray\[[a-z,]+\]==([0-9.]+)", (REPO / "cluster.yaml").read_text()).group(1)
    assert ray_req.specifier.contains(Version(pinned))


def test_serve_run_of_the_shipped_config_listens_on_loopback_only():
    """`serve run serve/config.yaml` as shipped is not open to the network until the user opens it."""
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"


def test_every_node_runs_serve_in_the_mode_ferray_serve_uses_locally():
    from ferray.distributed.runtime import SERVE_FAST_ENV

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        exported = command.split("&&")[0]
        for name, value in SERVE_FAST_ENV.items():
            assert f"{name}={value}" in exported


def test_serve_fast_mode_is_set_for_ferrays_ray_unless_turned_off(monkeypatch):
    import os

    from ferray.distributed.runtime import SERVE_FAST_ENV, configure_serve_env

    for name in SERVE_FAST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FERRAY_SERVE_FAST", "0")
    configure_serve_env()
    assert not any(name in os.environ for name in SERVE_FAST_ENV)
    monkeypatch.delenv("FERRAY_SERVE_FAST")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # what a user sets wins
    configure_serve_env()
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def uploaded(root: Path) -> set[str]:
    """The files `ray job submit --working-dir ROOT` packages, by Ray's own walk and matcher (its
    .gitignore and .rayignore rules), relative to ROOT."""
    from ray._private.runtime_env.packaging import _dir_travel

    files: set[str] = set()
    _dir_travel(root, [], lambda p: p.is_file() and files.add(str(p.relative_to(root))), include_gitignore=True)
    return files


def rsynced(root: Path, excludes: list[str]) -> set[str]:
    """The files `rsync -a --exclude P ... ROOT/ DEST/` copies (the cluster's file_mounts), for the
    pattern forms cluster.yaml uses: "/x" matches x at the transfer's root only, "**/x" a path whose
    last component is x at any depth, and an excluded folder takes everything under it."""

    def excluded(parts: tuple[str, ...]) -> bool:
        for pattern in excludes:
            if pattern.startswith("/") and len(parts) == 1 and parts[0] == pattern[1:]:
                return True
            if pattern.startswith("**/") and parts[-1] == pattern[3:]:
                return True
        return False

    kept = set()
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if path.is_file() and not any(excluded(parts[: i + 1]) for i in range(len(parts))):
            kept.add("/".join(parts))
    return kept


def test_the_synced_tree_and_the_job_upload_hold_the_package_and_its_weights_but_no_data(tmp_path):
    import shutil

    root = tmp_path / "project"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info"))
    for folder in ("data/fer2013", "runs/debug_a", "ferray-demo/data"):  # what a user's checkout holds
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "x.parquet").write_bytes(b"x")
        (root / folder / "best.pt").write_bytes(b"x")
    package = {str(p.relative_to(root)) for p in (root / "ferray").rglob("*.py")}
    weights = {str(p.relative_to(root)) for p in (root / "ferray" / "bundles").rglob("*.pt")}
    assert "ferray/data/contract.py" in package and weights
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for kept in (uploaded(root), rsynced(root, raw["rsync_exclude"])):
        assert package <= kept and weights <= kept and "pyproject.toml" in kept
        assert not any(f.startswith(("data/", "runs/", "ferray-demo/")) for f in kept)


def test_requests_the_cluster_can_never_satisfy_fail_at_once(ray_session, monkeypatch, prepared_synth, tmp_path):
    from ferray.distributed.train import check_resources

    gpu = load_config(None, ["scaling.workers=2", "scaling.gpus_per_worker=1"])
    with pytest.raises(ConfigError, match="need 2 GPUs; this Ray cluster has 0 and can have at most 0"):
        check_resources(gpu)
    monkeypatch.setenv("FERRAY_MAX_GPUS", "8")  # an autoscaling cluster declares its ceiling
    check_resources(gpu)
    monkeypatch.setenv("FERRAY_MAX_GPUS", "1")
    with pytest.raises(ConfigError, match="at most 1"):
        check_resources(gpu)
    # the same mistake is the same error in every stage: the upscaling pool too
    from ferray.distributed.upscale import upscale

    monkeypatch.delenv("FERRAY_MAX_GPUS")
    with pytest.raises(ConfigError, match="2 actors x 1 GPU need 2 GPUs; this Ray cluster has 0"):
        upscale(prepared_synth, tmp_path / "never-written", "bicubic", actors=2, gpus_per_actor=1)
    assert not (tmp_path / "never-written").exists()


def test_paths_some_node_cannot_see_are_named(ray_session, tmp_path):
    from ferray.distributed.cluster import check_shared_paths, missing_on_nodes

    assert missing_on_nodes({"data": tmp_path}) == []
    with pytest.raises(ConfigError, match=r"data /nowhere/fer2013 \(.*\).*every node mounts"):
        check_shared_paths({"data": "/nowhere/fer2013"})


def test_a_node_that_leaves_before_its_path_probe_is_skipped(ray_session, tmp_path, monkeypatch):
    """An autoscaler stops idle nodes at any moment: one listed alive and gone when its probe is
    scheduled (TaskUnschedulableError in CI) holds no workers and misses nothing; the others count."""
    from ferray.distributed import cluster

    here = cluster.alive_nodes()
    gone = {"NodeID": "ab" * 28, "NodeManagerAddress": "192.0.2.9", "Alive": True}
    monkeypatch.setattr(cluster, "alive_nodes", lambda: [*here, gone])
    assert cluster.missing_on_nodes({"data": tmp_path}, timeout_s=30) == []
    assert cluster.missing_on_nodes({"data": "/nowhere/fer2013"}, timeout_s=30) == [
        f"data /nowhere/fer2013 (node {here[0]['NodeManagerAddress']})"
    ]


# ------------------------------------------------------------------------------------ a real head
def _free_port() -> int:
    from ferray.testing import free_port

    return free_port()


@pytest.fixture
def head_node(tmp_path):
    """A Ray head started with `ray start --head --block` (ports of its own, beside the test session's
    Ray), stopped at the end. Ray 2.5x clusters require a token: RAY_AUTH_MODE=token makes the head and
    the `ray job` client use the one in ~/.ray/auth_token (made on first use)."""
    port, dashboard, agent, metrics = (_free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    }  # a test head has nothing to drain
    process = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ferray.testing import wait_for_dashboard

        wait_for_dashboard(address, process, 90)
        yield address, env
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def ray_cli(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_jobs_submitted_to_a_head_node_use_the_cluster(head_node, tmp_path):
    address, env = head_node
    from ferray.data.synth import SynthSpec, synthesize

    synthesize(tmp_path / "csv", SynthSpec(n=140, seed=1), fmt="csv")
    submitted = ray_cli(
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--no-wait",
        "--",
        "ferray",
        "prepare",
        "--source",
        str(tmp_path / "csv" / "fer2013.csv"),
        "--out",
        str(tmp_path / "data"),
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    logs = ray_cli("job", "logs", "--address", address, "--follow", job, env=env)
    status = ray_cli("job", "status", "--address", address, job, env=env)
    assert "succeeded" in (status.stdout + status.stderr).lower(), logs.stdout[-3000:]
    assert "ferray: using the Ray cluster at" in logs.stdout  # not a second, embedded Ray
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["rows"] == 140

    # bad input is an early, clear failure of the job, not a hang
    bad = ray_cli(
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "ferray",
        "train",
        "experiments/debug_a.yaml",
        "--data",
        "/nowhere/fer2013",
        env=env,
    )
    assert bad.returncode != 0 and "/nowhere/fer2013" in bad.stdout + bad.stderr


# ------------------------------------------------------------------------------------ multi-node
def script_result(script: str, *args: str, timeout: float = 600) -> dict:
    """Run tests/SCRIPT ARGS in its own process (the session holds a Ray of its own) and return the
    JSON of its last "RESULT {...}" line, with its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        # the error first: a CI log keeps the start of a failure's message, and the stdout is mostly
        # the autoscaler's chatter
        said = [line for line in done.stderr.strip().splitlines() if line.strip()]
        pytest.fail(
            f"tests/{script} exit {done.returncode}: {said[-1] if said else 'nothing on stderr'}\n"
            f"--- stderr, the end ---\n{done.stderr[-4000:]}\n--- stdout, the end ---\n{done.stdout[-1500:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :]) | {"stdout": done.stdout}


def multinode(what: str, out: Path) -> dict:
    # training across nodes that loses one is tested through the cluster path's jobs, on nodes an
    # autoscaler starts (test_the_cluster_path_runs_on_an_autoscaling_cluster)
    return script_result("multinode.py", what, str(out))


# every ferray module imported, and the default bundle's weight files found, from where ferray stands
IMPORT_ALL = """
import importlib, json, pkgutil, sys
from pathlib import Path
import ferray
names = [m.name for m in pkgutil.walk_packages(ferray.__path__, "ferray.")]
for name in names:
    importlib.import_module(name)
from ferray.bundle import default_bundle_path
weights = sorted(p.name for p in Path(default_bundle_path()).glob("*.pt"))
print(json.dumps({"file": ferray.__file__, "modules": len(names), "weights": weights}))
"""


def copy_files(root: Path, files: set[str], target: Path) -> Path:
    import shutil

    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target / name)
    return target


@pytest.mark.slow
def test_the_synced_tree_installs_and_the_job_upload_imports_in_a_clean_virtualenv(tmp_path):
    """What a node gets: cluster.yaml's rsync of the checkout then its `pip install -e`; what a job
    gets: the `--working-dir .` upload first on the path. Each in a virtualenv without ferray."""
    import shutil

    root = tmp_path / "checkout"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build"))
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    synced = copy_files(root, rsynced(root, raw["rsync_exclude"]), tmp_path / "synced")
    upload = copy_files(root, uploaded(root), tmp_path / "upload")
    shipped = sorted(p.name for p in (REPO / "ferray" / "bundles" / "default").glob("*.pt"))
    venv = fresh_venv(tmp_path / "venv")
    python = str(venv / "bin" / "python")

    def imports(cwd: Path, **env: str) -> dict:
        done = subprocess.run(
            [python, "-c", IMPORT_ALL], capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    # a job's driver and workers: the upload's folder on the path (Ray puts it first), nothing installed
    found = imports(tmp_path, PYTHONPATH=str(upload))
    assert found["file"] == str(upload / "ferray" / "__init__.py") and found["weights"] == shipped
    # a node: the synced tree installed in place, as setup_commands does
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(synced)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    found = imports(tmp_path, PYTHONPATH="")
    assert found["file"] == str(synced / "ferray" / "__init__.py") and found["weights"] == shipped
    assert found["modules"] > 50


def test_processes_of_ferrays_ray_find_their_own_cluster_when_a_second_ray_starts(tmp_path):
    """A second Ray started after ferray's own (a `ferray serve` beside a training run): a process of
    the first that looks its cluster up without an address (as Train's placement-group cleaner does)
    finds its own, not the newer one; the driver's own environment is left as it was."""
    facts = script_result("two_rays.py", str(tmp_path))
    assert facts["env"] == f"127.0.0.1:{facts['own_port']}"
    assert facts["finds_itself"], facts
    assert facts["driver_env"] is None


@pytest.mark.slow
def test_upscaling_across_nodes_loses_no_row_when_a_node_dies(tmp_path):
    result = multinode("upscale", tmp_path)
    assert result["kill"]["on_killed_node"] >= 1, "no actor sat on the killed node"
    for split, counts in result["splits"].items():
        assert counts["rows"] == counts["unique"] == counts["expected"], (split, counts)


def test_a_second_ray_on_the_machine_gets_its_own_haproxy_side_ports(monkeypatch):
    """HAProxy's stats and metrics ports default to fixed numbers: each Ray ferray starts takes free
    ones, and does not hand them down to the processes it starts (they pick their own)."""
    import os

    from ferray.distributed.runtime import HAPROXY_PORT_VARIABLES, own_ray_environment

    for name in HAPROXY_PORT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with own_ray_environment():
        first = [os.environ[name] for name in HAPROXY_PORT_VARIABLES]
    assert all(name not in os.environ for name in HAPROXY_PORT_VARIABLES)
    assert len(set(first)) == 2 and "8404" not in first and "9101" not in first
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # a port the user chose stays
    with own_ray_environment():
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_each_ray_ferray_starts_keeps_haproxys_files_in_a_private_directory(monkeypatch):
    """Ray's default puts every Serve's HAProxy config and (world-writable) admin socket in one shared
    /tmp/haproxy-serve: each Ray ferray starts gets a 0700 directory of its own, not handed down."""
    import os
    import stat
    from pathlib import Path

    from ferray.distributed.runtime import HAPROXY_FILE_VARIABLES, own_ray_environment

    for name in HAPROXY_FILE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    folders = []
    for _ in range(2):
        with own_ray_environment():
            paths = {name: Path(os.environ[name]) for name in HAPROXY_FILE_VARIABLES}
        folder = paths["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
        assert all(path == folder or path.parent == folder for path in paths.values()), paths
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
        assert folder.name.startswith(f"fs-{os.getpid()}-")
        # HAProxy's limit on a socket's path, with the node-id folder (56 characters) Ray adds
        assert len(str(paths["RAY_SERVE_HAPROXY_SOCKET_PATH"])) + 57 <= 97
        folders.append(folder)
    assert folders[0] != folders[1] and not any(name in os.environ for name in HAPROXY_FILE_VARIABLES)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", "/run/mine/admin.sock")  # where the user put them
    with own_ray_environment():
        assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/run/mine/admin.sock"
        assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ


def test_ferrays_own_ray_drains_a_stopped_ingress_briefly_unless_the_user_says_otherwise(monkeypatch):
    """Ray's 30 s drain of a stopped ingress replica (for load balancers in front of a cluster) made
    every Serve shutdown on one machine take 30 s; ferray's own Ray shortens it, cluster.yaml does not."""
    import os

    from ferray.distributed.runtime import EMBEDDED_SERVE_ENV, own_ray_environment

    (name,) = EMBEDDED_SERVE_ENV
    monkeypatch.delenv(name, raising=False)
    with own_ray_environment():
        assert float(os.environ[name]) <= 5
    assert name not in (REPO / "cluster.yaml").read_text()  # a cluster keeps Ray's default
    monkeypatch.setenv(name, "12")
    with own_ray_environment():
        assert os.environ[name] == "12"


def test_ferrays_own_ray_mutes_rays_warnings_about_itself_and_keeps_the_users_filters(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    from ferray.distributed.runtime import RAY_INTERNAL_WARNINGS, own_ray_environment

    monkeypatch.delenv("FERRAY_VERBOSE", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    with own_ray_environment():
        filters = os.environ["PYTHONWARNINGS"].split(",")
    assert filters[0] == "error::UserWarning" and set(RAY_INTERNAL_WARNINGS) <= set(filters)
    # as a Ray worker started with that environment sees it: Ray Train's deprecation is gone, others stay
    script = (
        "import warnings\n"
        "warnings.warn('`ExecutionOptions.exclude_resources` is deprecated and will be removed', DeprecationWarning)\n"
        "warnings.warn('something else', FutureWarning)\n"
    )
    said = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": ",".join(filters)},
    ).stderr
    assert "exclude_resources" not in said and "something else" in said
    monkeypatch.setenv("FERRAY_VERBOSE", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "")
    with own_ray_environment():
        assert not os.environ["PYTHONWARNINGS"]  # verbose: every warning shows


def test_a_worker_whose_node_cannot_see_the_run_folder_refuses_to_write_it(tmp_path):
    """Checked on the worker too: a folder only the driver's node holds is refused, naming it."""
    from ferray.distributed.train import check_visible_here
    from ferray.runs import RunFolder

    with pytest.raises(ConfigError, match=r"run folder .*elsewhere is not on this node .*every node mounts"):
        check_visible_here(tmp_path / "elsewhere")
    RunFolder(tmp_path / "shared").start(load_config(None, []))
    check_visible_here(tmp_path / "shared")


def test_every_node_type_names_an_image_whose_driver_runs_torchs_cuda():
    # Ray's default AWS image predates the NVIDIA driver torch's CUDA build needs: GPU workers would
    # fail, or train on their CPUs without a word. Each type names its image; a GPU node checks.
    text = (REPO / "cluster.yaml").read_text()
    raw = yaml.safe_load(text)
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"]["ImageId"].startswith("ami-"), name
    assert "driver >= 580" in text and "base-oss-nvidia-driver-gpu" in text
    assert "if nvidia-smi -L > /dev/null 2>&1; then python -m ferray.device --require-gpu; fi" in raw["setup_commands"]


def test_a_gpu_torch_cannot_use_is_a_failed_setup_that_says_why(monkeypatch, capsys):
    import torch

    from ferray import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = device.gpu_problem(driver="535.104.05")
    assert "cannot use this machine's GPU: NVIDIA driver 535.104.05" in problem and torch.__version__ in problem
    monkeypatch.setattr(device, "driver_version", lambda: "535.104.05")
    assert device.main(["--require-gpu"]) == 1
    assert "NVIDIA driver 535.104.05" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.gpu_problem() is None


def test_shells_on_the_nodes_hold_the_token_and_the_serve_rule_follows_its_cidr():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    # `ray exec`, `ray attach` and `serve deploy` on the head run in the login shell: without the
    # token variables there every Ray call is refused.
    profile = next(c for c in raw["setup_commands"] if ">> ~/.bashrc" in c)
    for variable in (
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN_PATH=/mnt/ferray/.ray/auth_token",
        "TORCH_HOME=/mnt/ferray/",
    ):
        assert variable in profile
    # Ray writes rules only into a group it creates: the group's name carries the CIDR, so a new CIDR
    # is a new group with the new rule rather than an old group keeping the old one.
    group = raw["provider"]["security_group"]
    (cidr,) = [r["CidrIp"] for rule in group["IpPermissions"] for r in rule["IpRanges"]]
    assert group["GroupName"] == f"ferray-serve-{cidr}"


@pytest.mark.slow
def test_the_cluster_path_runs_on_an_autoscaling_cluster(tmp_path):
    """prepare -> train (a node killed mid-run) -> tune -> upscale -> ensemble -> serve -> HTTP through
    the Jobs API, on nodes Ray's fake provider starts for the load and stops when idle
    (tests/autoscaling.py)."""
    facts = script_result("autoscaling.py", str(tmp_path), timeout=1500)
    assert facts["workers_at_start"] == 0  # a head of 0 CPUs: every node below came for the load
    assert facts["uses_the_cluster"]
    train = facts["train"]
    assert train["nodes_before_the_kill"] >= 2 and train["workers"] == 2
    # each node's Ray directory apart (its sessions, sockets and unpacked uploads), as on machines
    assert len(set(train["node_dirs"])) == len(train["node_dirs"]) >= 2 and "head" not in train["node_dirs"]
    assert train["kill"]["on_nodes"] == 2 and train["kill"]["on_killed_node"] == 1  # one worker a node, one killed
    assert train["killed_after_epochs"] >= 1 and train["epochs"] == 3
    # restarted from the checkpoint in the shared root: no epoch lost or repeated
    assert train["logged"] == [1, 2, 3] and train["resumed_from"] and train["resumed_from"][0] >= 1
    assert facts["gpu_nodes_added"] >= 1  # the upscaling actor's GPU brought a GPU node
    (face,) = facts["answer"]["faces"]  # the served ensemble answered over HTTP
    assert max(face["probs"], key=face["probs"].get) == face["label"] and set(face["members"]) == {"a"}
    assert facts["idle_seconds"] >= 0  # every worker node went after its idle timeout (else wait_for raised)
