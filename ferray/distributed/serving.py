"""Starting and stopping the Serve application of serve/ (used by `ferray serve`, the demo, tests, benches).

The application itself (deployments, routes) lives in serve/app.py; its settings in serve/config.yaml.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

APP_NAME = "ferray"


def app_args(
    bundle: str | Path | None, config: str | Path | None = None, overrides: list[str] = ()
) -> tuple[dict, dict]:
    """(application args, http_options) of a Serve config, with the bundle and `key=value` overrides applied."""
    from ferray.bundle import resolve_bundle
    from ferray.config import apply_overrides
    from ferray.serve_app.settings import CONFIG_FILE, load_config, parse_settings

    document = load_config(config or CONFIG_FILE)
    args = copy.deepcopy(document["applications"][0].get("args") or {})
    args["bundle"] = str(resolve_bundle(bundle if bundle is not None else args.get("bundle")).absolute())
    apply_overrides(args, list(overrides))  # the --set syntax of every ferray command
    settings = parse_settings(args)  # every mistake reported here, before Serve starts anything
    check_members(settings)
    return args, dict(document.get("http_options") or {})


def proxy_location(config: str | Path | None = None) -> str:
    """Where Serve runs its HTTP proxies, from the Serve config (EveryNode by default, as Serve's)."""
    from ferray.serve_app.settings import CONFIG_FILE, load_config

    return str(load_config(config or CONFIG_FILE).get("proxy_location") or "EveryNode")


def check_members(settings) -> None:
    """The members the settings name are a set or members of their bundle (read from its card)."""
    from ferray.bundle import answering_members, read_bundle_card
    from ferray.config import ConfigError

    try:
        answering_members(read_bundle_card(settings.bundle), settings.members)
    except ConfigError as error:
        raise ConfigError(f"args.members: {error}") from None


def start(
    bundle: str | Path,
    port: int = 8000,
    host: str = "127.0.0.1",
    config: str | Path | None = None,
    overrides: list[str] = (),
    wait_s: float = 180.0,
    access_log: bool = False,
) -> str:
    """Deploy the application on the connected Ray (embedded if none) and wait until it answers; its URL.
    Replicas log warnings only, plus one line per request with `access_log` (or FERRAY_VERBOSE=1)."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from ferray.distributed.runtime import connect, is_verbose
    from ferray.serve_app.app import build
    from ferray.serve_app.settings import parse_settings

    args, http = app_args(bundle, config, overrides)
    connect()
    check_replica_resources(parse_settings(args))
    http.update({"host": host, "port": port})
    verbose = access_log or is_verbose()
    logging_config = LoggingConfig(log_level="INFO" if verbose else "WARNING", enable_access_log=verbose)
    # the controller's and proxies' INFO lines (replica bookkeeping) only with FERRAY_VERBOSE=1
    serve.start(
        proxy_location=proxy_location(config),
        http_options=http,
        logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
    )
    serve.run(build(args), name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_ready(url, wait_s)
    return url


def check_replica_resources(settings) -> None:
    """Refuse replicas this cluster can never place (GPUs on a machine without any), instead of
    leaving Serve to wait for them forever."""
    from ferray.distributed.cluster import require

    for name in ("ensemble",) if settings.layout == "fused" else ("model_a", "model_b"):
        replica = getattr(settings, name)
        for resource, each in (("GPU", replica.num_gpus), ("CPU", replica.num_cpus)):
            if each:
                require(resource, replica.min_replicas, each, f"Serve replica(s) of {name}")


def wait_ready(url: str, wait_s: float) -> None:
    """Until /readyz answers 200: every member loaded and answering a tiny forward."""
    import json

    deadline, last = time.monotonic() + wait_s, "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503: not ready yet; the body names what is not
            try:
                last = json.dumps(json.loads(error.read()).get("members"))
            except ValueError:
                last = f"HTTP {error.code}"
        except OSError as error:
            last = str(error)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz did not say ready within {wait_s:.0f} s (last: {last})")
        time.sleep(0.5)


def stop(owns_ray: bool) -> None:
    """Shut Serve and the Ray this process started down (`owns_ray`); on a cluster, or in a Ray this
    process joined, delete only this application."""
    import ray
    from ray import serve

    if owns_ray:
        # The whole Ray goes, replicas and controller with it: Serve's own shutdown would first wait for
        # every replica to drain and the controller to stop (tens of seconds, then a warning) for a
        # cluster that is about to disappear anyway.
        ray.shutdown()
    elif ray.is_initialized():
        serve.delete(APP_NAME)


def check_port_free(host: str, port: int) -> None:
    """PortInUse (one line naming the port and, where it can be read, the process holding it) rather
    than a stack trace from deep inside Serve once Ray has started."""
    import errno
    import socket

    from ferray.distributed.leftovers import listener_of
    from ferray.errors import PortInUse

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no holder
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise PortInUse(f"cannot listen on {host}:{port} ({error.strerror})") from None
            holder = listener_of(port)
            raise PortInUse(
                f"port {port} on {host} is in use{' by ' + holder if holder else ''}; stop it or choose another --port"
            ) from None


def serve_forever(
    bundle,
    port: int = 8000,
    host: str = "127.0.0.1",
    config=None,
    overrides: list[str] = (),
) -> None:
    """`ferray serve`: start, print the URL, block until Ctrl-C or SIGTERM, then shut everything down."""
    from ferray.bundle import resolve_bundle
    from ferray.distributed.leftovers import clean_leftovers
    from ferray.distributed.runtime import connect, server_base

    for line in clean_leftovers(server_base()):  # what a killed server (and its watchdog) left
        log.info(f"serve: {line}")
    check_port_free(host, port)
    stopping, ready = threading.Event(), threading.Event()

    def on_sigterm(*_):
        stopping.set()
        if not ready.is_set():  # still starting: stop starting (the finally below shuts down what started)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    owns_ray = False
    try:
        log.info(f"serve: starting {resolve_bundle(bundle)} (replicas load the models; this takes a few seconds) ...")
        owns_ray = connect().mode == "embedded"
        # again right after ray.init, which installs a crash reporter for SIGTERM (a C stack dump on a
        # plain stop): ours must be the last word
        signal.signal(signal.SIGTERM, on_sigterm)
        url = start(bundle, port, host, config, overrides, access_log=True)
        ready.set()
        log.info(f"serve: ready at {url}  (web page {url}/, API docs {url}/docs); Ctrl-C to stop")
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        log.info("serve: shutting down ...")
        stop(owns_ray)
        signal.signal(signal.SIGTERM, previous)
        log.info("serve: stopped")
