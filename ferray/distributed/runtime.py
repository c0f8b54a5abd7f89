"""The one place where ferray connects to Ray.

Rule: if Ray is already up in this process, use it; if RAY_ADDRESS is set (by the user, or by
`ray job submit` for the job it runs), join that cluster; otherwise start an embedded Ray sized to
this machine, quietly (warnings only).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ferray.distributed import ray_internals

# Logical CPUs for the embedded Ray: at least this many, so that Data read tasks, Train workers and
# Tune trials can coexist on a 2-core laptop (they mostly wait on each other, not on the cores).
MIN_LOGICAL_CPUS = 4


# Notices Ray prints on every embedded start or Data run that a user of ferray cannot act on.
QUIET_LOGGERS = (
    "ray.data._internal.progress",  # "progress bars disabled" (we disable them off a terminal)
)
# Ray Data's own report of a failed task: ferray reports bad records itself, naming file and row,
# and re-raises anything else with its traceback.
TASK_ERROR_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data.exceptions",
)


def configure_train_env(single_machine: bool = False) -> None:
    """Settings Ray Train reads from the environment (set in the driver: Ray Train passes its
    RAY_TRAIN_* variables on to its controller and workers, on a cluster too).

    A worker's ray.train.report waits until the controller's next poll of the worker group; Ray's
    default poll of 2 s costs up to 2 s per epoch, much of a short epoch. 0.5 s polls cost little.
    On one machine (`single_machine`) there is no node to lose alone, so the preemption watcher, an
    extra actor process per run, is only a cost.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if single_machine:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data's parquet reader V2 (the 2.60 default) adds a ListFiles stage that takes seconds per
    # read of a prepared split on a small machine, several times V1's, and every Train run, upscale
    # and tune trial reads one. Ray keeps V1
    # selectable by this variable; RAY_DATA_USE_DATASOURCE_V2=1 brings V2 back.
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")


# Ray Serve's high-throughput mode, read by the Serve controller and replicas when their processes
# start (so set before a Ray of ferray's own starts; cluster.yaml exports the same on every node).
# THROUGHPUT_OPTIMIZED: gRPC between replicas and user code on the replica's own loop; HA_PROXY: an
# HAProxy process answers HTTP and forwards to the ingress replicas' own HTTP servers, instead of
# Ray's Python proxy actor. bench/serve_load.py measures each against the default mode.
# HAProxy's client timeout is Ray's hour by default: a client sending a body slowly held a connection
# that long. The ingress answers 408 after body_timeout_s (30 s, serve/settings.py); HAProxy's own
# limit matches it.
SERVE_FAST_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "30",
}


def configure_serve_env() -> None:
    """Serve's high-throughput mode for a Ray ferray starts; FERRAY_SERVE_FAST=0 keeps Ray's default
    (one Python proxy actor per node). A variable the user set wins."""
    if os.environ.get("FERRAY_SERVE_FAST", "1") == "0":
        return
    for name, value in SERVE_FAST_ENV.items():
        os.environ.setdefault(name, value)


# How long an ingress replica keeps answering once Serve stops it (an app deleted or redeployed,
# Serve shut down) in the high-throughput mode: Ray's default, 30 s, gives load balancers in front of
# a cluster's nodes time to drop it. A Ray of ferray's own has only the HAProxy beside it on the same
# machine, which retries a refused connection on another replica; 30 s there was every `serve.delete`,
# every Serve shutdown in the demo and the tests, and a "Controller failed to shut down" warning.
# Only for ferray's own Ray (a value the user set wins); cluster.yaml keeps Ray's default.
EMBEDDED_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

# Warnings Ray's own processes print about Ray's own calls, which no user can act on: Ray Train's
# DatasetManager (an actor of every Train run) sets a Ray Data option Ray has deprecated, two lines
# per run. Muted in the processes of ferray's own Ray (they inherit PYTHONWARNINGS; a literal start
# of the message, as -W takes it), unless FERRAY_VERBOSE=1.
RAY_INTERNAL_WARNINGS = ("ignore:`ExecutionOptions.exclude_resources` is deprecated",)

