"""Good clients beside hostile ones: does the served ensemble keep answering?

    python -m bench.serve_hostile [--bundle BUNDLE] [--clients 8] [--seconds 15] [--attackers 16]

One `ferray serve`-style app (the fused layout in Serve's high-throughput mode) on 127.0.0.1. Good
clients POST 48x48 face PNGs to /predict, first alone (quiet), then beside each attack in turn:
  slow uploads    attackers declare a 1 MB body and send a byte a second (the body deadline: 408)
  decode-heavy    attackers send 24-megapixel photos to /predict with face detection on
  large bodies    attackers send 9 MB bodies at once that are no image (refused at their first bytes: 415)
  readiness       attackers poll GET /readyz as fast as they can
The attackers run in a process of their own at the lowest CPU priority (Linux's SCHED_IDLE, else
nice 19; --attackers-share-cpu: at normal priority), as if on other machines; each phase prints the
CPU seconds they spent. They connect from an address of their own (--attacker-address, 127.0.0.2:
one hostile client with many connections), as a client on another machine would, so the server's
limits per client address (ferray serve --client-requests-per-s, --client-upload-mb-per-s) apply to
them and not to the good clients; --no-client-limits measures the server without those limits.
For each it prints the good clients' requests/s as a ratio to the quiet run, their p99 latency and
their statuses, and how every attacker request was answered (status, and whether its body was JSON).
Targets: good clients keep >= 70% of their quiet throughput and a p99 under 2 s under every attack,
nothing is lost or answered 500, and every refused attacker request got a JSON status.

Without --bundle an untrained bundle of the real Model A and a ResNet18 Model B on SR faces is
written first (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.loadgen import HEADER, face_bodies, format_row, run_load, speed_bundle

MIN_RATIO, MAX_P99_S = 0.7, 2.0


def big_photo(width: int = 6000, height: int = 4000) -> bytes:
    """A 24-megapixel JPEG (smooth, so its bytes stay small; decoding and searching it are the cost)."""
    import numpy as np
    from PIL import Image

    ramp = np.add.outer(np.linspace(30, 120, height), np.linspace(0, 100, width)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


class Attack:
    """`attackers` threads running attacks()[name] in a loop until stopped, in a process of their
    own (in the good clients' process they would take its interpreter lock, and the good clients
    would be measured slow for the bench's sake, not the server's); each returns a status and
    whether the answer's body was JSON. `answers` counts them once the attack is over."""

    def __init__(self, url: str, attackers: int, name: str, share_cpu: bool = False, source: str = ""):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.stop, self.results = context.Event(), context.Queue()
        self.process = context.Process(
            target=attack_process, args=(url, attackers, name, self.stop, self.results, share_cpu, source)
        )
        self.answers: Counter = Counter()
        self.cpu_s = 0.0  # the attacking process's CPU seconds

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        answers, self.cpu_s = self.results.get(timeout=180)
        self.answers = Counter(dict(answers))
        self.process.join(timeout=30)


def attack_process(
    url: str, attackers: int, name: str, stop, results, share_cpu: bool = False, source: str = ""
) -> None:
    """The attacking process: its threads until `stop`, then the answers' counts (and the CPU seconds
    the attack cost its senders) into `results`. At the lowest priority unless `share_cpu`: a real
    attacker runs on machines of its own, and on the bench's two cores an attacker's own CPU (a
    Python client sending a thousand requests a second takes most of a core) would be counted as
    the server's weakness."""
    import resource

    from ferray.serve_app.intake import background_thread

    if not share_cpu:  # SCHED_IDLE: only when no other process wants the CPU (nice 19 still takes a share)
        background_thread()  # before the attacking threads start: they inherit it
    parts, one = urlsplit(url), attacks()[name]
    where = Target(parts.hostname, parts.port, source)
    answers, lock = Counter(), threading.Lock()

    def loop() -> None:
        while not stop.is_set():
            try:
                status, is_json = one(where)
            except (OSError, http.client.HTTPException):
                status, is_json = 0, False
                time.sleep(0.05)
            with lock:
                answers[(status, is_json)] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(attackers)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(timeout=150)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.put((list(answers.items()), usage.ru_utime + usage.ru_stime))


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    source: str = ""  # the address to connect from ("": the system's choice)

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(
            self.host, self.port, timeout=timeout, source_address=(self.source, 0) if self.source else None
        )


