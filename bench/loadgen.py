"""A bounded HTTP load on 127.0.0.1 for the serving benches: N client threads, each with one
keep-alive connection, POSTing faces for T seconds; latencies and statuses are recorded per request."""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Record:
    start: float
    latency: float
    status: int  # 0: the connection failed


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, since: float = float("-inf"), until: float = float("inf")) -> dict:
        chosen = [r for r in self.records if since <= r.start < until]
        ok = np.array([r.latency for r in chosen if r.status == 200])
        refused = [r.latency for r in chosen if r.status != 200]
        span = min(until, self.seconds) - max(since, 0.0)
        return {
            "requests": len(chosen),
            "ok": int(len(ok)),
            "errors": len(chosen) - len(ok),
            # overload: how the rest were answered (0: the connection failed) and how fast
            "statuses": {str(code): n for code, n in sorted(Counter(r.status for r in chosen).items())},
            "refused_p99": float(np.percentile(refused, 99)) if refused else float("nan"),
            "rps": len(ok) / span if span > 0 else 0.0,
            **{f"p{q}": float(np.percentile(ok, q)) if len(ok) else float("nan") for q in (50, 95, 99)},
        }


def run_load(
    url: str,
    bodies: list[bytes],
    clients: int,
    seconds: float,
    path: str = "/predict",
    content_type: str = "image/png",
    on_tick=None,
) -> LoadResult:
    """`clients` threads POST `bodies` (round robin) to url+path for `seconds`; times are relative to start."""
    parts = urlsplit(url)
    result = LoadResult()
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        count = index
        while time.perf_counter() < deadline:
            body = bodies[count % len(bodies)]
            count += clients
            start = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                time.sleep(0.05)
            with lock:
                result.records.append(Record(start - t0, time.perf_counter() - start, status))
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        if on_tick is not None:
            on_tick(time.perf_counter() - t0)
        time.sleep(0.1)
    result.seconds = time.perf_counter() - t0
    return result


def face_bodies(n: int = 64, seed: int = 0) -> list[bytes]:
    """PNG bytes of synthetic 48x48 faces."""
    from ferray.data.synth import SynthSpec, generate
    from ferray.testing import png_bytes

    images = generate(SynthSpec(n=max(n, 7), seed=seed))[0]
    return [png_bytes(face) for face in images[:n]]


def format_row(name: str, s: dict) -> str:
    return (
        f"{name:<34}{s['rps']:>8.1f}{s['p50'] * 1e3:>9.0f}{s['p95'] * 1e3:>9.0f}{s['p99'] * 1e3:>9.0f}{s['errors']:>8}"
    )


HEADER = f"{'server':<34}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"


def cpu_times() -> dict[int, tuple[float, str]]:
    """Seconds of CPU (user + system) each process of this machine has used, with its command line."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/cmdline") as f:
                command = f.read().replace("\0", " ").strip()
        except OSError:  # the process ended meanwhile
            continue
        times[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, command)
    return times


def cpu_per_request(before: dict, after: dict, requests: int, top: int = 6) -> list[tuple[str, float]]:
    """The processes that spent the most CPU between two cpu_times(), in ms per answered request:
    where a server's time goes (proxy, ingress, model replicas), whatever else the machine runs."""
    spent = []
    for pid, (seconds, command) in after.items():
        delta = seconds - before.get(pid, (0.0, ""))[0]
        if delta > 0 and requests:
            spent.append((command.split(" --")[0][:48], delta * 1e3 / requests))
    return sorted(spent, key=lambda row: -row[1])[:top]


def speed_bundle(folder: str, tta: bool = False, model_b: str = "resnet18_b"):
    """An untrained bundle of the real Model A (xception_a) and `model_b` behind a 32 ch x 4 block SR
    generator, written under `folder`: serving speed does not depend on the weights."""
    from pathlib import Path

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.testing import untrained_bundle

    synthesize(Path(folder) / "data", SynthSpec(n=140, seed=0))
    return untrained_bundle(
        folder, Path(folder) / "data", tta=tta, model_a="xception_a", model_b=model_b, sr_channels=32, sr_blocks=4
    )