# HAProxy's stats and metrics listeners have fixed default ports (8404, 9101): a second Ray on the
# same machine (a second `ferray serve`, a test beside a server) would fail to start its HAProxy.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# HAProxy's files: Ray's defaults put them all in one /tmp/haproxy-serve, shared by every Serve on the
# machine (two `ferray serve` shared one admin socket, which Ray makes world-writable, and one config)
HAPROXY_FILE_VARIABLES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
OWN_ADDRESS_VARIABLES = ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")
# Run in every worker of a Ray of ferray's own: HAProxy's stats and metrics listeners on loopback,
# and /readyz answered from HAProxy's cache (ferray.distributed.ray_internals.HAPROXY_REWRITES).
HAPROXY_HOOK = "ferray.distributed.ray_internals.haproxy_config_of_ferray"


@contextmanager
def own_ray_environment():
    """Around the ray.init that starts a Ray of ferray's own: Serve's mode (configure_serve_env),
    its short ingress drain (EMBEDDED_SERVE_ENV), Ray's warnings about itself muted
    (RAY_INTERNAL_WARNINGS, added to the user's PYTHONWARNINGS), for HAProxy's side listeners ports free
    on this machine and its files in a private directory (server_directory), and the GCS's port with
    RAY_ADDRESS naming it (below). Ray's processes keep what they inherited at start; these are taken
    back from this process's environment afterwards, so that a process it starts (a `ferray serve`
    under test) picks its own. What the user set stays."""
    configure_serve_env()
    for name, value in EMBEDDED_SERVE_ENV.items():
        os.environ.setdefault(name, value)
    if not is_verbose():
        filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
        os.environ["PYTHONWARNINGS"] = ",".join(filters + [f for f in RAY_INTERNAL_WARNINGS if f not in filters])
    chosen_here = (*HAPROXY_PORT_VARIABLES, *OWN_ADDRESS_VARIABLES, *HAPROXY_FILE_VARIABLES)
    saved = {name: os.environ.get(name) for name in chosen_here}
    for name in HAPROXY_PORT_VARIABLES:
        if saved[name] is None:
            os.environ[name] = str(free_local_port())
    if all(saved[name] is None for name in HAPROXY_FILE_VARIABLES):
        private = server_directory()
        for name, file in HAPROXY_FILE_VARIABLES.items():
            os.environ[name] = str(private / file) if file else str(private)
    if saved["RAY_GCS_SERVER_PORT"] is None:
        # Ray's processes look a cluster up by address "auto" (Train's placement-group cleaner does,
        # through the state API): with several Rays on the machine that finds the newest, and a
        # second Ray started beside a training run (a `ferray serve`, a test) made the run's cleaner
        # judge its controller gone and remove the run's placement group. So the GCS gets a port
        # chosen here, and every process of this Ray inherits RAY_ADDRESS naming it.
        port = free_local_port()
        os.environ["RAY_GCS_SERVER_PORT"], os.environ["RAY_ADDRESS"] = str(port), f"127.0.0.1:{port}"
    try:
        yield
    finally:
        for name, value in saved.items():  # this process and what it starts later choose afresh
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def server_directory() -> Path:
    """A directory of this process's own Ray's serving files, readable by this user only (0700):
    HAProxy's config, admin socket and server state. Removed when the process exits normally, and by a
    watchdog when it is killed (ferray.distributed.leftovers); one left when both were killed is
    found by the next `ferray serve` by the pid in its name (fs-PID-...).

    Short, in /tmp: Ray puts HAProxy's sockets one node-id folder (56 characters) further down, and
    HAProxy refuses a socket path of more than 97."""
    import atexit
    import shutil
    import tempfile

    from ferray.distributed.leftovers import FOLDER_PREFIX, start_watchdog

    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=server_base()))  # 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    start_watchdog(folder)  # clears it, and ends what runs from it, once this process ends
    return folder