def answer_of(connection: http.client.HTTPConnection) -> tuple[int, bool]:
    response = connection.getresponse()
    body = response.read()
    try:
        json.loads(body)
        return response.status, True
    except ValueError:
        return response.status, False


def slow_upload(where) -> tuple[int, bool]:
    """Declare 1 MB, then send a byte a second until the server answers (or two minutes pass)."""
    import select

    connection = where.connect(120)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(1 << 20))
    connection.endheaders()
    try:
        connection.send(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR")  # it starts like an image, then dawdles
        for _ in range(120):
            if select.select([connection.sock], [], [], 1.0)[0]:  # the server has answered
                break
            connection.send(b"\0")
    except OSError:
        pass
    try:
        return answer_of(connection)
    finally:
        connection.close()


def posting(path: str, body: bytes, content_type: str):
    def one(where) -> tuple[int, bool]:
        connection = where.connect(120)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            return answer_of(connection)
        finally:
            connection.close()

    return one


def polling_readiness(where) -> tuple[int, bool]:
    connection = where.connect(60)
    try:
        connection.request("GET", "/readyz")
        return answer_of(connection)
    finally:
        connection.close()


def attacks() -> dict:
    return {
        "slow uploads": slow_upload,
        "decode-heavy": posting("/predict", big_photo(), "image/jpeg"),
        "large bodies": posting("/predict", bytes(9 << 20), "image/png"),
        "readiness": polling_readiness,
    }


def good_load(url: str, bodies, args) -> dict:
    run_load(url, bodies, args.clients, 2.0)  # warm-up
    return run_load(url, bodies, args.clients, args.seconds).summary()


def run(args) -> int:
    import ray
    from ray import serve

    from ferray.distributed.client_limits import export_limits, limits_from_environment
    from ferray.distributed.serving import start
    from ferray.testing import free_port

    if args.no_client_limits:  # read when the server's Ray starts
        export_limits(0, 0)
    limits = limits_from_environment()
    print(
        f"limits per client address: {limits.requests_per_s:g} requests/s, {limits.upload_mb_per_s:g} MB/s of "
        f"uploads (0: none); attackers from {args.attacker_address or 'the same address as the good clients'}"
    )
    bundle = Path(args.bundle) if args.bundle else speed_bundle(tempfile.mkdtemp(prefix="ferray-hostile-"))
    url = start(bundle, port=free_port())
    bodies = face_bodies(32)
    failed = []
    try:
        print(HEADER)
        quiet = good_load(url, bodies, args)
        print(format_row("quiet", quiet))
        for name in attacks():
            with Attack(url, args.attackers, name, args.attackers_share_cpu, args.attacker_address) as attack:
                time.sleep(2.0)  # the attack under way before the good clients start
                good = good_load(url, bodies, args)
            ratio = good["rps"] / quiet["rps"] if quiet["rps"] else float("nan")
            bad_answers = {k: v for k, v in attack.answers.items() if k[0] != 200 and not k[1]}
            print(format_row(name, good) + f"  ratio {ratio:.2f}")
            print(
                f"    attackers: {dict(sorted(attack.answers.items()))} ((status, JSON body): count), "
                f"{attack.cpu_s:.0f} CPU s of their own"
            )
            if ratio < MIN_RATIO or good["p99"] > MAX_P99_S or good["errors"] or bad_answers:
                failed.append(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"targets: good clients >= {MIN_RATIO:.0%} of quiet throughput, p99 < {MAX_P99_S:g} s, no errors, "
        f"every refusal JSON: {'met' if not failed else 'missed under ' + ', '.join(failed)}"
    )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a bundle folder (default: an untrained bundle of the real members)")
    parser.add_argument("--clients", type=int, default=8, help="good clients")
    parser.add_argument("--seconds", type=float, default=15.0, help="of good load per phase")
    parser.add_argument("--attackers", type=int, default=16, help="hostile clients per attack")
    parser.add_argument(
        "--attackers-share-cpu",
        action="store_true",
        help="run the attackers at normal priority (default: the lowest, as if on machines of their own)",
    )
    parser.add_argument(
        "--attacker-address",
        default="127.0.0.2",
        help="the loopback address the attackers connect from ('': the good clients' own, 127.0.0.1)",
    )
    parser.add_argument("--no-client-limits", action="store_true", help="serve without the limits per client address")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
