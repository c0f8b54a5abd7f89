"""Starting and stopping the Serve application of serve/ (used by `ferray serve`, the demo, tests, benches).

The application itself (deployments, routes) lives in serve/app.py; its settings in serve/config.yaml.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import yaml

APP_NAME = "ferray"
_started_ray = False  # set by start(): whether stop() owns Ray (embedded) or only the application


def app_args(bundle: str | Path | None, config: str | Path | None = None, overrides: list[str] = ()) -> tuple[dict, dict]:
    """(application args, http_options) of a Serve config, with the bundle and `key=value` overrides applied."""
    from ferray.config import ConfigError
    from serve.settings import CONFIG_FILE, load_config, parse_settings

    from ferray.ensemble import resolve_bundle

    document = load_config(config or CONFIG_FILE)
    args = copy.deepcopy(document["applications"][0].get("args") or {})
    args["bundle"] = str(resolve_bundle(bundle if bundle is not None else args.get("bundle")).absolute())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model_a.max_batch_size=1")
        node = args
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    parse_settings(args)  # every mistake reported here, before Serve starts anything
    return args, dict(document.get("http_options") or {})


def start(bundle: str | Path, port: int = 8000, host: str = "127.0.0.1", config: str | Path | None = None,
          overrides: list[str] = (), wait_s: float = 180.0, access_log: bool = False) -> str:
    """Deploy the application on the connected Ray (embedded if none) and wait until it answers; its URL.
    Replicas log warnings only, plus one line per request with `access_log` (or FERRAY_VERBOSE=1)."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from ferray.runtime import is_verbose

    from ferray.runtime import connect
    from serve.app import build

    global _started_ray
    args, http = app_args(bundle, config, overrides)
    _started_ray = connect().mode == "embedded"
    http.update({"host": host, "port": port})
    verbose = access_log or is_verbose()
    logging_config = LoggingConfig(log_level="INFO" if verbose else "WARNING", enable_access_log=verbose)
    # the controller's and proxies' INFO lines (replica bookkeeping) only with FERRAY_VERBOSE=1
    serve.start(http_options=http, logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"))
    serve.run(build(args), name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_healthy(url, wait_s)
    return url


def wait_healthy(url: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {wait_s:.0f} s")
        time.sleep(0.5)


def stop() -> None:
    """Shut Serve and the Ray this process started down; on a cluster, delete only this application."""
    import ray
    from ray import serve

    if _started_ray:
        serve.shutdown()
        ray.shutdown()
    elif ray.is_initialized():
        serve.delete(APP_NAME)


def serve_forever(bundle, port: int = 8000, host: str = "127.0.0.1", config=None, overrides: list[str] = (),
                  echo: Callable[[str], None] = print) -> None:
    """`ferray serve`: start, print the URL, block until Ctrl-C or SIGTERM, then shut everything down."""
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        echo(f"serve: starting {bundle} (replicas load the models; this takes a few seconds) ...")
        url = start(bundle, port, host, config, overrides, access_log=True)
        # again after ray.init, which installs its own crash reporter for SIGTERM: ours must be the last word
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        echo(f"serve: ready at {url}  (web page {url}/, API docs {url}/docs); Ctrl-C to stop")
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        echo("serve: shutting down ...")
        stop()
        signal.signal(signal.SIGTERM, previous)
        echo("serve: stopped")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict]:
    """(status, JSON) of a POST; 4xx/5xx answers are returned, not raised."""
    import json
    import urllib.error

    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def png_bytes(gray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_requests(bundle, data, faces: int = 4, echo: Callable[[str], None] = print) -> dict:
    """The demo's last step: serve the bundle, POST a few PublicTest faces as PNGs and as a pixel row,
    print the answers, shut Serve down."""
    import json

    from ray import serve

    from ferray.data.contract import EMOTIONS, load_split

    images, labels, _ = load_split(data, "PublicTest")
    url = start(bundle, port=free_port())
    echo(f"serve: {url} is up; POST {url}/predict with {faces} PublicTest faces")
    answers = []
    try:
        for index in range(faces):
            status, answer = post(f"{url}/predict", png_bytes(images[index]), "image/png")
            face = answer["faces"][0]
            echo(f"  face {index}: HTTP {status}, true {EMOTIONS[labels[index]]:<8} predicted {face['label']:<8}"
                 f" p={face['probs'][face['label']]:.2f}")
            answers.append(answer)
        row = json.dumps({"pixels": images[0].reshape(-1).tolist()}).encode()
        status, answer = post(f"{url}/predict/pixels", row, "application/json")
        echo(f"  POST /predict/pixels (face 0 as a FER2013 row): HTTP {status}, {answer['faces'][0]['label']}")
    finally:
        serve.shutdown()
    return {"url": url, "answers": answers}