def server_base() -> str:
    """Where server_directory makes its folders: the temporary directory where its name is short."""
    import tempfile

    base = tempfile.gettempdir()
    return base if len(base) <= 8 else "/tmp"


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_verbose() -> bool:
    return os.environ.get("FERRAY_VERBOSE", "") == "1"


def quiet_worker_logs() -> None:
    """In a Ray worker (Train loop, Tune trial): keep Ray Train's per-report INFO lines, and the progress
    bars of the datasets a trial builds (its DataContext is not the driver's), off the console."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    if not is_verbose():
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray_internals.quiet_train_context_logger()


@dataclass
class RayInfo:
    mode: str  # "existing" | "cluster" | "embedded"
    address: str
    cpus: float
    gpus: float


def embedded_resources() -> tuple[int, int]:
    """(logical CPUs, object-store bytes) for an embedded Ray; FERRAY_NUM_CPUS / FERRAY_OBJECT_STORE_MB override."""
    cpus = int(os.environ.get("FERRAY_NUM_CPUS", max(os.cpu_count() or 1, MIN_LOGICAL_CPUS)))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 8 << 30
    store_mb = int(os.environ.get("FERRAY_OBJECT_STORE_MB", min(2048, total // (8 << 20))))
    return cpus, store_mb << 20


def connect(quiet: bool | None = None, progress: bool | None = None) -> RayInfo:
    """Connect to (or start) Ray per the rule above, and set Data's progress display.

    progress=None shows Ray Data's progress bars only when stderr is a terminal; quiet=None means
    quiet unless FERRAY_VERBOSE=1 (then Ray's INFO logs show).
    """
    import ray

    if quiet is None:
        quiet = not is_verbose()
    embedded = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")  # a Ray of our own, on this machine
    configure_train_env(single_machine=embedded)

    level = logging.WARNING if quiet else logging.INFO
    if quiet:
        # Ray Data reads this in every process it logs from (workers inherit it at start); its
        # warnings in workers are mostly "progress bars disabled", which we do on purpose.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for name in TASK_ERROR_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if ray.is_initialized():
        mode = "existing"
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=level)
        mode = "cluster"
        print(f"ferray: using the Ray cluster at {os.environ['RAY_ADDRESS']}", file=sys.stderr, flush=True)
    else:
        cpus, store = embedded_resources()
        # The dashboard serves the State API, which Ray Train V2 polls to clean up after a run
        # (without it every run logs "State API may be temporarily unavailable" each second).
        # address="local": a new Ray of our own even when `ray start` left one running on this machine
        # (ray.init() would join that one; joining it is what RAY_ADDRESS is for)
        with own_ray_environment():
            ray.init(
                address="local",
                num_cpus=cpus,
                object_store_memory=store,
                include_dashboard=True,
                logging_level=level,
                runtime_env={"worker_process_setup_hook": HAPROXY_HOOK},
            )
        mode = "embedded"
    configure_data(quiet=quiet, progress=sys.stderr.isatty() if progress is None else progress)
    resources = ray.cluster_resources()
    return RayInfo(mode, ray.get_runtime_context().gcs_address, resources.get("CPU", 0), resources.get("GPU", 0))


def configure_data(quiet: bool, progress: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0") == "1"  # see configure_train_env
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    _poll_cluster_size_faster()


# Ray Data (2.5x-2.6x) learns the cluster's size from a non-blocking RPC that it polls once a
# second; until the first answer lands, every operator has a zero budget and runs one task at a
# time. A whole FER2013 prepare takes seconds, so that first second is a large share of it.
# Polling every 0.2 s leaves at most 0.2 s serial (a private knob: ferray.distributed.ray_internals).
LIMITS_POLL_S = 0.2


def _poll_cluster_size_faster() -> None:
    ray_internals.poll_cluster_size_every(LIMITS_POLL_S)
